//! phalanx-proto: the control-plane API (`phalanx/v1/control.proto`) and its generated code.

/// Generated messages and the `Coordinator` gRPC client and server.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("phalanx.v1");
}

/// The package version of the API; bumped on incompatible changes.
pub const API_VERSION: &str = "phalanx.v1";
