//! Sharded checkpoints (C-5, C-6): `step-N/` holds one part per rank, each a contiguous range
//! of the flat state cut by a pure plan, so N ranks each write about 1/N. A rank writes its part
//! under a temporary name, fsyncs it and renames it into place before it reports the part
//! durable; the manifest, listing every part with its size and SHA-256, is written last, by the
//! commit, once every part of the save is durable. A folder without a manifest is a save that
//! was aborted or is still draining: never loaded.

use crate::{
    decode_tensors, io, now_ms, sync_dir, tensor_file, CheckpointError, FileEntry, Manifest,
    Result, FORMAT, MANIFEST,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
pub use tensor_file::Sealed;

/// Rank 0's side file: what the flat state is (model, tokenizer, optimizer step, layout).
pub const META: &str = "meta.json";

/// Part boundaries fall on multiples of this many values (1 KiB of f32).
pub const ALIGN: u64 = 256;

/// Who wrote which range of the flat state, recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shards {
    pub world: u32,
    pub generation: u64,
    pub job: String,
    pub config_hash: String,
    /// Values in the flat state (every tensor of a part has this range's length).
    pub total: u64,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub rank: u32,
    pub file: String,
    pub start: u64,
    pub len: u64,
}

/// The plan: the range of a flat state of `total` values that `rank` of `world` holds.
/// Contiguous, in rank order, covering everything; lengths differ by less than 2 x [`ALIGN`]
/// (a block, and the last block's missing tail).
pub fn part_range(total: u64, world: u32, rank: u32) -> Range<u64> {
    let world = u64::from(world.max(1));
    let rank = u64::from(rank).min(world - 1);
    let blocks = total.div_ceil(ALIGN);
    let (per, extra) = (blocks / world, blocks % world);
    let first = rank * per + rank.min(extra);
    let len = per + u64::from(rank < extra);
    (first * ALIGN).min(total)..((first + len) * ALIGN).min(total)
}

/// The file name of a rank's part.
pub fn part_name(rank: u32, world: u32) -> String {
    format!("part-{rank:05}-of-{world:05}.safetensors")
}

/// Writes one file of a save in progress: under a temporary name, fsynced, renamed into place,
/// the folder fsynced. The file is durable when this returns.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry> {
    write_durably(dir, name, |tmp| tensor_file::write_bytes(tmp, bytes))
}

/// Writes a rank's part: its range of every flat tensor, as safetensors, straight from the
/// host buffers the stage filled, hashed when they were sealed.
pub fn write_part(dir: &Path, name: &str, part: &Sealed) -> Result<FileEntry> {
    write_durably(dir, name, |tmp| tensor_file::write_sealed(tmp, part))
}

/// `write` fills a temporary file (durable when it returns); it is then renamed into place and
/// the folder fsynced.
fn write_durably(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> Result<(u64, String)>,
) -> Result<FileEntry> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let (bytes, sha256) = match write(&tmp) {
        Ok(w) => w,
        Err(e) => {
            // A full disk keeps nothing of a failed write: the space goes back at once.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
    sync_dir(dir)?;
    Ok(FileEntry {
        name: name.into(),
        bytes,
        sha256,
    })
}

pub fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> Result<FileEntry> {
    let bytes = serde_json::to_vec_pretty(v).expect("JSON value serializes");
    write_file(dir, name, &bytes)
}

/// The commit (C-5): the manifest, written last, makes the save a checkpoint. Every file it
/// lists must already be durable.
pub fn commit(dir: &Path, step: u64, files: Vec<FileEntry>, shards: Shards) -> Result<Manifest> {
    let manifest = Manifest {
        format: FORMAT,
        step,
        created_unix_ms: now_ms(),
        files,
        shards: Some(shards),
    };
    let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    write_file(dir, MANIFEST, &bytes)?;
    Ok(manifest)
}

fn step_of(p: &Path) -> Option<u64> {
    p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()
}

/// The `step-N` folders under `root`, newest first, and whether each is committed (has a
/// manifest; not yet verified).
pub fn saves(root: &Path) -> Vec<(u64, PathBuf, bool)> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut v: Vec<(u64, PathBuf, bool)> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .filter_map(|p| {
            let committed = p.join(MANIFEST).is_file();
            step_of(&p).map(|s| (s, p, committed))
        })
        .collect();
    v.sort_by_key(|s| std::cmp::Reverse(s.0));
    v
}

/// A committed checkpoint that verified, with its files' bytes.
pub struct Verified {
    pub step: u64,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub files: BTreeMap<String, Vec<u8>>,
}

