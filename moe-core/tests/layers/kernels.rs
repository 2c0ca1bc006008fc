//! The CubeCL kernels of moe-kernels against their tensor-op twins: the routing plan
//! (histogram, offsets, stable permutation, inverse), gather (permute), the grouped-GEMM experts
//! (against a host loop) and weighted combine (unpermute + combine) on real plans over
//! T ∈ {1, 3, 64, 1000} × E ∈ {1, 8, 64, 128} × k ∈ {1, 2, 8, E}, edge shapes, dtypes and
//! out-of-range indices;
//! whole layers (SwiGLU and GELU experts, on the kernel path through the grouped-GEMM experts)
//! and their gradients equal between the two dispatch strategies; strategy
//! resolution on devices without kernels.
//!
//! The kernels run wherever a CubeCL device is in `common::devices()` (wgpu on lavapipe in CI,
//! where `MOE_REQUIRE_WGPU=1` makes its absence a failure).

use crate::common;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use moe_core::{DispatchPath, DispatchStrategy, ExpertActivation, MoeError, MoeLayerConfig, TopK};
use moe_kernels::{self, KernelError};

/// The devices of the suite on which the kernels run.
fn kernel_devices() -> Vec<(&'static str, Device)> {
    let devices: Vec<_> = common::devices()
        .into_iter()
        .filter(|(_, d)| moe_kernels::available(d))
        .collect();
    if devices.is_empty() {
        eprintln!("no CubeCL device in this build: kernel tests only check the fallbacks");
    }
    devices
}

/// Deterministic pseudo-random integers in `0..bound`.
fn ints(n: usize, bound: usize, seed: u64) -> Vec<i64> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % bound as u64) as i64
        })
        .collect()
}

fn int_tensor<const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// The twin of the combine kernel with tensor ops: sources outside `0..m` point at an extra
/// zero row.
fn combine_twin(rows: Tensor<2>, sources: &[i64], weights: Tensor<2>) -> Tensor<2> {
    let [m, width] = rows.dims();
    let [t, k] = weights.dims();
    let device = rows.device();
    let dtype = rows.dtype();
    let padded = Tensor::cat(
        vec![rows, Tensor::<2>::zeros([1, width], (&device, dtype))],
        0,
    );
    let clamped: Vec<i64> = sources
        .iter()
        .map(|&s| {
            if s < 0 || s as usize >= m {
                m as i64
            } else {
                s
            }
        })
        .collect();
    let per_slot = padded
        .select(0, int_tensor(clamped, [t * k], &device))
        .reshape([t, k, width])
        .cast(DType::F32);
    let weighted = per_slot * weights.cast(DType::F32).unsqueeze_dim(2);
    weighted.sum_dim(1).reshape([t, width]).cast(dtype)
}

/// Float dtypes to test on `device`: f32, and f16 where it computes in it.
fn dtypes(device: &Device) -> Vec<DType> {
    let mut out = vec![DType::F32];
    if device.supports_dtype(DType::F16) {
        out.push(DType::F16);
    }
    out
}

#[test]
fn gather_rows_equals_select() {
    for (name, device) in kernel_devices() {
        for dtype in dtypes(&device) {
            for (rows, width, m) in [
                (1, 1, 1),
                (3, 5, 7),
                (64, 64, 64),
                (1000, 130, 1000),
                (17, 2048, 3),
                (8, 6, 0),
            ] {
                let x =
                    common::upload(common::normal(rows * width, 1.0, 1), [rows, width], &device)
                        .cast(dtype);
                let idx = ints(m, rows, rows as u64 + 7);
                let got =
                    moe_kernels::gather_rows(x.clone(), int_tensor(idx.clone(), [m], &device))
                        .unwrap();
                let want = x.select(0, int_tensor(idx, [m], &device));
                assert_eq!(got.dims(), [m, width]);
                assert_eq!(got.dtype(), dtype);
                // A copy: bit for bit.
                assert_eq!(
                    common::host(got.cast(DType::F32)),
                    common::host(want.cast(DType::F32)),
                    "{name} {dtype:?} rows {rows} width {width} m {m}"
                );
            }
            // Indices outside the rows give zero rows instead of reading out of bounds.
            let x = common::upload(vec![1.0; 12], [3, 4], &device).cast(dtype);
            let got =
                moe_kernels::gather_rows(x, int_tensor(vec![2, 3, -1, 0], [4], &device)).unwrap();
            let host = common::host(got.cast(DType::F32));
            assert_eq!(&host[4..12], &[0.0; 8], "{name} {dtype:?}");
            assert_eq!(&host[..4], &[1.0; 4]);
        }
    }
}

