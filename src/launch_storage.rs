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

#[cfg(test)]
mod tests {
    use super::*;

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