/// The newest committed checkpoint under `root` that verifies (C-6), from before `before` if
/// given, and the newer committed ones that did not, with why.
pub fn newest_valid(
    root: &Path,
    before: Option<u64>,
) -> (Option<Verified>, Vec<(PathBuf, CheckpointError)>) {
    let mut skipped = Vec::new();
    for (step, dir, committed) in saves(root) {
        if !committed || before.is_some_and(|b| step >= b) {
            continue;
        }
        match crate::verify(&dir) {
            Ok((manifest, files)) => {
                let v = Verified {
                    step,
                    dir,
                    manifest,
                    files,
                };
                return (Some(v), skipped);
            }
            Err(e) => skipped.push((dir, e)),
        }
    }
    (None, skipped)
}

impl Verified {
    /// The flat tensor `name` put together from every part, in plan order.
    pub fn assemble(&self, name: &str) -> Result<Vec<f32>> {
        self.assemble_range(name, 0..self.total()?)
    }

    fn shards(&self) -> Result<&Shards> {
        self.manifest
            .shards
            .as_ref()
            .ok_or_else(|| self.bad("is a whole-model checkpoint, not a sharded one".into()))
    }

    pub fn total(&self) -> Result<u64> {
        Ok(self.shards()?.total)
    }

    fn bad(&self, reason: String) -> CheckpointError {
        CheckpointError::BadManifest {
            path: self.dir.join(MANIFEST),
            reason,
        }
    }

    /// The values `range` of the flat tensor `name`, read from the parts that hold them: a
    /// checkpoint written by N ranks loads at any world size (the plan is recut on load).
    pub fn assemble_range(&self, name: &str, range: Range<u64>) -> Result<Vec<f32>> {
        let shards = self.shards()?;
        let mut parts: Vec<&Part> = shards.parts.iter().collect();
        parts.sort_by_key(|p| p.start);
        let mut end = 0;
        for p in &parts {
            if p.start != end {
                return Err(self.bad(format!("parts leave a gap or overlap at value {end}")));
            }
            end = p.start + p.len;
        }
        if end != shards.total || range.end > shards.total {
            return Err(self.bad(format!(
                "parts cover {end} values of {}; the range asked ends at {}",
                shards.total, range.end
            )));
        }
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for p in parts {
            let (lo, hi) = (p.start.max(range.start), (p.start + p.len).min(range.end));
            if lo >= hi {
                continue;
            }
            let t = self.tensor_of(p, name)?;
            out.extend_from_slice(&t[(lo - p.start) as usize..(hi - p.start) as usize]);
        }
        Ok(out)
    }

    fn tensor_of(&self, p: &Part, name: &str) -> Result<Vec<f32>> {
        let path = self.dir.join(&p.file);
        let bytes = self
            .files
            .get(&p.file)
            .ok_or_else(|| self.bad(format!("part {} is not among its files", p.file)))?;
        let ts =
            decode_tensors(bytes).map_err(|reason| CheckpointError::BadTensor { path, reason })?;
        let t = ts
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| self.bad(format!("part {} has no tensor {name}", p.file)))?;
        if t.data.len() as u64 != p.len {
            return Err(self.bad(format!(
                "tensor {name} of part {} holds {} values, the plan {}",
                p.file,
                t.data.len(),
                p.len
            )));
        }
        Ok(t.data)
    }

    /// A JSON side file.
    pub fn json(&self, name: &str) -> Result<serde_json::Value> {
        let bytes = self
            .files
            .get(name)
            .ok_or_else(|| self.bad(format!("has no {name}")))?;
        serde_json::from_slice(bytes).map_err(|e| CheckpointError::BadTensor {
            path: self.dir.join(name),
            reason: format!("invalid JSON: {e}"),
        })
    }
}

