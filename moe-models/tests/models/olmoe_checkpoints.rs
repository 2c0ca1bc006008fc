//! The tiny OLMoE checkpoint in every layout and dtype the loader reads (sharded, packed
//! experts, bf16/f16 storage), computed in f32, bf16 and f16, with `clip_qkv`, and every way a
//! checkpoint or a call can be wrong, through the library API.

use crate::common;

use std::path::Path;

use burn::tensor::{Device, FloatDType};
use common::checkpoints;
use moe_core::TopK;
use moe_models::{
    GenerateOptions, KvCache, LoadError, LoadOptions, MoeCausalLm, MoeCausalLmConfig, RunError,
    Sampling, TensorSource,
};
use safetensors::Dtype;

fn reference() -> TensorSource {
    TensorSource::open(&checkpoints::tiny_dir().join("reference.safetensors")).unwrap()
}

/// The two reference prompts.
fn prompts() -> Vec<Vec<i64>> {
    let r = reference();
    (0..2)
        .map(|p| {
            let name = format!("prompt{p}.input_ids");
            let len = r.shape(&name).unwrap()[1];
            r.read_i64(&name, &[1, len]).unwrap()
        })
        .collect()
}

fn reference_logits(p: usize, len: usize, vocab: usize) -> Vec<f32> {
    reference()
        .read_f32(&format!("prompt{p}.logits"), &[1, len, vocab])
        .unwrap()
}

/// Logits of one prompt, `[L · vocab]` on the host.
fn logits(model: &MoeCausalLm, ids: &[i64]) -> Vec<f32> {
    let mut cache = KvCache::new(model.layers.len(), 1);
    let out = model
        .forward(
            &[ids.to_vec()],
            &[vec![true; ids.len()]],
            &mut cache,
            &TopK::Configured,
            false,
        )
        .unwrap();
    common::host(out.logits)
}

fn load(dir: &Path, device: &Device, dtype: FloatDType) -> MoeCausalLm {
    let options = LoadOptions {
        dtype,
        progress: false,
    };
    let (model, _, report) = MoeCausalLm::load_with(dir, device, &options).unwrap();
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    model
}

/// Largest absolute logit of the reference, to state half-precision tolerances relative to it.
fn logit_scale() -> f32 {
    let vocab = 512;
    prompts()
        .iter()
        .enumerate()
        .flat_map(|(p, ids)| reference_logits(p, ids.len(), vocab))
        .fold(0.0, |m, v| m.max(v.abs()))
}

#[test]
fn sharded_and_packed_checkpoints_give_the_same_logits() {
    let sharded = checkpoints::sharded("olmoe-sharded", 3);
    let packed = checkpoints::packed("olmoe-packed");
    assert!(sharded.join("model-00003-of-00003.safetensors").exists());
    for (name, device) in common::devices() {
        let base = load(&checkpoints::tiny_dir(), &device, FloatDType::F32);
        for (layout, dir) in [("sharded", &sharded), ("packed", &packed)] {
            let model = load(dir, &device, FloatDType::F32);
            for (p, ids) in prompts().iter().enumerate() {
                let (want, got) = (logits(&base, ids), logits(&model, ids));
                let err = common::max_abs_diff(&got, &want);
                // The same f32 weights in another arrangement: the same numbers.
                assert!(err <= 1e-6, "{name} {layout} prompt {p}: {err:e}");
                let ref_err = common::max_abs_diff(&got, &reference_logits(p, ids.len(), 512));
                assert!(ref_err <= 1e-4, "{name} {layout} prompt {p}: {ref_err:e}");
            }
        }
    }
}