#[test]
fn weighted_combine_equals_the_tensor_op_twin() {
    for (name, device) in kernel_devices() {
        for dtype in dtypes(&device) {
            for (t, k, width) in [
                (1, 1, 1),
                (3, 2, 5),
                (64, 8, 64),
                (1000, 2, 132),
                (5, 128, 16),
                (0, 2, 8),
            ] {
                let m = t * k;
                let rows = common::upload(common::normal(m * width, 1.0, 3), [m, width], &device)
                    .cast(dtype);
                // Every slot points at some row; a few past the end (unused slots) are skipped.
                let mut sources = ints(t * k, m.max(1) + 2, t as u64);
                if let Some(first) = sources.first_mut() {
                    *first = m as i64 + 5;
                }
                let weights = common::upload(common::normal(t * k, 0.5, 4), [t, k], &device);
                let got = moe_kernels::weighted_combine(
                    rows.clone(),
                    int_tensor(sources.clone(), [t, k], &device),
                    weights.clone(),
                )
                .unwrap();
                assert_eq!(got.dims(), [t, width]);
                assert_eq!(got.dtype(), dtype);
                let want = combine_twin(rows, &sources, weights);
                let err = common::max_abs_diff(
                    &common::host(got.cast(DType::F32)),
                    &common::host(want.cast(DType::F32)),
                );
                let tol = match dtype {
                    DType::F16 => 2e-3 * (k as f32).sqrt(),
                    _ => 1e-5 * (k as f32).sqrt(),
                };
                assert!(
                    err <= tol,
                    "{name} {dtype:?} t {t} k {k} width {width}: {err:e}"
                );
            }
        }
    }
}

/// Expert ids `[T, k]`: k distinct experts per token, and the last slot of every third token
/// unused (id `E`, as a per-token k leaves it) when k > 1.
fn routing_ids(t: usize, e: usize, k: usize, seed: u64) -> Vec<i64> {
    let mut out = Vec::with_capacity(t * k);
    for token in 0..t {
        let draws = ints(e, 1 << 30, seed * 7919 + token as u64);
        let mut experts: Vec<usize> = (0..e).collect();
        experts.sort_by_key(|&x| draws[x]);
        for (slot, &x) in experts[..k].iter().enumerate() {
            let unused = k > 1 && slot == k - 1 && token % 3 == 2;
            out.push(if unused { e as i64 } else { x as i64 });
        }
    }
    out
}

/// Seeded SwiGLU experts of width `width` and hidden size 12.
fn grid_experts(e: usize, width: usize, device: &Device) -> moe_core::Experts {
    let f = 12;
    let w = |rows, cols, seed| {
        common::upload(
            common::normal(e * rows * cols, 1.0 / (rows as f32).sqrt(), seed),
            [e, rows, cols],
            device,
        )
    };
    moe_core::Experts::from_tensors(Some(w(width, f, 31)), w(width, f, 32), w(f, width, 33))
        .unwrap()
}

