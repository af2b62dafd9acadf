//! phalanx-checkpoint: the on-disk format of models and checkpoints.
//!
//! A checkpoint is a folder holding safetensors files, JSON side files and `manifest.json`,
//! which lists every file with its size and SHA-256. It is written under a temporary name,
//! fsynced, and renamed into place, so a checkpoint is either complete and verifiable or not
//! there at all (invariant C-1 in docs/semantics.md). Loading verifies every file first.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub mod sharded;
mod tensor_file;

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{dir} does not exist; pass the folder of a saved model (a run's `model/` or `checkpoints/step-N/`)")]
    NotFound { dir: PathBuf },
    #[error("{dir} has no {MANIFEST}: it is not a phalanx checkpoint, or its write never finished; use another checkpoint")]
    NoManifest { dir: PathBuf },
    #[error("{path}: invalid manifest ({reason}); the checkpoint is corrupt, use an earlier one")]
    BadManifest { path: PathBuf, reason: String },
    #[error("{path} is missing; the checkpoint is incomplete, use an earlier one")]
    MissingFile { path: PathBuf },
    #[error("{path} is {actual} bytes but the manifest says {expected}: the file is truncated or corrupt; use an earlier checkpoint")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("{path} does not match its SHA-256 in the manifest: the file is corrupt; use an earlier checkpoint")]
    ChecksumMismatch { path: PathBuf },
    #[error("{path}: {reason}")]
    BadTensor { path: PathBuf, reason: String },
    #[error("a checkpoint part cannot be encoded: {reason}; this is a bug, please report it")]
    BadPart { reason: String },
    #[error("checkpoint format {found} is not supported (this build reads format {FORMAT}); use a matching phalanx version")]
    Format { found: u32 },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io { op, path, source }
}

/// A named f32 tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub step: u64,
    pub created_unix_ms: u64,
    pub files: Vec<FileEntry>,
    /// A sharded checkpoint's plan: which rank wrote which range of the flat state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<sharded::Shards>,
}

/// What goes into a checkpoint: tensor files and JSON side files, by file name.
#[derive(Debug, Default)]
pub struct Contents {
    pub tensors: BTreeMap<String, Vec<TensorData>>,
    pub json: BTreeMap<String, serde_json::Value>,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Tensors as a safetensors file that Hugging Face transformers loads (it requires the
/// `format: pt` metadata).
pub fn encode_for_hf(ts: &[TensorData]) -> Result<Vec<u8>, String> {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    tensor_file::encode(ts, Some(meta))
}

pub(crate) fn decode_tensors(bytes: &[u8]) -> Result<Vec<TensorData>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(format!("tensor {name} is {:?}, expected F32", view.dtype()));
        }
        // A copy, not a cast: the data need not be aligned for f32 within the file's bytes.
        let data = bytemuck::pod_collect_to_vec(view.data());
        out.push(TensorData {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

/// Writes `contents` as the checkpoint `dir`, replacing an older one of that name only once the
/// new one is complete.
fn parent_and_name(dir: &Path) -> (&Path, &str) {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("checkpoint");
    (parent, name)
}

/// The folders a save leaves beside `dir` while it works: `.NAME.tmp-PID` (the new version,
/// complete once it has a manifest) and `.NAME.old-PID` (the previous one, while the new one is
/// renamed into place).
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let (parent, name) = parent_and_name(dir);
    let (tmp, old) = (format!(".{name}.tmp-"), format!(".{name}.old-"));
    let Ok(rd) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&tmp) || n.starts_with(&old))
        })
        .collect();
    // The newest first: a complete new version wins over the old one.
    v.sort_by_key(|p| {
        let is_old = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&old));
        let t = std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (is_old, std::cmp::Reverse(t))
    });
    v
}

