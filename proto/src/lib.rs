//! phalanx-proto: the control-plane API (`phalanx/v1/control.proto`) and its generated code.

/// Generated messages and the `Coordinator` gRPC client and server.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("phalanx.v1");
}

/// The package version of the API; bumped on incompatible changes.
pub const API_VERSION: &str = "phalanx.v1";

/// A heartbeat carries the times of at most this many steps committed since the last one
/// (`Heartbeat.recent`); a rank keeps its newest, the coordinator reads no more.
pub const MAX_RECENT_STEPS: usize = 64;