/// `down(silu(x·gate) ⊙ x·up)` in f64 over expert-sorted host rows cut by `counts`.
fn host_experts(experts: &moe_core::Experts, rows: &[f32], counts: &[usize], d: usize) -> Vec<f32> {
    let f = experts.d_ff();
    let gate = common::host(experts.gate.as_ref().unwrap().val());
    let up = common::host(experts.up.val());
    let down = common::host(experts.down.val());
    let mut out = Vec::with_capacity(rows.len());
    let mut r = 0;
    for (e, &count) in counts.iter().enumerate() {
        for _ in 0..count {
            let x = &rows[r * d..(r + 1) * d];
            let h: Vec<f64> = (0..f)
                .map(|j| {
                    let dot = |w: &[f32]| -> f64 {
                        (0..d)
                            .map(|i| x[i] as f64 * w[e * d * f + i * f + j] as f64)
                            .sum()
                    };
                    let g = dot(&gate);
                    g / (1.0 + (-g).exp()) * dot(&up)
                })
                .collect();
            for c in 0..d {
                let y: f64 = (0..f)
                    .map(|j| h[j] * down[e * f * d + j * d + c] as f64)
                    .sum();
                out.push(y as f32);
            }
            r += 1;
        }
    }
    out
}

#[test]
fn permute_and_combine_on_real_plans_equal_the_tensor_op_path() {
    use moe_core::dispatch::{self, DispatchPlan};
    let width = 20; // not a multiple of the 4-wide vectors
    for (name, device) in kernel_devices() {
        let mut cases = 0;
        for t in [1, 3, 64, 1000] {
            for e in [1, 8, 64, 128] {
                for k in [1, 2, 8, e] {
                    if k > e || (e == 128 && k == 128 && t == 1000) {
                        continue;
                    }
                    let ids = routing_ids(t, e, k, (t * e + k) as u64);
                    let ids = int_tensor(ids, [t, k], &device);
                    let plan = DispatchPlan::new(&ids, e);
                    // The plan kernel (stable counting sort) gives the tensor-op plan exactly.
                    let kernel_plan = DispatchPlan::build(&ids, e, DispatchPath::Kernels).unwrap();
                    for (what, a, b) in [
                        ("counts", &kernel_plan.counts, &plan.counts),
                        ("offsets", &kernel_plan.offsets, &plan.offsets),
                        (
                            "sorted_pairs",
                            &kernel_plan.sorted_pairs,
                            &plan.sorted_pairs,
                        ),
                        (
                            "sorted_tokens",
                            &kernel_plan.sorted_tokens,
                            &plan.sorted_tokens,
                        ),
                        ("inverse", &kernel_plan.inverse, &plan.inverse),
                    ] {
                        assert_eq!(
                            common::host_int(a.clone()),
                            common::host_int(b.clone()),
                            "{name} plan {what} t {t} e {e} k {k}"
                        );
                    }
                    let active: usize = plan.counts_to_host().iter().sum();
                    let x = common::upload(common::normal(t * width, 1.0, 5), [t, width], &device);
                    let w = common::upload(common::normal(t * k, 1.0, 6), [t, k], &device);
                    let run = |path| {
                        let plan = match path {
                            DispatchPath::Kernels => &kernel_plan,
                            _ => &plan,
                        };
                        let rows = dispatch::permute(x.clone(), plan, active, path).unwrap();
                        // Stand-in for the experts: any row-wise map.
                        let expert_rows = rows.clone().mul_scalar(0.5).add_scalar(1.0);
                        let out = dispatch::combine(expert_rows, plan, &w, path).unwrap();
                        (common::host(rows), common::host(out))
                    };
                    let (rows_k, out_k) = run(DispatchPath::Kernels);
                    let (rows_t, out_t) = run(DispatchPath::TensorOps);
                    assert_eq!(rows_k, rows_t, "{name} permute t {t} e {e} k {k}");
                    let err = common::max_abs_diff(&out_k, &out_t);
                    assert!(err <= 1e-5, "{name} combine t {t} e {e} k {k}: {err:e}");

                    // The grouped-GEMM experts on this plan (every pair's row, unused slots
                    // last) against a host loop over the expert-sorted rows.
                    let experts = grid_experts(e, width, &device);
                    let all =
                        moe_kernels::gather_rows(x.clone(), kernel_plan.sorted_tokens.clone())
                            .unwrap();
                    let got = common::host(
                        experts
                            .forward_grouped(all, kernel_plan.counts.clone())
                            .unwrap(),
                    );
                    let counts = plan.counts_to_host();
                    let want = host_experts(&experts, &rows_t, &counts, width);
                    let err = common::max_abs_diff(&got[..active * width], &want);
                    assert!(err <= 2e-5, "{name} experts t {t} e {e} k {k}: {err:e}");
                    assert!(
                        got[active * width..].iter().all(|&v| v == 0.0),
                        "{name} unused rows t {t} e {e} k {k}"
                    );
                    cases += 1;
                }
            }
        }
        // All tokens to one expert (the others empty).
        let (t, e) = (300, 64);
        let ids = int_tensor(vec![5; t], [t, 1], &device);
        let plan = DispatchPlan::new(&ids, e);
        let counts = plan.counts_to_host();
        assert_eq!((counts[5], counts.iter().sum::<usize>()), (t, t));
        let x = common::upload(common::normal(t * width, 1.0, 7), [t, width], &device);
        let w = common::upload(common::normal(t, 1.0, 8), [t, 1], &device);
        let run = |path| {
            let rows = dispatch::permute(x.clone(), &plan, t, path).unwrap();
            common::host(dispatch::combine(rows, &plan, &w, path).unwrap())
        };
        let err = common::max_abs_diff(&run(DispatchPath::Kernels), &run(DispatchPath::TensorOps));
        assert!(err <= 1e-6, "{name} one expert: {err:e}");
        eprintln!("{name}: permute, grouped experts and combine agree on {cases} (T, E, k) plans");
    }
}

