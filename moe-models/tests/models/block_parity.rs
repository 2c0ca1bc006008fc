//! Parity with Hugging Face transformers 4.57 sparse-MoE blocks (tests/data/moe-block, made by
//! scripts/fixtures/make_moe_blocks.py): router logits, selected experts, routing weights and
//! block output, on every backend of the suite.

use crate::common;

use burn::tensor::{Device, Tensor, TensorData};
use moe_core::{MoeLayerConfig, TopK};
use moe_models::{ExpertNaming, TensorSource, load_block, load_block_as};

/// transformers reproduces itself within ~4e-6; the engine must stay within 1e-5.
const TOLERANCE: f32 = 1e-5;

struct Case {
    file: &'static str,
    naming: ExpertNaming,
    config: MoeLayerConfig,
    shared: bool,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            file: "olmoe_e8_k2",
            naming: ExpertNaming::Proj,
            config: MoeLayerConfig::olmoe(64, 32, 8, 2),
            shared: false,
        },
        Case {
            file: "mixtral_e8_k2",
            naming: ExpertNaming::Mixtral,
            config: MoeLayerConfig::mixtral(64, 32, 8, 2),
            shared: false,
        },
        Case {
            file: "qwen2moe_e8_k2_shared",
            naming: ExpertNaming::Proj,
            config: MoeLayerConfig::qwen2_moe(64, 32, 8, 2, 48),
            shared: true,
        },
        Case {
            file: "olmoe_e64_k8_h128",
            naming: ExpertNaming::Proj,
            config: MoeLayerConfig::olmoe(128, 64, 64, 8),
            shared: false,
        },
    ]
}

fn check_case(case: &Case, device_name: &str, device: &Device) {
    let path = common::data(&format!("moe-block/{}.safetensors", case.file));
    let bytes = std::fs::read(&path).unwrap();
    let source = TensorSource::from_bytes(bytes, path.display().to_string()).unwrap();
    let layer = load_block(&source, "", case.naming, &case.config, device).unwrap();

    let (d, e, k) = (
        case.config.d_model,
        case.config.num_experts,
        case.config.top_k,
    );
    let t = source.shape("input").unwrap()[0];
    let input = source.read_f32("input", &[t, d]).unwrap();
    let x = Tensor::<2>::from_data(TensorData::new(input, [t, d]), device);
    let out = layer.try_forward(x, &TopK::Configured).unwrap();

    let label = format!("{} on {device_name}", case.file);
    let logits = common::host(out.routing.logits.clone().unwrap());
    let want_logits = source.read_f32("router_logits", &[t, e]).unwrap();
    let logit_err = common::max_abs_diff(&logits, &want_logits);
    assert!(
        logit_err <= TOLERANCE,
        "{label}: router logits off by {logit_err:e}"
    );

    let ids = common::host_int(out.routing.expert_ids.clone());
    let want_ids = source.read_i64("topk_idx", &[t, k]).unwrap();
    assert_eq!(ids, want_ids, "{label}: selected experts differ");

    let weights = common::host(out.routing.weights.clone());
    let want_weights = source.read_f32("topk_weight", &[t, k]).unwrap();
    let weight_err = common::max_abs_diff(&weights, &want_weights);
    assert!(
        weight_err <= TOLERANCE,
        "{label}: routing weights off by {weight_err:e}"
    );

    let hidden = common::host(out.hidden);
    let want = source.read_f32("output", &[t, d]).unwrap();
    let out_err = common::max_abs_diff(&hidden, &want);
    assert!(
        out_err <= TOLERANCE,
        "{label}: block output off by {out_err:e}"
    );

    if case.shared {
        let shared = layer.shared.as_ref().unwrap();
        let x = Tensor::<2>::from_data(
            TensorData::new(source.read_f32("input", &[t, d]).unwrap(), [t, d]),
            device,
        );
        let ffn = common::host(shared.ffn.forward_expert(0, x.clone()));
        let want_ffn = source.read_f32("shared_expert_output", &[t, d]).unwrap();
        let ffn_err = common::max_abs_diff(&ffn, &want_ffn);
        assert!(
            ffn_err <= TOLERANCE,
            "{label}: shared expert off by {ffn_err:e}"
        );
        let gate = common::host(x.matmul(shared.gate.as_ref().unwrap().val()));
        let want_gate = source
            .read_f32("shared_expert_gate_logit", &[t, 1])
            .unwrap();
        let gate_err = common::max_abs_diff(&gate, &want_gate);
        assert!(
            gate_err <= TOLERANCE,
            "{label}: shared gate logit off by {gate_err:e}"
        );
    }
    eprintln!(
        "{label}: max abs diff logits {logit_err:.2e}, weights {weight_err:.2e}, output {out_err:.2e}"
    );
}

