//! The fused router epilogue kernel (`moe_kernels::route_epilogue`, used by the router on the
//! kernel path when no gradient is needed and the input is short) against the router's
//! composed tensor ops, through `Router::select`: softmax
//! with and without renormalisation, sigmoid + selection bias + group-limited top-k + scaling
//! (DeepSeek-V3), k = 1 and k = E, E = 1, one token to a thousand, exact ties; its typed errors;
//! and the cases where the router must keep the composed ops (autodiff, per-token k).

use crate::common;

use burn::tensor::{DType, Tensor};
use moe_core::{DispatchStrategy, GroupLimit, MoeLayer, MoeLayerConfig, Scoring, TopK};
use moe_kernels::{self, EpilogueSpec, KernelError};

fn kernel_devices() -> Vec<(&'static str, burn::tensor::Device)> {
    common::devices()
        .into_iter()
        .filter(|(_, d)| moe_kernels::available(d))
        .collect()
}

/// Routes `x` through `layer`'s router after its logits with `Router::select` on both
/// strategies (the fused kernel whatever the number of tokens) and compares them token by
/// token; a token whose k-th and (k+1)-th selection values lie within `1e-6` (a near-tie the
/// two score computations may order either way) is skipped. Returns the tokens compared.
fn compare(layer: &MoeLayer, x: Tensor<2>, k: usize, what: &str) -> usize {
    let e = layer.num_experts();
    let t = x.dims()[0];
    let logits = x.matmul(layer.router.weight.val());
    let select = |strategy| layer.router.select(logits.clone(), k, strategy).unwrap();
    let (ids_f, w_f) = select(DispatchStrategy::Kernels);
    let (ids_c, w_c) = select(DispatchStrategy::TensorOps);
    let scores = common::host(match layer.router.settings.scoring {
        Scoring::Softmax => burn::tensor::activation::softmax(logits, 1),
        Scoring::Sigmoid => burn::tensor::activation::sigmoid(logits),
    });
    let bias = layer
        .router
        .selection_bias
        .as_ref()
        .map(|b| common::host(b.val()));
    let (ids_f, ids_c) = (common::host_int(ids_f), common::host_int(ids_c));
    let (w_f, w_c) = (common::host(w_f), common::host(w_c));
    let mut compared = 0;
    for token in 0..t {
        let mut values: Vec<f32> = (0..e)
            .map(|i| scores[token * e + i] + bias.as_ref().map_or(0.0, |b| b[i]))
            .collect();
        values.sort_by(|a, b| b.partial_cmp(a).unwrap());
        if k < e && (values[k - 1] - values[k]).abs() < 1e-6 && values[k - 1] != values[k] {
            continue;
        }
        let row = token * k..(token + 1) * k;
        assert_eq!(
            ids_f[row.clone()],
            ids_c[row.clone()],
            "{what}: token {token}"
        );
        let err = common::max_abs_diff(&w_f[row.clone()], &w_c[row]);
        assert!(err <= 1e-6, "{what}: token {token} weights {err:e}");
        compared += 1;
    }
    compared
}

#[test]
fn fused_epilogue_equals_the_composed_router() {
    for (name, device) in kernel_devices() {
        let mut total = 0;
        for (t, e, k) in [
            (1, 8, 1),
            (3, 1, 1),
            (64, 64, 8),
            (1000, 8, 2),
            (5, 128, 128),
        ] {
            for normalize in [false, true] {
                let config = MoeLayerConfig::olmoe(32, 8, e, k).with_normalize_top_k(normalize);
                let layer = common::seeded_layer(&config, (t + e) as u64, &device);
                let x = common::upload(common::normal(t * 32, 1.0, 7), [t, 32], &device);
                let what = format!("{name} softmax t {t} e {e} k {k} norm {normalize}");
                let n = compare(&layer, x, k, &what);
                assert!(n * 10 >= t * 9, "{what}: only {n} of {t} tokens compared");
                total += n;
            }
        }
        // DeepSeek-V3: sigmoid, selection bias, groups of 2 and of 1, scaling.
        for (e, k, groups) in [(16, 4, (4, 2)), (8, 3, (8, 3)), (32, 8, (8, 4))] {
            let (n_group, topk_group) = groups;
            let config = MoeLayerConfig::deepseek_v3(
                32,
                8,
                e,
                k,
                GroupLimit::new(n_group, topk_group),
                2.5,
                8,
            );
            let layer = common::seeded_layer(&config, e as u64, &device);
            let t = 200;
            let x = common::upload(common::normal(t * 32, 1.0, 8), [t, 32], &device);
            let what = format!("{name} deepseek e {e} k {k} groups {groups:?}");
            let n = compare(&layer, x, k, &what);
            assert!(n * 10 >= t * 9, "{what}: only {n} of {t} tokens compared");
            total += n;
        }
        // Exact ties (a zero router): every expert scores alike, the lowest ids win, in order.
        let config = MoeLayerConfig::olmoe(16, 8, 6, 3);
        let mut layer = common::seeded_layer(&config, 1, &device);
        layer.router.weight = burn::module::Param::from_tensor(Tensor::zeros([16, 6], &device));
        let x = common::upload(common::normal(4 * 16, 1.0, 3), [4, 16], &device);
        let fused = layer
            .router
            .route_with(x, &TopK::Configured, DispatchStrategy::Kernels)
            .unwrap();
        assert_eq!(
            common::host_int(fused.expert_ids),
            [0, 1, 2].repeat(4),
            "{name} ties"
        );
        eprintln!("{name}: fused and composed routing agree on {total} tokens");
    }
}