#[test]
fn half_precision_checkpoints_and_compute_stay_within_tolerance() {
    let scale = logit_scale();
    let bf16_dir = checkpoints::half("olmoe-bf16", Dtype::BF16);
    let f16_dir = checkpoints::half("olmoe-f16", Dtype::F16);
    // Relative to the largest logit: bf16 keeps 8 significant bits, f16 11.
    let bf16_tol = 3e-2 * scale;
    let f16_tol = 4e-3 * scale;
    for (name, device) in common::devices() {
        let mut cases = vec![
            (
                "bf16 storage, f32 compute",
                &bf16_dir,
                FloatDType::F32,
                bf16_tol,
            ),
            (
                "f16 storage, f32 compute",
                &f16_dir,
                FloatDType::F32,
                f16_tol,
            ),
        ];
        let tiny = checkpoints::tiny_dir();
        for (dtype, tol, label) in [
            (FloatDType::BF16, bf16_tol, "f32 storage, bf16 compute"),
            (FloatDType::F16, f16_tol, "f32 storage, f16 compute"),
        ] {
            match device.supports_dtype(dtype) {
                true => cases.push((label, &tiny, dtype, tol)),
                false => {
                    // Refused up front with a typed error that names the dtype.
                    let options = LoadOptions {
                        dtype,
                        progress: false,
                    };
                    let err = MoeCausalLm::load_with(&tiny, &device, &options).unwrap_err();
                    assert!(
                        matches!(err, LoadError::UnsupportedComputeDtype { .. }),
                        "{name}: {err}"
                    );
                    eprintln!("{name}: {err}");
                }
            }
        }
        for (label, dir, dtype, tol) in cases {
            let model = load(dir, &device, dtype);
            for (p, ids) in prompts().iter().enumerate() {
                let got = logits(&model, ids);
                let err = common::max_abs_diff(&got, &reference_logits(p, ids.len(), 512));
                eprintln!(
                    "{name} {label} prompt {p}: logits max abs diff {err:.3e} (scale {scale:.2})"
                );
                assert!(err <= tol, "{name} {label} prompt {p}: {err:e} > {tol:e}");
                // Not a trivially loose bound: half precision does move the logits.
                assert!(err > 1e-5, "{name} {label}: suspiciously exact ({err:e})");
            }
        }
    }
}

#[test]
fn clip_qkv_matches_transformers() {
    let clip = TensorSource::open(&checkpoints::tiny_dir().join("clip_qkv.safetensors")).unwrap();
    let c = clip.read_f32("clip_qkv", &[1]).unwrap()[0] as f64;
    let dir = checkpoints::scratch("olmoe-clip");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoints::tiny_dir().join("config.json")).unwrap(),
    )
    .unwrap();
    config["clip_qkv"] = serde_json::Value::from(c);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        checkpoints::tiny_dir().join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    for (name, device) in common::devices() {
        let (model, parsed, _) = MoeCausalLm::load(&dir, &device).unwrap();
        assert_eq!(parsed.clip_qkv, Some(c));
        for p in 0..2 {
            let len = clip.shape(&format!("input_ids.p{p}")).unwrap()[0];
            let ids = clip.read_i64(&format!("input_ids.p{p}"), &[len]).unwrap();
            let got = logits(&model, &ids);
            let want = clip.read_f32(&format!("logits.p{p}"), &[len, 512]).unwrap();
            let unclipped = clip
                .read_f32(&format!("logits_noclip.p{p}"), &[len, 512])
                .unwrap();
            let err = common::max_abs_diff(&got, &want);
            assert!(err <= 1e-4, "{name} clip prompt {p}: {err:e}");
            // The clamp is active: without it the logits are far away.
            assert!(common::max_abs_diff(&got, &unclipped) > 1.0, "{name} p{p}");
            eprintln!("{name} clip_qkv={c} prompt {p}: logits max abs diff {err:.2e}");
        }
    }
}

