//! The workspace's shared test helpers, and a seeded layer.

#[path = "../../../tests/common/mod.rs"]
mod shared;

pub use shared::*;

use burn::module::Param;
use burn::tensor::Device;
use moe_core::{ExpertActivation, Experts, MoeLayer, MoeLayerConfig, SharedExpert};

/// A layer whose parameters are seeded host values, identical on every backend.
pub fn seeded_layer(config: &MoeLayerConfig, seed: u64, device: &Device) -> MoeLayer {
    let (d, f, e) = (config.d_model, config.d_ff, config.num_experts);
    let mut layer = config.init(device).unwrap();
    let dev = device;
    layer.router.weight = Param::from_tensor(upload(
        normal(d * e, 1.5 / (d as f32).sqrt(), seed),
        [d, e],
        dev,
    ));
    if let Some(bias) = &mut layer.router.selection_bias {
        *bias = Param::from_tensor(upload(normal(e, 0.1, seed + 1), [e], dev));
    }
    let stacked = |experts: usize, fd: usize, fo: usize, s: u64| {
        upload(
            normal(experts * fd * fo, 1.0 / (fd as f32).sqrt(), s),
            [experts, fd, fo],
            dev,
        )
    };
    let gated = config.activation == ExpertActivation::SwiGlu;
    layer.experts = Experts::from_tensors(
        gated.then(|| stacked(e, d, f, seed + 2)),
        stacked(e, d, f, seed + 3),
        stacked(e, f, d, seed + 4),
    )
    .unwrap();
    if let Some(shared) = &config.shared_expert {
        let sf = shared.d_ff;
        let ffn = Experts::from_tensors(
            Some(stacked(1, d, sf, seed + 5)),
            stacked(1, d, sf, seed + 6),
            stacked(1, sf, d, seed + 7),
        )
        .unwrap();
        let gate = shared
            .gated
            .then(|| upload(normal(d, 0.3, seed + 8), [d, 1], dev));
        layer.shared = Some(SharedExpert::from_parts(ffn, gate).unwrap());
    }
    layer
}
