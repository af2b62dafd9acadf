//! Safetensors files written as a stream from the tensors' own buffers: no encoded copy of the
//! state in memory, and the kernel's writeback started while the file grows, so that a
//! checkpoint's drain is bounded by the disk rather than by copies and one flush at the end.
//! A part's SHA-256 is computed before its write ([`Sealed`]), on the thread that staged it,
//! while the training step runs: the hash is CPU work the drain need not wait for.

use crate::{hex, io, CheckpointError, Result, TensorData};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

// Safetensors stores little-endian values: the f32 buffers are written as they lie in memory.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "phalanx checkpoints are written on little-endian machines only"
);

/// Bytes handed to the kernel at once (hashed just before, while they are in the cache).
const CHUNK: usize = 8 << 20;
/// Bytes written after which they are pushed to the disk: the flush of one stretch overlaps
/// the write of the next (and, with one writer per rank, the other ranks' writes) instead of
/// all of it waiting for the final fsync.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// Extra key-value pairs of a safetensors header (`__metadata__`).
pub type HeaderMeta = Option<HashMap<String, String>>;

/// The safetensors header of `ts` (length prefix, JSON, padding to 8 bytes); their data
/// follows it in the order given.
fn header(ts: &[TensorData], meta: HeaderMeta) -> Result<Vec<u8>, String> {
    let mut offset = 0;
    let mut infos = Vec::with_capacity(ts.len());
    for t in ts {
        let n: usize = t.shape.iter().product();
        if n != t.data.len() {
            return Err(format!(
                "tensor {}: shape {:?} holds {n} values but the data has {}",
                t.name,
                t.shape,
                t.data.len()
            ));
        }
        let info = TensorInfo {
            dtype: Dtype::F32,
            shape: t.shape.clone(),
            data_offsets: (offset, offset + 4 * n),
        };
        offset += 4 * n;
        infos.push((t.name.clone(), info));
    }
    let metadata = Metadata::new(meta, infos).map_err(|e| e.to_string())?;
    let mut json = serde_json::to_vec(&metadata).map_err(|e| e.to_string())?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend((json.len() as u64).to_le_bytes());
    out.extend(json);
    Ok(out)
}

fn data(t: &TensorData) -> &[u8] {
    bytemuck::cast_slice(&t.data)
}

/// A whole safetensors file in memory.
pub fn encode(ts: &[TensorData], meta: HeaderMeta) -> Result<Vec<u8>, String> {
    let mut out = header(ts, meta)?;
    out.reserve(ts.iter().map(|t| 4 * t.data.len()).sum());
    for t in ts {
        out.extend_from_slice(data(t));
    }
    Ok(out)
}

/// Tensors sealed for a write: their safetensors header and the size and SHA-256 of the file
/// they make, computed before the file is written.
#[derive(Debug)]
pub struct Sealed {
    tensors: Vec<TensorData>,
    head: Vec<u8>,
    bytes: u64,
    sha256: String,
}

impl Sealed {
    /// The header of `ts` and the digest of the file they make. The tensors are kept as they
    /// are: what is written later is what was hashed here.
    pub fn seal(ts: Vec<TensorData>) -> Result<Sealed> {
        let head = header(&ts, None).map_err(|reason| CheckpointError::BadPart { reason })?;
        let mut hash = Sha256::new();
        hash.update(&head);
        let mut bytes = head.len() as u64;
        for t in &ts {
            hash.update(data(t));
            bytes += data(t).len() as u64;
        }
        Ok(Sealed {
            tensors: ts,
            head,
            bytes,
            sha256: hex(&hash.finalize()),
        })
    }

    /// The tensors back (their buffers are reused by the next stage).
    pub fn into_tensors(self) -> Vec<TensorData> {
        self.tensors
    }

    /// The size and SHA-256 of the file.
    pub fn digest(&self) -> (u64, &str) {
        (self.bytes, &self.sha256)
    }
}

/// A file being written durably: hashed as it goes unless its digest is known, pushed to the
/// disk every `WRITEBACK_EVERY` bytes, fsynced by `finish`.
pub(crate) struct DurableFile {
    file: File,
    path: PathBuf,
    hash: Option<Sha256>,
    bytes: u64,
    unsynced: u64,
}

impl DurableFile {
    pub(crate) fn create(path: &Path) -> Result<DurableFile> {
        Ok(DurableFile {
            file: File::create(path).map_err(io("create", path))?,
            path: path.to_path_buf(),
            hash: Some(Sha256::new()),
            bytes: 0,
            unsynced: 0,
        })
    }

    /// A file whose digest was computed before ([`Sealed`]).
    fn create_sealed(path: &Path) -> Result<DurableFile> {
        let mut f = DurableFile::create(path)?;
        f.hash = None;
        Ok(f)
    }

