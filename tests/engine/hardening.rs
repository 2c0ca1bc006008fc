//! Hostile checkpoints, configs, prompts and paths: one test per class of defect, through the
//! library and through the `moe` command line. None may crash, hang, read outside the model
//! folder, replace a file it was not asked to write, or return non-finite results quietly.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use common::checkpoints::{self, Stored, scratch, tensors_in, write_tensors};
use moe::TopK;
use moe::moe_models::decoder::Stage;
use moe::moe_models::{Checkpoint, KvCache, LoadError, MoeCausalLm, MoeCausalLmConfig, RunError};
use serde_json::json;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

fn data(name: &str) -> PathBuf {
    Path::new(DATA).join(name)
}

/// Runs the `moe` binary; a run longer than `limit` is killed and fails the test (a hang).
fn moe_within(args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("`moe {}` still running after {limit:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn moe(args: &[&str]) -> (Option<i32>, String, String) {
    moe_within(args, Duration::from_secs(120))
}

/// `moe logits` of the one id 1 on the checkpoint in `dir`, written to stdout.
fn logits_of(dir: &Path) -> (Option<i32>, String, String) {
    moe(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--ids",
        "1",
        "--out",
        "-",
    ])
}

/// A failed run with a one-line `error: …` message (exit 1: not a panic's 101, not a signal).
fn assert_clean_error(run: &(Option<i32>, String, String), needle: &str) {
    let (code, _, stderr) = run;
    assert_eq!(*code, Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
}

/// A copy of the tiny checkpoint folder `src` (config, tokenizer, weights) named `name`.
fn copy_of(src: &Path, name: &str) -> PathBuf {
    let dir = scratch(name);
    checkpoints::copy_side_files_from(src, &dir);
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    dir
}

/// Rewrites `dir/config.json` through `edit`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(value.as_object_mut().unwrap());
    std::fs::write(path, value.to_string()).unwrap();
}

/// Runs `f` on another thread and fails if it has not returned within `limit` (a hang).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("the call blocked")
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

fn cpu() -> Device {
    Device::flex()
}

// ---- 1. the files of a model folder stay inside it, and are regular files ----

/// The tiny checkpoint in two shards, with shard names in the index replaced by `names`.
fn sharded_with(name: &str, rename: &[(&str, &str)]) -> PathBuf {
    let dir = checkpoints::sharded(name, 2);
    let path = dir.join("model.safetensors.index.json");
    let mut text = std::fs::read_to_string(&path).unwrap();
    for (from, to) in rename {
        text = text.replace(from, &to.replace('\\', "\\\\"));
    }
    std::fs::write(path, text).unwrap();
    dir
}