#[test]
fn sampling_is_seeded_and_follows_the_softmax() {
    let device = common::cpu();
    let model = load(&checkpoints::tiny_dir(), &device, FloatDType::F32);
    let prompt = &prompts()[0];
    let run = |sampling: Sampling, max_new: usize| {
        let options = GenerateOptions {
            sampling,
            ..GenerateOptions::greedy(max_new)
        };
        let mut streamed = Vec::new();
        let tokens = model
            .generate(prompt, &options, &mut |t| streamed.push(t))
            .unwrap();
        assert_eq!(tokens, streamed, "every token is streamed once, in order");
        tokens
    };
    let greedy = run(Sampling::Greedy, 10);
    let (reference, _) = model
        .generate_greedy(prompt, 10, &TopK::Configured, true)
        .unwrap();
    assert_eq!(greedy, reference);
    let sampled =
        |temperature: f64, seed: u64| run(Sampling::Temperature { temperature, seed }, 10);
    assert_eq!(sampled(0.0, 5), greedy, "temperature 0 is greedy");
    assert_eq!(sampled(1e-4, 5), greedy, "a tiny temperature is greedy");
    assert_eq!(sampled(1.0, 42), sampled(1.0, 42), "same seed, same tokens");
    assert_ne!(
        sampled(1.0, 42),
        sampled(1.0, 43),
        "another seed, other tokens"
    );
    assert_ne!(sampled(100.0, 1), greedy, "a hot sampler leaves the argmax");

    // One step drawn with 600 seeds at temperature 1.5: the share of each of the three most
    // likely tokens matches softmax(logits / 1.5) within 5 standard deviations.
    let temperature = 1.5;
    let last: Vec<f64> = logits(&model, prompt)[(prompt.len() - 1) * 512..]
        .iter()
        .map(|&v| v as f64 / temperature)
        .collect();
    let max = last.iter().cloned().fold(f64::MIN, f64::max);
    let total: f64 = last.iter().map(|v| (v - max).exp()).sum();
    let probs: Vec<f64> = last.iter().map(|v| (v - max).exp() / total).collect();
    let mut order: Vec<usize> = (0..512).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let draws = 600;
    let mut counts = vec![0usize; 512];
    for seed in 0..draws {
        counts[run(Sampling::Temperature { temperature, seed }, 1)[0] as usize] += 1;
    }
    for &token in &order[..3] {
        let p = probs[token];
        let share = counts[token] as f64 / draws as f64;
        let sigma = (p * (1.0 - p) / draws as f64).sqrt();
        assert!(
            (share - p).abs() <= 5.0 * sigma + 1e-9,
            "token {token}: drawn {share:.3}, softmax {p:.3} (sigma {sigma:.3})"
        );
    }

    let err = model
        .generate(
            prompt,
            &GenerateOptions {
                sampling: Sampling::Temperature {
                    temperature: -1.0,
                    seed: 0,
                },
                ..GenerateOptions::greedy(3)
            },
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(err, RunError::InvalidTemperature(t) if t == -1.0),
        "{err}"
    );
    // Generation ends at a stop token, which is returned.
    let stop = greedy[2];
    let options = GenerateOptions {
        stop_tokens: vec![stop],
        ..GenerateOptions::greedy(10)
    };
    let tokens = model.generate(prompt, &options, &mut |_| {}).unwrap();
    let first = greedy.iter().position(|&t| t == stop).unwrap();
    assert_eq!(tokens, greedy[..=first]);
}

#[test]
fn bad_calls_are_typed_errors_and_leave_the_cache_alone() {
    let device = common::cpu();
    let model = load(&checkpoints::tiny_dir(), &device, FloatDType::F32);
    let layers = model.layers.len();
    let call = |ids: Vec<Vec<i64>>, mask: Vec<Vec<bool>>, rows: usize, k: TopK| {
        let mut cache = KvCache::new(layers, rows);
        let err = model
            .forward(&ids, &mask, &mut cache, &k, false)
            .unwrap_err();
        assert!(cache.is_empty(), "a failed call must not grow the cache");
        err.to_string()
    };
    let ok = |n: usize| vec![true; n];
    assert_eq!(
        call(vec![], vec![], 0, TopK::Configured),
        "empty input: 0 rows of 0 tokens"
    );
    assert_eq!(
        call(vec![vec![]], vec![vec![]], 1, TopK::Configured),
        "empty input: 1 rows of 0 tokens"
    );
    assert_eq!(
        call(
            vec![vec![1, 2, 3], vec![4, 5]],
            vec![ok(3), ok(2)],
            2,
            TopK::Configured
        ),
        "row 1 has 2 tokens, row 0 has 3"
    );
    assert_eq!(
        call(vec![vec![1, 2, 3]], vec![ok(2)], 1, TopK::Configured),
        "mask has 1 rows (row 0: 2 entries) for ids of 1 rows of 3"
    );
    assert_eq!(
        call(vec![vec![1, 2, 3]], vec![ok(3)], 2, TopK::Configured),
        "the KV cache holds 2 rows and 2 layers, the call has 1 rows and the model 2 layers"
    );
    assert_eq!(
        call(vec![vec![1, 512, 3]], vec![ok(3)], 1, TopK::Configured),
        "token id 512 (row 0, position 1) is outside the vocabulary 0..512"
    );
    assert_eq!(
        call(vec![vec![1, -1]], vec![ok(2)], 1, TopK::Configured),
        "token id -1 (row 0, position 1) is outside the vocabulary 0..512"
    );
    let err = call(vec![vec![1, 2]], vec![ok(2)], 1, TopK::Fixed(9));
    assert!(err.contains('9') && err.contains('8'), "{err}");
    let err = call(vec![vec![1, 2]], vec![ok(2)], 1, TopK::Fixed(0));
    assert!(err.contains('0'), "{err}");
}