/// A save interrupted between its two renames leaves no `dir`, but a complete new version or
/// the previous one beside it: put the newest one that verifies back in place. Then the
/// leftovers of interrupted saves are removed (not while `dir` is missing and none verifies:
/// they are all there is).
pub fn recover(dir: &Path) -> Result<()> {
    if !dir.exists() {
        if let Some(good) = leftovers(dir).into_iter().find(|p| verify(p).is_ok()) {
            std::fs::rename(&good, dir).map_err(io("rename", &good))?;
        }
    }
    if dir.exists() {
        for p in leftovers(dir).into_iter().filter(|p| !saving_now(p)) {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
    Ok(())
}

/// A leftover whose process is another live one may be a save in progress: left alone.
fn saving_now(p: &Path) -> bool {
    let pid = p
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit('-').next())
        .and_then(|n| n.parse::<u32>().ok());
    pid.is_some_and(|pid| pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists())
}

pub fn save(dir: &Path, step: u64, contents: &Contents) -> Result<Manifest> {
    let (parent, name) = parent_and_name(dir);
    std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    recover(dir)?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io("remove", &tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io("create", &tmp))?;
    let mut files = Vec::new();
    let entry = |file: &str, (bytes, sha256): (u64, String)| FileEntry {
        name: file.to_string(),
        bytes,
        sha256,
    };
    for (file, ts) in &contents.tensors {
        let written = tensor_file::write_tensors(&tmp.join(file), ts, None);
        files.push(entry(file, written?));
    }
    for (file, v) in &contents.json {
        let bytes = serde_json::to_vec_pretty(v).expect("JSON value serializes");
        files.push(entry(
            file,
            tensor_file::write_bytes(&tmp.join(file), &bytes)?,
        ));
    }
    let manifest = Manifest {
        format: FORMAT,
        step,
        created_unix_ms: now_ms(),
        files,
        shards: None,
    };
    // The manifest is written last: a folder without one is an unfinished write.
    tensor_file::write_bytes(
        &tmp.join(MANIFEST),
        &serde_json::to_vec_pretty(&manifest).expect("manifest serializes"),
    )?;
    sync_dir(&tmp)?;
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(io("rename", dir))?;
        std::fs::rename(&tmp, dir).map_err(io("rename", &tmp))?;
        std::fs::remove_dir_all(&old).map_err(io("remove", &old))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(io("rename", &tmp))?;
    }
    sync_dir(parent)?;
    Ok(manifest)
}

/// Reads the manifest and checks every file's size and checksum. Returns the manifest and the
/// verified bytes of every file.
pub fn verify(dir: &Path) -> Result<(Manifest, BTreeMap<String, Vec<u8>>)> {
    if !dir.is_dir() {
        return Err(CheckpointError::NotFound {
            dir: dir.to_path_buf(),
        });
    }
    let mpath = dir.join(MANIFEST);
    if !mpath.is_file() {
        return Err(CheckpointError::NoManifest {
            dir: dir.to_path_buf(),
        });
    }
    let raw = std::fs::read(&mpath).map_err(io("read", &mpath))?;
    let manifest: Manifest =
        serde_json::from_slice(&raw).map_err(|e| CheckpointError::BadManifest {
            path: mpath.clone(),
            reason: e.to_string(),
        })?;
    if manifest.format != FORMAT {
        return Err(CheckpointError::Format {
            found: manifest.format,
        });
    }
    let mut out = BTreeMap::new();
    for f in &manifest.files {
        if f.name.contains('/') || f.name.contains("..") {
            return Err(CheckpointError::BadManifest {
                path: mpath.clone(),
                reason: format!("file name {:?} leaves the checkpoint folder", f.name),
            });
        }
        let path = dir.join(&f.name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::MissingFile { path })
            }
            Err(e) => return Err(io("read", &path)(e)),
        };
        if bytes.len() as u64 != f.bytes {
            return Err(CheckpointError::SizeMismatch {
                path,
                actual: bytes.len() as u64,
                expected: f.bytes,
            });
        }
        if hex(&Sha256::digest(&bytes)) != f.sha256 {
            return Err(CheckpointError::ChecksumMismatch { path });
        }
        out.insert(f.name.clone(), bytes);
    }
    Ok((manifest, out))
}

/// Verifies and loads a checkpoint (after putting back one a crash left beside it).
pub fn load(dir: &Path) -> Result<(Manifest, Contents)> {
    recover(dir)?;
    let (manifest, files) = verify(dir)?;
    let mut contents = Contents::default();
    for (name, bytes) in files {
        let path = dir.join(&name);
        if name.ends_with(".safetensors") {
            let ts = decode_tensors(&bytes)
                .map_err(|reason| CheckpointError::BadTensor { path, reason })?;
            contents.tensors.insert(name, ts);
        } else if name.ends_with(".json") {
            let v = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::BadTensor {
                path,
                reason: format!("invalid JSON: {e}"),
            })?;
            contents.json.insert(name, v);
        }
    }
    Ok((manifest, contents))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Contents {
        let mut c = Contents::default();
        c.tensors.insert(
            "model.safetensors".into(),
            vec![
                TensorData {
                    name: "a".into(),
                    shape: vec![2, 3],
                    data: (0..6).map(|i| i as f32 * 0.5).collect(),
                },
                TensorData {
                    name: "b".into(),
                    shape: vec![1],
                    data: vec![f32::MIN_POSITIVE],
                },
            ],
        );
        c.json
            .insert("model.json".into(), serde_json::json!({"n_layer": 2}));
        c
    }

    #[test]
    fn round_trip_is_exact() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("model");
        save(&dir, 7, &sample()).unwrap();
        let (m, c) = load(&dir).unwrap();
        assert_eq!(m.step, 7);
        assert_eq!(c.tensors, sample().tensors);
        assert_eq!(c.json, sample().json);
        // Saving again over it replaces it whole.
        save(&dir, 8, &sample()).unwrap();
        assert_eq!(load(&dir).unwrap().0.step, 8);
        let leftovers: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary folders left behind");
    }

    // C-1: a damaged checkpoint is refused with the file named, never loaded.
    #[test]
    fn truncated_corrupt_and_missing_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("m");
        save(&dir, 1, &sample()).unwrap();
        let f = dir.join("model.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(
            load(&dir),
            Err(CheckpointError::SizeMismatch { .. })
        ));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&f, &flipped).unwrap();
        assert!(matches!(
            load(&dir),
            Err(CheckpointError::ChecksumMismatch { .. })
        ));
        std::fs::remove_file(&f).unwrap();
        assert!(matches!(
            load(&dir),
            Err(CheckpointError::MissingFile { .. })
        ));
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        assert!(matches!(
            load(&dir),
            Err(CheckpointError::NoManifest { .. })
        ));
        assert!(matches!(
            load(&d.path().join("nope")),
            Err(CheckpointError::NotFound { .. })
        ));
    }
}

