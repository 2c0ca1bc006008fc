//! The tiny OLMoE checkpoint (tests/data/olmoe-tiny, made with transformers 4.57) against its
//! reference activations: logits, every layer's MoE input/routing/output, greedy continuations
//! with and without the KV cache, and a left-padded batch.

use crate::common;

use std::path::PathBuf;

use burn::tensor::Device;
use moe_core::TopK;
use moe_models::{KvCache, MoeCausalLm, TensorSource};

const LOGIT_TOLERANCE: f32 = 1e-4;

fn dir() -> PathBuf {
    common::checkpoints::tiny_dir()
}

fn reference() -> TensorSource {
    TensorSource::open(&dir().join("reference.safetensors")).unwrap()
}

fn check_prompts(name: &str, device: &Device) {
    let (model, config, report) = MoeCausalLm::load(&dir(), device).unwrap();
    assert!(
        report.unused.is_empty(),
        "unused tensors: {:?}",
        report.unused
    );
    // embeddings, lm_head, final norm; per layer 2 norms, 4 projections, q/k norms, router
    // and 3 matrices per expert.
    let per_layer = 9 + 3 * config.num_experts;
    assert_eq!(report.loaded, 3 + config.num_hidden_layers * per_layer);
    let r = reference();
    let (h, v, e, k) = (
        config.hidden_size,
        config.vocab_size,
        config.num_experts,
        config.num_experts_per_tok,
    );
    for p in 0..2 {
        let ids = common::reference_prompt(&r, p);
        let l = ids.len();
        let mut cache = KvCache::new(model.layers.len(), 1);
        let out = model
            .forward(
                std::slice::from_ref(&ids),
                &[vec![true; l]],
                &mut cache,
                &TopK::Configured,
                true,
            )
            .unwrap();
        let logits = common::host(out.logits);
        let want = r
            .read_f32(&format!("prompt{p}.logits"), &[1, l, v])
            .unwrap();
        let err = common::max_abs_diff(&logits, &want);
        assert!(
            err <= LOGIT_TOLERANCE,
            "{name} prompt {p}: logits off by {err:e}"
        );
        eprintln!("{name} prompt {p}: logits max abs diff {err:.2e}");
        for (i, layer) in out.moe.into_iter().enumerate() {
            let at = |what: &str| format!("prompt{p}.layer{i}.moe.{what}");
            let input = common::host(layer.input);
            let want_in = r.read_f32(&at("input"), &[1, l, h]).unwrap();
            let in_err = common::max_abs_diff(&input, &want_in);
            assert!(
                in_err <= LOGIT_TOLERANCE,
                "{name} p{p} layer {i}: moe input off by {in_err:e}"
            );
            let ids = common::host_int(layer.routing.expert_ids);
            assert_eq!(
                ids,
                r.read_i64(&at("topk_idx"), &[l, k]).unwrap(),
                "{name} p{p} layer {i}"
            );
            let w = common::host(layer.routing.weights);
            let w_err = common::max_abs_diff(&w, &r.read_f32(&at("topk_weight"), &[l, k]).unwrap());
            assert!(
                w_err <= LOGIT_TOLERANCE,
                "{name} p{p} layer {i}: weights off by {w_err:e}"
            );
            let logits = common::host(layer.routing.logits.unwrap());
            let lg_err =
                common::max_abs_diff(&logits, &r.read_f32(&at("router_logits"), &[l, e]).unwrap());
            assert!(
                lg_err <= LOGIT_TOLERANCE,
                "{name} p{p} layer {i}: router logits off by {lg_err:e}"
            );
            let output = common::host(layer.output);
            let out_err =
                common::max_abs_diff(&output, &r.read_f32(&at("output"), &[1, l, h]).unwrap());
            assert!(
                out_err <= LOGIT_TOLERANCE,
                "{name} p{p} layer {i}: moe output off by {out_err:e}"
            );
        }
    }
}

#[test]
fn prompts_match_reference_logits_and_every_moe_layer() {
    for (name, device) in common::devices() {
        check_prompts(name, &device);
    }
}

#[test]
fn greedy_continuations_match_with_and_without_cache() {
    for (name, device) in common::devices() {
        let (model, _, _) = MoeCausalLm::load(&dir(), &device).unwrap();
        common::check_greedy(&model, &reference(), LOGIT_TOLERANCE, name);
    }
}

#[test]
fn left_padded_batch_matches_single_prompts() {
    for (name, device) in common::devices() {
        let (model, config, _) = MoeCausalLm::load(&dir(), &device).unwrap();
        let r = reference();
        let (b, l, v) = (2, 13, config.vocab_size);
        let ids = r.read_i64("batch.input_ids", &[b, l]).unwrap();
        let mask = r.read_i64("batch.attention_mask", &[b, l]).unwrap();
        let rows: Vec<Vec<i64>> = ids.chunks(l).map(<[i64]>::to_vec).collect();
        let masks: Vec<Vec<bool>> = mask
            .chunks(l)
            .map(|m| m.iter().map(|&x| x == 1).collect())
            .collect();
        let mut cache = KvCache::new(model.layers.len(), b);
        let out = model
            .forward(&rows, &masks, &mut cache, &TopK::Configured, false)
            .unwrap();
        let got = common::host(out.logits);
        let want = r.read_f32("batch.logits", &[b, l, v]).unwrap();
        let mut worst = 0.0f32;
        for (row, kept) in masks.iter().enumerate() {
            for (pos, &keep) in kept.iter().enumerate() {
                if keep {
                    let at = (row * l + pos) * v;
                    worst = worst.max(common::max_abs_diff(&got[at..at + v], &want[at..at + v]));
                }
            }
        }
        assert!(
            worst <= LOGIT_TOLERANCE,
            "{name}: padded batch logits off by {worst:e}"
        );
        eprintln!("{name}: left-padded batch max abs diff {worst:.2e}");
    }
}

#[test]
fn bad_configs_name_the_field() {
    use moe_models::MoeCausalLmConfig;
    let good = std::fs::read_to_string(dir().join("config.json")).unwrap();
    assert!(MoeCausalLmConfig::from_json(&good).is_ok());
    let with = |field: &str, value: &str| {
        let mut json: serde_json::Value = serde_json::from_str(&good).unwrap();
        json[field] = serde_json::from_str(value).unwrap();
        MoeCausalLmConfig::from_json(&json.to_string())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        with("num_experts_per_tok", "9"),
        "config.json: `num_experts_per_tok` 9 exceeds num_experts 8"
    );
    assert_eq!(
        with("hidden_size", "-64"),
        "config.json: `hidden_size` must be a positive integer, got -64"
    );
    assert_eq!(
        with("hidden_act", "\"gelu\""),
        "config.json: `hidden_act` `gelu` is not supported (only `silu`)"
    );
    assert!(with("rope_scaling", r#"{"type": "linear", "factor": 2.0}"#).contains("rope_scaling"));
    assert!(with("num_attention_heads", "5").contains("does not divide hidden_size 64"));
    let err = MoeCausalLmConfig::from_json("{ not json").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("config.json: `config.json` not valid JSON"),
        "{err}"
    );
    // Folders (missing config.json, broken safetensors, …): olmoe_checkpoints.rs.
}
