//! The one decision of a forward call, as `MoeOutput::path` reports it: on every device of the
//! suite, which implementation ran the router epilogue and the experts, and the reason for
//! each fallback (tensor ops asked for, no kernel on the device, autodiff, more tokens than the
//! fused epilogue takes, a k per token, too many groups, f16 or strided expert weights on the
//! host kernels). Each fallback's output is checked against the tensor-op path, so a reported
//! path that did not run the layer right fails too.

use crate::common;

use burn::module::Param;
use burn::tensor::{DType, Device, Tensor};
use moe_core::dispatch::{
    FUSED_EPILOGUE_MAX_GROUPS, FUSED_EPILOGUE_MAX_TOKENS, Fallback, StepPath,
};
use moe_core::{
    CallPath, DispatchPath, DispatchStrategy, Experts, GroupLimit, MoeLayer, MoeLayerConfig,
    RouterKind, TopK,
};

const D: usize = 16;

fn kernel() -> StepPath {
    StepPath {
        ran: DispatchPath::Kernels,
        fallback: None,
    }
}

fn host() -> StepPath {
    StepPath {
        ran: DispatchPath::HostKernels,
        fallback: None,
    }
}

fn ops(why: Fallback) -> StepPath {
    StepPath {
        ran: DispatchPath::TensorOps,
        fallback: Some(why),
    }
}

/// What the device runs when nothing forces a fallback.
fn device_kind(device: &Device) -> (bool, bool) {
    (
        moe_kernels::available(device),
        moe_kernels::host::host_available(device),
    )
}

/// The path of one call, and its output's distance from the same layer on tensor ops.
fn run(layer: &MoeLayer, tokens: usize, top_k: &TopK) -> (CallPath, f32) {
    let device = layer.router.weight.device();
    let x = common::upload(common::normal(tokens * D, 1.0, 7), [tokens, D], &device);
    let x = x.cast(layer.experts.up.val().dtype());
    let out = layer.try_forward(x.clone(), top_k).unwrap();
    let twin = layer
        .clone()
        .with_dispatch(DispatchStrategy::TensorOps)
        .try_forward(x, top_k)
        .unwrap();
    let diff = common::max_abs_diff(
        &common::host(out.hidden.cast(DType::F32)),
        &common::host(twin.hidden.cast(DType::F32)),
    );
    (out.path, diff)
}

fn olmoe(device: &Device) -> MoeLayer {
    common::seeded_layer(&MoeLayerConfig::olmoe(D, 8, 8, 2), 11, device)
}

/// `experts` with every matrix made by `make` from the stored one.
fn remade(experts: &Experts, make: impl Fn(Tensor<3>) -> Tensor<3>) -> Experts {
    let remake = |p: &Param<Tensor<3>>| make(p.val());
    Experts::from_tensors(
        experts.gate.as_ref().map(remake),
        remake(&experts.up),
        remake(&experts.down),
    )
    .unwrap()
}

#[test]
fn the_default_path_is_the_devices_kernels() {
    for (name, device) in common::devices() {
        let (kernels, host_kernels) = device_kind(&device);
        let (path, diff) = run(&olmoe(&device), 3, &TopK::Configured);
        let want = match (kernels, host_kernels) {
            (true, _) => CallPath {
                epilogue: Some(kernel()),
                experts: kernel(),
            },
            (false, true) => CallPath {
                epilogue: Some(ops(Fallback::NoKernel)),
                experts: host(),
            },
            (false, false) => CallPath {
                epilogue: Some(ops(Fallback::NoKernel)),
                experts: ops(Fallback::NoKernel),
            },
        };
        assert_eq!(path, want, "{name}: {path}");
        assert!(diff < 1e-4, "{name}: {diff}");
    }
}

#[test]
fn tensor_ops_asked_for_are_reported_as_asked() {
    for (name, device) in common::devices() {
        let layer = olmoe(&device).with_dispatch(DispatchStrategy::TensorOps);
        let (path, _) = run(&layer, 3, &TopK::Configured);
        let want = CallPath {
            epilogue: Some(ops(Fallback::Requested)),
            experts: ops(Fallback::Requested),
        };
        assert_eq!(path, want, "{name}: {path}");
        assert_eq!(
            path.to_string(),
            "experts tensor-ops (tensor ops requested), epilogue tensor-ops (tensor ops requested)"
        );
    }
}

#[test]
fn the_fused_epilogue_takes_up_to_its_token_limit() {
    for (name, device) in common::devices() {
        let (kernels, _) = device_kind(&device);
        let layer = olmoe(&device);
        let (at_limit, diff) = run(&layer, FUSED_EPILOGUE_MAX_TOKENS, &TopK::Configured);
        assert!(diff < 1e-4, "{name}: {diff}");
        let (over, diff) = run(&layer, FUSED_EPILOGUE_MAX_TOKENS + 1, &TopK::Configured);
        assert!(diff < 1e-4, "{name}: {diff}");
        if kernels {
            assert_eq!(at_limit.epilogue, Some(kernel()), "{name}");
            let many = Fallback::ManyTokens {
                tokens: FUSED_EPILOGUE_MAX_TOKENS + 1,
                max: FUSED_EPILOGUE_MAX_TOKENS,
            };
            assert_eq!(over.epilogue, Some(ops(many)), "{name}: {over}");
            assert_eq!(over.experts, kernel(), "{name}");
        } else {
            assert_eq!(over.epilogue, Some(ops(Fallback::NoKernel)), "{name}");
        }
    }
}

