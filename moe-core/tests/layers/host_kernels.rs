//! The host kernels (`DispatchPath::HostKernels`, the flex default) against the tensor-op path
//! on shapes that reach every branch of the expert products (vector tails, the streaming
//! panel and the `gemm` crate), with bf16 weights, across thread counts, and on bad routings.

use crate::common;

use burn::module::Param;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use moe_core::{
    DispatchPath, DispatchStrategy, ExpertActivation, MoeError, MoeLayer, MoeLayerConfig, Routing,
    TopK,
};
use moe_kernels::host::{self, PANEL_MAX_ROWS};

fn flex() -> Option<Device> {
    common::devices()
        .into_iter()
        .find(|(name, _)| *name == "flex")
        .map(|(_, d)| d)
}

fn run(layer: &MoeLayer, x: &[f32], t: usize, k: usize, strategy: DispatchStrategy) -> Vec<f32> {
    let device = layer.router.weight.device();
    let layer = layer.clone().with_dispatch(strategy);
    let x = common::upload(x.to_vec(), [t, layer.d_model()], &device);
    common::host(layer.try_forward(x, &TopK::Fixed(k)).unwrap().hidden)
}

/// `experts` with every matrix cast to `dtype` (stored contiguous, row-major).
fn cast_experts(experts: &moe_core::Experts, dtype: DType) -> moe_core::Experts {
    let cast = |p: &Param<Tensor<3>>| p.val().cast(dtype);
    moe_core::Experts::from_tensors(
        experts.gate.as_ref().map(cast),
        cast(&experts.up),
        cast(&experts.down),
    )
    .unwrap()
}

/// `experts` rounded to bf16 and widened back to f32.
fn widened(experts: &moe_core::Experts) -> moe_core::Experts {
    cast_experts(&cast_experts(experts, DType::BF16), DType::F32)
}

