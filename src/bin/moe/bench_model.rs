//! `moe bench-model`: a whole checkpoint timed as llama-bench times one — load to first token
//! and peak memory, prefill tokens/s at each prompt length, decode ms per token after a
//! context — through `generate`, the path a user runs.

use std::path::Path;
use std::time::Instant;

use moe::TopK;
use moe::moe_models::{GenerateOptions, MoeCausalLm};

use crate::Result;

/// What to time.
pub(crate) struct ModelBench<'a> {
    pub(crate) prompts: &'a [usize],
    pub(crate) context: usize,
    pub(crate) steps: usize,
    pub(crate) runs: usize,
    pub(crate) top_k: TopK,
    pub(crate) json: bool,
}

/// Prompt ids spread over the vocabulary (deterministic: the same prompt every run).
fn prompt(len: usize, vocab: usize) -> Vec<i64> {
    (0..len)
        .map(|i| ((i * 7919 + 13) % vocab.max(1)) as i64)
        .collect()
}

/// Seconds to the first new token and to the end of `new` tokens after `prompt` (greedy,
/// stop tokens ignored).
fn time_generate(
    model: &MoeCausalLm,
    prompt: &[i64],
    new: usize,
    top_k: &TopK,
) -> Result<(f64, f64, usize)> {
    let options = GenerateOptions {
        top_k: top_k.clone(),
        ..GenerateOptions::greedy(new)
    };
    let start = Instant::now();
    let mut first = None;
    let tokens = model.generate(prompt, &options, &mut |_| {
        first.get_or_insert_with(|| start.elapsed().as_secs_f64());
    })?;
    let total = start.elapsed().as_secs_f64();
    Ok((first.unwrap_or(total), total, tokens.len()))
}

/// Min, median (the `bench` command's) and max; `values` holds at least one.
fn stats(values: &mut [f64]) -> (f64, f64, f64) {
    let median = crate::median_of(values).unwrap_or(f64::NAN);
    (values[0], median, values[values.len() - 1])
}

/// The process's peak resident memory in bytes (Linux: `VmHWM`), if known.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes of the folder's safetensors files.
fn checkpoint_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Runs the bench on `model` (loaded in `load_seconds` from `dir`) and prints it.
pub(crate) fn bench_model(
    model: &MoeCausalLm,
    dir: &Path,
    load_seconds: f64,
    bench: &ModelBench<'_>,
) -> Result<()> {
    if bench.runs == 0 || bench.steps == 0 || bench.context == 0 {
        return Err(format!(
            "--runs ({}), --gen ({}) and --context ({}) must be at least 1",
            bench.runs, bench.steps, bench.context
        )
        .into());
    }
    let vocab = model.vocab_size();
    let mut report = serde_json::json!({ "load_seconds": load_seconds });
    // load to first token: the load, then the shortest prompt's first token
    let shortest = bench.prompts.iter().copied().min().unwrap_or(bench.context);
    let (first, _, _) = time_generate(model, &prompt(shortest, vocab), 1, &bench.top_k)?;
    report["load_to_first_token_seconds"] = (load_seconds + first).into();
    let mut lines = vec![format!(
        "load {load_seconds:.2} s, first token after {:.2} s",
        load_seconds + first
    )];

    let mut prefill = Vec::new();
    for &p in bench.prompts {
        let ids = prompt(p, vocab);
        let mut rates = Vec::with_capacity(bench.runs);
        for _ in 0..bench.runs {
            let (first, _, _) = time_generate(model, &ids, 1, &bench.top_k)?;
            rates.push(p as f64 / first.max(1e-9));
        }
        let (min, median, max) = stats(&mut rates);
        lines.push(format!(
            "prefill {p:>5} tokens: {median:8.1} tokens/s (min {min:.1}, max {max:.1})"
        ));
        prefill.push(serde_json::json!({
            "prompt": p, "tokens_per_second": median, "min": min, "max": max,
        }));
    }
    report["prefill"] = prefill.into();

    let ids = prompt(bench.context, vocab);
    let mut steps = Vec::with_capacity(bench.runs);
    for _ in 0..bench.runs {
        let (first, total, made) = time_generate(model, &ids, bench.steps + 1, &bench.top_k)?;
        if made > 1 {
            steps.push((total - first) * 1e3 / (made - 1) as f64);
        }
    }
    if !steps.is_empty() {
        let (min, median, max) = stats(&mut steps);
        lines.push(format!(
            "decode after {} tokens: {median:.2} ms per token, {:.1} tokens/s (min {min:.2}, max {max:.2} ms)",
            bench.context,
            1e3 / median
        ));
        report["decode"] = serde_json::json!({
            "context": bench.context, "tokens": bench.steps, "ms_per_token": median,
            "tokens_per_second": 1e3 / median, "min_ms": min, "max_ms": max,
        });
    }

    let size = checkpoint_bytes(dir);
    if let Some(rss) = peak_rss() {
        let ratio = match size {
            0 => String::new(),
            _ => format!(
                " ({:.2}x the checkpoint's {:.2} GB)",
                rss as f64 / size as f64,
                size as f64 / 1e9
            ),
        };
        lines.push(format!("peak RSS {:.2} GB{ratio}", rss as f64 / 1e9));
        report["peak_rss_bytes"] = rss.into();
    }
    report["checkpoint_bytes"] = size.into();
    match bench.json {
        true => println!("{report}"),
        false => lines.iter().for_each(|l| println!("{l}")),
    }
    Ok(())
}