/// A save interrupted between its renames, and the leftovers of interrupted saves.
#[cfg(test)]
mod crash {
    use super::*;

    fn contents(step: u64) -> Contents {
        let mut c = Contents::default();
        c.json
            .insert("step.json".into(), serde_json::json!({ "step": step }));
        c
    }

    // The previous version renamed away, the new one complete beside it, then the crash: the
    // next load finds the new one in place.
    #[test]
    fn a_save_cut_between_its_renames_is_recovered() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("model");
        save(&dir, 1, &contents(1)).unwrap();
        let new = d.path().join(".model.tmp-999999");
        save(&new, 2, &contents(2)).unwrap();
        std::fs::rename(&dir, d.path().join(".model.old-999999")).unwrap();
        let (m, _) = load(&dir).unwrap();
        assert_eq!(m.step, 2);
        assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    }

    // Only the old version survived (the new one had no manifest yet): it is put back.
    #[test]
    fn an_unfinished_new_version_falls_back_to_the_old_one() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("model");
        save(&dir, 1, &contents(1)).unwrap();
        std::fs::rename(&dir, d.path().join(".model.old-999999")).unwrap();
        std::fs::create_dir(d.path().join(".model.tmp-999999")).unwrap();
        assert_eq!(load(&dir).unwrap().0.step, 1);
        // Leftovers of saves that died earlier go with the next save.
        std::fs::create_dir(d.path().join(".model.tmp-888888")).unwrap();
        save(&dir, 3, &contents(3)).unwrap();
        assert!(leftovers(&dir).is_empty());
    }
}

/// Fuzzing (issue "Trust and restarts", item 8): checkpoint headers from untrusted bytes are
/// errors, never panics or unbounded allocations. Fixed budgets, so the suite's time is known.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// A checkpoint folder whose manifest is right for `model.safetensors` = `bytes`, so that
    /// the tensor decoder itself sees the fuzzed bytes.
    fn folder(bytes: &[u8]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("model.safetensors"), bytes).unwrap();
        let m = Manifest {
            format: FORMAT,
            step: 1,
            created_unix_ms: 0,
            shards: None,
            files: vec![FileEntry {
                name: "model.safetensors".into(),
                bytes: bytes.len() as u64,
                sha256: hex(&Sha256::digest(bytes)),
            }],
        };
        std::fs::write(d.path().join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        d
    }

    /// A safetensors header that claims what it likes: a length prefix, then JSON.
    fn header(len: u64, json: &str, tail: &[u8]) -> Vec<u8> {
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.extend_from_slice(tail);
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_bytes_as_tensors_are_an_error_or_tensors(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_tensors(&bytes);
        }

        #[test]
        fn lying_safetensors_headers_are_errors(
            len in any::<u64>(),
            dtype in prop::sample::select(vec!["F32", "F16", "I64", "U8", "BOOL", "X"]),
            shape in proptest::collection::vec(any::<u64>(), 0..4),
            start in any::<u64>(), end in any::<u64>(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let json = format!(
                r#"{{"t":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{start},{end}]}}}}"#
            );
            let _ = decode_tensors(&header(len, &json, &tail));
            let _ = decode_tensors(&header(json.len() as u64, &json, &tail));
        }

        #[test]
        fn any_manifest_is_an_error_or_a_checkpoint(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(MANIFEST), &raw).unwrap();
            let starts_json = raw.first() == Some(&b'{');
            prop_assert!(load(d.path()).is_err() || starts_json, "{:?}", raw);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn fuzzed_tensor_files_load_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let d = folder(&bytes);
            let _ = load(d.path());
        }
    }
}