fn largest(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

#[test]
fn host_kernels_match_tensor_ops_on_every_branch() {
    let Some(device) = flex() else { return };
    assert_eq!(
        DispatchStrategy::Auto.resolve(&device).unwrap(),
        DispatchPath::HostKernels
    );
    // d_model 44 and d_ff 72: column blocks with vector tails; T up to 300 with E = 4 makes
    // segments both shorter and longer than PANEL_MAX_ROWS.
    for activation in [ExpertActivation::SwiGlu, ExpertActivation::Gelu] {
        let config = MoeLayerConfig::olmoe(44, 72, 4, 2).with_activation(activation);
        let layer = common::seeded_layer(&config, 11, &device);
        for t in [1, 3, 2 * PANEL_MAX_ROWS + 5, 300] {
            for k in [1, 2, 4] {
                let x = common::normal(t * 44, 1.0, (t * 10 + k) as u64);
                let host = run(&layer, &x, t, k, DispatchStrategy::Kernels);
                let ops = run(&layer, &x, t, k, DispatchStrategy::TensorOps);
                let err = common::max_abs_diff(&host, &ops);
                assert!(
                    err <= 1e-5 * largest(&ops).max(1.0),
                    "{activation:?} T={t} k={k}: off by {err:e}"
                );
            }
        }
    }
}

#[test]
fn every_token_to_one_expert_and_empty_experts() {
    let Some(device) = flex() else { return };
    let layer = common::seeded_layer(&MoeLayerConfig::olmoe(24, 40, 5, 1), 3, &device);
    for t in [1, PANEL_MAX_ROWS, PANEL_MAX_ROWS + 1, 70] {
        // every token to expert 3 (the other four are empty), one token's slot unused
        let mut ids = vec![3i64; t];
        ids[t - 1] = 5;
        let weights: Vec<f32> = (0..t).map(|i| 0.5 + i as f32 / t as f32).collect();
        let routing = Routing::new(
            Tensor::<2, Int>::from_data(TensorData::new(ids, [t, 1]), &device),
            common::upload(weights.clone(), [t, 1], &device),
            5,
        )
        .unwrap();
        let x = common::upload(common::normal(t * 24, 1.0, t as u64), [t, 24], &device);
        let got = common::host(layer.experts.forward(x.clone(), &routing).unwrap());
        let want = common::host(layer.experts.forward_expert(3, x));
        for token in 0..t {
            for c in 0..24 {
                let w = if token == t - 1 { 0.0 } else { weights[token] };
                let (g, e) = (got[token * 24 + c], w * want[token * 24 + c]);
                assert!((g - e).abs() <= 1e-5, "T={t} token {token}: {g} vs {e}");
            }
        }
    }
}

#[test]
fn bf16_weights_are_widened_exactly() {
    let Some(device) = flex() else { return };
    let config = MoeLayerConfig::olmoe(32, 48, 4, 2);
    let layer = common::seeded_layer(&config, 5, &device);
    // the same weights, rounded to bf16: stored as bf16, and stored as f32
    let mut bf16 = layer.clone();
    bf16.experts = cast_experts(&layer.experts, DType::BF16);
    let mut rounded = layer.clone();
    rounded.experts = widened(&layer.experts);
    for t in [1, 40] {
        let x = common::normal(t * 32, 1.0, t as u64);
        let a = run(&bf16, &x, t, 2, DispatchStrategy::Kernels);
        let b = run(&rounded, &x, t, 2, DispatchStrategy::Kernels);
        assert_eq!(
            a, b,
            "T={t}: bf16 storage must compute like its f32 widening"
        );
        // the tensor ops take f32 rows on bf16 weights too, computing in f32
        let ops = run(&bf16, &x, t, 2, DispatchStrategy::TensorOps);
        let err = common::max_abs_diff(&ops, &a);
        assert!(
            err <= 1e-5 * largest(&a).max(1.0),
            "T={t}: tensor ops off by {err:e}"
        );
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let Some(device) = flex() else { return };
    let layer = common::seeded_layer(&MoeLayerConfig::olmoe(64, 256, 8, 2), 9, &device);
    // and bf16 weights as `with_host_layout` stores them, in a bf16 computation
    let mut bf16 = layer.clone();
    bf16.experts = cast_experts(&layer.experts, DType::BF16).with_host_layout();
    for (layer, dtype) in [(&layer, DType::F32), (&bf16, DType::BF16)] {
        for t in [1, 9, 200] {
            let x = common::normal(t * 64, 1.0, t as u64);
            let with = |threads: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| {
                        let layer = layer.clone().with_dispatch(DispatchStrategy::Kernels);
                        let x = common::upload(x.clone(), [t, 64], &device).cast(dtype);
                        let out = layer.try_forward(x, &TopK::Fixed(2)).unwrap().hidden;
                        common::host(out.cast(DType::F32))
                    })
            };
            let one = with(1);
            assert_eq!(one, with(2), "{dtype:?} T={t}");
            assert_eq!(one, with(5), "{dtype:?} T={t}");
        }
    }
}

