//! The dispatch hot path at the OLMoE-1B-7B layer shape (H 2048, I 1024, E 64, k 8), per
//! backend and dispatch strategy:
//!
//! - `route`: the router (logits, scores, top-k, weights) — the fused epilogue kernel after the
//!   logits against the composed tensor ops;
//! - `epilogue`: the router after its logits alone (`Router::select`: softmax, top-k, weights),
//!   fused kernel against composed ops;
//! - `plan`: the routing plan (histogram, offsets, stable permutation, inverse) of `[T, k]` ids;
//! - `permute`: rows gathered into expert order (`[T·k, H]`, the order of a real routing plan);
//! - `combine`: unpermute + weighted combine of `[T·k, H]` expert rows into `[T, H]`;
//! - `experts`: the SwiGLU experts on `[T·k, H]` expert-sorted rows — the grouped-GEMM kernels
//!   (two launches, counts read on the device) against one matmul chain per expert after a
//!   host read of the counts;
//! - `experts-bf16`: the host kernels' experts in a bf16 computation (bf16 weights, stored as
//!   `Experts::with_host_layout` stores them, and bf16 rows);
//! - `layer`: the whole MoE layer (route, plan, permute, experts, combine).
//!
//! Every timed chain feeds each call's output into the next call's input (lavapipe and lazy
//! backends would otherwise return or skip repeated identical work) and reads one value back
//! before the clock stops.
//!
//! ```text
//! cargo bench --features wgpu --bench dispatch
//! MOE_BENCH_TOKENS=1,16 MOE_BENCH_STAGES=permute,combine MOE_BENCH_BACKENDS=wgpu \
//!     cargo bench --features wgpu --bench dispatch
//! ```
//! Defaults: tokens 1,16,128,512,2048; stages route,epilogue,plan,permute,combine,experts,
//! experts-bf16,layer; every
//! compiled-in backend (wgpu only where a Vulkan driver is installed). A stacked expert tensor
//! at this shape (`[64, 2048, 1024]` f32) is 512 MiB; where the device binds less (lavapipe:
//! 128 MiB) the experts and layer stages run with the expert width `I` halved until one fits
//! (lavapipe: I = 128) and say so in their name. Lavapipe (software Vulkan) is a correctness
//! target, not a performance one.

use std::time::{Duration, Instant};

use burn::tensor::{DType, Device, Distribution, Int, Tensor, TensorData};
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main,
};
use moe::DispatchPath;
use moe::backend::Backend;
use moe::dispatch::{self, DispatchPlan};
use moe::moe_kernels::host::{self, HostTensor};
use moe::{DispatchStrategy, MoeLayer, MoeLayerConfig, TopK};

const H: usize = 2048;
const I: usize = 1024;
const E: usize = 64;
const K: usize = 8;

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn backends() -> Vec<Backend> {
    let wanted = list("MOE_BENCH_BACKENDS", "");
    Backend::compiled()
        .into_iter()
        .filter(|b| *b != Backend::Cuda || !wanted.is_empty())
        .filter(|b| *b != Backend::Wgpu || moe::backend::vulkan_driver_installed())
        .filter(|b| wanted.is_empty() || wanted.iter().any(|w| w == b.name()))
        .collect()
}

/// Reads the sum of the last result and waits for the device: everything the chain depends on
/// has run. (Reading a single element was not enough on wgpu: lavapipe then reported copies of
/// 128 MB in under a millisecond.)
fn sync(x: Tensor<2>) {
    let device = x.device();
    let _ = x.sum().into_data();
    let _ = device.sync();
}

