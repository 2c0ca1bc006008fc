//! Shared test helpers: the devices every generic test runs on, and comparisons.
#![allow(dead_code)]

pub mod checkpoints;

use burn::module::Param;
use burn::tensor::{Device, Int, Tensor, TensorData};
use moe::backend::Backend;
use moe::{ExpertActivation, Experts, MoeLayer, MoeLayerConfig, SharedExpert};

/// Every compiled-in backend the generic suite runs on, with its name.
///
/// wgpu is included when a Vulkan driver is installed; without one it is skipped with a
/// message, unless `MOE_REQUIRE_WGPU=1` (set by CI), which turns the absence into a failure.
/// CUDA is never part of the suite (it cannot be built on the project's machines).
pub fn devices() -> Vec<(&'static str, Device)> {
    let mut out = Vec::new();
    for backend in Backend::compiled() {
        match backend {
            Backend::Cuda => continue,
            Backend::Wgpu if !moe::backend::vulkan_driver_installed() => {
                if std::env::var("MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                    panic!(
                        "MOE_REQUIRE_WGPU=1 but no Vulkan driver is installed (apt-get install mesa-vulkan-drivers)"
                    );
                }
                eprintln!("skipping wgpu: no Vulkan driver (apt-get install mesa-vulkan-drivers)");
                continue;
            }
            _ => {}
        }
        out.push((backend.name(), backend.device()));
    }
    assert!(!out.is_empty(), "no backend compiled in");
    out
}

/// Host copy of a float tensor.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Host copy of an int tensor.
pub fn host_int<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

/// Uploads row-major f32 values.
pub fn upload<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Largest absolute difference; panics on a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Deterministic standard-normal values (a seeded generator, the same on every backend).
pub fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dist = rand_distr::Normal::new(0.0f32, std).unwrap();
    (0..n).map(|_| dist.sample(&mut rng)).collect()
}

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

/// Ids of prompt `p` of a reference file (`prompt{p}.input_ids`, `[1, L]`).
#[cfg(feature = "models")]
pub fn reference_prompt(r: &moe::moe_models::TensorSource, p: usize) -> Vec<i64> {
    let len = r.shape(&format!("prompt{p}.input_ids")).unwrap()[1];
    r.read_i64(&format!("prompt{p}.input_ids"), &[1, len])
        .unwrap()
}

/// Both reference prompts' greedy continuations (`prompt{p}.greedy.new_tokens` `[10]` and
/// `.step_logits` `[10, vocab]`), with and without the KV cache: tokens identical, step logits
/// within `tolerance`.
#[cfg(feature = "models")]
pub fn check_greedy(
    model: &moe::moe_models::MoeCausalLm,
    r: &moe::moe_models::TensorSource,
    tolerance: f32,
    name: &str,
) {
    let vocab = model.vocab_size();
    for p in 0..2 {
        let ids = reference_prompt(r, p);
        let want = r
            .read_i64(&format!("prompt{p}.greedy.new_tokens"), &[10])
            .unwrap();
        let want_logits = r
            .read_f32(&format!("prompt{p}.greedy.step_logits"), &[10, vocab])
            .unwrap();
        for use_cache in [true, false] {
            let (tokens, logits) = model
                .generate_greedy(&ids, 10, &moe::TopK::Configured, use_cache)
                .unwrap();
            assert_eq!(tokens, want, "{name} prompt {p} cache {use_cache}");
            let err = max_abs_diff(&host(logits), &want_logits);
            assert!(
                err <= tolerance,
                "{name} p{p} cache {use_cache}: step logits off by {err:e}"
            );
        }
    }
}
