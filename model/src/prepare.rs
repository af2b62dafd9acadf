//! `phalanx prepare`: text files -> train.bin / val.bin / meta.json.

use crate::data::{DatasetMeta, SourceFile, TokenDtype, META_FILE, TRAIN_FILE, VAL_FILE};
use crate::tokenizer::Tokenizer;
use crate::{ModelError, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    Char,
    Gpt2,
}

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files or folders; empty means the default corpus.
    pub inputs: Vec<PathBuf>,
    pub tokenizer: TokenizerKind,
    pub out: PathBuf,
    /// Share of the text (by characters) held out for validation, as whole files.
    pub val_fraction: f64,
}

#[derive(Debug, Clone)]
pub struct PrepareReport {
    pub meta: DatasetMeta,
    pub inputs: Vec<PathBuf>,
}

/// Large files are encoded in pieces of about this many bytes, cut at blank lines, so that both
/// cores work on one big file. The cut depends only on the text, never on the number of threads,
/// so the output is the same on any machine.
const CHUNK_BYTES: usize = 1 << 20;

/// Where the default corpus (the Shakespeare plays) is looked for, in order.
pub fn default_corpus_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("PHALANX_CORPUS") {
        v.push(PathBuf::from(p));
    }
    v.push(PathBuf::from("corpus/shakespeare"));
    // The corpus ships in the repository; a binary built from it also finds it from elsewhere.
    v.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/shakespeare"));
    v
}