#[test]
fn shards_outside_the_folder_are_refused() {
    let outside = scratch("hardening-outside");
    let dir = checkpoints::sharded("hardening-traversal-base", 2);
    // A valid shard outside the folder: today's main loads it and exits 0.
    std::fs::copy(
        dir.join("model-00001-of-00002.safetensors"),
        outside.join("x.safetensors"),
    )
    .unwrap();
    let escape = format!(
        "../{}/x.safetensors",
        outside.file_name().unwrap().to_str().unwrap()
    );
    let absolute = outside.join("x.safetensors").display().to_string();
    for (case, name) in [
        ("dotdot", escape.as_str()),
        ("absolute", absolute.as_str()),
        ("passwd", "/etc/passwd"),
        ("device", "/dev/zero"),
        ("inner-dotdot", "sub/../../x.safetensors"),
    ] {
        let dir = sharded_with(
            &format!("hardening-traversal-{case}"),
            &[("model-00001-of-00002.safetensors", name)],
        );
        let err = within(Duration::from_secs(30), move || {
            Checkpoint::open(&dir).unwrap_err()
        });
        assert!(
            matches!(&err, LoadError::UnsafePath { name: n, .. } if n == name),
            "{case}: {err}"
        );
        let dir =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hardening-traversal-{case}"));
        let run = logits_of(&dir);
        assert_clean_error(&run, &format!("refusing to read `{name}`"));
    }
    // A symbolic link inside the folder that leads out of it.
    let dir = sharded_with("hardening-traversal-link", &[]);
    let shard = dir.join("model-00001-of-00002.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink(outside.join("x.safetensors"), &shard).unwrap();
    let err = Checkpoint::open(&dir).unwrap_err();
    assert!(matches!(err, LoadError::UnsafePath { .. }), "{err}");
}

#[test]
fn fifo_and_directory_shards_fail_without_blocking() {
    // A FIFO as model.safetensors: today's main blocks forever in open().
    let dir = scratch("hardening-fifo");
    checkpoints::copy_side_files(&dir);
    mkfifo(&dir.join("model.safetensors"));
    let d = dir.clone();
    let err = within(Duration::from_secs(30), move || {
        Checkpoint::open(&d).unwrap_err()
    });
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let run = logits_of(&dir);
    assert_clean_error(&run, "not a regular file");
    // A FIFO config.json, and a directory named as a shard.
    let dir = copy_of(&checkpoints::tiny_dir(), "hardening-fifo-config");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    mkfifo(&dir.join("config.json"));
    let run = moe_within(
        &["inspect", "--model", dir.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_clean_error(&run, "not a regular file");
    let dir = sharded_with(
        "hardening-dir-shard",
        &[("model-00001-of-00002.safetensors", "sub")],
    );
    std::fs::create_dir(dir.join("sub")).unwrap();
    let err = Checkpoint::open(&dir).unwrap_err();
    assert!(err.to_string().contains("is a directory"), "{err}");
}

#[test]
fn a_hugging_face_cache_snapshot_still_loads() {
    // hub layout: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>
    let repo = scratch("hardening-hub/models--x--tiny");
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        let blob = blobs.join(format!("blob-{file}"));
        std::fs::copy(checkpoints::tiny_dir().join(file), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob-{file}"), snapshot.join(file))
            .unwrap();
    }
    let (model, _, report) = MoeCausalLm::load(&snapshot, &cpu()).unwrap();
    assert!(report.unused.is_empty());
    assert_eq!(model.layers.len(), 2);
}

// ---- 2. --out writes the file the user named, in place ----

#[cfg(unix)]
#[test]
fn out_is_written_in_place_and_never_replaced() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = scratch("hardening-out");
    let tiny = checkpoints::tiny_dir();
    let tiny = tiny.to_str().unwrap();
    let logits = |out: &str| moe(&["logits", "--model", tiny, "--ids", "3,4", "--out", out]);
    // An existing file keeps its mode.
    let file = dir.join("kept.safetensors");
    std::fs::write(&file, b"old").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, _, stderr) = logits(file.to_str().unwrap());
    assert_eq!(code, Some(0), "{stderr}");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    let source = moe::moe_models::TensorSource::open(&file).unwrap();
    assert_eq!(source.shape("logits").unwrap(), vec![2, 512]);
    // A symbolic link stays a link; its target gets the logits.
    let target = dir.join("target.safetensors");
    let link = dir.join("link.safetensors");
    std::fs::write(&target, b"").unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (code, _, stderr) = logits(link.to_str().unwrap());
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(std::fs::metadata(&target).unwrap().len() > 4096);
    // A FIFO is refused and stays a FIFO (today's main replaces it by a regular file).
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let run = logits(fifo.to_str().unwrap());
    assert_clean_error(&run, "FIFO");
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    // A directory that does not exist: the error names the user's path, not a temp file.
    let missing = dir.join("no/such/dir/out.safetensors");
    let run = logits(missing.to_str().unwrap());
    assert_clean_error(&run, missing.to_str().unwrap());
    assert!(!run.2.contains(".tmp"), "{}", run.2);
    // `-` is stdout: the bytes of a safetensors file.
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["logits", "--model", tiny, "--ids", "3,4", "--out", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let source = moe::moe_models::TensorSource::from_bytes(out.stdout, "stdout").unwrap();
    assert_eq!(source.shape("logits").unwrap(), vec![2, 512]);
    // The library call refuses the FIFO the same way.
    let err = moe::moe_models::io::write_f32(&fifo, "x", &[1], &[1.0]).unwrap_err();
    assert!(err.to_string().contains(fifo.to_str().unwrap()), "{err}");
}

// ---- 3. sizes from config.json are proven by tensors before anything is allocated ----

#[test]
fn configs_that_disagree_with_their_tensors_are_typed_errors() {
    let tiny = checkpoints::tiny_dir();
    let qwen3 = data("qwen3-moe-tiny");
    for (case, src, field, value) in [
        (
            "layers",
            &tiny,
            "num_hidden_layers",
            json!(1_000_000_000u64),
        ),
        ("layers-max", &tiny, "num_hidden_layers", json!(i64::MAX)),
        (
            "expert-size",
            &tiny,
            "intermediate_size",
            json!(1_000_000_000u64),
        ),
        ("experts", &tiny, "num_experts", json!(1_000_000_000_000u64)),
        (
            "dense-size",
            &qwen3,
            "intermediate_size",
            json!(1_000_000_000u64),
        ),
        ("vocab", &tiny, "vocab_size", json!(1_000_000_000u64)),
    ] {
        let dir = copy_of(src, &format!("hardening-size-{case}"));
        edit_config(&dir, |c| {
            c.insert(field.into(), value.clone());
        });
        let err = MoeCausalLm::load(&dir, &cpu()).unwrap_err();
        match &err {
            LoadError::ConfigMismatch { field: f, .. } => {
                assert!(f.contains(field), "{case}: {err}")
            }
            LoadError::Config { field: f, .. } => assert!(f.contains(field), "{case}: {err}"),
            other => panic!("{case}: {other}"),
        }
        let run = logits_of(&dir);
        assert_clean_error(&run, field);
    }
    // The mismatch names the config's value and the tensor's shape.
    let dir = copy_of(&tiny, "hardening-size-message");
    edit_config(&dir, |c| {
        c.insert("intermediate_size".into(), json!(48));
    });
    let err = MoeCausalLm::load(&dir, &cpu()).unwrap_err().to_string();
    assert!(
        err.contains("intermediate_size = 48")
            && err.contains("model.layers.0.mlp.experts.0.gate_proj.weight")
            && err.contains("[32, 64]"),
        "{err}"
    );
}

// ---- 4. inspect's work is bounded, whatever the config claims ----

#[test]
fn inspect_is_bounded_and_never_wraps() {
    let config_only =
        |name: &str, edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
            let dir = scratch(name);
            std::fs::copy(
                data("deepseek-v3-tiny/config.json"),
                dir.join("config.json"),
            )
            .unwrap();
            edit_config(&dir, |c| edit(c));
            dir
        };
    let huge_layers = config_only("hardening-inspect-layers", &|c| {
        c.insert("num_hidden_layers".into(), json!(i64::MAX));
    });
    let dense = config_only("hardening-inspect-dense", &|c| {
        c.insert("num_hidden_layers".into(), json!(100_000_000));
        c.insert("first_k_dense_replace".into(), json!(100_000_000));
    });
    let wide = config_only("hardening-inspect-wide", &|c| {
        c.insert("hidden_size".into(), json!(1u64 << 62));
    });
    for (dir, field) in [
        (&huge_layers, "num_hidden_layers"),
        (&dense, "num_hidden_layers"),
        (&wide, "hidden_size"),
    ] {
        let run = moe_within(
            &["inspect", "--model", dir.to_str().unwrap(), "--json"],
            Duration::from_secs(20),
        );
        assert_clean_error(&run, field);
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        assert!(MoeCausalLmConfig::from_json(&text).is_err());
    }
    // With the weights present, inspect checks the config against them.
    let dir = copy_of(&data("deepseek-v3-tiny"), "hardening-inspect-weights");
    edit_config(&dir, |c| {
        c.insert("num_hidden_layers".into(), json!(60_000));
    });
    let run = moe(&["inspect", "--model", dir.to_str().unwrap()]);
    assert_clean_error(&run, "num_hidden_layers = 60000");
}

// ---- 5. every size the decoder assumes is validated ----

#[test]
fn odd_head_sizes_are_config_errors() {
    let olmoe = std::fs::read_to_string(checkpoints::tiny_dir().join("config.json")).unwrap();
    let qwen3 = std::fs::read_to_string(data("qwen3-moe-tiny/config.json")).unwrap();
    let with = |text: &str, edits: &[(&str, serde_json::Value)]| {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        for (k, x) in edits {
            v[*k] = x.clone();
        }
        v.to_string()
    };
    for (case, text) in [
        (
            "64 heads of size 1",
            with(
                &olmoe,
                &[
                    ("num_attention_heads", 64.into()),
                    ("num_key_value_heads", 64.into()),
                ],
            ),
        ),
        ("head_dim 15", with(&qwen3, &[("head_dim", 15.into())])),
        ("head_dim 1", with(&qwen3, &[("head_dim", 1.into())])),
        (
            "kv heads not dividing heads",
            with(&olmoe, &[("num_key_value_heads", 3.into())]),
        ),
        (
            "heads not dividing hidden",
            with(&olmoe, &[("num_attention_heads", 5.into())]),
        ),
    ] {
        let err = MoeCausalLmConfig::from_json(&text).unwrap_err();
        assert!(matches!(err, LoadError::Config { .. }), "{case}: {err}");
    }
    // Through the CLI: a clean error, not the panic in the rotary tables of today's main.
    let dir = copy_of(&data("qwen3-moe-tiny"), "hardening-head-dim");
    edit_config(&dir, |c| {
        c.insert("head_dim".into(), json!(15));
    });
    let run = logits_of(&dir);
    assert_clean_error(&run, "head_dim");
}

// ---- 6. the context limit, and long prompts ----

#[test]
fn the_context_limit_is_enforced_and_long_prompts_run_in_blocks() {
    let dir = copy_of(&checkpoints::tiny_dir(), "hardening-context");
    edit_config(&dir, |c| {
        c.insert("max_position_embeddings".into(), json!(16));
    });
    let (model, _, _) = MoeCausalLm::load(&dir, &cpu()).unwrap();
    let mut cache = KvCache::new(model.layers.len(), 1);
    let ids: Vec<i64> = (0..17).map(|i| 2 + i % 500).collect();
    let err = model
        .forward(
            std::slice::from_ref(&ids),
            &[vec![true; 17]],
            &mut cache,
            &TopK::Configured,
            false,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            RunError::ContextTooLong {
                cached: 0,
                len: 17,
                max: 16
            }
        ),
        "{err}"
    );
    assert!(cache.is_empty());
    // Generation stops when the sequence fills the context: 10 + 7 = 17 > 16.
    let new = model
        .generate(
            &ids[..10],
            &moe::moe_models::GenerateOptions::greedy(20),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(new.len(), 7);
    // Through the CLI, with a prompt file longer than one argument may be (128 KiB).
    let prompt = dir.join("prompt.txt");
    std::fs::write(&prompt, "the river runs past. ".repeat(8000)).unwrap();
    let run = moe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-file",
        prompt.to_str().unwrap(),
    ]);
    assert_clean_error(&run, "exceed the model's context of 16 positions");

    // A prompt of more than one attention block gives the logits of a prompt fed in pieces.
    let (model, _, _) = MoeCausalLm::load(&checkpoints::tiny_dir(), &cpu()).unwrap();
    let ids: Vec<i64> = (0..1100).map(|i| 2 + (i * 7919) % 509).collect();
    let mut whole = KvCache::new(model.layers.len(), 1);
    let all = model
        .forward(
            std::slice::from_ref(&ids),
            &[vec![true; 1100]],
            &mut whole,
            &TopK::Configured,
            false,
        )
        .unwrap()
        .logits;
    let mut pieces = KvCache::new(model.layers.len(), 1);
    let mut last = None;
    for piece in ids.chunks(300) {
        let out = model
            .forward(
                &[piece.to_vec()],
                &[vec![true; piece.len()]],
                &mut pieces,
                &TopK::Configured,
                false,
            )
            .unwrap();
        last = Some(out.logits);
    }
    let tail = |t: burn::tensor::Tensor<3>, at: usize| common::host(t.narrow(1, at, 1));
    let (a, b) = (tail(all, 1099), tail(last.unwrap(), 1100 - 3 * 300 - 1));
    let err = common::max_abs_diff(&a, &b);
    assert!(err < 1e-4, "whole vs pieces: {err}");
}

