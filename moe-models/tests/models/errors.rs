//! One test per error variant: bad configs, bad inputs and bad checkpoints return typed errors
//! carrying the numbers, and never panic.

use crate::common;

use burn::tensor::{Device, Tensor};
use moe_core::{Experts, GroupLimit, MoeError, MoeLayerConfig, SharedExpert, TopK};
use moe_models::{ExpertNaming, LoadError, TensorSource, load_block};

fn device() -> Device {
    common::cpu()
}

fn init_err(config: MoeLayerConfig) -> MoeError {
    config.init(&device()).unwrap_err()
}

#[test]
fn zero_sizes() {
    assert_eq!(
        init_err(MoeLayerConfig::olmoe(0, 8, 4, 1)),
        MoeError::ZeroSize { name: "d_model" }
    );
    assert_eq!(
        init_err(MoeLayerConfig::olmoe(8, 0, 4, 1)),
        MoeError::ZeroSize { name: "d_ff" }
    );
    assert_eq!(
        init_err(MoeLayerConfig::olmoe(8, 8, 0, 1)),
        MoeError::ZeroSize {
            name: "num_experts"
        }
    );
}

#[test]
fn top_k_zero_or_above_experts() {
    let err = init_err(MoeLayerConfig::olmoe(8, 8, 4, 0));
    assert_eq!(
        err,
        MoeError::TopKOutOfRange {
            top_k: 0,
            num_experts: 4
        }
    );
    assert_eq!(err.to_string(), "top_k (0) must be in 1..=4");
    let err = init_err(MoeLayerConfig::olmoe(8, 8, 4, 5));
    assert_eq!(
        err,
        MoeError::TopKOutOfRange {
            top_k: 5,
            num_experts: 4
        }
    );

    // The runtime dial is checked the same way.
    let layer = MoeLayerConfig::olmoe(8, 8, 4, 2).init(&device()).unwrap();
    let x = Tensor::<2>::zeros([3, 8], &device());
    for k in [0, 5] {
        let err = layer.try_forward(x.clone(), &TopK::Fixed(k)).unwrap_err();
        assert_eq!(
            err,
            MoeError::TopKOutOfRange {
                top_k: k,
                num_experts: 4
            }
        );
    }
}

#[test]
fn groups_must_divide_experts() {
    let config = MoeLayerConfig::deepseek_v3(8, 8, 8, 2, GroupLimit::new(3, 1), 1.0, 8);
    let err = init_err(config);
    assert_eq!(
        err,
        MoeError::GroupsDoNotDivide {
            n_group: 3,
            num_experts: 8
        }
    );
    assert!(err.to_string().contains("n_group (3)") && err.to_string().contains("(8)"));
}

#[test]
fn topk_group_out_of_range() {
    for topk_group in [0, 5] {
        let config =
            MoeLayerConfig::deepseek_v3(8, 8, 8, 1, GroupLimit::new(4, topk_group), 1.0, 8);
        assert_eq!(
            init_err(config),
            MoeError::TopKGroupOutOfRange {
                topk_group,
                n_group: 4
            }
        );
    }
}

#[test]
fn top_k_exceeds_what_the_groups_leave() {
    // 16 experts in 4 groups of 4, one group kept: at most 4 experts.
    let config = MoeLayerConfig::deepseek_v3(8, 8, 16, 5, GroupLimit::new(4, 1), 1.0, 8);
    let expected = MoeError::TopKExceedsGroups {
        top_k: 5,
        available: 4,
        topk_group: 1,
        n_group: 4,
    };
    assert_eq!(init_err(config.clone()), expected);
    let layer = MoeLayerConfig { top_k: 4, ..config }
        .init(&device())
        .unwrap();
    let x = Tensor::<2>::zeros([2, 8], &device());
    assert_eq!(layer.try_forward(x, &TopK::Fixed(5)).unwrap_err(), expected);
}

#[test]
fn scaling_factor_must_be_positive_and_finite() {
    for value in [0.0, -1.0, f64::INFINITY] {
        let err = init_err(MoeLayerConfig::olmoe(8, 8, 4, 1).with_routed_scaling_factor(value));
        assert_eq!(err, MoeError::InvalidScalingFactor { value });
    }
    let err = init_err(MoeLayerConfig::olmoe(8, 8, 4, 1).with_routed_scaling_factor(f64::NAN));
    assert!(matches!(err, MoeError::InvalidScalingFactor { value } if value.is_nan()));
}

#[test]
fn hidden_size_mismatch() {
    let layer = MoeLayerConfig::olmoe(8, 8, 4, 2).init(&device()).unwrap();
    let err = layer
        .try_forward(Tensor::<2>::zeros([3, 6], &device()), &TopK::Configured)
        .unwrap_err();
    assert_eq!(
        err,
        MoeError::HiddenSizeMismatch {
            expected: 8,
            got: 6
        }
    );
    assert_eq!(
        err.to_string(),
        "input hidden size is 6, but the layer expects d_model = 8"
    );
    let err = layer
        .router
        .route(Tensor::<2>::zeros([3, 9], &device()), &TopK::Configured)
        .unwrap_err();
    assert_eq!(
        err,
        MoeError::HiddenSizeMismatch {
            expected: 8,
            got: 9
        }
    );
}

#[test]
fn wrong_input_rank() {
    let layer = MoeLayerConfig::olmoe(8, 8, 4, 2).init(&device()).unwrap();
    let err = layer
        .try_forward(Tensor::<1>::zeros([8], &device()), &TopK::Configured)
        .unwrap_err();
    assert_eq!(err, MoeError::WrongRank { rank: 1 });
    let err = layer
        .try_forward(
            Tensor::<4>::zeros([1, 2, 3, 8], &device()),
            &TopK::Configured,
        )
        .unwrap_err();
    assert_eq!(err, MoeError::WrongRank { rank: 4 });
}

