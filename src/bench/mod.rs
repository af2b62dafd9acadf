//! `phalanx bench ...`: benchmarks are commands that report figures, measured side by side
//! with their peers in one run where there is one.
//!
//! - [`train`]: training throughput, one process or a world of ranks, against PyTorch;
//! - [`collectives`]: allreduce and friends over UCX, against gloo;
//! - [`gloo`]: the PyTorch side of that comparison;
//! - [`straggler`]: detection and rebalancing figures under a CPU quota;
//! - [`coordinator`]: decisions per second of the coordinator core and its gRPC service;
//! - [`detection`]: crash and hang detection latency over many real faults, false detections;
//! - [`checkpoint`]: a sharded checkpoint's stage, drain and throughput against the disk, and
//!   PyTorch DCP beside it;
//! - [`versus`]: phalanx's training against PyTorch eager (one rank) or DDP (N ranks);
//! - [`zero`]: ZeRO-1 against replicated data parallel: memory per rank and step time;
//! - [`deterministic`]: deterministic mode's step time against the default's;
//! - [`launched`]: one launched job's figures, for the comparisons of variants.

pub mod checkpoint;
pub mod collectives;
pub mod coordinator;
pub mod detection;
pub mod deterministic;
pub mod gloo;
pub mod launched;
pub mod straggler;
pub mod train;
pub mod versus;
pub mod zero;