    pub(crate) fn put(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let (now, rest) = bytes.split_at(bytes.len().min(CHUNK));
            if let Some(h) = &mut self.hash {
                h.update(now);
            }
            self.file.write_all(now).map_err(io("write", &self.path))?;
            self.bytes += now.len() as u64;
            self.unsynced += now.len() as u64;
            if self.unsynced >= WRITEBACK_EVERY {
                self.file.sync_data().map_err(io("fsync", &self.path))?;
                self.unsynced = 0;
            }
            bytes = rest;
        }
        Ok(())
    }

    /// Durable when this returns: the file's size, and its SHA-256 (hex) if it was hashed.
    pub(crate) fn finish(self) -> Result<(u64, Option<String>)> {
        self.file.sync_all().map_err(io("fsync", &self.path))?;
        Ok((self.bytes, self.hash.map(|h| hex(&h.finalize()))))
    }
}

/// Writes `ts` as the safetensors file `path`, durably, straight from their buffers, hashed on
/// the way; its size and SHA-256.
pub(crate) fn write_tensors(
    path: &Path,
    ts: &[TensorData],
    meta: HeaderMeta,
) -> Result<(u64, String)> {
    let head = header(ts, meta).map_err(|reason| CheckpointError::BadTensor {
        path: path.to_path_buf(),
        reason,
    })?;
    let mut f = DurableFile::create(path)?;
    f.put(&head)?;
    for t in ts {
        f.put(data(t))?;
    }
    let (n, sha) = f.finish()?;
    Ok((n, sha.expect("a file created unsealed is hashed")))
}

/// Writes sealed tensors as the safetensors file `path`, durably, straight from their
/// buffers; its size and SHA-256 (the seal's).
pub(crate) fn write_sealed(path: &Path, s: &Sealed) -> Result<(u64, String)> {
    let mut f = DurableFile::create_sealed(path)?;
    f.put(&s.head)?;
    for t in &s.tensors {
        f.put(data(t))?;
    }
    let (bytes, _) = f.finish()?;
    if bytes != s.bytes {
        return Err(CheckpointError::SizeMismatch {
            path: path.to_path_buf(),
            actual: bytes,
            expected: s.bytes,
        });
    }
    Ok((bytes, s.sha256.clone()))
}

/// Writes `bytes` as the file `path`, durably; its size and SHA-256.
pub(crate) fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(u64, String)> {
    let mut f = DurableFile::create(path)?;
    f.put(bytes)?;
    let (n, sha) = f.finish()?;
    Ok((n, sha.expect("a file created unsealed is hashed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<TensorData> {
        vec![
            TensorData {
                name: "b".into(),
                shape: vec![2, 3],
                data: (0..6).map(|i| i as f32 * 0.5 - 1.0).collect(),
            },
            TensorData {
                name: "a".into(),
                shape: vec![5],
                data: vec![f32::MIN_POSITIVE, -0.0, 1e30, 3.25, 7.0],
            },
        ]
    }

    #[test]
    fn streamed_files_are_safetensors_with_the_same_values_and_hash() {
        let d = tempfile::tempdir().unwrap();
        let ts = sample();
        let path = d.path().join("x.safetensors");
        let sealed = Sealed::seal(ts.clone()).unwrap();
        let (bytes, sha) = write_sealed(&path, &sealed).unwrap();
        assert_eq!(sealed.digest(), (bytes, sha.as_str()));
        let hashed_on_the_way = d.path().join("y.safetensors");
        assert_eq!(
            write_tensors(&hashed_on_the_way, &ts, None).unwrap(),
            (bytes, sha.clone())
        );
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len() as u64, bytes);
        assert_eq!(sha, hex(&Sha256::digest(&on_disk)));
        assert_eq!(on_disk, encode(&ts, None).unwrap());
        let mut back = crate::decode_tensors(&on_disk).unwrap();
        back.sort_by(|a, b| a.name.cmp(&b.name));
        let mut want = ts.clone();
        want.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back, want);
    }

    #[test]
    fn a_shape_that_does_not_fit_the_data_is_refused() {
        let mut ts = sample();
        ts[1].shape = vec![4];
        let e = Sealed::seal(ts).unwrap_err();
        assert!(e.to_string().contains("tensor a"), "{e}");
    }

    #[test]
    fn large_files_hash_across_chunks() {
        let d = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..(CHUNK * 2 + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let path = d.path().join("big");
        let (n, sha) = write_bytes(&path, &bytes).unwrap();
        assert_eq!(n, bytes.len() as u64);
        assert_eq!(sha, hex(&Sha256::digest(&bytes)));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }
}
