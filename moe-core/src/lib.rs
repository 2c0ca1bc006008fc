//! # moe-core
//!
//! Mixture-of-Experts building blocks for [Burn](https://burn.dev): routers, stacked expert
//! FFNs, shared experts and a dropless, deterministic sort-based dispatch. Every module works on
//! any Burn device (flex and ndarray on the CPU, wgpu, CUDA) through the same code.
//!
//! One forward pass of a [`MoeLayer`], each step in one named place:
//!
//! | step | where |
//! |---|---|
//! | route: logits (f32), scores, top-k (or expert choice, hash, random), weights, capacity | [`Router::route_options`] |
//! | plan: sort `(token, slot)` pairs by expert | [`dispatch::DispatchPlan::build`] |
//! | permute: gather rows into expert order | [`dispatch::permute`] |
//! | experts: one FFN per contiguous segment | [`Experts::forward_grouped`] (kernels), [`Experts::forward_segments`] (tensor ops) |
//! | unpermute + combine: gather back, weighted sum over k | [`dispatch::combine`] |
//! | shared: dense expert for every token | [`SharedExpert::forward`] |
//!
//! Per-call choices live in [`ForwardOptions`] ([`MoeLayer::try_forward_with`]); training
//! losses ([`load_balancing_loss`], [`router_z_loss`]) and the auxiliary-loss-free balancer
//! ([`AuxFreeBalancer`]) beside them; k schedules in [`DenseToSparse`] and [`MixedTopK`].
//!
//! ## Embedding a layer in your own module
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::{RmsNorm, RmsNormConfig};
//! use burn::tensor::{Device, Distribution, Tensor};
//! use moe_core::{MoeError, MoeLayer, MoeLayerConfig, TopK};
//!
//! #[derive(Module, Debug)]
//! struct Block {
//!     norm: RmsNorm,
//!     moe: MoeLayer,
//! }
//!
//! impl Block {
//!     fn new(device: &Device) -> Result<Self, MoeError> {
//!         let moe = MoeLayerConfig::olmoe(64, 32, 8, 2).init(device)?; // d, d_ff, E, k
//!         Ok(Block { norm: RmsNormConfig::new(64).init(device), moe })
//!     }
//!
//!     /// `x`: `[batch, seq, 64]`; `k` experts per token for this call.
//!     fn forward(&self, x: Tensor<3>, k: usize) -> Result<Tensor<3>, MoeError> {
//!         let out = self.moe.try_forward(self.norm.forward(x.clone()), &TopK::Fixed(k))?;
//!         Ok(x + out.hidden)
//!     }
//! }
//!
//! let device = Device::default();
//! let block = Block::new(&device)?;
//! let x = Tensor::<3>::random([2, 5, 64], Distribution::Normal(0.0, 1.0), &device);
//! assert_eq!(block.forward(x.clone(), 2)?.dims(), [2, 5, 64]);
//! assert_eq!(block.forward(x, 8)?.dims(), [2, 5, 64]); // same weights, all 8 experts
//! # Ok::<(), MoeError>(())
//! ```
#![warn(missing_docs)]

// One public path per item: the types at the crate root, the dispatch steps under
// `dispatch`, the oracle under `reference`.
mod balance;
pub mod dispatch;
mod error;
mod experts;
mod layer;
mod options;
pub mod reference;
mod router;
mod schedule;
mod shared;

pub use balance::{
    AuxFreeBalancer, expert_load, load_balancing_loss, load_balancing_loss_layers, load_cv,
    router_z_loss,
};
pub use dispatch::decision::CallPath;
pub use dispatch::strategy::{DispatchPath, DispatchStrategy};
pub use error::MoeError;
pub use experts::{ExpertActivation, Experts, ExpertsConfig};
pub use layer::{MoeLayer, MoeLayerConfig, MoeOutput};
/// The CubeCL kernels behind [`DispatchPath::Kernels`] and the host kernels behind
/// [`DispatchPath::HostKernels`].
pub use moe_kernels;
pub use options::{Capacity, ForwardOptions};
pub use router::{
    GroupLimit, Router, RouterConfig, RouterKind, RouterSettings, Routing, Scoring, TopK,
    expert_choice_capacity, hash_experts, random_experts,
};
pub use schedule::{DenseToSparse, MixedTopK};
pub use shared::{SharedExpert, SharedExpertConfig};
