//! A private one-node Slurm cluster (Debian's slurmctld, slurmd and munged) in a scratch
//! directory: its own munge key and socket, its own ports, state and logs, so that it neither
//! needs nor disturbs a Slurm or munge of the machine. Dropping it cancels its jobs and stops
//! its daemons.

use super::free_port;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SlurmCluster {
    dir: PathBuf,
    conf: PathBuf,
    /// munged, slurmctld, slurmd: stopped in the reverse order.
    daemons: Vec<(&'static str, Child)>,
}

/// A job as `scontrol show job` reports it.
#[derive(Clone, Debug)]
pub struct SlurmJob {
    pub state: String,
    /// The batch script's exit code (ExitCode=CODE:SIGNAL).
    pub exit_code: i32,
    pub exit_signal: i32,
}

impl SlurmJob {
    /// It left the queue for good (not pending, running, completing or requeued).
    pub fn ended(&self) -> bool {
        [
            "COMPLETED",
            "FAILED",
            "TIMEOUT",
            "CANCELLED",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "PREEMPTED",
            "BOOT_FAIL",
            "DEADLINE",
        ]
        .contains(&self.state.as_str())
    }
}

/// A Slurm or munge daemon, found where Debian installs it even when sbin is not on PATH.
fn daemon(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run scripts/setup (it installs slurmctld, slurmd and munge)")
        })
}

fn short_hostname() -> String {
    let out = Command::new("hostname").arg("-s").output().unwrap();
    assert!(out.status.success(), "hostname -s failed");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl SlurmCluster {
    /// Starts munged, slurmctld and slurmd with their files in `dir` and returns once the node
    /// is idle; panics with the daemons' logs if it is not within a minute.
    pub fn start(dir: &Path) -> SlurmCluster {
        for sub in ["munge", "state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let munge = dir.join("munge");
        let key = munge.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").unwrap(),
            &mut bytes,
        )
        .unwrap();
        std::fs::write(&key, bytes).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let socket = munge.join("munge.socket");
        let host = short_hostname();
        let conf = dir.join("slurm.conf");
        std::fs::write(&conf, slurm_conf(dir, &host, &socket)).unwrap();
        let mut c = SlurmCluster {
            dir: dir.to_path_buf(),
            conf: conf.clone(),
            daemons: Vec::new(),
        };
        // --force: munged's checks of who may write the key's and socket's directories are for
        // a system install; these are the test's own.
        c.spawn(
            "munged",
            Command::new(daemon("munged"))
                .arg("--foreground")
                .arg("--force")
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
                .arg(format!(
                    "--seed-file={}",
                    munge.join("munged.seed").display()
                ))
                .arg(format!("--log-file={}", munge.join("munged.log").display())),
        );
        c.wait_for("the munge socket", Duration::from_secs(20), |_| {
            socket.exists()
        });
        for name in ["slurmctld", "slurmd"] {
            c.spawn(
                name,
                Command::new(daemon(name)).arg("-D").arg("-f").arg(&conf),
            );
        }
        c.wait_for(
            &format!("node {host} idle in sinfo"),
            Duration::from_secs(60),
            |c| {
                c.command("sinfo")
                    .args(["-h", "-o", "%T"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
            },
        );
        c
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let out = std::fs::File::create(self.dir.join("log").join(format!("{name}.out"))).unwrap();
        let child = cmd
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.daemons.push((name, child));
    }

    /// Polls `ready` until it holds; panics with the logs if a daemon exits or `timeout` passes.
    fn wait_for(&mut self, what: &str, timeout: Duration, ready: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if ready(self) {
                return;
            }
            for (name, child) in &mut self.daemons {
                if let Some(st) = child.try_wait().unwrap() {
                    panic!(
                        "{name} exited ({st}) before {what}:\n{}",
                        logs_in(&self.dir)
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}:\n{}",
                logs_in(&self.dir)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A Slurm client command (sbatch, squeue, scontrol ...) of this cluster. The variables of
    /// a Slurm job that the tests may run in are dropped: sbatch and srun would take them for
    /// their own options.
    pub fn command(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if ["SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_"]
                .iter()
                .any(|p| k.starts_with(p))
            {
                c.env_remove(k.as_ref());
            }
        }
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// `sbatch --parsable ARGS`; the job's id.
    pub fn sbatch<I, S>(&self, cmd: &mut Command, args: I) -> u32
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = cmd.arg("--parsable").args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "sbatch failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .trim()
            .split(';')
            .next()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("sbatch printed no job id: {stdout}"))
    }

    /// The job's state, while slurmctld still knows it (MinJobAge, 5 minutes after its end).
    pub fn job(&self, id: u32) -> Option<SlurmJob> {
        let out = self
            .command("scontrol")
            .args(["show", "job", "-o", &id.to_string()])
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .map(str::to_string)
        };
        let state = field("JobState=")?;
        let (code, sig) = field("ExitCode=")?
            .split_once(':')
            .map(|(a, b)| (a.parse().unwrap_or(-1), b.parse().unwrap_or(-1)))?;
        Some(SlurmJob {
            state,
            exit_code: code,
            exit_signal: sig,
        })
    }

    /// Polls the job until it has ended; panics with `context()` if not within `timeout`.
    pub fn wait_end(&self, id: u32, timeout: Duration, context: impl Fn() -> String) -> SlurmJob {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id);
            if let Some(j) = job.as_ref().filter(|j| j.ended()) {
                return j.clone();
            }
            assert!(
                Instant::now() < deadline,
                "job {id} has not ended within {timeout:?} ({job:?}):\n{}",
                context()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The daemons' logs, for a failure's message.
    pub fn logs(&self) -> String {
        logs_in(&self.dir)
    }
}

fn logs_in(dir: &Path) -> String {
    let mut s = String::new();
    for f in [
        "log/slurmctld.log",
        "log/slurmd.log",
        "log/munged.out",
        "log/slurmctld.out",
        "log/slurmd.out",
        "munge/munged.log",
    ] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        s += &format!("--- {f} (last 40 lines)\n{tail}\n");
    }
    s
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        // The jobs' processes belong to slurmstepd, not to slurmd: they must go first.
        let ids = self
            .command("squeue")
            .args(["-h", "-o", "%i"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = self
                .command("scancel")
                .args(["--full", "--signal=KILL"])
                .args(&ids)
                .status();
            let _ = self.command("scancel").args(&ids).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline
                && self
                    .command("squeue")
                    .args(["-h", "-o", "%i"])
                    .output()
                    .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
            {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        while let Some((_, mut child)) = self.daemons.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One node of 8 CPUs on 127.0.0.1, whatever its cores (config_overrides): 5 tasks fit on a
/// 2-core machine. No cgroups, no accounting: nothing of the host is configured or needed.
fn slurm_conf(dir: &Path, host: &str, munge_socket: &Path) -> String {
    let d = dir.display();
    let mut ports = vec![free_port()];
    while ports.len() < 2 {
        let p = free_port();
        if p != ports[0] {
            ports.push(p);
        }
    }
    format!(
        "ClusterName=phalanxtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=30
OverTimeLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
",
        ctld_port = ports[0],
        d_port = ports[1],
        socket = munge_socket.display(),
    )
}
