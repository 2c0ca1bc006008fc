//! Variants of the tiny OLMoE checkpoint written on the fly: sharded, packed experts, bf16/f16
//! storage, and broken ones (garbage, truncated, a header that lies, a missing or mis-shaped
//! tensor, bad config.json). Each goes into its own fresh folder under cargo's test scratch dir.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::{data, host, max_abs_diff};

/// The tiny checkpoint shipped with the repo.
pub fn tiny_dir() -> PathBuf {
    data("olmoe-tiny")
}

/// An empty folder `name` under the test scratch dir (removed first if a run left it).
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One stored tensor.
#[derive(Clone)]
pub struct Stored {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Stored {
    fn f32_values(&self) -> Vec<f32> {
        assert_eq!(self.dtype, Dtype::F32);
        self.bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn from_f32(values: &[f32], shape: Vec<usize>) -> Self {
        Stored {
            dtype: Dtype::F32,
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Every tensor of the tiny checkpoint, by name.
pub fn tiny_tensors() -> BTreeMap<String, Stored> {
    tensors_in(&tiny_dir())
}

/// Every tensor of `dir/model.safetensors`, by name.
pub fn tensors_in(dir: &Path) -> BTreeMap<String, Stored> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let stored = Stored {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            };
            (name, stored)
        })
        .collect()
}

/// Writes `tensors` as one safetensors file.
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, Stored>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, t)| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Copies config.json and tokenizer.json of the tiny checkpoint into `dir`.
pub fn copy_side_files(dir: &Path) {
    copy_side_files_from(&tiny_dir(), dir);
}

/// Copies config.json, tokenizer.json and (where `src` has one) generation_config.json from
/// `src` into `dir`.
pub fn copy_side_files_from(src: &Path, dir: &Path) {
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
    }
    if src.join("generation_config.json").exists() {
        let file = "generation_config.json";
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
    }
}

/// A folder with the tiny config and `tensors` as `model.safetensors`.
pub fn single(name: &str, tensors: &BTreeMap<String, Stored>) -> PathBuf {
    let dir = scratch(name);
    copy_side_files(&dir);
    write_tensors(&dir.join("model.safetensors"), tensors);
    dir
}

/// The tiny checkpoint split into `shards` files with a `model.safetensors.index.json`, the
/// tensors dealt round-robin so every shard holds parts of several layers.
pub fn sharded(name: &str, shards: usize) -> PathBuf {
    sharded_from(&tiny_dir(), name, shards)
}

/// [`sharded`] for the single-file checkpoint in `src` (its side files copied along).
pub fn sharded_from(src: &Path, name: &str, shards: usize) -> PathBuf {
    let dir = scratch(name);
    copy_side_files_from(src, &dir);
    let mut parts = vec![BTreeMap::new(); shards];
    let mut weight_map = serde_json::Map::new();
    for (i, (tensor, stored)) in tensors_in(src).into_iter().enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i % shards + 1);
        weight_map.insert(tensor.clone(), serde_json::Value::from(file));
        parts[i % shards].insert(tensor, stored);
    }
    for (s, part) in parts.iter().enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        write_tensors(&dir.join(file), part);
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    dir
}

/// The tiny checkpoint with each layer's experts in the packed layout of newer transformers:
/// `mlp.experts.gate_up_proj` `[E, 2I, H]` (gate rows first) and `mlp.experts.down_proj`
/// `[E, H, I]`.
pub fn packed(name: &str) -> PathBuf {
    let mut tensors = tiny_tensors();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_dir().join("config.json")).unwrap())
            .unwrap();
    let n = |f: &str| config[f].as_u64().unwrap() as usize;
    let (layers, e, h, i) = (
        n("num_hidden_layers"),
        n("num_experts"),
        n("hidden_size"),
        n("intermediate_size"),
    );
    for layer in 0..layers {
        let p = format!("model.layers.{layer}.mlp.experts.");
        let mut gate_up = Vec::with_capacity(e * 2 * i * h);
        let mut down = Vec::with_capacity(e * h * i);
        for j in 0..e {
            let mut take = |part: &str| {
                tensors
                    .remove(&format!("{p}{j}.{part}.weight"))
                    .unwrap()
                    .f32_values()
            };
            let (g, u, d) = (take("gate_proj"), take("up_proj"), take("down_proj"));
            gate_up.extend(g);
            gate_up.extend(u);
            down.extend(d);
        }
        tensors.insert(
            format!("{p}gate_up_proj"),
            Stored::from_f32(&gate_up, vec![e, 2 * i, h]),
        );
        tensors.insert(
            format!("{p}down_proj"),
            Stored::from_f32(&down, vec![e, h, i]),
        );
    }
    single(name, &tensors)
}

/// The tiny checkpoint with every tensor stored as bf16 (`Dtype::BF16`) or f16.
pub fn half(name: &str, dtype: Dtype) -> PathBuf {
    let mut tensors = tiny_tensors();
    for t in tensors.values_mut() {
        let values = t.f32_values();
        t.bytes = match dtype {
            Dtype::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            other => panic!("not a half dtype: {other:?}"),
        };
        t.dtype = dtype;
    }
    single(name, &tensors)
}

