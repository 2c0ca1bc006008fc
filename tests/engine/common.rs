//! The workspace's shared test helpers and checkpoint variants.

#[path = "../common/mod.rs"]
mod shared;

pub use shared::*;

#[path = "../common/checkpoints.rs"]
pub mod checkpoints;

pub use checkpoints::reference_prompt;
