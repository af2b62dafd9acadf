//! Storage faults of a launch: a byte flipped in the newest committed checkpoint, and a
//! checkpoint disk that fills up (a tmpfs mounted for the run, filled and emptied again).

use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Flips one bit in the middle of the largest part of the newest committed checkpoint; the
/// part's path, or `None` when nothing is committed yet.
pub fn corrupt_newest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let newest = phalanx_checkpoint::sharded::saves(&run_dir.join("checkpoints"))
        .into_iter()
        .find(|s| s.2);
    let Some((_, dir, _)) = newest else {
        return Ok(None);
    };
    let part = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .max_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()));
    let Some(part) = part else {
        bail!("{} is committed but holds no part", dir.display());
    };
    flip_a_bit(&part)?;
    Ok(Some(part))
}

fn flip_a_bit(file: &Path) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .with_context(|| format!("cannot open {}", file.display()))?;
    let at = f.metadata()?.len() / 2;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut b)?;
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&b)?;
    f.sync_all()?;
    Ok(())
}

/// A checkpoint disk for a model of `params` parameters that keeps `keep` checkpoints: room for
/// them, one being written and one more (parameters and two AdamW moments in f32 each), at
/// least 64 MiB. A tmpfs takes memory only for what it holds.
pub fn disk_mib_for(params: u64, keep: usize) -> u64 {
    let save = params * 12;
    ((save * (keep as u64 + 2)) >> 20).max(64)
}

/// The run's checkpoint folder on a tmpfs of its own, so that it can be filled up without
/// touching the machine's disks. When the launch ends its checkpoints are copied back to the
/// folder underneath and the tmpfs unmounted: the run directory keeps them.
pub struct CheckpointDisk {
    dir: PathBuf,
    filler: PathBuf,
    mounted: bool,
}

impl CheckpointDisk {
    /// Mounts a tmpfs of `size_mib` at `<run_dir>/checkpoints`, which must hold nothing yet.
    pub fn mount(run_dir: &Path, size_mib: u64) -> Result<Self> {
        if !crate::hosts::is_root() {
            bail!(
                "--fill-disk-at mounts a tmpfs as the checkpoint disk, which needs root; run as \
                 root or without it"
            );
        }
        let dir = run_dir.join("checkpoints");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        if std::fs::read_dir(&dir)?.next().is_some() {
            bail!(
                "--fill-disk-at needs an empty {} (a tmpfs goes over it); start a new run.dir",
                dir.display()
            );
        }
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .context("cannot run mount")?;
        if !ok.success() {
            bail!("cannot mount a tmpfs at {}", dir.display());
        }
        Ok(CheckpointDisk {
            filler: dir.join(".disk-filler"),
            dir,
            mounted: true,
        })
    }

    /// Takes every free byte of the disk with one file (allocated at once, not written: a
    /// filesystem fills in milliseconds even beside a busy job); its size.
    /// Called again, it takes what was freed since (the job's retention deletes old
    /// checkpoints; a disk filled by something else stays full while that goes on writing).
    pub fn fill(&self) -> Result<u64> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.filler)
            .with_context(|| format!("cannot open {}", self.filler.display()))?;
        let st = rustix::fs::statvfs(&self.dir)
            .with_context(|| format!("cannot read the free space of {}", self.dir.display()))?;
        if st.f_bavail == 0 {
            return Ok(f.metadata()?.len());
        }
        // The free count includes what the filesystem keeps for itself: take it in halving
        // pieces down to a page, so that not one page is left.
        let mut at = f.metadata()?.len();
        let mut piece = (st.f_bavail * st.f_frsize).max(4096);
        while piece >= 4096 {
            match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), at, piece) {
                Ok(()) => at += piece,
                Err(rustix::io::Errno::NOSPC) => piece /= 2,
                Err(e) => return Err(e).context("cannot fill the checkpoint disk"),
            }
        }
        Ok(at)
    }

    /// Removes the filler: room again.
    pub fn free(&self) -> Result<()> {
        match std::fs::remove_file(&self.filler) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("cannot remove {}", self.filler.display()))
            }
            _ => Ok(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Copies the checkpoints back under the mount point and unmounts the tmpfs.
    pub fn release(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        self.free()?;
        let keep = self.dir.with_file_name(".checkpoints-from-tmpfs");
        let _ = std::fs::remove_dir_all(&keep);
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&self.dir)
            .arg(&keep)
            .status()
            .context("cannot run cp")?;
        // Never unmount the only copy of the checkpoints.
        if !copied.success() {
            bail!(
                "cannot copy the checkpoints off the tmpfs at {}; it stays mounted: copy them \
                 and run `umount {}`",
                self.dir.display(),
                self.dir.display()
            );
        }
        let unmounted = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .context("cannot run umount")?;
        if !unmounted.success() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
        self.mounted = false;
        std::fs::remove_dir(&self.dir).ok();
        std::fs::rename(&keep, &self.dir)
            .with_context(|| format!("cannot move the checkpoints back to {}", self.dir.display()))
    }
}

impl Drop for CheckpointDisk {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(error = %e, "the checkpoint tmpfs was not released cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The tmpfs fills to ENOSPC, empties again, and its files outlive it on the disk below.
    #[test]
    fn a_filled_checkpoint_disk_keeps_its_files_when_released() {
        if !crate::hosts::is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mut disk = CheckpointDisk::mount(d.path(), 8).unwrap();
        std::fs::write(disk.dir().join("kept"), b"x").unwrap();
        let filled = disk.fill().unwrap();
        assert!(filled > 7 << 20 && filled <= 8 << 20, "{filled}");
        let fs = rustix::fs::statvfs(disk.dir()).unwrap();
        assert_eq!(fs.f_bavail, 0, "not full");
        let e = std::fs::write(disk.dir().join("more"), vec![1u8; 1 << 20]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28), "{e}");
        // Room made while full is taken again.
        std::fs::remove_file(disk.dir().join("kept")).unwrap();
        disk.fill().unwrap();
        assert_eq!(rustix::fs::statvfs(disk.dir()).unwrap().f_bavail, 0);
        std::fs::write(disk.dir().join("kept"), b"x").unwrap_err();
        disk.free().unwrap();
        std::fs::write(disk.dir().join("kept"), b"x").unwrap();
        std::fs::write(disk.dir().join("more"), vec![1u8; 1 << 20]).unwrap();
        disk.release().unwrap();
        assert_eq!(
            std::fs::read(d.path().join("checkpoints/kept")).unwrap(),
            b"x"
        );
        assert!(!d.path().join("checkpoints/.disk-filler").exists());
        drop(disk);
    }

    // The newest committed save is struck, not a newer one still being written.
    #[test]
    fn the_newest_committed_checkpoint_is_the_one_corrupted() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("checkpoints");
        for (step, committed) in [(10, true), (20, true), (30, false)] {
            let dir = root.join(format!("step-{step}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("part-00000-of-00001.safetensors"), [0u8; 8]).unwrap();
            if committed {
                std::fs::write(dir.join(phalanx_checkpoint::MANIFEST), "{}").unwrap();
            }
        }
        let part = corrupt_newest(d.path()).unwrap().unwrap();
        assert!(part.starts_with(root.join("step-20")), "{}", part.display());
        assert_eq!(std::fs::read(&part).unwrap(), [0, 0, 0, 0, 1, 0, 0, 0]);
        let untouched = root.join("step-30/part-00000-of-00001.safetensors");
        assert_eq!(std::fs::read(untouched).unwrap(), [0u8; 8]);
        assert!(corrupt_newest(&d.path().join("none")).unwrap().is_none());
    }
}