#[test]
fn whole_layers_agree_between_strategies() {
    for (name, device) in kernel_devices() {
        let mut cases = 0;
        for (t, e, k) in [
            (1, 8, 1),
            (1, 8, 8),
            (3, 1, 1),
            (64, 64, 8),
            (200, 8, 2),
            (3, 128, 128),
        ] {
            let config = MoeLayerConfig::olmoe(32, 24, e, k);
            let layer = common::seeded_layer(&config, t as u64 + e as u64, &device);
            let x = common::upload(common::normal(t * 32, 1.0, 9), [t, 32], &device);
            let kernels = layer
                .clone()
                .with_dispatch(DispatchStrategy::Kernels)
                .try_forward(x.clone(), &TopK::Fixed(k))
                .unwrap();
            let ops = layer
                .with_dispatch(DispatchStrategy::TensorOps)
                .try_forward(x, &TopK::Fixed(k))
                .unwrap();
            assert_eq!(
                common::host_int(kernels.routing.expert_ids),
                common::host_int(ops.routing.expert_ids)
            );
            let err =
                common::max_abs_diff(&common::host(kernels.hidden), &common::host(ops.hidden));
            assert!(err <= 1e-5, "{name} t {t} e {e} k {k}: {err:e}");
            cases += 1;
        }
        // GELU experts (no gate): the grouped matmul, then the activation.
        let config = MoeLayerConfig::olmoe(24, 40, 8, 2).with_activation(ExpertActivation::Gelu);
        let layer = common::seeded_layer(&config, 5, &device);
        let x = common::upload(common::normal(70 * 24, 1.0, 4), [70, 24], &device);
        let kernels = layer
            .clone()
            .with_dispatch(DispatchStrategy::Kernels)
            .try_forward(x.clone(), &TopK::Configured)
            .unwrap();
        let ops = layer
            .with_dispatch(DispatchStrategy::TensorOps)
            .try_forward(x, &TopK::Configured)
            .unwrap();
        let err = common::max_abs_diff(&common::host(kernels.hidden), &common::host(ops.hidden));
        assert!(err <= 1e-5, "{name} gelu experts: {err:e}");

        // All tokens to one expert: a zero router ties every expert, top-1 takes expert 0.
        let config = MoeLayerConfig::olmoe(16, 8, 4, 1);
        let mut layer = common::seeded_layer(&config, 1, &device);
        layer.router.weight = burn::module::Param::from_tensor(Tensor::zeros([16, 4], &device));
        let x = common::upload(common::normal(50 * 16, 1.0, 2), [50, 16], &device);
        let kernels = layer
            .clone()
            .with_dispatch(DispatchStrategy::Kernels)
            .try_forward(x.clone(), &TopK::Configured)
            .unwrap();
        assert!(
            common::host_int(kernels.routing.expert_ids)
                .iter()
                .all(|&e| e == 0)
        );
        let ops = layer
            .with_dispatch(DispatchStrategy::TensorOps)
            .try_forward(x, &TopK::Configured)
            .unwrap();
        let err = common::max_abs_diff(&common::host(kernels.hidden), &common::host(ops.hidden));
        assert!(err <= 1e-5, "{name} one expert: {err:e}");
        eprintln!("{name}: {cases} layer shapes agree between kernels and tensor ops");
    }
}