#[test]
fn per_row_k_out_of_range_or_wrong_length() {
    let layer = MoeLayerConfig::olmoe(8, 8, 4, 2).init(&device()).unwrap();
    let x = Tensor::<2>::zeros([3, 8], &device());
    let err = layer
        .try_forward(x.clone(), &TopK::PerToken(vec![1, 5, 2]))
        .unwrap_err();
    assert_eq!(
        err,
        MoeError::RowTopKOutOfRange {
            row: 1,
            k: 5,
            max: 4
        }
    );
    assert_eq!(
        err.to_string(),
        "per-row top_k of row 1 is 5, but it must be in 1..=4"
    );
    let err = layer
        .try_forward(x.clone(), &TopK::PerToken(vec![1, 2, 0]))
        .unwrap_err();
    assert_eq!(
        err,
        MoeError::RowTopKOutOfRange {
            row: 2,
            k: 0,
            max: 4
        }
    );
    let err = layer
        .try_forward(x, &TopK::PerToken(vec![1, 2]))
        .unwrap_err();
    assert_eq!(
        err,
        MoeError::RowTopKLength {
            expected: 3,
            got: 2
        }
    );
    let err = layer
        .try_forward(
            Tensor::<3>::zeros([2, 5, 8], &device()),
            &TopK::PerSequence(vec![1, 2, 3]),
        )
        .unwrap_err();
    assert_eq!(
        err,
        MoeError::RowTopKLength {
            expected: 2,
            got: 3
        }
    );
}

#[test]
fn mis_shaped_parameters() {
    let d = device();
    let err = Experts::from_tensors(
        None,
        Tensor::<3>::zeros([4, 8, 16], &d),
        Tensor::<3>::zeros([4, 8, 16], &d),
    )
    .unwrap_err();
    assert_eq!(
        err,
        MoeError::ShapeMismatch {
            name: "experts.down".into(),
            expected: vec![4, 16, 8],
            got: vec![4, 8, 16]
        }
    );
    let ffn = Experts::from_tensors(
        None,
        Tensor::<3>::zeros([1, 8, 16], &d),
        Tensor::<3>::zeros([1, 16, 8], &d),
    )
    .unwrap();
    let err = SharedExpert::from_parts(ffn, Some(Tensor::<2>::zeros([7, 1], &d))).unwrap_err();
    assert!(err.to_string().contains("[7, 1]") && err.to_string().contains("[8, 1]"));
}

fn block_bytes() -> Vec<u8> {
    std::fs::read(common::data("moe-block/olmoe_e8_k2.safetensors")).unwrap()
}

#[test]
fn checkpoint_missing_tensor_names_it() {
    let bytes = block_bytes();
    let source = TensorSource::from_bytes(bytes, "olmoe_e8_k2.safetensors").unwrap();
    // Ask for 9 experts: expert 8 does not exist.
    let config = MoeLayerConfig::olmoe(64, 32, 9, 2);
    let err = load_block(&source, "", ExpertNaming::Proj, &config, &device()).unwrap_err();
    assert!(matches!(err, LoadError::ShapeMismatch { ref name, .. } if name == "gate.weight"));
    assert_eq!(
        err.to_string(),
        "tensor `gate.weight` in olmoe_e8_k2.safetensors has shape [8, 64], expected [9, 64]"
    );
    let config = MoeLayerConfig::olmoe(64, 32, 8, 2);
    let err = load_block(
        &source,
        "model.layers.0.mlp.",
        ExpertNaming::Proj,
        &config,
        &device(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor `model.layers.0.mlp.gate.weight` is missing from olmoe_e8_k2.safetensors"
    );
}

#[test]
fn checkpoint_mis_shaped_expert() {
    let bytes = block_bytes();
    let source = TensorSource::from_bytes(bytes, "f").unwrap();
    let config = MoeLayerConfig::olmoe(64, 16, 8, 2); // the file has d_ff = 32
    let err = load_block(&source, "", ExpertNaming::Proj, &config, &device()).unwrap_err();
    match err {
        LoadError::ShapeMismatch {
            name,
            expected,
            got,
            ..
        } => {
            assert_eq!(name, "experts.0.gate_proj.weight");
            assert_eq!((expected, got), (vec![16, 64], vec![32, 64]));
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn checkpoint_corrupt_or_truncated() {
    let bytes = block_bytes();
    for cut in [0, 7, 100, bytes.len() - 1] {
        let err = TensorSource::from_bytes(bytes[..cut].to_vec(), "cut.safetensors")
            .err()
            .unwrap();
        assert!(
            matches!(err, LoadError::Corrupt { .. }),
            "cut at {cut}: {err}"
        );
    }
    // A header that lies: it promises 1000 f32 values where the file holds 4.
    let header = br#"{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}"#;
    let mut lying = (header.len() as u64).to_le_bytes().to_vec();
    lying.extend_from_slice(header);
    lying.extend_from_slice(&[0u8; 16]);
    let err = TensorSource::from_bytes(lying, "lying.safetensors")
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("lying.safetensors is not a valid safetensors file")
    );

    let garbage = b"this is not a safetensors file at all".to_vec();
    assert!(matches!(
        TensorSource::from_bytes(garbage, "g").err().unwrap(),
        LoadError::Corrupt { .. }
    ));
}

#[test]
fn checkpoint_unsupported_dtype() {
    let bytes = block_bytes();
    let source = TensorSource::from_bytes(bytes, "f").unwrap();
    // topk_idx is I64: not a float weight.
    let err = source.read_f32("topk_idx", &[37, 2]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor `topk_idx` in f has dtype I64, expected F32, BF16 or F16"
    );
}