#[test]
fn olmoe_block_matches_transformers() {
    for (name, device) in common::devices() {
        check_case(&cases()[0], name, &device);
    }
}

#[test]
fn mixtral_block_matches_transformers() {
    for (name, device) in common::devices() {
        check_case(&cases()[1], name, &device);
    }
}

#[test]
fn qwen2_moe_block_with_shared_expert_matches_transformers() {
    for (name, device) in common::devices() {
        check_case(&cases()[2], name, &device);
    }
}

#[test]
fn olmoe_64_experts_top8_block_matches_transformers() {
    for (name, device) in common::devices() {
        check_case(&cases()[3], name, &device);
    }
}

/// The same block stored in BF16 and F16 loads (converted to f32) and stays within the
/// half-precision rounding of the weights.
#[test]
fn half_precision_checkpoints_load() {
    use safetensors::tensor::{Dtype, TensorView};
    let path = common::data("moe-block/olmoe_e8_k2.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let source = TensorSource::from_bytes(bytes, path.display().to_string()).unwrap();
    let config = MoeLayerConfig::olmoe(64, 32, 8, 2);
    let device = common::cpu();
    let input = source.read_f32("input", &[37, 64]).unwrap();
    let want = source.read_f32("output", &[37, 64]).unwrap();

    for (dtype, tolerance) in [(Dtype::BF16, 0.1f32), (Dtype::F16, 0.02)] {
        let weights: Vec<(String, Vec<usize>, Vec<u8>)> = source
            .names()
            .into_iter()
            .filter(|n| n == "gate.weight" || n.starts_with("experts."))
            .map(|name| {
                let shape = source.shape(&name).unwrap();
                let values = source.read_f32(&name, &shape).unwrap();
                let bytes: Vec<u8> = values
                    .iter()
                    .flat_map(|&v| match dtype {
                        Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes(),
                        _ => half::f16::from_f32(v).to_le_bytes(),
                    })
                    .collect();
                (name, shape, bytes)
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = weights
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        let half_bytes = safetensors::serialize(views, None).unwrap();
        let half_source = TensorSource::from_bytes(half_bytes, "half").unwrap();
        let layer = load_block(&half_source, "", ExpertNaming::Proj, &config, &device).unwrap();
        let x = Tensor::<2>::from_data(TensorData::new(input.clone(), [37, 64]), &device);
        let got = common::host(layer.forward(x));
        let err = common::max_abs_diff(&got, &want);
        assert!(err < tolerance, "{dtype:?}: off by {err}");
        assert!(
            err > 0.0,
            "{dtype:?}: rounding the weights must change something"
        );
        eprintln!("{dtype:?} weights: max abs diff {err:.2e}");
    }
}

/// The packed expert layout of newer transformers releases (`experts.gate_up_proj` `[E, 2I, H]`,
/// gate rows first; `experts.down_proj` `[E, H, I]`) loads to the very same layer.
#[test]
fn packed_expert_layout_loads_identically() {
    use safetensors::tensor::{Dtype, TensorView};
    let path = common::data("moe-block/olmoe_e8_k2.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let source = TensorSource::from_bytes(bytes, path.display().to_string()).unwrap();
    let (e, h, i) = (8, 64, 32);
    let mut gate_up = Vec::new();
    let mut down = Vec::new();
    for j in 0..e {
        for part in ["gate_proj", "up_proj"] {
            gate_up.extend(
                source
                    .read_f32(&format!("experts.{j}.{part}.weight"), &[i, h])
                    .unwrap(),
            );
        }
        down.extend(
            source
                .read_f32(&format!("experts.{j}.down_proj.weight"), &[h, i])
                .unwrap(),
        );
    }
    let router = source.read_f32("gate.weight", &[e, h]).unwrap();
    let le = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (gate_up, down, router) = (le(&gate_up), le(&down), le(&router));
    let views = vec![
        (
            "experts.gate_up_proj",
            TensorView::new(Dtype::F32, vec![e, 2 * i, h], &gate_up).unwrap(),
        ),
        (
            "experts.down_proj",
            TensorView::new(Dtype::F32, vec![e, h, i], &down).unwrap(),
        ),
        (
            "gate.weight",
            TensorView::new(Dtype::F32, vec![e, h], &router).unwrap(),
        ),
    ];
    let packed_bytes = safetensors::serialize(views, None).unwrap();
    let packed = TensorSource::from_bytes(packed_bytes, "packed").unwrap();
    let packed_source = &packed;

    let config = MoeLayerConfig::olmoe(h, i, e, 2);
    for (name, device) in common::devices() {
        let per_expert = load_block(&source, "", ExpertNaming::Proj, &config, &device).unwrap();
        let packed = load_block(&packed, "", ExpertNaming::Proj, &config, &device).unwrap();
        for (a, b) in [
            (
                per_expert.experts.gate.as_ref().unwrap().val(),
                packed.experts.gate.as_ref().unwrap().val(),
            ),
            (per_expert.experts.up.val(), packed.experts.up.val()),
            (per_expert.experts.down.val(), packed.experts.down.val()),
        ] {
            assert_eq!(common::host(a), common::host(b), "{name}");
        }
        let x = Tensor::<2>::from_data(
            TensorData::new(source.read_f32("input", &[37, h]).unwrap(), [37, h]),
            &device,
        );
        let want = source.read_f32("output", &[37, h]).unwrap();
        let err = common::max_abs_diff(&common::host(packed.forward(x)), &want);
        assert!(err <= TOLERANCE, "{name}: packed layout off by {err:e}");
    }
    // bf16 on the host kernels: both forms load out-major where that is preferred, holding
    // the f32 load's values rounded
    use burn::tensor::DType;
    use moe_kernels::host;
    let Some((_, flex)) = common::devices().into_iter().find(|(n, _)| *n == "flex") else {
        return;
    };
    let full = load_block(&source, "", ExpertNaming::Proj, &config, &flex).unwrap();
    for from in [&source, packed_source] {
        let half =
            load_block_as(from, "", ExpertNaming::Proj, &config, &flex, DType::BF16).unwrap();
        for (a, b) in [
            (
                full.experts.gate.as_ref().unwrap().val(),
                half.experts.gate.as_ref().unwrap().val(),
            ),
            (full.experts.up.val(), half.experts.up.val()),
            (full.experts.down.val(), half.experts.down.val()),
        ] {
            assert_eq!(a.dims(), b.dims());
            let out_major = matches!(
                host::HostTensor::new(b.clone()).unwrap().matrix(),
                Some(host::Matrix::Bf16T(_))
            );
            assert_eq!(out_major, host::bf16_out_major_preferred());
            assert_eq!(
                common::host(b.cast(DType::F32)),
                common::host(a.cast(DType::BF16).cast(DType::F32))
            );
        }
    }
}

/// `load_block_as` in every float dtype the device takes, on the block with a shared expert
/// (its one-expert tensors take the loader's single-matrix path): the parameters hold the f32
/// load's values, converted (f64 exactly, f16 and bf16 rounded).
#[test]
fn blocks_load_in_every_float_dtype() {
    let device = common::cpu();
    let case = &cases()[2];
    assert!(
        case.shared,
        "the case list changed: pick the block with a shared expert"
    );
    let path = common::data(&format!("moe-block/{}.safetensors", case.file));
    let source = TensorSource::from_bytes(std::fs::read(&path).unwrap(), case.file).unwrap();
    let f32_layer = load_block(&source, "", case.naming, &case.config, &device).unwrap();
    let values = |layer: &moe_core::MoeLayer| -> Vec<Vec<f32>> {
        let shared = layer.shared.as_ref().unwrap();
        [
            layer.experts.up.val(),
            shared.ffn.up.val(),
            shared.ffn.down.val(),
        ]
        .into_iter()
        .map(|t| common::host(t.cast(burn::tensor::DType::F32)))
        .collect()
    };
    let want = values(&f32_layer);
    use burn::tensor::DType;
    for (dtype, tolerance) in [(DType::F64, 0.0), (DType::F16, 1e-3), (DType::BF16, 1e-2)] {
        if !device.supports_dtype(dtype) {
            continue;
        }
        let layer = load_block_as(&source, "", case.naming, &case.config, &device, dtype).unwrap();
        for (got, want) in values(&layer).iter().zip(&want) {
            let err = common::max_abs_diff(got, want);
            assert!(err <= tolerance, "{dtype:?}: off by {err}");
        }
    }
}
