//! moe-models' integration tests, one binary: every architecture against transformers
//! references (logits, per-layer routing, greedy continuations with and without the KV cache),
//! MoE blocks loaded alone, checkpoint variants (sharded, packed, bf16/f16) and load errors.

mod common;

mod architectures;
mod block_parity;
mod errors;
mod olmoe;
mod olmoe_checkpoints;
