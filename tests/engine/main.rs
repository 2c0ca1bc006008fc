//! The facade's integration tests, one binary: the `moe` command line against transformers
//! references, one hardening test per class of bad input (library and CLI), and the tiny-LM
//! trainer. (tests/fuzz.rs is its own binary: it counts allocations with a global allocator.)

mod common;

mod cli;
mod hardening;
mod tiny_lm;
