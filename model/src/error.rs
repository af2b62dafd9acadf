use std::path::PathBuf;

/// Every error of the model crate. Messages say what went wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not UTF-8 text (first invalid byte at offset {offset}); convert it, e.g. \
         `iconv -f LATIN1 -t UTF-8 {path} > {path}.utf8`, or leave it out of --input"
    )]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("{path} has no .txt files; pass text files or folders that contain .txt files")]
    EmptyInput { path: PathBuf },
    #[error("{path} does not exist; check the --input path")]
    MissingInput { path: PathBuf },
    #[error(
        "the input text is empty ({files} file(s), 0 characters); pass files with text in them"
    )]
    EmptyText { files: usize },
    #[error(
        "no input given and no default corpus found (looked in {looked}); pass --input PATH \
         or run the setup script, which installs the Shakespeare corpus"
    )]
    NoDefaultCorpus { looked: String },
    #[error("dataset {dir}: {reason}; (re)create it with `phalanx prepare --out {dir}`")]
    Dataset { dir: PathBuf, reason: String },
    #[error("invalid value {key} = {value}: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },
    #[error(
        "device = \"cuda\" was requested but libtorch sees no CUDA device; \
         use device = \"cpu\" or device = \"auto\""
    )]
    NoCuda,
    #[error("unknown device {0:?}; use \"auto\", \"cpu\" or \"cuda\"")]
    UnknownDevice(String),
    #[error("{var} = {value:?} is not a local rank (0, 1, ...); the launcher sets it per process on a node")]
    BadLocalRank { var: &'static str, value: String },
    #[error("local rank {local_rank} (from {var}) but only {gpus} GPU(s) visible: run at most {gpus} ranks per node, or give each rank its own CUDA_VISIBLE_DEVICES")]
    TooFewGpus {
        local_rank: usize,
        var: &'static str,
        gpus: usize,
    },
    #[error("unknown model preset {name:?}; valid presets: {valid}")]
    UnknownPreset { name: String, valid: String },
    #[error(
        "the prompt contains {ch:?}, which is not in the model's character vocabulary; remove it"
    )]
    UnknownChar { ch: char },
    #[error("token {token} is outside the vocabulary of size {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    #[error("parameter {name}: {reason}")]
    Parameter { name: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {reason}")]
    NotAModel { path: PathBuf, reason: String },
    #[error("cannot save the model to {path}: {source}")]
    Save {
        path: PathBuf,
        #[source]
        source: phalanx_checkpoint::CheckpointError,
    },
    #[error(transparent)]
    Checkpoint(#[from] phalanx_checkpoint::CheckpointError),
    #[error(
        "{out} holds a dataset made with the {had} tokenizer; pass another --out, or delete \
         {out} to replace it with a {want} one"
    )]
    OtherTokenizer {
        out: PathBuf,
        had: String,
        want: String,
    },
    #[error(
        "the training split of {dir} has {tokens} tokens, too few for model.block_size = {block}; \
         use more text or a smaller block size"
    )]
    TooFewTokens {
        dir: PathBuf,
        tokens: usize,
        block: usize,
    },
}

impl ModelError {
    pub(crate) fn read(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Read {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Write {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn dataset(dir: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Dataset {
            dir: dir.into(),
            reason: reason.into(),
        }
    }
}
