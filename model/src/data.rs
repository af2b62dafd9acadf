//! Token files written by `phalanx prepare`, memory-mapped, and the windows cut from them.

use crate::{ModelError, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};

pub const META_FILE: &str = "meta.json";
pub const TRAIN_FILE: &str = "train.bin";
pub const VAL_FILE: &str = "val.bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= u16::MAX as usize + 1 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }
    pub fn width(self) -> usize {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    pub split: String,
    pub tokens: u64,
}

/// `meta.json`: what a dataset folder holds and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetMeta {
    pub format: u32,
    pub tokenizer: String,
    pub vocab_size: usize,
    pub dtype: TokenDtype,
    /// The character vocabulary in token order (char tokenizer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<String>,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub val_fraction: f64,
    /// "whole-files" when whole files were held out, "tail-of-file" for a single input file.
    pub split: String,
    pub sources: Vec<SourceFile>,
}

/// A memory-mapped file of little-endian token ids.
pub struct TokenFile {
    map: Option<Mmap>,
    dtype: TokenDtype,
    len: usize,
}

impl TokenFile {
    pub fn open(path: &Path, dtype: TokenDtype, vocab_size: usize) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let file = File::open(path).map_err(|e| {
            ModelError::dataset(dir, format!("cannot open {}: {e}", path.display()))
        })?;
        let bytes = file
            .metadata()
            .map_err(|e| ModelError::read(path, e))?
            .len() as usize;
        if bytes % dtype.width() != 0 {
            return Err(ModelError::dataset(
                dir,
                format!(
                    "{} is {bytes} bytes, not a whole number of {}-byte tokens: it is truncated",
                    path.display(),
                    dtype.width()
                ),
            ));
        }
        let map = if bytes == 0 {
            None
        } else {
            // A mapped file that another process truncates would fault; prepare writes datasets
            // by rename, so a published file is never changed in place.
            Some(map_readonly(&file).map_err(|e| ModelError::read(path, e))?)
        };
        let tf = TokenFile {
            map,
            dtype,
            len: bytes / dtype.width(),
        };
        // A token id beyond the vocabulary would index out of the embedding table deep inside
        // libtorch; catch it here with a message that names the file.
        if let Some(bad) = tf.max_token().filter(|&m| m as usize >= vocab_size) {
            return Err(ModelError::dataset(
                dir,
                format!(
                    "{} holds token id {bad} but meta.json says vocab_size = {vocab_size}",
                    path.display()
                ),
            ));
        }
        Ok(tf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        let m = self.map.as_ref().expect("get() on an empty token file");
        match self.dtype {
            TokenDtype::U16 => u16::from_le_bytes([m[2 * i], m[2 * i + 1]]) as u32,
            TokenDtype::U32 => {
                u32::from_le_bytes([m[4 * i], m[4 * i + 1], m[4 * i + 2], m[4 * i + 3]])
            }
        }
    }

    /// Appends tokens `[start, start + n)` to `out` as i64 (what libtorch indexes with).
    pub fn extend_window(&self, start: usize, n: usize, out: &mut Vec<i64>) {
        out.extend((start..start + n).map(|i| self.get(i) as i64));
    }

    fn max_token(&self) -> Option<u32> {
        (0..self.len).map(|i| self.get(i)).max()
    }
}

// The one `unsafe` outside the data-plane module (docs/semantics.md, "Unsafe code"): no safe
// API can map a file, because the type system cannot stop another process from changing it.
#[allow(unsafe_code)]
fn map_readonly(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the mapping is read-only and the dataset files are published by rename
    // (`phalanx prepare` writes to a temporary name first), so the file behind a mapping is
    // never modified or truncated while mapped, unless a user edits it in place by hand.
    unsafe { Mmap::map(file) }
}

/// A prepared dataset: meta plus the train and val token files.
pub struct Dataset {
    pub dir: PathBuf,
    pub meta: DatasetMeta,
    pub train: TokenFile,
    pub val: TokenFile,
}

impl Dataset {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::dataset(dir, "the folder does not exist"));
        }
        let meta_path = dir.join(META_FILE);
        let raw = std::fs::read_to_string(&meta_path)
            .map_err(|e| ModelError::dataset(dir, format!("cannot read {META_FILE}: {e}")))?;
        let meta: DatasetMeta = serde_json::from_str(&raw)
            .map_err(|e| ModelError::dataset(dir, format!("{META_FILE} is invalid: {e}")))?;
        let train = TokenFile::open(&dir.join(TRAIN_FILE), meta.dtype, meta.vocab_size)?;
        let val = TokenFile::open(&dir.join(VAL_FILE), meta.dtype, meta.vocab_size)?;
        if train.is_empty() {
            return Err(ModelError::dataset(dir, "train.bin is empty"));
        }
        if train.len() as u64 != meta.train_tokens || val.len() as u64 != meta.val_tokens {
            return Err(ModelError::dataset(
                dir,
                format!(
                    "token counts differ from meta.json (train {} vs {}, val {} vs {})",
                    train.len(),
                    meta.train_tokens,
                    val.len(),
                    meta.val_tokens
                ),
            ));
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            meta,
            train,
            val,
        })
    }
}
