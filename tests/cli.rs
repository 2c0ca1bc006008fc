//! The `moe` command-line tool on the tiny OLMoE checkpoint: results and one-line errors.

use std::process::Command;

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

#[test]
fn bad_inputs_exit_non_zero_with_one_line() {
    let cases: Vec<Vec<&str>> = vec![
        vec!["generate", "--model", TINY, "--ids", "1,99999"],
        vec!["generate", "--model", TINY, "--ids", "1,2", "--top-k", "0"],
        vec!["generate", "--model", TINY, "--ids", "1,2", "--top-k", "9"],
        vec!["inspect", "--model", "/nonexistent/folder"],
        vec!["generate", "--model", TINY],
        vec!["--backend", "tpu", "inspect", "--model", TINY],
    ];
    for args in cases {
        let (ok, _, stderr) = moe(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
}