/// `HostTensor::matrix` takes a view as out-major weights only when it is one: experts sliced
/// off an out-major stack (an offset start) or its outputs narrowed with one expert, but not
/// its rows narrowed nor its outputs narrowed across experts (no longer one block per expert).
#[test]
fn out_major_views_are_read_only_where_they_are_out_major() {
    let Some(device) = flex() else { return };
    let (e, k, n) = (3usize, 5usize, 4usize);
    // stored [E, N, K]: value = 100 e + 10 c + kk at (e, kk, c) of the [E, K, N] view
    let stored: Vec<f32> = (0..e * n * k)
        .map(|i| (100 * (i / (n * k)) + 10 * ((i / k) % n) + i % k) as f32)
        .collect();
    let view = Tensor::<3>::from_data(TensorData::new(stored, [e, n, k]), (&device, DType::BF16))
        .swap_dims(1, 2);
    let kind = |t: Tensor<3>| match host::HostTensor::new(t).unwrap().matrix() {
        Some(host::Matrix::Bf16T(w)) => Some(w.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
        _ => None,
    };
    // expert 1 alone: its [N, K] block
    let one = kind(view.clone().narrow(0, 1, 1)).expect("an expert of an out-major stack");
    let want: Vec<f32> = (0..n * k)
        .map(|i| (100 + 10 * (i / k) + i % k) as f32)
        .collect();
    assert_eq!(one, want);
    // outputs 1..3 of expert 2
    let outs = kind(view.clone().narrow(0, 2, 1).narrow(2, 1, 2)).expect("outputs of one expert");
    let want: Vec<f32> = (0..2 * k)
        .map(|i| (200 + 10 * (1 + i / k) + i % k) as f32)
        .collect();
    assert_eq!(outs, want);
    assert!(
        kind(view.clone().narrow(1, 0, k - 1)).is_none(),
        "rows narrowed"
    );
    assert!(
        kind(view.clone().narrow(2, 0, n - 1)).is_none(),
        "outputs across experts"
    );
    assert!(
        kind(view.swap_dims(1, 2)).is_none(),
        "contiguous: row-major, not out-major"
    );
}

/// `with_host_layout` moves only bf16 weights: f32 experts come back as they are, and GELU
/// experts (no gate) move their two matrices.
#[test]
fn with_host_layout_moves_only_bf16_weights() {
    let Some(device) = flex() else { return };
    let config = MoeLayerConfig::olmoe(32, 48, 4, 2).with_activation(ExpertActivation::Gelu);
    let layer = common::seeded_layer(&config, 3, &device);
    let f32_experts = layer.experts.clone().with_host_layout();
    assert!(matches!(
        host::HostTensor::new(f32_experts.up.val())
            .unwrap()
            .matrix(),
        Some(host::Matrix::F32(_))
    ));
    let gelu = cast_experts(&layer.experts, DType::BF16).with_host_layout();
    assert!(gelu.gate.is_none());
    for p in [&gelu.up, &gelu.down] {
        let moved = matches!(
            host::HostTensor::new(p.val()).unwrap().matrix(),
            Some(host::Matrix::Bf16T(_))
        );
        assert_eq!(moved, host::bf16_out_major_preferred());
    }
    assert_eq!(
        common::host(gelu.up.val().cast(DType::F32)),
        common::host(layer.experts.up.val().cast(DType::BF16).cast(DType::F32))
    );
}

#[test]
fn bad_routings_are_typed_errors() {
    let Some(device) = flex() else { return };
    let layer = common::seeded_layer(&MoeLayerConfig::olmoe(8, 8, 4, 2), 1, &device);
    let x = common::upload(vec![0.1; 16], [2, 8], &device);
    for bad in [7i64, -1] {
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![0, 1, 2, bad], [2, 2]), &device);
        let weights = common::upload(vec![0.25; 4], [2, 2], &device);
        // Routing::new refuses the id up front ...
        let err = Routing::new(ids.clone(), weights.clone(), 4).unwrap_err();
        assert_eq!(
            err,
            MoeError::ExpertIdOutOfRange {
                position: 3,
                id: bad,
                num_experts: 4
            }
        );
        // ... and a routing assembled field by field still meets the kernels' own check.
        let routing = Routing {
            expert_ids: ids,
            weights,
            logits: None,
            scores: None,
            num_experts: 4,
            dropped: None,
        };
        let err = layer.experts.forward(x.clone(), &routing).unwrap_err();
        assert!(
            matches!(err, MoeError::Kernel(_)) && err.to_string().contains(&format!("id {bad}")),
            "{err}"
        );
    }
    // the kernels themselves check their slices
    let w = vec![0.0f32; 10];
    let err =
        host::ExpertMatrices::new(None, host::Matrix::F32(&w), host::Matrix::F32(&w), 2, 2, 3)
            .unwrap_err();
    assert!(
        err.to_string()
            .contains("up holds 10 values, expected 2 experts × 2 × 3 = 12"),
        "{err}"
    );
}