#[test]
fn a_k_per_token_takes_the_composed_epilogue() {
    for (name, device) in common::devices() {
        let (kernels, host_kernels) = device_kind(&device);
        let top_k = TopK::PerToken(vec![1, 2, 1, 2]);
        let (path, diff) = run(&olmoe(&device), 4, &top_k);
        assert!(diff < 1e-4, "{name}: {diff}");
        let epilogue = match kernels {
            true => ops(Fallback::PerTokenK),
            false => ops(Fallback::NoKernel),
        };
        assert_eq!(path.epilogue, Some(epilogue), "{name}: {path}");
        // The experts' path does not depend on k.
        let experts = match (kernels, host_kernels) {
            (true, _) => kernel(),
            (false, true) => host(),
            (false, false) => ops(Fallback::NoKernel),
        };
        assert_eq!(path.experts, experts, "{name}: {path}");
    }
}

#[test]
fn autodiff_keeps_the_kernels_that_have_a_backward_pass() {
    for (name, device) in common::devices() {
        let (kernels, host_kernels) = device_kind(&device);
        let device = device.autodiff();
        let (path, diff) = run(&olmoe(&device), 3, &TopK::Configured);
        assert!(diff < 1e-4, "{name}: {diff}");
        // The grouped GEMM has a backward pass; the fused epilogue and the host kernels not.
        let want = match (kernels, host_kernels) {
            (true, _) => CallPath {
                epilogue: Some(ops(Fallback::Autodiff)),
                experts: kernel(),
            },
            (false, true) => CallPath {
                epilogue: Some(ops(Fallback::NoKernel)),
                experts: ops(Fallback::Autodiff),
            },
            (false, false) => CallPath {
                epilogue: Some(ops(Fallback::NoKernel)),
                experts: ops(Fallback::NoKernel),
            },
        };
        assert_eq!(path, want, "{name} autodiff: {path}");
    }
}

#[test]
fn weights_the_host_kernels_cannot_read_take_tensor_ops() {
    for (name, device) in common::devices() {
        // The weights' dtype and layout matter only to the host kernels.
        if !moe_kernels::host::host_available(&device) {
            continue;
        }
        let f16 = {
            let mut layer = olmoe(&device);
            layer.experts = remade(&layer.experts, |w| w.cast(DType::F16));
            layer
        };
        // f32 weights stored transposed: a strided view of `[E, N, K]`.
        let strided = {
            let mut layer = olmoe(&device);
            layer.experts = remade(&layer.experts, |w| {
                let stored = w.swap_dims(1, 2);
                let stored = Tensor::<3>::from_data(stored.into_data(), &device);
                stored.swap_dims(1, 2)
            });
            layer
        };
        for (layer, why, case) in [
            (&f16, Fallback::WeightDType(DType::F16), "f16"),
            (&strided, Fallback::WeightLayout, "strided"),
        ] {
            let (path, diff) = run(layer, 5, &TopK::Configured);
            let tolerance = if case == "f16" { 1e-2 } else { 1e-4 };
            assert!(diff < tolerance, "{name} {case}: {diff}");
            assert_eq!(path.experts, ops(why), "{name} {case}: {path}");
        }
    }
    // The same layer with its f32 weights stored contiguous runs the host kernels again.
    for (name, device) in common::devices() {
        if moe_kernels::host::host_available(&device) {
            let (path, _) = run(&olmoe(&device), 5, &TopK::Configured);
            assert_eq!(path.experts, host(), "{name}: {path}");
        }
    }
}

#[test]
fn more_groups_than_the_fused_epilogue_keeps_take_the_composed_ops() {
    for (name, device) in common::devices() {
        let (kernels, _) = device_kind(&device);
        let experts = 2 * FUSED_EPILOGUE_MAX_GROUPS;
        for (groups, fused) in [(FUSED_EPILOGUE_MAX_GROUPS, true), (experts, false)] {
            let config = MoeLayerConfig::deepseek_v3(
                D,
                8,
                experts,
                4,
                GroupLimit {
                    n_group: groups,
                    topk_group: 4,
                },
                2.5,
                8,
            );
            let layer = common::seeded_layer(&config, 5, &device);
            let (path, diff) = run(&layer, 3, &TopK::Configured);
            assert!(diff < 1e-4, "{name} {groups} groups: {diff}");
            let want = match (kernels, fused) {
                (true, true) => kernel(),
                (true, false) => ops(Fallback::ManyGroups {
                    groups,
                    max: FUSED_EPILOGUE_MAX_GROUPS,
                }),
                (false, _) => ops(Fallback::NoKernel),
            };
            assert_eq!(path.epilogue, Some(want), "{name} {groups} groups: {path}");
        }
    }
}

#[test]
fn routers_without_a_top_k_epilogue_report_none() {
    for (name, device) in common::devices() {
        let config =
            MoeLayerConfig::olmoe(D, 8, 8, 2).with_router_kind(RouterKind::Hash { seed: 3 });
        let layer = common::seeded_layer(&config, 2, &device);
        let ids = Tensor::<1, burn::tensor::Int>::arange(0..3, &device);
        let x = common::upload(common::normal(3 * D, 1.0, 1), [3, D], &device);
        let options = moe_core::ForwardOptions::new().with_token_ids(ids);
        let out = layer.try_forward_with(x, &options).unwrap();
        assert_eq!(out.path.epilogue, None, "{name}: {}", out.path);
    }
}

#[test]
fn kernels_forced_on_a_device_without_them_is_an_error() {
    for (name, device) in common::devices() {
        let (kernels, host_kernels) = device_kind(&device);
        if kernels || host_kernels {
            continue;
        }
        let layer = olmoe(&device).with_dispatch(DispatchStrategy::Kernels);
        let x = common::upload(vec![0.5; 2 * D], [2, D], &device);
        let err = layer.try_forward(x, &TopK::Configured).unwrap_err();
        assert!(
            matches!(err, moe_core::MoeError::KernelsUnavailable { .. }),
            "{name}: {err}"
        );
    }
}
