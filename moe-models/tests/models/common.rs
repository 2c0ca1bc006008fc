//! The workspace's shared test helpers and checkpoint variants.

#[path = "../../../tests/common/mod.rs"]
mod shared;

pub use shared::*;

#[path = "../../../tests/common/checkpoints.rs"]
pub mod checkpoints;

pub use checkpoints::{check_greedy, reference_prompt};