/// A bf16 computation (bf16 input, bf16 expert weights) rounds its activations as a bf16
/// model does and sums exact products in f32 on every path: a token's output is the same,
/// up to one bf16 step of the cast at the end, whether it runs alone (the streaming panel)
/// or in a batch of 300 (the packed tiles: `vdpbf16ps` pairs where the CPU has AVX-512 BF16);
/// and it is the f32 computation of the same weights on bf16-rounded activations, up to the
/// rounding of the hidden rows.
#[test]
fn bf16_compute_matches_alone_and_in_a_batch() {
    let Some(device) = flex() else { return };
    assert_eq!(
        DispatchStrategy::Auto.resolve(&device).unwrap(),
        DispatchPath::HostKernels
    );
    let (h, f, e, k, t) = (64usize, 96usize, 4usize, 2usize, 300usize);
    let layer = common::seeded_layer(&MoeLayerConfig::olmoe(h, f, e, k), 21, &device);
    let bf16 = cast_experts(&layer.experts, DType::BF16);
    let f32_twin = widened(&layer.experts);
    // the host kernels read these weights in place (else the layer would take the tensor ops)
    let stored = host::HostTensor::new(bf16.up.val()).unwrap();
    assert!(matches!(stored.matrix(), Some(host::Matrix::Bf16(_))));
    // every token to two distinct experts (the second 1 to 3 after the first): segments of
    // about 150 rows
    let ids: Vec<i64> = (0..t)
        .flat_map(|i| [i % e, (i % e + 1 + (i / e) % (e - 1)) % e])
        .map(|id| id as i64)
        .collect();
    let weights: Vec<f32> = (0..t * k).map(|i| 0.25 + (i % 7) as f32 / 10.0).collect();
    let routing = |rows: std::ops::Range<usize>| {
        let n = rows.len();
        Routing::new(
            Tensor::<2, Int>::from_data(
                TensorData::new(ids[rows.start * k..rows.end * k].to_vec(), [n, k]),
                &device,
            ),
            common::upload(
                weights[rows.start * k..rows.end * k].to_vec(),
                [n, k],
                &device,
            ),
            e,
        )
        .unwrap()
    };
    let x = common::upload(common::normal(t * h, 1.0, 77), [t, h], &device).cast(DType::BF16);
    let batch = common::host(
        bf16.forward(x.clone(), &routing(0..t))
            .unwrap()
            .cast(DType::F32),
    );
    let f32_batch = common::host(
        f32_twin
            .forward(x.clone().cast(DType::F32), &routing(0..t))
            .unwrap(),
    );
    let scale = largest(&f32_batch);
    for token in [0, 1, 150, 299] {
        let alone = bf16
            .forward(x.clone().narrow(0, token, 1), &routing(token..token + 1))
            .unwrap()
            .cast(DType::F32);
        let alone = common::host(alone);
        for c in 0..h {
            let (a, b) = (alone[c], batch[token * h + c]);
            // one bf16 step of the larger, plus a hidden value rounded the other way (about
            // 2^-8 of one term of the sum)
            let step = a.abs().max(b.abs()) / 128.0 + 1e-3 * scale;
            assert!(
                (a - b).abs() <= step,
                "token {token} [{c}]: alone {a} batch {b}"
            );
            let want = f32_batch[token * h + c];
            assert!(
                (b - want).abs() <= 2e-2 * scale,
                "token {token} [{c}]: bf16 {b} f32 {want}"
            );
        }
    }
}

