//! The coordinator's decision core: membership, generations, failure, hang and straggler
//! detection, spare promotion and the split-brain guard, with no I/O.
//!
//! Inputs are events applied to `State` (`register`, `session_opened`, `session_closed`,
//! `heartbeat`, `report_fault`, `scale`, `drain`); the one decision function is
//! `decide(now, &State, &CoreConfig) -> Decision`, which says what to do and why. `apply`
//! carries a decision out on the state. Time is always passed in, so tests inject it.

use crate::error::RuntimeError;
use crate::ids::{Generation, Rank, Step};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::straggler::Context;
pub use super::straggler::{FlagChange, Judge, Peers, StragglerConfig, MAX_WINDOW};
use super::watchdog::Watch;

mod apply;
mod config;
mod decide;
mod decision;
mod member;
mod regroup;
mod shares;
mod state;
mod stragglers;
#[cfg(test)]
mod tests;

pub use apply::apply;
pub use config::{member_cap, CoreConfig};
pub use decide::decide;
pub use decision::*;
pub use member::*;
pub use shares::{assigned_shares, even_shares, makespan, weighted_shares};
pub use state::State;

use decide::*;
use regroup::*;
use stragglers::*;