/// Expert ids `[T, K]` of a realistic routing: K distinct experts per token from a seeded
/// generator (not one repeated token, which would send everything to the same experts).
fn routing_ids(t: usize, device: &Device) -> Tensor<2, Int> {
    let mut state = 0x9e3779b97f4a7c15u64 ^ t as u64;
    let mut ids = Vec::with_capacity(t * K);
    for _ in 0..t {
        let mut chosen = Vec::with_capacity(K);
        while chosen.len() < K {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let e = (state % E as u64) as i64;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        ids.extend(chosen);
    }
    Tensor::from_data(TensorData::new(ids, [t, K]), device)
}

/// The expert width `I` of the experts and layer stages: the OLMoE width, halved until one
/// stacked `[E, H, I]` f32 tensor fits the device's largest buffer.
fn expert_width(device: &Device) -> usize {
    let limit = moe::moe_kernels::max_buffer_bytes(device).unwrap_or(u64::MAX);
    let mut d_ff = I;
    while d_ff > 1 && (E * H * d_ff * 4) as u64 >= limit {
        d_ff /= 2;
    }
    d_ff
}

/// The host kernels' plan of `ids`, after one read of the ids.
fn host_plan(ids: &Tensor<2, Int>) -> host::HostPlan {
    let [t, k] = ids.dims();
    let ids: Vec<i64> = ids.to_data().iter::<i64>().collect();
    host::HostPlan::new(&ids, t, k, E).unwrap()
}

/// The strategy that always takes `path`.
fn forced(path: DispatchPath) -> DispatchStrategy {
    match path {
        DispatchPath::Kernels | DispatchPath::HostKernels => DispatchStrategy::Kernels,
        DispatchPath::TensorOps => DispatchStrategy::TensorOps,
    }
}

fn paths(device: &Device) -> Vec<(DispatchPath, &'static str)> {
    let mut out = vec![(DispatchPath::TensorOps, "tensor-ops")];
    if let Ok(path) = DispatchStrategy::Kernels.resolve(device) {
        out.push((path, path.name()));
    }
    out
}

/// Ten samples of equal iteration counts: slow cases (a layer on lavapipe) stay affordable.
fn settle(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
}

/// One criterion group `name` timing, for `t` tokens, chains of `step` from `start`; `done`
/// waits for the last result before the clock stops.
fn stage<T: Clone>(
    c: &mut Criterion,
    name: String,
    t: usize,
    start: T,
    mut step: impl FnMut(T) -> T,
    done: impl Fn(T),
) {
    let mut group = c.benchmark_group(name);
    settle(&mut group);
    group.bench_with_input(BenchmarkId::from_parameter(t), &t, |b, _| {
        b.iter_custom(|iters| timed(iters, start.clone(), &mut step, &done))
    });
    group.finish();
}

fn timed<T: Clone>(
    iters: u64,
    start: T,
    mut step: impl FnMut(T) -> T,
    done: impl Fn(T),
) -> Duration {
    let begin = Instant::now();
    let mut x = start;
    for _ in 0..iters {
        x = step(x);
    }
    done(x);
    begin.elapsed()
}

fn bench(c: &mut Criterion) {
    let tokens: Vec<usize> = list("MOE_BENCH_TOKENS", "1,16,128,512,2048")
        .iter()
        .map(|t| {
            t.parse()
                .expect("MOE_BENCH_TOKENS: comma-separated integers")
        })
        .collect();
    let stages = list(
        "MOE_BENCH_STAGES",
        "route,epilogue,plan,permute,combine,experts,experts-bf16,layer",
    );
    for backend in backends() {
        let device = backend.device();
        let d_ff = expert_width(&device);
        let wide = |stage: &str| match d_ff {
            I => stage.to_string(),
            _ => format!("{stage}-i{d_ff}"),
        };
        let layer: Option<MoeLayer> = stages
            .iter()
            .any(|s| {
                ["layer", "experts", "experts-bf16", "route", "epilogue"].contains(&s.as_str())
            })
            .then(|| MoeLayerConfig::olmoe(H, d_ff, E, K).init(&device).unwrap());
        for &t in &tokens {
            let plan = DispatchPlan::new(&routing_ids(t, &device), E);
            let host_routing = host_plan(&routing_ids(t, &device));
            let rows = t * K;
            let x_rows = Tensor::<2>::random([rows, H], Distribution::Normal(0.0, 1.0), &device);
            for (path, path_name) in paths(&device) {
                let id = |stage: &str| format!("{stage}/{backend}/{path_name}");
                if let Some(layer) = layer
                    .as_ref()
                    .filter(|_| stages.iter().any(|s| s == "route"))
                {
                    let strategy = forced(path);
                    let x0 = Tensor::<2>::random([t, H], Distribution::Normal(0.0, 1.0), &device);
                    // The next input is moved by this call's weights.
                    stage(
                        c,
                        id("route"),
                        t,
                        x0.clone(),
                        |x| {
                            let routing = layer
                                .router
                                .route_with(x.clone(), &TopK::Configured, strategy)
                                .unwrap();
                            let shift = routing.weights.sum_dim(1).mul_scalar(1e-3);
                            x + shift
                        },
                        sync,
                    );
                }
                if let Some(layer) = layer
                    .as_ref()
                    .filter(|_| stages.iter().any(|s| s == "epilogue"))
                {
                    let strategy = forced(path);
                    let logits0 =
                        Tensor::<2>::random([t, E], Distribution::Normal(0.0, 1.0), &device);
                    // The next logits are moved by this call's weights.
                    stage(
                        c,
                        id("epilogue"),
                        t,
                        logits0.clone(),
                        |logits| {
                            let (_, weights) =
                                layer.router.select(logits.clone(), K, strategy).unwrap();
                            logits + weights.sum_dim(1).mul_scalar(1e-3)
                        },
                        sync,
                    );
                }
                if stages.iter().any(|s| s == "plan") {
                    let ids0 = routing_ids(t, &device);
                    // Each call's expert ids come from the previous call's plan.
                    stage(
                        c,
                        id("plan"),
                        t,
                        ids0.clone(),
                        |ids| match path {
                            DispatchPath::HostKernels => {
                                // the read of the ids is part of this path's plan
                                let plan = host_plan(&ids);
                                let order: Vec<i64> =
                                    plan.sorted_tokens().iter().map(|&r| r as i64).collect();
                                Tensor::<2, Int>::from_data(TensorData::new(order, [t, K]), &device)
                                    .remainder_scalar(E as i64)
                            }
                            _ => {
                                let plan = DispatchPlan::build(&ids, E, path).unwrap();
                                plan.sorted_pairs.reshape([t, K]).remainder_scalar(E as i64)
                            }
                        },
                        |ids| {
                            let device = ids.device();
                            let _ = ids.sum().into_data();
                            let _ = device.sync();
                        },
                    );
                }
                // The host kernels fuse the gather into the expert products: no permute stage.
                if stages.iter().any(|s| s == "permute") && path != DispatchPath::HostKernels {
                    stage(
                        c,
                        id("permute"),
                        t,
                        x_rows.clone(),
                        |x| {
                            let order = plan.sorted_pairs.clone();
                            match path {
                                DispatchPath::Kernels => {
                                    moe::moe_kernels::gather_rows(x, order).unwrap()
                                }
                                _ => x.select(0, order),
                            }
                        },
                        sync,
                    );
                }
                if stages.iter().any(|s| s == "combine") {
                    let w0 = Tensor::<2>::random([t, K], Distribution::Uniform(0.0, 0.2), &device);
                    // the expert rows as the host path holds them (read once, off the clock)
                    let host_rows = match path {
                        DispatchPath::HostKernels => HostTensor::new(x_rows.clone())
                            .unwrap()
                            .to_f32_vec()
                            .unwrap(),
                        _ => Vec::new(),
                    };
                    // Each call's weights come from the previous call's output.
                    stage(
                        c,
                        id("combine"),
                        t,
                        w0.clone(),
                        |w| {
                            let out = match path {
                                DispatchPath::HostKernels => {
                                    let weights: Vec<f32> = w.to_data().iter::<f32>().collect();
                                    let out = host::combine(&host_rows, &host_routing, &weights, H)
                                        .unwrap();
                                    Tensor::<2>::from_data(TensorData::new(out, [t, H]), &device)
                                }
                                _ => dispatch::combine(x_rows.clone(), &plan, &w, path).unwrap(),
                            };
                            out.narrow(1, 0, K).cast(DType::F32).mul_scalar(1e-3)
                        },
                        sync,
                    );
                }
                // The host kernels' experts: [T, H] tokens gathered through the plan inside the
                // expert products; `experts-bf16` in a bf16 computation (bf16 weights, bf16 rows).
                let host_stages = [
                    ("experts", DType::F32, host::Compute::F32),
                    ("experts-bf16", DType::BF16, host::Compute::Bf16),
                ];
                for (name, dtype, compute) in host_stages {
                    let Some(layer) = layer
                        .as_ref()
                        .filter(|_| stages.iter().any(|s| s == name))
                        .filter(|_| path == DispatchPath::HostKernels)
                    else {
                        continue;
                    };
                    // stored as the library stores them (bf16: out-major where preferred)
                    let experts = &layer.experts;
                    let cast = |p: &burn::module::Param<Tensor<3>>| p.val().cast(dtype);
                    let stored = moe::Experts::from_tensors(
                        experts.gate.as_ref().map(cast),
                        cast(&experts.up),
                        cast(&experts.down),
                    )
                    .unwrap()
                    .with_host_layout();
                    let held = [stored.gate.as_ref().unwrap(), &stored.up, &stored.down]
                        .map(|p| HostTensor::new(p.val()).unwrap());
                    let matrices = host::ExpertMatrices::new(
                        held[0].matrix(),
                        held[1].matrix().unwrap(),
                        held[2].matrix().unwrap(),
                        E,
                        H,
                        d_ff,
                    )
                    .unwrap();
                    let x0 = Tensor::<2>::random([t, H], Distribution::Normal(0.0, 1.0), &device)
                        .cast(dtype);
                    stage(
                        c,
                        id(&wide(name)),
                        t,
                        x0,
                        |x| {
                            let x = HostTensor::new(x).unwrap().to_f32_vec().unwrap();
                            let rows = host::grouped_ffn_in(&x, &host_routing, &matrices, compute)
                                .unwrap();
                            Tensor::<2>::from_data(TensorData::new(rows, [t * K, H]), &device)
                                .narrow(0, 0, t)
                                .tanh()
                                .cast(dtype)
                        },
                        sync,
                    );
                }
                if let Some(layer) = layer
                    .as_ref()
                    .filter(|_| stages.iter().any(|s| s == "experts"))
                    .filter(|_| path != DispatchPath::HostKernels)
                {
                    let experts = &layer.experts;
                    stage(
                        c,
                        id(&wide("experts")),
                        t,
                        x_rows.clone(),
                        |x| {
                            let out = match path {
                                DispatchPath::Kernels => {
                                    experts.forward_grouped(x, plan.counts.clone()).unwrap()
                                }
                                _ => {
                                    let counts = plan.counts_to_host();
                                    experts.forward_segments(x, &counts)
                                }
                            };
                            out.tanh()
                        },
                        sync,
                    );
                }
                if let Some(layer) = layer
                    .as_ref()
                    .filter(|_| stages.iter().any(|s| s == "layer"))
                {
                    let strategy = forced(path);
                    let layer = layer.clone().with_dispatch(strategy);
                    let x0 = Tensor::<2>::random([t, H], Distribution::Normal(0.0, 1.0), &device);
                    stage(
                        c,
                        id(&wide("layer")),
                        t,
                        x0.clone(),
                        |x| {
                            let out = layer.try_forward(x, &TopK::Configured).unwrap();
                            out.hidden.tanh()
                        },
                        sync,
                    );
                }
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
