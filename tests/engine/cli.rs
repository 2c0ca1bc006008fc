//! The `moe` command-line tool on the tiny OLMoE checkpoint: results and one-line errors.

use crate::common;

use std::process::Command;

use common::checkpoints;

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/olmoe-tiny");

fn moe(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_json_matches_the_reference_continuation() {
    let (ok, stdout, _) = moe(&[
        "generate",
        "--model",
        TINY,
        "--prompt",
        "The river runs past.",
        "--max-new-tokens",
        "10",
        "--json",
    ]);
    assert!(ok);
    assert_eq!(
        stdout.trim(),
        r#"{"new_tokens":[373,373,373,373,373,373,373,373,456,275],"text":"tutututututututukn e"}"#
    );
    let (ok, stdout, _) = moe(&[
        "generate",
        "--model",
        TINY,
        "--ids",
        "425,333,388,393,387,308,350,260,415,382,317,433,15",
        "--max-new-tokens",
        "10",
        "--json",
    ]);
    assert!(ok);
    assert!(
        stdout.starts_with(r#"{"new_tokens":[454,454,454,11,11,11,379,11,11,11]"#),
        "{stdout}"
    );
}

/// `generate` reports the prompt's pass (prefill) and the decode steps separately on stderr,
/// with their token counts; one new token has no decode step.
#[test]
fn generate_reports_prefill_and_decode_separately() {
    let run = |new: &str| {
        let (ok, _, stderr) = moe(&[
            "generate",
            "--model",
            TINY,
            "--ids",
            "5,6,7,8,9",
            "--max-new-tokens",
            new,
            "--json",
        ]);
        assert!(ok, "{stderr}");
        stderr
    };
    let four = run("4");
    assert!(four.contains("4 new tokens in "), "{four}");
    assert!(four.contains("prefill: 5 prompt tokens in "), "{four}");
    assert!(four.contains("; decode: 3 tokens in "), "{four}");
    assert!(four.contains(" ms per token, "), "{four}");
    let one = run("1");
    assert!(one.contains("prefill: 5 prompt tokens in "), "{one}");
    assert!(!one.contains("decode:"), "{one}");
}

#[test]
fn inspect_reports_sizes_and_parameters() {
    let (ok, stdout, _) = moe(&["inspect", "--model", TINY, "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        (v["experts"].as_u64(), v["top_k"].as_u64()),
        (Some(8), Some(2))
    );
    // The checkpoint holds 200,066 f32 values (800,264 bytes less its header); all are counted.
    let total = v["total_parameters"].as_u64().unwrap();
    let bytes = std::fs::metadata(format!("{TINY}/model.safetensors"))
        .unwrap()
        .len();
    assert!(
        total * 4 < bytes && bytes - total * 4 < 8192,
        "{total} vs {bytes} bytes"
    );
}

/// `inspect` names the architecture and counts every stored value; `generate` continues the
/// first reference prompt of make_olmoe_tiny.py as transformers did (the script's printout).
fn architecture_runs_through_the_same_commands(
    folder: &str,
    architecture: &str,
    tokens: &str,
) -> serde_json::Value {
    let dir = format!("{}/tests/data/{folder}", env!("CARGO_MANIFEST_DIR"));
    let (ok, stdout, stderr) = moe(&["inspect", "--model", &dir, "--json"]);
    assert!(ok, "{folder}: {stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["architecture"], architecture);
    let bytes = std::fs::read(format!("{dir}/model.safetensors")).unwrap();
    let stored: usize = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensors()
        .iter()
        .map(|(_, view)| view.shape().iter().product::<usize>())
        .sum();
    assert_eq!(
        v["total_parameters"].as_u64(),
        Some(stored as u64),
        "{folder}: every stored value is counted"
    );
    let (ok, stdout, stderr) = moe(&[
        "generate",
        "--model",
        &dir,
        "--ids",
        "285,283,452,283,500,350,15",
        "--max-new-tokens",
        "10",
        "--json",
    ]);
    assert!(ok, "{folder}: {stderr}");
    let want = format!(r#"{{"new_tokens":[{tokens}]"#);
    assert!(stdout.starts_with(&want), "{folder}: {stdout}");
    // `logits` writes the reference logits of the first prompt.
    let out = std::env::temp_dir().join(format!(
        "moe-cli-logits-{folder}-{}.safetensors",
        std::process::id()
    ));
    let reference = moe::moe_models::TensorSource::open(std::path::Path::new(&format!(
        "{dir}/reference.safetensors"
    )))
    .unwrap();
    let prompt = common::reference_prompt(&reference, 0);
    let ids: Vec<String> = prompt.iter().map(|i| i.to_string()).collect();
    let (ok, _, stderr) = moe(&[
        "logits",
        "--model",
        &dir,
        "--ids",
        &ids.join(","),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{folder}: {stderr}");
    let l = prompt.len();
    let got = moe::moe_models::TensorSource::open(&out)
        .unwrap()
        .read_f32("logits", &[l, 512])
        .unwrap();
    let want = reference.read_f32("prompt0.logits", &[1, l, 512]).unwrap();
    let err = common::max_abs_diff(&got, &want);
    assert!(err <= 1e-4, "{folder}: logits off by {err:e}");
    std::fs::remove_file(&out).unwrap();
    // Another k runs from the same folder.
    let (ok, _, stderr) = moe(&[
        "generate",
        "--model",
        &dir,
        "--ids",
        "285,283",
        "--max-new-tokens",
        "2",
        "--top-k",
        "1",
    ]);
    assert!(ok, "{folder}: {stderr}");
    v
}

#[test]
fn qwen3_moe_runs_through_the_same_commands() {
    let v = architecture_runs_through_the_same_commands(
        "qwen3-moe-tiny",
        "qwen3_moe",
        "496,496,421,99,256,83,256,99,219,17",
    );
    assert_eq!(v["dense_layers"], serde_json::json!([1]));
    assert_eq!(v["intermediate_size"], 32, "the expert width");
}

#[test]
fn qwen2_moe_runs_through_the_same_commands() {
    architecture_runs_through_the_same_commands(
        "qwen2-moe-tiny",
        "qwen2_moe",
        "489,114,207,55,322,58,238,295,253,73",
    );
}

#[test]
fn deepseek_v3_runs_through_the_same_commands() {
    let v = architecture_runs_through_the_same_commands(
        "deepseek-v3-tiny",
        "deepseek_v3",
        "348,208,487,156,91,211,413,483,303,488",
    );
    assert_eq!(v["dense_layers"], serde_json::json!([0]));
}

#[test]
fn mixtral_runs_through_the_same_commands() {
    let v = architecture_runs_through_the_same_commands(
        "mixtral-tiny",
        "mixtral",
        "435,384,115,210,237,336,20,344,439,192",
    );
    assert_eq!(
        (v["experts"].as_u64(), v["kv_heads"].as_u64()),
        (Some(8), Some(2))
    );
}

#[test]
fn bad_inputs_exit_non_zero_with_one_line() {
    let cases: Vec<Vec<&str>> = vec![
        vec!["generate", "--model", TINY, "--ids", "1,99999"],
        vec!["generate", "--model", TINY, "--ids", "1,2", "--top-k", "0"],
        vec!["generate", "--model", TINY, "--ids", "1,2", "--top-k", "9"],
        vec!["inspect", "--model", "/nonexistent/folder"],
        vec!["generate", "--model", TINY],
        vec!["--backend", "tpu", "inspect", "--model", TINY],
        vec![
            "generate",
            "--model",
            TINY,
            "--ids",
            "1,2",
            "--temperature",
            "-1",
        ],
        vec![
            "generate",
            "--model",
            TINY,
            "--ids",
            "1,2",
            "--temperature",
            "nan",
        ],
        vec!["generate", "--model", TINY, "--ids=-3,2"],
        vec![
            "logits",
            "--model",
            TINY,
            "--ids",
            "1,512",
            "--out",
            "/tmp/x.safetensors",
        ],
        vec![
            "--backend",
            "ndarray",
            "--dtype",
            "f16",
            "logits",
            "--model",
            TINY,
            "--ids",
            "1",
            "--out",
            "/tmp/x.safetensors",
        ],
        vec!["--dtype", "f8", "inspect", "--model", TINY],
    ];
    for args in cases {
        let (ok, _, stderr) = moe(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
}

#[test]
fn broken_checkpoints_exit_non_zero_with_one_line_naming_the_problem() {
    for (case, dir, expect) in checkpoints::broken("cli") {
        let dir = dir.to_str().unwrap();
        let out = std::env::temp_dir().join(format!("moe-cli-{case}.safetensors"));
        for args in [
            vec![
                "generate",
                "--model",
                dir,
                "--ids",
                "1,2",
                "--max-new-tokens",
                "2",
            ],
            vec![
                "logits",
                "--model",
                dir,
                "--ids",
                "1,2",
                "--out",
                out.to_str().unwrap(),
            ],
        ] {
            let (ok, stdout, stderr) = moe(&args);
            assert!(!ok, "{case}: {args:?} succeeded");
            assert!(stdout.is_empty(), "{case}: {stdout}");
            assert!(!stderr.contains("panicked"), "{case}: {stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "{case}: {stderr}");
            assert!(
                stderr.starts_with("error: ") && stderr.contains(expect),
                "{case}: `{stderr}` lacks `{expect}`"
            );
        }
    }
}

#[test]
fn sampling_dtype_and_backend_flags() {
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "generate",
            "--model",
            TINY,
            "--ids",
            "425,333,388",
            "--max-new-tokens",
            "8",
            "--json",
        ];
        a.extend_from_slice(extra);
        a
    };
    let tokens = |extra: &[&'static str]| {
        let (ok, stdout, stderr) = moe(&args(extra));
        assert!(ok, "{extra:?}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(stderr.contains("tokens/s"), "{stderr}");
        v["new_tokens"].clone()
    };
    let greedy = tokens(&[]);
    assert_eq!(tokens(&["--temperature", "0"]), greedy);
    let hot = tokens(&["--temperature", "50", "--seed", "3"]);
    assert_eq!(tokens(&["--temperature", "50", "--seed", "3"]), hot);
    assert_ne!(hot, greedy);
    assert_ne!(tokens(&["--temperature", "50", "--seed", "4"]), hot);
    // Half-precision compute on the default CPU backend runs and gives tokens.
    for dtype in ["bf16", "f16"] {
        let (ok, stdout, stderr) = moe(&[
            "--dtype",
            dtype,
            "generate",
            "--model",
            TINY,
            "--ids",
            "425,333",
            "--max-new-tokens",
            "3",
            "--json",
        ]);
        assert!(ok && stdout.contains("new_tokens"), "{dtype}: {stderr}");
    }
    // Logits in bf16 compute are still written as f32 [L, vocab].
    let out = std::env::temp_dir().join(format!("moe-cli-bf16-{}.safetensors", std::process::id()));
    let (ok, _, stderr) = moe(&[
        "--dtype",
        "bf16",
        "logits",
        "--model",
        TINY,
        "--ids",
        "1,2,3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let logits = st.tensor("logits").unwrap();
    assert_eq!(
        (logits.dtype(), logits.shape()),
        (safetensors::Dtype::F32, &[3usize, 512][..])
    );
    std::fs::remove_file(&out).unwrap();

    let (ok, stdout, _) = moe(&["backends", "--json"]);
    assert!(ok);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    let flex = lines.iter().find(|v| v["backend"] == "flex").unwrap();
    assert_eq!(flex["compiled"], true);
    assert_eq!(flex["default"], true);
    assert_eq!(flex["dtypes"], serde_json::json!(["f32", "bf16", "f16"]));
    let cuda = lines.iter().find(|v| v["backend"] == "cuda").unwrap();
    assert_eq!(cuda["compiled"], false);
}

#[test]
fn logits_match_the_reference() {
    let out =
        std::env::temp_dir().join(format!("moe-cli-logits-{}.safetensors", std::process::id()));
    let r =
        moe::moe_models::TensorSource::open(&checkpoints::tiny_dir().join("reference.safetensors"))
            .unwrap();
    let ids: Vec<String> = common::reference_prompt(&r, 1)
        .iter()
        .map(|i| i.to_string())
        .collect();
    let l = ids.len();
    let ids = ids.join(",");
    let (ok, _, stderr) = moe(&[
        "logits",
        "--model",
        TINY,
        "--ids",
        &ids,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let got = moe::moe_models::TensorSource::open(&out)
        .unwrap()
        .read_f32("logits", &[l, 512])
        .unwrap();
    let want = r.read_f32("prompt1.logits", &[1, l, 512]).unwrap();
    let err = common::max_abs_diff(&got, &want);
    assert!(err <= 1e-4, "{err:e}");
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn ids_work_without_a_tokenizer_and_prompts_need_one() {
    let dir = checkpoints::scratch("cli-no-tokenizer");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(checkpoints::tiny_dir().join(file), dir.join(file)).unwrap();
    }
    let dir = dir.to_str().unwrap();
    let (ok, stdout, stderr) = moe(&[
        "generate",
        "--model",
        dir,
        "--ids",
        "425,333,388",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["new_tokens"].as_array().unwrap().len(), 4);
    assert!(v.get("text").is_none(), "{stdout}");
    // Without --json the ids are streamed as numbers.
    let (ok, stdout, _) = moe(&[
        "generate",
        "--model",
        dir,
        "--ids",
        "425,333,388",
        "--max-new-tokens",
        "4",
    ]);
    assert!(ok);
    let streamed: Vec<serde_json::Value> = stdout
        .split_whitespace()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect();
    assert_eq!(streamed, *v["new_tokens"].as_array().unwrap());
    let (ok, _, stderr) = moe(&["generate", "--model", dir, "--prompt", "hello"]);
    assert!(!ok);
    assert_eq!(
        stderr.trim(),
        "error: --prompt and --prompt-file need tokenizer.json in the model folder"
    );
}

#[test]
fn bench_prints_one_json_line_per_case() {
    let (ok, stdout, stderr) = moe(&[
        "bench",
        "--preset",
        "mixtral-8x7b-scaled",
        "--tokens",
        "1,4",
        "--runs",
        "3",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, tokens) in lines.iter().zip([1, 4]) {
        assert_eq!(line["preset"], "mixtral-8x7b-scaled");
        assert_eq!(line["tokens"], tokens);
        assert_eq!(line["backend"], "flex");
        assert_eq!(line["dispatch"], "host-kernels");
        assert_eq!(line["dtype"], "f32");
        for field in ["median_ms", "gflops", "weight_gbps"] {
            let v = line[field].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{field}: {v}");
        }
    }
    for args in [
        vec!["bench", "--preset", "nope"],
        // ndarray runs neither the CubeCL nor the host kernels
        vec![
            "--backend",
            "ndarray",
            "bench",
            "--dispatch",
            "kernels",
            "--tokens",
            "1",
        ],
        vec!["bench", "--dispatch", "fastest", "--tokens", "1"],
        vec!["bench", "--runs", "1"],
        vec!["bench", "--tokens", "0", "--preset", "mixtral-8x7b-scaled"],
    ] {
        let (ok, _, stderr) = moe(&args);
        assert!(!ok, "{args:?} succeeded");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
}

/// `bench-model` times the tiny checkpoint as llama-bench would: one JSON object with the load,
/// a prefill rate per prompt length, decode after the context, peak RSS; bad counts and a
/// prompt longer than the model's context are one-line errors.
#[test]
fn bench_model_reports_load_prefill_and_decode() {
    let (ok, stdout, stderr) = moe(&[
        "bench-model",
        "--model",
        TINY,
        "--prompts",
        "4,9",
        "--context",
        "3",
        "--gen",
        "2",
        "--runs",
        "2",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(report["load_seconds"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        report["load_to_first_token_seconds"].as_f64().unwrap()
            >= report["load_seconds"].as_f64().unwrap()
    );
    let prompts: Vec<u64> = report["prefill"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["prompt"].as_u64().unwrap())
        .collect();
    assert_eq!(prompts, [4, 9], "{report}");
    for p in report["prefill"].as_array().unwrap() {
        assert!(p["tokens_per_second"].as_f64().unwrap() > 0.0, "{report}");
    }
    assert_eq!(report["decode"]["context"], 3, "{report}");
    assert_eq!(report["decode"]["tokens"], 2, "{report}");
    assert!(report["decode"]["ms_per_token"].as_f64().unwrap() > 0.0);
    #[cfg(target_os = "linux")]
    assert!(report["peak_rss_bytes"].as_u64().unwrap() > 0);

    for bad in [
        vec!["--runs", "0"],
        vec!["--gen", "0"],
        vec!["--prompts", "5000"],
    ] {
        let mut args = vec!["bench-model", "--model", TINY];
        args.extend(bad.iter());
        let (ok, _, stderr) = moe(&args);
        assert!(!ok, "{bad:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "{bad:?}: {stderr}");
        assert!(stderr.starts_with("error:"), "{bad:?}: {stderr}");
    }
}