#[test]
fn logits_whose_scores_coincide_rank_as_their_scores() {
    for (name, device) in kernel_devices() {
        // Softmax entries that underflow to 0, nearly equal logits, sigmoids that round to 1.
        let rows: [[f32; 6]; 3] = [
            [0.0, -200.0, -150.0, -300.0, -120.0, -0.5],
            [3.0, 3.0 + 1e-7, 3.0 - 1e-7, 3.0, -1.0, 2.0],
            [20.0, 30.0, 17.0, 40.0, -100.0, -90.0],
        ];
        for sigmoid in [false, true] {
            let values: Vec<f32> = rows.iter().flatten().copied().collect();
            let logits = common::upload(values, [3, 6], &device);
            let spec = EpilogueSpec {
                top_k: 6,
                sigmoid,
                normalize: false,
                scale: 1.0,
                groups: None,
            };
            let (ids, weights) = moe_kernels::route_epilogue(logits.clone(), None, spec).unwrap();
            let scores = match sigmoid {
                true => burn::tensor::activation::sigmoid(logits),
                false => burn::tensor::activation::softmax(logits, 1),
            };
            let (want_weights, want_ids) = scores.topk_with_indices(6, 1);
            assert_eq!(
                common::host_int(ids),
                common::host_int(want_ids),
                "{name} sigmoid {sigmoid}"
            );
            let err = common::max_abs_diff(&common::host(weights), &common::host(want_weights));
            assert!(err <= 1e-7, "{name} sigmoid {sigmoid}: {err:e}");
        }
    }
}

#[test]
fn the_router_keeps_the_composed_ops_where_it_must() {
    for (name, device) in kernel_devices() {
        // Autodiff: the weights must carry gradients into the router.
        let ad = device.clone().autodiff();
        let config = MoeLayerConfig::olmoe(16, 8, 8, 2).with_normalize_top_k(true);
        let layer = common::seeded_layer(&config, 4, &ad);
        let x = common::upload(common::normal(10 * 16, 1.0, 5), [10, 16], &ad);
        let routing = layer
            .router
            .route_with(x, &TopK::Configured, DispatchStrategy::Kernels)
            .unwrap();
        let grads = routing.weights.powi_scalar(2).sum().backward();
        let g = common::host(layer.router.weight.grad(&grads).unwrap());
        assert!(g.iter().any(|v| *v != 0.0), "{name}: no router gradient");

        // Per-token k: unused slots hold id E and weight 0.
        let layer = common::seeded_layer(&config, 4, &device);
        let x = common::upload(common::normal(3 * 16, 1.0, 6), [3, 16], &device);
        let routing = layer
            .router
            .route_with(x, &TopK::PerToken(vec![1, 2, 1]), DispatchStrategy::Kernels)
            .unwrap();
        let ids = common::host_int(routing.expert_ids);
        assert_eq!((ids[1], ids[5]), (8, 8), "{name}: {ids:?}");
    }
}

#[test]
fn bad_epilogue_calls_are_typed_errors() {
    for (name, device) in kernel_devices() {
        let logits = Tensor::<2>::zeros([4, 8], &device);
        let spec = EpilogueSpec {
            top_k: 2,
            sigmoid: false,
            normalize: true,
            scale: 1.0,
            groups: None,
        };
        let cases: Vec<(Tensor<2>, Option<Tensor<1>>, EpilogueSpec, &str)> = vec![
            (
                logits.clone(),
                None,
                EpilogueSpec { top_k: 9, ..spec },
                "k = 9",
            ),
            (
                logits.clone(),
                None,
                EpilogueSpec { top_k: 0, ..spec },
                "k = 0",
            ),
            (
                logits.clone(),
                None,
                EpilogueSpec {
                    groups: Some((3, 1)),
                    ..spec
                },
                "3 groups",
            ),
            (
                logits.clone(),
                None,
                EpilogueSpec {
                    top_k: 5,
                    groups: Some((4, 2)),
                    ..spec
                },
                "from 2 of 4 groups",
            ),
            (
                logits.clone(),
                Some(Tensor::zeros([7], &device)),
                spec,
                "bias [7]",
            ),
        ];
        for (logits, bias, spec, needle) in cases {
            let err = moe_kernels::route_epilogue(logits, bias, spec).unwrap_err();
            assert!(
                matches!(err, KernelError::Shape { .. }) && err.to_string().contains(needle),
                "{name}: {err}"
            );
        }
        if device.supports_dtype(DType::F16) {
            let err = moe_kernels::route_epilogue(logits.cast(DType::F16), None, spec).unwrap_err();
            assert!(err.to_string().contains("must be f32"), "{name}: {err}");
        }
    }
    // Not a CubeCL device.
    let cpu = common::cpu();
    if moe_kernels::available(&cpu) {
        return;
    }
    let err = moe_kernels::route_epilogue(
        Tensor::<2>::zeros([2, 4], &cpu),
        None,
        EpilogueSpec {
            top_k: 1,
            sigmoid: false,
            normalize: false,
            scale: 1.0,
            groups: None,
        },
    )
    .unwrap_err();
    assert!(matches!(err, KernelError::Unsupported { .. }), "{err}");
}