/// bf16 expert weights moved out-major by `Experts::with_host_layout` (where the CPU has the
/// AVX-512 path; elsewhere they stay as they are) keep their shapes and values, and give the
/// row-major layer's outputs on every path: f32 and bf16 computations, segments from one row
/// (the `dots` product) to 300 (the packed tiles), the host kernels and the tensor ops.
#[test]
fn out_major_bf16_weights_give_the_row_major_results() {
    let Some(device) = flex() else { return };
    let (h, f, e, k) = (40usize, 72usize, 4usize, 2usize);
    let layer = common::seeded_layer(&MoeLayerConfig::olmoe(h, f, e, k), 33, &device);
    let mut row_major = layer.clone();
    row_major.experts = cast_experts(&layer.experts, DType::BF16);
    let mut out_major = row_major.clone();
    out_major.experts = out_major.experts.with_host_layout();
    let moved = host::bf16_out_major_preferred();
    for (a, b) in [
        (&row_major.experts.up, &out_major.experts.up),
        (&row_major.experts.down, &out_major.experts.down),
    ] {
        assert_eq!(a.dims(), b.dims());
        let stored = host::HostTensor::new(b.val()).unwrap();
        match moved {
            true => assert!(matches!(stored.matrix(), Some(host::Matrix::Bf16T(_)))),
            false => assert!(matches!(stored.matrix(), Some(host::Matrix::Bf16(_)))),
        }
        assert_eq!(
            common::host(a.val().cast(DType::F32)),
            common::host(b.val().cast(DType::F32)),
            "the values move, not change"
        );
    }
    // a second call leaves out-major weights as they are
    let again = out_major.experts.clone().with_host_layout();
    let stored = host::HostTensor::new(again.up.val()).unwrap();
    assert_eq!(
        matches!(stored.matrix(), Some(host::Matrix::Bf16T(_))),
        moved
    );
    let forward = |layer: &MoeLayer, x: &[f32], t: usize, dtype: DType, strategy| {
        let layer = layer.clone().with_dispatch(strategy);
        let x = common::upload(x.to_vec(), [t, h], &device).cast(dtype);
        common::host(
            layer
                .try_forward(x, &TopK::Fixed(k))
                .unwrap()
                .hidden
                .cast(DType::F32),
        )
    };
    for t in [1, 3, 2 * PANEL_MAX_ROWS + 5, 300] {
        let x = common::normal(t * h, 1.0, 500 + t as u64);
        for dtype in [DType::F32, DType::BF16] {
            for strategy in [DispatchStrategy::Kernels, DispatchStrategy::TensorOps] {
                let want = forward(&row_major, &x, t, dtype, strategy);
                let scale = largest(&want).max(1e-3);
                let got = forward(&out_major, &x, t, dtype, strategy);
                for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                    // f32: the same exact products summed in another order; bf16: a hidden
                    // value may round the other way (about 2^-8 of one term), and the output
                    // is cast to bf16 (one step of the larger)
                    let tol = match dtype {
                        DType::F32 => 1e-5 * scale,
                        _ => a.abs().max(b.abs()) / 128.0 + 2e-3 * scale,
                    };
                    assert!(
                        (a - b).abs() <= tol,
                        "T={t} {dtype:?} {strategy:?} [{i}]: out-major {a} row-major {b}"
                    );
                }
            }
        }
    }
}

/// A shared expert (and so a decoder's dense MLP) runs on the host kernels where the layer's
/// experts do, and matches its tensor-op twin (`forward_expert`, then the sigmoid gate): f32 and
/// bf16 weights, rows for the panel and for the tiles.
#[test]
fn shared_experts_on_the_host_kernels_match_their_twin() {
    use burn::tensor::activation::sigmoid;
    let Some(device) = flex() else { return };
    let config = MoeLayerConfig::qwen2_moe(48, 40, 4, 2, 56);
    let layer = common::seeded_layer(&config, 23, &device);
    let shared = layer.shared.as_ref().unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let ffn = cast_experts(&shared.ffn, dtype);
        let gate = shared.gate.as_ref().unwrap().val().cast(dtype);
        let shared = moe_core::SharedExpert::from_parts(ffn.clone(), Some(gate.clone())).unwrap();
        for t in [1, 3, 2 * PANEL_MAX_ROWS + 5, 150] {
            let x = common::upload(common::normal(t * 48, 1.0, 40 + t as u64), [t, 48], &device)
                .cast(dtype);
            let got = common::host(shared.forward(x.clone()).cast(DType::F32));
            let twin = ffn.forward_expert(0, x.clone()) * sigmoid(x.matmul(gate.clone()));
            let want = common::host(twin.cast(DType::F32));
            let tolerance = match dtype {
                DType::F32 => 1e-5,
                _ => 2e-2,
            } * largest(&want).max(1.0);
            let err = common::max_abs_diff(&got, &want);
            assert!(err <= tolerance, "{dtype:?} t{t}: off by {err}");
        }
    }
}