#[test]
fn gradients_agree_between_strategies() {
    for (name, device) in kernel_devices() {
        let device = device.autodiff();
        let (t, d) = (40, 16);
        let config = MoeLayerConfig::qwen2_moe(d, 12, 8, 2, 6).with_normalize_top_k(true);
        let probe = common::normal(t * d, 1.0, 11);
        let grads_of = |strategy: DispatchStrategy| {
            let layer = common::seeded_layer(&config, 3, &device).with_dispatch(strategy);
            let x = common::upload(common::normal(t * d, 1.0, 10), [t, d], &device).require_grad();
            let r = common::upload(probe.clone(), [t, d], &device);
            let out = layer.try_forward(x.clone(), &TopK::Configured).unwrap();
            let grads = (out.hidden * r).sum().backward();
            [
                common::host(x.grad(&grads).unwrap()),
                common::host(layer.router.weight.grad(&grads).unwrap()),
                common::host(layer.experts.up.grad(&grads).unwrap()),
                common::host(layer.experts.down.grad(&grads).unwrap()),
                common::host(layer.experts.gate.as_ref().unwrap().grad(&grads).unwrap()),
            ]
        };
        let kernels = grads_of(DispatchStrategy::Kernels);
        let ops = grads_of(DispatchStrategy::TensorOps);
        for (what, (a, b)) in [
            "input",
            "router",
            "experts.up",
            "experts.down",
            "experts.gate",
        ]
        .iter()
        .zip(kernels.iter().zip(&ops))
        {
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = common::max_abs_diff(a, b);
            assert!(scale > 0.0, "{name} {what}: zero gradient");
            assert!(
                err <= 1e-5 * (1.0 + scale),
                "{name} {what}: {err:e} (scale {scale:e})"
            );
        }

        // The kernels' own backward against the twins' (through Burn's autodiff).
        let (m, width, tt, k) = (12, 8, 5, 3);
        let rows_host = common::normal(m * width, 1.0, 20);
        let w_host = common::normal(tt * k, 1.0, 21);
        // One unused slot (source past the rows): it gets no gradient and gives none.
        let mut sources = ints(tt * k, m, 22);
        sources[0] = m as i64;
        let probe = common::normal(tt * width, 1.0, 23);
        let run = |kernel: bool| {
            let rows = common::upload(rows_host.clone(), [m, width], &device).require_grad();
            let w = common::upload(w_host.clone(), [tt, k], &device).require_grad();
            let src = int_tensor(sources.clone(), [tt, k], &device);
            let idx = int_tensor(sources[1..].to_vec(), [tt * k - 1], &device);
            let (out, gathered) = match kernel {
                true => (
                    moe_kernels::weighted_combine(rows.clone(), src, w.clone()).unwrap(),
                    moe_kernels::gather_rows(rows.clone(), idx).unwrap(),
                ),
                false => (
                    combine_twin(rows.clone(), &sources, w.clone()),
                    rows.clone().select(0, idx),
                ),
            };
            let r = common::upload(probe.clone(), [tt, width], &device);
            let loss = (out * r).sum() + gathered.powi_scalar(2).sum();
            let grads = loss.backward();
            (
                common::host(rows.grad(&grads).unwrap()),
                common::host(w.grad(&grads).unwrap()),
            )
        };
        let (rows_k, w_k) = run(true);
        let (rows_t, w_t) = run(false);
        assert!(
            common::max_abs_diff(&rows_k, &rows_t) <= 1e-5,
            "{name} d rows"
        );
        assert!(common::max_abs_diff(&w_k, &w_t) <= 1e-5, "{name} d weights");
    }
}

