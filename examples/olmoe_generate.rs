//! Text generation with an OLMoE checkpoint.
//!
//! ```text
//! cargo run --example olmoe_generate                       # the tiny checkpoint in tests/data
//! cargo run --release --example olmoe_generate -- --model ~/OLMoE-1B-7B-0924 \
//!     --prompt "The capital of France is" --max-new-tokens 20 \
//!     [--top-k 4] [--dtype bf16] [--temperature 0.8 --seed 1] [--backend wgpu]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::FloatDType;
use clap::Parser;
use moe::TopK;
use moe::backend::Backend;
use moe::moe_models::{GenerateOptions, LoadOptions, MoeCausalLm, Sampling, io};

#[derive(Parser)]
#[command(about = "Continue a prompt with an OLMoE checkpoint")]
struct Args {
    /// Checkpoint folder (config.json, safetensors, tokenizer.json); the bundled tiny model by
    /// default.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/olmoe-tiny"))]
    model: PathBuf,
    #[arg(long, default_value = "The river runs past.")]
    prompt: String,
    #[arg(long, default_value_t = 10)]
    max_new_tokens: usize,
    /// Experts per token (the MoE-PHDS dial); the checkpoint's own k by default.
    #[arg(long)]
    top_k: Option<usize>,
    /// f32, bf16 or f16 weights and compute.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// flex, ndarray, wgpu or cuda, as compiled in.
    #[arg(long, default_value_t = Backend::default().to_string())]
    backend: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let backend: Backend = args.backend.parse()?;
    let dtype = match args.dtype.as_str() {
        "f32" => FloatDType::F32,
        "bf16" => FloatDType::BF16,
        "f16" => FloatDType::F16,
        other => return Err(format!("--dtype {other}: use f32, bf16 or f16").into()),
    };
    let device = backend.device();

    let start = Instant::now();
    let options = LoadOptions {
        dtype,
        progress: true,
    };
    let (model, config, report) = MoeCausalLm::load_with(&args.model, &device, &options)?;
    println!(
        "loaded {} ({} layers, {} experts, top-{}) on {backend} in {}: {} tensors in {:.2} s",
        args.model.display(),
        config.num_hidden_layers,
        config.num_experts,
        config.num_experts_per_tok,
        args.dtype,
        report.loaded,
        start.elapsed().as_secs_f64()
    );
    let tokenizer =
        io::load_tokenizer(&args.model)?.ok_or("the model folder has no tokenizer.json")?;
    let encoding = tokenizer
        .encode(args.prompt.as_str(), false)
        .map_err(|e| e.to_string())?;
    let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| id as i64).collect();

    let options = GenerateOptions {
        top_k: args.top_k.map_or(TopK::Configured, TopK::Fixed),
        sampling: Sampling::Temperature {
            temperature: args.temperature,
            seed: args.seed,
        },
        stop_tokens: config.eos_ids(),
        ..GenerateOptions::greedy(args.max_new_tokens)
    };
    let start = Instant::now();
    let new = model.generate(&ids, &options, &mut |_| {})?;
    let seconds = start.elapsed().as_secs_f64();
    let new_u32: Vec<u32> = new.iter().map(|&id| id as u32).collect();
    let text = tokenizer
        .decode(&new_u32, false)
        .map_err(|e| e.to_string())?;
    println!("prompt: {}", args.prompt);
    println!("continuation: {text}");
    println!("new tokens: {new:?}");
    println!(
        "{} tokens in {seconds:.3} s: {:.1} tokens/s",
        new.len(),
        new.len() as f64 / seconds.max(1e-9)
    );
    Ok(())
}
