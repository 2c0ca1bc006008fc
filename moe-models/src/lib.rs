//! # moe-models
//!
//! Hugging Face Mixture-of-Experts checkpoints (config.json + safetensors) for `moe-core`.
//! It loads whole OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral and DeepSeek-V3 models ([`decoder`]) and single MoE blocks in the OLMoE,
//! Qwen2/3-MoE, DeepSeek (per-expert or packed experts) and Mixtral layouts, from F32, BF16 or
//! F16 tensors.
#![warn(missing_docs)]

pub mod block;
pub mod checkpoint;
pub mod decoder;
pub mod error;
pub mod files;
pub mod io;
pub mod tensors;

pub use block::{ExpertNaming, load_block, load_block_as};
pub use checkpoint::Checkpoint;
pub use decoder::{
    GenerateOptions, KvCache, LoadOptions, LoadReport, MoeCausalLm, MoeCausalLmConfig, Sampling,
};
pub use error::{LoadError, RunError};
pub use tensors::{ReadTensors, TensorSource};