/// Retention (C-7): keeps the newest `keep_last` committed checkpoints and every one whose step
/// is a multiple of `keep_every` (0: none), never the newest committed one; folders of saves
/// older than the newest commit that never committed (aborted) go too. Newer uncommitted
/// folders may still be draining and are left. Returns what it removed.
pub fn retain(root: &Path, keep_last: usize, keep_every: u64) -> Vec<PathBuf> {
    let all = saves(root);
    let Some(newest) = all.iter().find(|s| s.2).map(|s| s.0) else {
        return Vec::new();
    };
    let mut kept = 0;
    let mut removed = Vec::new();
    for (step, dir, committed) in all {
        let keep = if committed {
            kept += 1;
            step == newest || kept <= keep_last.max(1) || (keep_every > 0 && step % keep_every == 0)
        } else {
            step > newest
        };
        if !keep && std::fs::remove_dir_all(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorData;

    // C-5: the plan covers the flat state exactly, in rank order, with aligned boundaries.
    #[test]
    fn the_plan_tiles_the_state() {
        for total in [0, 1, 255, 256, 257, 10_000, 1_000_003] {
            for world in 1..=9 {
                let mut end = 0;
                for r in 0..world {
                    let p = part_range(total, world, r);
                    assert_eq!(p.start, end, "total {total} world {world} rank {r}");
                    assert!(p.start.is_multiple_of(ALIGN) || p.start == total);
                    end = p.end;
                }
                assert_eq!(end, total);
                let lens: Vec<u64> = (0..world)
                    .map(|r| part_range(total, world, r))
                    .map(|p| p.end - p.start)
                    .collect();
                let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(hi - lo < 2 * ALIGN, "{lens:?}");
            }
        }
    }

    fn save(root: &Path, step: u64, world: u32, flat: &[f32], commit_it: bool) -> PathBuf {
        let dir = root.join(format!("step-{step}"));
        let total = flat.len() as u64;
        let mut files = Vec::new();
        let mut parts = Vec::new();
        for r in 0..world {
            let range = part_range(total, world, r);
            let slice = flat[range.start as usize..range.end as usize].to_vec();
            let name = part_name(r, world);
            let t = TensorData {
                name: "params".into(),
                shape: vec![slice.len()],
                data: slice,
            };
            files.push(write_part(&dir, &name, &Sealed::seal(vec![t]).unwrap()).unwrap());
            parts.push(Part {
                rank: r,
                file: name,
                start: range.start,
                len: range.end - range.start,
            });
        }
        files.push(write_json(&dir, META, &serde_json::json!({"step": step})).unwrap());
        if commit_it {
            let shards = Shards {
                world,
                generation: 1,
                job: "j".into(),
                config_hash: "c".into(),
                total,
                parts,
            };
            commit(&dir, step, files, shards).unwrap();
        }
        dir
    }

    // C-6: written by 4 ranks, read back whole and as the ranges of 3.
    #[test]
    fn parts_of_n_load_at_any_world() {
        let d = tempfile::tempdir().unwrap();
        let flat: Vec<f32> = (0..3000).map(|i| i as f32 * 0.25).collect();
        save(d.path(), 10, 4, &flat, true);
        let (v, skipped) = newest_valid(d.path(), None);
        assert!(skipped.is_empty());
        let v = v.unwrap();
        assert_eq!(v.assemble("params").unwrap(), flat);
        let mut again = Vec::new();
        for r in 0..3 {
            let range = part_range(3000, 3, r);
            again.extend(v.assemble_range("params", range).unwrap());
        }
        assert_eq!(again, flat);
        assert_eq!(v.json(META).unwrap()["step"], 10);
    }

    // C-5, C-6: an uncommitted save is never loaded; a flipped byte in the newest committed one
    // names its part and falls back to the previous one.
    #[test]
    fn uncommitted_and_corrupt_saves_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let flat: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        save(d.path(), 10, 2, &flat, true);
        let newest = save(d.path(), 20, 2, &flat, true);
        save(d.path(), 30, 2, &flat, false);
        let part = newest.join(part_name(1, 2));
        let mut b = std::fs::read(&part).unwrap();
        let n = b.len() - 1;
        b[n] ^= 0x10;
        std::fs::write(&part, b).unwrap();
        let (v, skipped) = newest_valid(d.path(), None);
        assert_eq!(v.unwrap().step, 10);
        assert_eq!(skipped.len(), 1);
        let why = skipped[0].1.to_string();
        assert!(why.contains("part-00001-of-00002"), "{why}");
    }

    // C-7: the last K and every M-th are kept, never the newest committed; aborted saves older
    // than it go, newer uncommitted ones (maybe draining) stay.
    #[test]
    fn retention_keeps_the_last_and_every_mth() {
        let d = tempfile::tempdir().unwrap();
        let flat = vec![1.0f32; 10];
        for s in [10, 20, 30, 40, 50] {
            save(d.path(), s, 1, &flat, true);
        }
        save(d.path(), 45, 1, &flat, false);
        save(d.path(), 60, 1, &flat, false);
        retain(d.path(), 2, 20);
        let left: Vec<u64> = saves(d.path()).iter().map(|s| s.0).collect();
        assert_eq!(left, vec![60, 50, 40, 20]);
    }
}