#[test]
fn strategies_resolve_from_the_device() {
    for (name, device) in common::devices() {
        let kernels = moe_kernels::available(&device);
        let host = moe_kernels::host::host_available(&device);
        // CubeCL kernels on wgpu, host kernels on flex (not on its autodiff device: they
        // record no gradient), tensor ops on ndarray.
        assert_eq!(host, name == "flex", "{name}");
        assert!(!moe_kernels::host::host_available(
            &device.clone().autodiff()
        ));
        let expected = if kernels {
            DispatchPath::Kernels
        } else if host {
            DispatchPath::HostKernels
        } else {
            DispatchPath::TensorOps
        };
        assert_eq!(
            DispatchStrategy::Auto.resolve(&device).unwrap(),
            expected,
            "{name}"
        );
        if kernels || host {
            assert_eq!(
                DispatchStrategy::Kernels.resolve(&device).unwrap(),
                expected
            );
        }
        assert_eq!(
            DispatchStrategy::Auto
                .resolve(&device.clone().autodiff())
                .unwrap(),
            if kernels {
                DispatchPath::Kernels
            } else {
                DispatchPath::TensorOps
            },
            "{name} autodiff"
        );
        assert_eq!(
            DispatchStrategy::TensorOps.resolve(&device).unwrap(),
            DispatchPath::TensorOps
        );
        // The autodiff device of a backend resolves like the backend.
        assert_eq!(moe_kernels::available(&device.clone().autodiff()), kernels);
        if !kernels && !host {
            let err = DispatchStrategy::Kernels.resolve(&device).unwrap_err();
            assert!(
                matches!(err, MoeError::KernelsUnavailable { .. }),
                "{name}: {err}"
            );
            // Forcing kernels on such a device is a typed error from the layer, not a panic.
            let layer = MoeLayerConfig::olmoe(8, 4, 4, 2)
                .init(&device)
                .unwrap()
                .with_dispatch(DispatchStrategy::Kernels);
            let x = common::upload(vec![0.5; 16], [2, 8], &device);
            let err = layer.try_forward(x.clone(), &TopK::Configured).unwrap_err();
            assert!(
                matches!(err, MoeError::KernelsUnavailable { .. }),
                "{name}: {err}"
            );
            let err = moe_kernels::gather_rows(x, int_tensor(vec![0], [1], &device)).unwrap_err();
            assert!(
                matches!(err, KernelError::Unsupported { .. }),
                "{name}: {err}"
            );
        }
    }
    // wgpu compiled in and present: the kernels must run there.
    if cfg!(feature = "wgpu") && std::env::var("MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
        assert!(
            !kernel_devices().is_empty(),
            "wgpu is required but runs no kernel"
        );
    }
}
