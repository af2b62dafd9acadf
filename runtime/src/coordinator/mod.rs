//! Coordinator: membership, generations, detection.
//!
//! `core` is the I/O-free decision logic; `journal` makes its durable part survive a crash;
//! `service` is the thin gRPC shell; `client` is the rank and admin side.

pub mod client;
pub mod core;
#[cfg(test)]
mod fuzz_tests;
pub mod journal;
pub mod observed;
pub mod saves;
pub mod service;
pub mod stall;
pub mod step_times;
pub mod straggler;
#[cfg(test)]
mod straggler_tests;
#[cfg(test)]
mod testkit;
pub mod watchdog;