pub fn default_corpus() -> Result<PathBuf> {
    let c = default_corpus_candidates();
    c.iter()
        .find(|p| p.is_dir())
        .cloned()
        .ok_or_else(|| ModelError::NoDefaultCorpus {
            looked: c
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Expands folders (recursively, `.txt` files only) and keeps explicit files as given.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let before = out.len();
            walk(p, &mut out)?;
            if out.len() == before {
                return Err(ModelError::EmptyInput { path: p.clone() });
            }
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(ModelError::MissingInput { path: p.clone() });
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::read(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| ModelError::read(dir, e))?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("txt")) {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads a text file: strips a UTF-8 byte-order mark, rejects non-UTF-8, turns CRLF into LF.
pub fn read_text(path: &Path) -> Result<(String, String, u64)> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::read(path, e))?;
    let sha = hex(&Sha256::digest(&bytes));
    let n = bytes.len() as u64;
    let body = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let text = std::str::from_utf8(body).map_err(|e| ModelError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.valid_up_to() + (bytes.len() - body.len()),
    })?;
    let text = if text.contains('\r') {
        text.replace("\r\n", "\n")
    } else {
        text.to_string()
    };
    Ok((text, sha, n))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Doc {
    path: PathBuf,
    text: String,
    sha256: String,
    bytes: u64,
}

/// Splits docs into (train, val) holding out whole files: files are taken in an order fixed by
/// the hash of their names until the held-out share reaches `fraction`. With one file, its tail
/// (cut at a line break) is held out instead. Returns the split name.
fn split_docs(docs: Vec<Doc>, fraction: f64) -> (Vec<Doc>, Vec<Doc>, &'static str) {
    if docs.len() == 1 {
        let d = docs.into_iter().next().expect("one doc");
        let target = ((d.text.len() as f64) * (1.0 - fraction)) as usize;
        let mut cut = target.min(d.text.len());
        while !d.text.is_char_boundary(cut) {
            cut -= 1;
        }
        let cut = d.text[..cut].rfind('\n').map(|i| i + 1).unwrap_or(cut);
        let (a, b) = d.text.split_at(cut);
        let mk = |text: &str| Doc {
            path: d.path.clone(),
            text: text.to_string(),
            sha256: d.sha256.clone(),
            bytes: d.bytes,
        };
        return (vec![mk(a)], vec![mk(b)], "tail-of-file");
    }
    let total: usize = docs.iter().map(|d| d.text.len()).sum();
    let target = (total as f64 * fraction).ceil() as usize;
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by_key(|&i| {
        Sha256::digest(
            docs[i]
                .path
                .file_name()
                .unwrap_or_default()
                .as_encoded_bytes(),
        )
    });
    let mut is_val = vec![false; docs.len()];
    let mut held = 0;
    for &i in &order {
        // Keep at least one file for training.
        if held >= target || is_val.iter().filter(|v| !**v).count() <= 1 {
            break;
        }
        is_val[i] = true;
        held += docs[i].text.len();
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (d, v) in docs.into_iter().zip(is_val) {
        if v {
            val.push(d)
        } else {
            train.push(d)
        }
    }
    (train, val, "whole-files")
}

fn chunks(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > CHUNK_BYTES {
        let mut at = CHUNK_BYTES;
        while !rest.is_char_boundary(at) {
            at += 1;
        }
        let cut = rest[at..]
            .find("\n\n")
            .map(|i| at + i + 2)
            .unwrap_or(rest.len());
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

fn encode_docs(tok: &Tokenizer, docs: &[Doc]) -> Result<Vec<Vec<u32>>> {
    docs.par_iter()
        .map(|d| {
            let parts: Vec<Vec<u32>> = chunks(&d.text)
                .par_iter()
                .map(|c| tok.encode(c))
                .collect::<Result<_>>()?;
            Ok(parts.concat())
        })
        .collect()
}

fn write_tokens(path: &Path, docs: &[Vec<u32>], dtype: TokenDtype) -> Result<u64> {
    let n: usize = docs.iter().map(Vec::len).sum();
    let mut buf = Vec::with_capacity(n * dtype.width());
    for t in docs.iter().flatten() {
        match dtype {
            TokenDtype::U16 => buf.extend_from_slice(&(*t as u16).to_le_bytes()),
            TokenDtype::U32 => buf.extend_from_slice(&t.to_le_bytes()),
        }
    }
    atomic_write(path, &buf)?;
    Ok(n as u64)
}

/// Writes to a temporary name and renames, so a reader (or a mapping) never sees a partial file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| ModelError::write(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::write(path, e))
}

/// A dataset folder made with another tokenizer is not silently replaced: the runs and models
/// made from it would no longer match it.
fn refuse_another_tokenizer(opts: &PrepareOptions) -> Result<()> {
    let want = match opts.tokenizer {
        TokenizerKind::Char => "char",
        TokenizerKind::Gpt2 => "gpt2",
    };
    let Ok(text) = std::fs::read_to_string(opts.out.join(META_FILE)) else {
        return Ok(());
    };
    let had = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|m| m["tokenizer"].as_str().map(str::to_string));
    match had {
        Some(had) if had != want => Err(ModelError::OtherTokenizer {
            out: opts.out.clone(),
            had,
            want: want.into(),
        }),
        _ => Ok(()),
    }
}

pub fn prepare(opts: &PrepareOptions) -> Result<PrepareReport> {
    if !(opts.val_fraction > 0.0 && opts.val_fraction < 1.0) {
        return Err(ModelError::InvalidValue {
            key: "--val-fraction".into(),
            value: opts.val_fraction.to_string(),
            reason: "must be between 0 and 1 (exclusive), e.g. 0.1".into(),
        });
    }
    refuse_another_tokenizer(opts)?;
    let inputs = if opts.inputs.is_empty() {
        vec![default_corpus()?]
    } else {
        opts.inputs.clone()
    };
    let files = collect_inputs(&inputs)?;
    let docs: Vec<Doc> = files
        .par_iter()
        .map(|p| {
            let (text, sha256, bytes) = read_text(p)?;
            Ok(Doc {
                path: p.clone(),
                text,
                sha256,
                bytes,
            })
        })
        .collect::<Result<_>>()?;
    let chars: usize = docs.iter().map(|d| d.text.len()).sum();
    if chars == 0 {
        return Err(ModelError::EmptyText { files: docs.len() });
    }
    let tok = match opts.tokenizer {
        TokenizerKind::Char => Tokenizer::char_from_texts(docs.iter().map(|d| d.text.as_str())),
        TokenizerKind::Gpt2 => Tokenizer::gpt2(),
    };
    let (train, val, split) = split_docs(docs, opts.val_fraction);
    let train_tok = encode_docs(&tok, &train)?;
    let val_tok = encode_docs(&tok, &val)?;
    let dtype = TokenDtype::for_vocab(tok.vocab_size());
    std::fs::create_dir_all(&opts.out).map_err(|e| ModelError::write(&opts.out, e))?;
    let train_tokens = write_tokens(&opts.out.join(TRAIN_FILE), &train_tok, dtype)?;
    let val_tokens = write_tokens(&opts.out.join(VAL_FILE), &val_tok, dtype)?;
    let mut sources = Vec::new();
    for (docs, toks, name) in [(&train, &train_tok, "train"), (&val, &val_tok, "val")] {
        for (d, t) in docs.iter().zip(toks) {
            sources.push(SourceFile {
                path: d.path.display().to_string(),
                bytes: d.bytes,
                sha256: d.sha256.clone(),
                split: name.into(),
                tokens: t.len() as u64,
            });
        }
    }
    let meta = DatasetMeta {
        format: 1,
        tokenizer: tok.kind().into(),
        vocab_size: tok.vocab_size(),
        dtype,
        vocab: tok.vocab_string(),
        train_tokens,
        val_tokens,
        val_fraction: opts.val_fraction,
        split: split.into(),
        sources,
    };
    let json = serde_json::to_vec_pretty(&meta).expect("meta serializes");
    atomic_write(&opts.out.join(META_FILE), &json)?;
    Ok(PrepareReport { meta, inputs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;

    fn opts(inputs: Vec<PathBuf>, out: &Path) -> PrepareOptions {
        PrepareOptions {
            inputs,
            tokenizer: TokenizerKind::Char,
            out: out.to_path_buf(),
            val_fraction: 0.3,
        }
    }

    #[test]
    fn crlf_bom_and_whole_file_holdout() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.txt"), b"\xEF\xBB\xBFHAMLET:\r\nTo be.\r\n").unwrap();
        std::fs::write(src.join("b.txt"), "LEAR:\nNothing.\n").unwrap();
        std::fs::write(src.join("c.txt"), "PUCK:\nLord, what fools.\n").unwrap();
        std::fs::write(src.join("notes.md"), "ignored").unwrap();
        let out = d.path().join("out");
        let r = prepare(&opts(vec![src], &out)).unwrap();
        assert_eq!(r.meta.sources.len(), 3);
        assert_eq!(r.meta.split, "whole-files");
        let vocab = r.meta.vocab.clone().unwrap();
        assert!(!vocab.contains('\r') && !vocab.contains('\u{feff}'));
        // Every file is wholly in one split.
        let val: u64 = r
            .meta
            .sources
            .iter()
            .filter(|s| s.split == "val")
            .map(|s| s.tokens)
            .sum();
        assert_eq!(val, r.meta.val_tokens);
        assert!(val > 0 && r.meta.train_tokens > 0);
        let ds = Dataset::open(&out).unwrap();
        assert_eq!(ds.train.len() as u64, r.meta.train_tokens);
    }

    #[test]
    fn non_utf8_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("latin1.txt");
        std::fs::write(&f, b"caf\xe9\n").unwrap();
        let e = prepare(&opts(vec![f.clone()], &d.path().join("o"))).unwrap_err();
        assert!(matches!(e, ModelError::NotUtf8 { offset: 3, .. }), "{e}");
        assert!(e.to_string().contains("latin1.txt"));
    }

    #[test]
    fn empty_folder_and_empty_text_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = prepare(&opts(vec![d.path().to_path_buf()], &d.path().join("o"))).unwrap_err();
        assert!(matches!(e, ModelError::EmptyInput { .. }), "{e}");
        let f = d.path().join("empty.txt");
        std::fs::write(&f, "").unwrap();
        let e = prepare(&opts(vec![f], &d.path().join("o"))).unwrap_err();
        assert!(matches!(e, ModelError::EmptyText { .. }), "{e}");
    }

    #[test]
    fn chunking_is_lossless() {
        let para = "WITCH:\nDouble, double toil and trouble.\n\n".repeat(60_000);
        let parts = chunks(&para);
        assert!(parts.len() > 1);
        assert_eq!(parts.concat(), para);
    }
}