/// Each way a checkpoint folder can be broken, with a word the error must contain.
pub fn broken(prefix: &str) -> Vec<(&'static str, PathBuf, &'static str)> {
    let good = std::fs::read(tiny_dir().join("model.safetensors")).unwrap();
    let mut out = Vec::new();
    let mut with_weights = |case: &'static str, bytes: &[u8], expect: &'static str| {
        let dir = scratch(&format!("{prefix}-{case}"));
        copy_side_files(&dir);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
        out.push((case, dir, expect));
    };
    with_weights(
        "garbage",
        b"this is not a safetensors file at all",
        "not a valid safetensors",
    );
    with_weights(
        "truncated",
        &good[..good.len() / 3],
        "not a valid safetensors",
    );
    with_weights("empty", b"", "not a valid safetensors");
    // A header claiming a length far beyond the file.
    let mut huge_header = good.clone();
    huge_header[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    with_weights(
        "header-length-lies",
        &huge_header,
        "not a valid safetensors",
    );
    // A header whose offsets say one tensor is larger than its shape × dtype.
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + header_len]).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(header).unwrap();
    let info = &mut json["model.norm.weight"];
    let shape = info["shape"][0].as_u64().unwrap();
    info["shape"] = serde_json::json!([shape * 2]);
    let lying = rebuild(&json, &good[8 + header_len..]);
    with_weights("header-shape-lies", &lying, "not a valid safetensors");

    let mut tensors = tiny_tensors();
    tensors.remove("model.layers.1.mlp.experts.5.up_proj.weight");
    out.push((
        "missing-tensor",
        single(&format!("{prefix}-missing-tensor"), &tensors),
        "model.layers.1.mlp.experts.5.up_proj.weight",
    ));
    let mut tensors = tiny_tensors();
    let t = tensors
        .get_mut("model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    t.shape = vec![32, 128];
    out.push((
        "misshaped-tensor",
        single(&format!("{prefix}-misshaped-tensor"), &tensors),
        "[32, 128], expected [64, 64]",
    ));
    let mut tensors = tiny_tensors();
    let t = tensors.get_mut("model.norm.weight").unwrap();
    t.dtype = Dtype::I32;
    out.push((
        "int-tensor",
        single(&format!("{prefix}-int-tensor"), &tensors),
        "dtype I32",
    ));

    let config = std::fs::read_to_string(tiny_dir().join("config.json")).unwrap();
    let mut with_config = |case: &'static str, text: Option<String>, expect: &'static str| {
        let dir = scratch(&format!("{prefix}-{case}"));
        std::fs::copy(
            tiny_dir().join("model.safetensors"),
            dir.join("model.safetensors"),
        )
        .unwrap();
        if let Some(text) = text {
            std::fs::write(dir.join("config.json"), text).unwrap();
        }
        out.push((case, dir, expect));
    };
    with_config("no-config", None, "config.json");
    with_config(
        "config-not-json",
        Some("{\"hidden_size\": 64,".into()),
        "not valid JSON",
    );
    let edit = |field: &str, value: serde_json::Value| {
        let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
        json[field] = value;
        Some(json.to_string())
    };
    with_config(
        "k-above-experts",
        edit("num_experts_per_tok", serde_json::json!(9)),
        "`num_experts_per_tok` 9 exceeds num_experts 8",
    );
    with_config(
        "negative-size",
        edit("hidden_size", serde_json::json!(-64)),
        "`hidden_size` must be a positive integer, got -64",
    );
    with_config(
        "config-disagrees-with-weights",
        edit("intermediate_size", serde_json::json!(48)),
        "config.json says intermediate_size = 48, but tensor `model.layers.0.mlp.experts.0.gate_proj.weight` has shape [32, 64]",
    );
    out
}

/// A safetensors file from a header value and the data bytes (header padded to 8 bytes).
fn rebuild(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend_from_slice(data);
    out
}

/// Ids of prompt `p` of a reference file (`prompt{p}.input_ids`, `[1, L]`).
pub fn reference_prompt(r: &moe_models::TensorSource, p: usize) -> Vec<i64> {
    let len = r.shape(&format!("prompt{p}.input_ids")).unwrap()[1];
    r.read_i64(&format!("prompt{p}.input_ids"), &[1, len])
        .unwrap()
}

/// Both reference prompts' greedy continuations (`prompt{p}.greedy.new_tokens` `[10]` and
/// `.step_logits` `[10, vocab]`), with and without the KV cache: tokens identical, step logits
/// within `tolerance`.
pub fn check_greedy(
    model: &moe_models::MoeCausalLm,
    r: &moe_models::TensorSource,
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
                .generate_greedy(&ids, 10, &moe_core::TopK::Configured, use_cache)
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
