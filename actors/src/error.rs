//! The one error type of `phalanx-actors`.

#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error("the coordinator at {url} refused this worker: {reason}")]
    Refused { url: String, reason: String },

    #[error(transparent)]
    Checkpoint(#[from] phalanx_checkpoint::CheckpointError),

    #[error(transparent)]
    Model(#[from] phalanx_model::ModelError),

    #[error(transparent)]
    Runtime(#[from] phalanx_runtime::RuntimeError),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot start the rank's actors: {0}; this is a bug, please report it")]
    Spawn(String),

    /// A child the compute loop talks to went away; the rank's supervisor restarts it (S-1, S-3).
    #[error("the {0} is gone; the rank's supervisor restarts it")]
    ChildGone(&'static str),

    /// A child panicked: a bug, not a peer failure.
    #[error("panicked: {0}")]
    Panicked(String),

    #[error("this rank has no session with the coordinator yet; it joins a group once registered")]
    NotRegistered,

    #[error(
        "the coordinator's split {shares:?} does not share this rank's {micro_batches} \
         micro-batches over {world} ranks; the coordinator and every worker must run the same \
         train.global_batch and train.micro_batch (same --config and overrides)"
    )]
    BadSplit {
        shares: Vec<u32>,
        world: u32,
        micro_batches: usize,
    },
}

pub type Result<T, E = ActorError> = std::result::Result<T, E>;
