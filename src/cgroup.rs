//! A CPU quota on one process (`phalanx launch --slow-at`): a cgroup of its own whose quota is a
//! share of one core, cgroup v1's cpu controller (`cpu.cfs_quota_us`) or v2's `cpu.max`. The
//! guard removes the cgroup when dropped, on every path (a launcher that fails half-way must
//! not leave cgroups behind): its process, if still alive, goes back to the root cgroup first.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct CpuQuota {
    dir: PathBuf,
    /// The cgroup the process goes back to (the hierarchy's root).
    root: PathBuf,
}

impl CpuQuota {
    /// Puts `pid` (all its threads) into a new cgroup limited to `pct`% of one core.
    pub fn apply(pid: u32, pct: u32) -> Result<CpuQuota> {
        let period = 100_000u64;
        let quota = period * pct as u64 / 100;
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let (root, files): (PathBuf, Vec<(&str, String)>) = if v1.join("cpu.cfs_quota_us").exists()
        {
            (
                v1.to_path_buf(),
                vec![
                    ("cpu.cfs_period_us", period.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ],
            )
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (
                PathBuf::from("/sys/fs/cgroup"),
                vec![("cpu.max", format!("{quota} {period}"))],
            )
        } else {
            anyhow::bail!(
                "no cgroup CPU controller at /sys/fs/cgroup: --slow-at needs cgroup v1's cpu or v2"
            );
        };
        let dir = root.join(format!("phalanx-slow-{pid}"));
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create {} (--slow-at needs root or a delegated cgroup)",
                dir.display()
            )
        })?;
        // From here the guard owns the directory: an error below removes it.
        let q = CpuQuota { dir, root };
        for (f, v) in files {
            std::fs::write(q.dir.join(f), &v)
                .with_context(|| format!("cannot write {v} to {}/{f}", q.dir.display()))?;
        }
        std::fs::write(q.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move pid {pid} into {}", q.dir.display()))?;
        Ok(q)
    }

    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the limit (the process stays in the cgroup).
    pub fn lift(&self) -> Result<()> {
        let (file, value) = if self.dir.join("cpu.cfs_quota_us").exists() {
            ("cpu.cfs_quota_us", "-1")
        } else {
            ("cpu.max", "max")
        };
        std::fs::write(self.dir.join(file), value)
            .with_context(|| format!("cannot write {value} to {}/{file}", self.dir.display()))
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // A cgroup can be removed only once it is empty.
        for _ in 0..50 {
            if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
                for pid in procs.split_whitespace() {
                    let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
                }
            }
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The cgroup goes with its guard even while its process still runs (as on an error path of
    // the launcher). Needs root and a cgroup CPU controller; says so when skipped.
    #[test]
    fn the_quota_cgroup_goes_with_its_guard() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let q = match CpuQuota::apply(child.id(), 25) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("skipped: {e:#}");
                return;
            }
        };
        let dir = q.dir().to_path_buf();
        assert!(dir.exists());
        q.lift().unwrap();
        drop(q);
        assert!(!dir.exists(), "{} was left behind", dir.display());
        let _ = child.kill();
        let _ = child.wait();
    }
}
