//! The launch's coordinator: on a thread of the launcher, or, when the fault plan kills it, as
//! a `phalanx coordinator` process of its own on a fixed address, so that a real SIGKILL ends
//! it and a new process starts again from its journal on the same address (K-5).

use crate::control::{self, CoordinatorArgs};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the coordinator needs to know of the job.
pub struct CoordinatorJob<'a> {
    pub cfg: &'a crate::config::TrainConfig,
    pub config: &'a Path,
    pub overrides: &'a [String],
    pub world: usize,
    pub max_world: usize,
    pub run_dir: &'a Path,
    /// The address it serves on (loopback, or the bridge simulated hosts reach).
    pub bind_ip: String,
}

pub struct Coordinator {
    pub url: String,
    pub job_token: String,
    pub admin_token: String,
    runner: Runner,
}

enum Runner {
    Thread {
        shutdown: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<Result<()>>,
    },
    Process(CoordinatorProcess),
}

impl Coordinator {
    /// On a thread of this process, or (`as_process`) as a process of its own.
    pub fn start(j: &CoordinatorJob, as_process: bool) -> Result<Coordinator> {
        let job_token = match j.cfg.coordinator.token() {
            Some(t) => t,
            None => control::random_token()?,
        };
        let admin_token = match j.cfg.coordinator.admin_token() {
            Some(t) => t,
            None => control::random_token()?,
        };
        let listener = std::net::TcpListener::bind(format!("{}:0", j.bind_ip))?;
        let addr = listener.local_addr()?;
        let url = format!("http://{addr}");
        let runner = if as_process {
            // The process binds the address itself; freed here first.
            drop(listener);
            let p = CoordinatorProcess::new(j, addr, &job_token, &admin_token)?;
            Runner::Process(p)
        } else {
            listener.set_nonblocking(true)?;
            let mut ccfg = j.cfg.coordinator.clone();
            ccfg.token = job_token.clone();
            ccfg.admin_token = admin_token.clone();
            let opts = control::service_opts(&ccfg, &args(j))?;
            let (shutdown, thread) = serve_on_a_thread(opts, listener)?;
            Runner::Thread { shutdown, thread }
        };
        Ok(Coordinator {
            url,
            job_token,
            admin_token,
            runner,
        })
    }

    /// Operators (and `phalanx scale` / `drain` / `status`) need the address and the tokens:
    /// they go to the run directory, the tokens readable by this user only.
    pub fn write_access(&self, run_dir: &Path) -> Result<()> {
        std::fs::write(run_dir.join("coordinator.url"), format!("{}\n", self.url))?;
        control::write_secret(&run_dir.join("job-token"), &self.job_token)?;
        control::write_secret(&run_dir.join("admin-token"), &self.admin_token)?;
        Ok(())
    }

    /// The coordinator's process, when it runs as one.
    pub fn process(&mut self) -> Option<&mut CoordinatorProcess> {
        match &mut self.runner {
            Runner::Process(p) => Some(p),
            Runner::Thread { .. } => None,
        }
    }

    pub fn stop(self) {
        match self.runner {
            Runner::Thread { shutdown, thread } => {
                let _ = shutdown.send(());
                let _ = thread.join();
            }
            Runner::Process(p) => p.stop(),
        }
    }
}

fn args(j: &CoordinatorJob) -> CoordinatorArgs {
    CoordinatorArgs {
        bind: None,
        world: j.world,
        max_world: j.max_world,
        run_dir: j.run_dir.to_path_buf(),
        insecure: false,
        config_hash: crate::worker::config_hash_of(j.cfg),
    }
}

/// `phalanx coordinator` on a fixed address, restartable.
pub struct CoordinatorProcess {
    command: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl CoordinatorProcess {
    fn new(
        j: &CoordinatorJob,
        addr: std::net::SocketAddr,
        job_token: &str,
        admin_token: &str,
    ) -> Result<Self> {
        let mut command = vec![
            "coordinator".to_string(),
            "--bind".into(),
            addr.to_string(),
            "--config".into(),
            j.config.display().to_string(),
            "--world".into(),
            j.world.to_string(),
            "--run-dir".into(),
            j.run_dir.display().to_string(),
        ];
        if let Some(h) = crate::worker::config_hash_of(j.cfg) {
            command.extend(["--config-hash".into(), h]);
        }
        command.extend(j.overrides.iter().cloned());
        let mut p = CoordinatorProcess {
            command,
            env: vec![
                ("PHALANX_JOB_TOKEN".into(), job_token.into()),
                ("PHALANX_ADMIN_TOKEN".into(), admin_token.into()),
            ],
            log: j.run_dir.join("logs").join("coordinator.log"),
            child: None,
        };
        p.start()?;
        Ok(p)
    }

    /// Starts the process and waits until it listens (its first stdout line says so).
    pub fn start(&mut self) -> Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        // A process group of its own: a Ctrl-C at the terminal is the launcher's to handle
        // (the ranks save and stop, C-8), not a reason for the coordinator to leave first.
        let mut child = Command::new(std::env::current_exe()?)
            .args(&self.command)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("cannot start the coordinator process")?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("listening on") => Ok(pid),
            _ => {
                self.kill();
                bail!(
                    "the coordinator process did not start listening within 30 s; see {}",
                    self.log.display()
                )
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) -> bool {
        match self.child.take() {
            Some(mut c) => {
                let ok = c.kill().is_ok();
                let _ = c.wait();
                ok
            }
            None => false,
        }
    }

    /// SIGTERM, then SIGKILL if it has not left within 5 s.
    fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        crate::signals::send(crate::signals::Signal::Term, &[c.id()]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A launch that ends on an error path leaves no coordinator behind.
impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// The coordinator service on a thread of its own, on `listener` (non-blocking); it stops when
/// the sender is used or dropped.
pub(crate) fn serve_on_a_thread(
    opts: phalanx_runtime::coordinator::service::ServiceOpts,
    listener: std::net::TcpListener,
) -> Result<(
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<Result<()>>,
)> {
    let (shutdown, shut_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(listener)?;
                phalanx_runtime::coordinator::service::run(opts, l, async {
                    let _ = shut_rx.await;
                })
                .await?;
                Ok(())
            })
        })?;
    Ok((shutdown, thread))
}
