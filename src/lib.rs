//! # moe
//!
//! A pure-Rust Mixture-of-Experts engine on [Burn](https://burn.dev): MoE layers (moe-core,
//! whose items are this crate's root: [`MoeLayer`], [`Router`], …), Hugging Face checkpoints
//! ([`moe_models`], feature `models`) and the CubeCL and host kernels ([`moe_kernels`]). Each
//! item has one path. [`backend`] names the compiled-in backends.
//!
//! ```
//! use burn::tensor::{Distribution, Tensor};
//! use moe::{MoeLayerConfig, TopK, backend::Backend};
//!
//! let device = Backend::default().device();
//! let layer = MoeLayerConfig::mixtral(64, 128, 8, 2).init(&device)?;
//! let x = Tensor::<2>::random([10, 64], Distribution::Normal(0.0, 1.0), &device);
//! let out = layer.try_forward(x, &TopK::Fixed(4))?; // 4 experts per token for this call
//! assert_eq!(out.hidden.dims(), [10, 64]);
//! assert_eq!(out.routing.expert_ids.dims(), [10, 4]);
//! # Ok::<(), moe::MoeError>(())
//! ```

pub mod backend;
#[cfg(feature = "train")]
pub mod train;

pub use moe_core::*;
pub use moe_kernels;
#[cfg(feature = "models")]
pub use moe_models;