#[test]
fn broken_checkpoints_are_typed_errors_naming_the_problem() {
    let device = common::cpu();
    for (case, dir, expect) in checkpoints::broken("lib") {
        let err = MoeCausalLm::load(&dir, &device).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(expect),
            "{case}: `{message}` does not contain `{expect}`"
        );
        let kind_ok = match case {
            "missing-tensor" => matches!(err, LoadError::MissingTensor { .. }),
            "misshaped-tensor" => matches!(err, LoadError::ShapeMismatch { .. }),
            "config-disagrees-with-weights" => matches!(err, LoadError::ConfigMismatch { .. }),
            "int-tensor" => matches!(err, LoadError::UnsupportedDtype { .. }),
            "no-config" => matches!(err, LoadError::Io { .. }),
            "config-not-json" | "k-above-experts" | "negative-size" => {
                matches!(err, LoadError::Config { .. })
            }
            _ => matches!(err, LoadError::Corrupt { .. }),
        };
        assert!(kind_ok, "{case}: unexpected kind {err:?}");
        // Errors that concern a file name it.
        if !case.contains("config") && case != "k-above-experts" && case != "negative-size" {
            assert!(
                message.contains("olmoe") || message.contains("lib-"),
                "{case}: {message}"
            );
        }
    }
    // The config's own checks, without a folder.
    let text = std::fs::read_to_string(checkpoints::tiny_dir().join("config.json")).unwrap();
    assert!(MoeCausalLmConfig::from_json(&text).is_ok());
    // Another architecture is refused by name, whether model_type or architectures says so.
    let dbrx_type = text.replace("\"olmoe\"", "\"dbrx\"");
    let err = MoeCausalLmConfig::from_json(&dbrx_type).unwrap_err();
    assert!(
        matches!(&err, LoadError::UnsupportedArchitecture { model_type, .. } if model_type == "dbrx"),
        "{err:?}"
    );
    assert!(err.to_string().contains("dbrx"), "{err}");
    let jamba = text.replace("OlmoeForCausalLM", "JambaForCausalLM");
    let err = MoeCausalLmConfig::from_json(&jamba).unwrap_err();
    assert!(err.to_string().contains("JambaForCausalLM"), "{err}");
}

#[test]
fn tensors_larger_than_the_device_buffer_limit_are_refused_up_front() {
    use moe_models::decoder::check_fits;
    let device = common::cpu();
    let big = MoeCausalLmConfig::olmoe_1b_7b();
    let lavapipe_limit = Some(128 << 20);
    let err = check_fits(&big, FloatDType::F32, lavapipe_limit, &device).unwrap_err();
    assert!(matches!(err, LoadError::TensorTooLarge { .. }), "{err}");
    // 50304 × 2048 f32 = 412 MB.
    assert!(err.to_string().contains("412090368 bytes"), "{err}");
    assert!(
        err.to_string().contains("model.embed_tokens.weight"),
        "{err}"
    );
    // bf16 halves the embeddings (206 MB), still too much; the experts (64 × 2048 × 1024 × 2 =
    // 268 MB) too.
    assert!(check_fits(&big, FloatDType::BF16, lavapipe_limit, &device).is_err());
    // No limit (CPU backends), or a limit the tensors fit under.
    assert!(check_fits(&big, FloatDType::F32, None, &device).is_ok());
    assert!(check_fits(&big, FloatDType::F32, Some(1 << 30), &device).is_ok());
    let tiny = MoeCausalLmConfig::from_json(
        &std::fs::read_to_string(checkpoints::tiny_dir().join("config.json")).unwrap(),
    )
    .unwrap();
    assert!(check_fits(&tiny, FloatDType::F32, lavapipe_limit, &device).is_ok());
    // Every backend of the suite reports a limit exactly when it is a CubeCL device.
    for (name, device) in common::devices() {
        let limit = moe_kernels::max_buffer_bytes(&device);
        assert_eq!(limit.is_some(), moe_kernels::available(&device), "{name}");
        if let Some(limit) = limit {
            assert!(limit >= 1 << 20, "{name}: {limit}");
            eprintln!("{name}: largest buffer {limit} bytes");
        }
    }
}
