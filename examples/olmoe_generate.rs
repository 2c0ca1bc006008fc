//! Greedy generation with an OLMoE checkpoint.
//!
//! ```text
//! cargo run --example olmoe_generate                       # the tiny checkpoint in tests/data
//! cargo run --release --example olmoe_generate -- --model ~/OLMoE-1B-7B-0924 \
//!     --prompt "The capital of France is" --max-new-tokens 20 [--top-k 4] [--backend wgpu]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use moe::TopK;
use moe::backend::Backend;
use moe::moe_models::{OlmoeModel, io};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_dir = arg(&args, "--model")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/olmoe-tiny"));
    let prompt = arg(&args, "--prompt").unwrap_or_else(|| "The river runs past.".into());
    let max_new: usize = arg(&args, "--max-new-tokens").map_or(Ok(10), |s| s.parse())?;
    let top_k = match arg(&args, "--top-k") {
        Some(k) => TopK::Fixed(k.parse()?),
        None => TopK::Configured,
    };
    let backend: Backend = match arg(&args, "--backend") {
        Some(name) => name.parse()?,
        None => Backend::default(),
    };
    let device = backend.device();

    let start = Instant::now();
    let (model, config, report) = OlmoeModel::load(&model_dir, &device)?;
    println!(
        "loaded {} ({} layers, {} experts, top-{}) on {backend}: {} tensors in {:.2} s",
        model_dir.display(),
        config.num_hidden_layers,
        config.num_experts,
        config.num_experts_per_tok,
        report.loaded,
        start.elapsed().as_secs_f64()
    );
    let tokenizer =
        io::load_tokenizer(&model_dir)?.ok_or("the model folder has no tokenizer.json")?;
    let encoding = tokenizer
        .encode(prompt.as_str(), false)
        .map_err(|e| e.to_string())?;
    let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| id as i64).collect();

    let start = Instant::now();
    let (new, _) = model.generate_greedy(&ids, max_new, &top_k, true)?;
    let seconds = start.elapsed().as_secs_f64();
    let new_u32: Vec<u32> = new.iter().map(|&id| id as u32).collect();
    let text = tokenizer
        .decode(&new_u32, false)
        .map_err(|e| e.to_string())?;
    println!("prompt: {prompt}");
    println!("continuation: {text}");
    println!("new tokens: {new:?}");
    println!("{:.1} tokens/s", new.len() as f64 / seconds.max(1e-9));
    Ok(())
}