// ---- 7. non-finite results are errors naming where they appeared ----

/// The tiny checkpoint with `value` written into one entry of `tensor`.
fn poisoned(name: &str, tensor: &str, value: f32) -> PathBuf {
    let mut tensors = tensors_in(&checkpoints::tiny_dir());
    let t: &mut Stored = tensors.get_mut(tensor).unwrap();
    t.bytes[..4].copy_from_slice(&value.to_le_bytes());
    let dir = scratch(name);
    checkpoints::copy_side_files(&dir);
    write_tensors(&dir.join("model.safetensors"), &tensors);
    dir
}

#[test]
fn non_finite_values_are_errors_naming_the_first_layer() {
    let cases = [
        // the first value of the embeddings is token 0's
        (
            "embed",
            "model.embed_tokens.weight",
            f32::INFINITY,
            Stage::Embeddings,
            "0",
        ),
        // expert 0's router weight on the first hidden value: every token's routing
        (
            "router",
            "model.layers.1.mlp.gate.weight",
            f32::NAN,
            Stage::Mlp(1),
            "5,6,7",
        ),
        (
            "attention",
            "model.layers.0.self_attn.v_proj.weight",
            f32::NAN,
            Stage::Attention(0),
            "1,2",
        ),
    ];
    for (case, tensor, value, stage, ids) in cases {
        let dir = poisoned(&format!("hardening-nan-{case}"), tensor, value);
        let (model, _, _) = MoeCausalLm::load(&dir, &cpu()).unwrap();
        let ids: Vec<i64> = ids.split(',').map(|x| x.parse().unwrap()).collect();
        let mut cache = KvCache::new(model.layers.len(), 1);
        let err = model
            .forward(
                std::slice::from_ref(&ids),
                &[vec![true; ids.len()]],
                &mut cache,
                &TopK::Configured,
                false,
            )
            .unwrap_err();
        assert!(
            matches!(err, RunError::NonFinite { stage: s } if s == stage),
            "{case}: {err}"
        );
        assert!(
            cache.is_empty(),
            "{case}: the failed call left the cache as it was"
        );
        // greedy generation fails instead of emitting token 0
        let ids_arg = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        let run = moe(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--ids",
            &ids_arg,
            "--json",
        ]);
        assert_clean_error(&run, &format!("first appear in {stage}"));
        assert!(run.1.is_empty(), "{case}: printed {}", run.1);
    }
    // Configs whose values blow up are refused up front.
    let tiny = std::fs::read_to_string(checkpoints::tiny_dir().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&tiny).unwrap();
    v["rope_theta"] = json!(1e-50);
    let err = MoeCausalLmConfig::from_json(&v.to_string()).unwrap_err();
    assert!(err.to_string().contains("rope_theta"), "{err}");
    let ds = std::fs::read_to_string(data("deepseek-v3-tiny/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&ds).unwrap();
    v["routed_scaling_factor"] = json!(1e300);
    let err = MoeCausalLmConfig::from_json(&v.to_string()).unwrap_err();
    assert!(err.to_string().contains("routed_scaling_factor"), "{err}");
}

// ---- 8. transformers' defaults, and unused tensors reported ----

#[test]
fn missing_fields_take_the_transformers_defaults() {
    let text = std::fs::read_to_string(data("config-defaults.json")).unwrap();
    let defaults: serde_json::Value = serde_json::from_str(&text).unwrap();
    for model_type in ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"] {
        let want = &defaults[model_type];
        let config = MoeCausalLmConfig::from_json(&format!(r#"{{"model_type": "{model_type}"}}"#))
            .unwrap_or_else(|e| panic!("{model_type}: {e}"));
        let mut ours = serde_json::to_value(&config).unwrap();
        // values transformers stores under other names, or derives when absent
        ours["num_key_value_heads"] = config.kv_heads().into();
        ours["num_local_experts"] = config.num_experts.into();
        ours["n_routed_experts"] = config.num_experts.into();
        ours["sliding_window"] = json!(config.attention_window());
        if !want["head_dim"].is_null() {
            ours["head_dim"] = config.rope_dim().into(); // DeepSeek-V3: qk_rope_head_dim
        }
        let mut compared = 0;
        for (field, value) in want.as_object().unwrap() {
            let Some(mine) = ours.get(field) else {
                continue;
            };
            if field == "bos_token_id" || value.is_object() {
                continue; // not read by this engine
            }
            let same = match (mine.as_f64(), value.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => mine == value,
            };
            assert!(
                same,
                "{model_type}.{field}: ours {mine}, transformers {value}"
            );
            compared += 1;
        }
        assert!(
            compared >= 15,
            "{model_type}: only {compared} fields compared"
        );
    }
}

#[test]
fn unused_tensors_are_reported_and_strict_refuses_them() {
    let dir = copy_of(&data("qwen2-moe-tiny"), "hardening-qkv-bias");
    edit_config(&dir, |c| {
        c.insert("qkv_bias".into(), json!(false));
    });
    let (_, _, report) = MoeCausalLm::load(&dir, &cpu()).unwrap();
    assert!(
        report
            .unused
            .contains(&"model.layers.0.self_attn.q_proj.bias".to_string()),
        "{:?}",
        report.unused
    );
    let d = dir.to_str().unwrap();
    let (code, _, stderr) = logits_of(&dir);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: ") && stderr.contains("q_proj.bias"),
        "{stderr}"
    );
    let run = moe(&[
        "--strict", "logits", "--model", d, "--ids", "1", "--out", "-",
    ]);
    assert_clean_error(&run, "--strict");
    // DeepSeek-V3 without n_shared_experts: transformers' default (1) uses the shared expert.
    let dir = copy_of(&data("deepseek-v3-tiny"), "hardening-shared-default");
    edit_config(&dir, |c| {
        c.remove("n_shared_experts");
    });
    let (_, _, report) = MoeCausalLm::load(&dir, &cpu()).unwrap();
    assert!(report.unused.is_empty(), "{:?}", report.unused);
}

// ---- 9. a file truncated while open is an error, not SIGBUS ----

#[test]
fn a_file_truncated_while_open_is_an_io_error() {
    let dir = copy_of(&checkpoints::tiny_dir(), "hardening-truncate");
    let path = dir.join("model.safetensors");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    // Tensors stored past the cut: today's main dies of SIGBUS reading them from its mapping.
    let mut failed = 0;
    for name in ckpt.names().map(String::from).collect::<Vec<_>>() {
        let shape = ckpt.shape(&name).unwrap();
        if let Err(err) = ckpt.read_f32(&name, &shape) {
            assert!(matches!(err, LoadError::Io { .. }), "{err}");
            assert!(err.to_string().contains("model.safetensors"), "{err}");
            failed += 1;
        }
    }
    assert!(failed > 0);
}
