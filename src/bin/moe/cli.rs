//! The command line of `moe`: its arguments and subcommands, and nothing that runs them (the
//! fuzzing harness parses arbitrary argument lists through this same definition).

use std::path::PathBuf;

use burn::tensor::FloatDType;
use clap::{Parser, Subcommand, ValueEnum};
use moe::backend::Backend;

#[derive(Parser)]
#[command(name = "moe", version, about = "Mixture-of-Experts models on Burn")]
pub struct Cli {
    /// Backend to run on (`moe backends` lists those compiled in).
    #[arg(long, global = true, default_value_t = Backend::default().to_string())]
    pub backend: String,
    /// Dtype of the weights and the computation (logits are written in f32).
    #[arg(long, global = true, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// Refuse a checkpoint holding tensors the model does not use (by default they are listed
    /// as a warning on stderr).
    #[arg(long, global = true)]
    pub strict: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl From<Dtype> for FloatDType {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => FloatDType::F32,
            Dtype::Bf16 => FloatDType::BF16,
            Dtype::F16 => FloatDType::F16,
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Architecture, sizes, experts, k, total and active parameters.
    Inspect {
        /// Checkpoint folder (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run one sequence and write its logits (`logits`, f32, `[L, vocab]`) to a safetensors file.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Token ids, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            required = true,
            allow_negative_numbers = true
        )]
        ids: Vec<i64>,
        /// File to write (created, or overwritten in place keeping its mode; `-`: stdout).
        #[arg(long)]
        out: PathBuf,
        /// Experts per token (the MoE-PHDS dial); the checkpoint's own k by default.
        #[arg(long)]
        top_k: Option<usize>,
    },
    /// Continue a prompt: greedy, or sampled with --temperature and --seed.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// Prompt text (needs tokenizer.json in the folder).
        #[arg(long, conflicts_with_all = ["ids", "prompt_file"])]
        prompt: Option<String>,
        /// Read the prompt text from a file (`-`: stdin), for prompts longer than one argument
        /// may be (128 KiB on Linux); at most 64 MiB.
        #[arg(long, conflicts_with = "ids")]
        prompt_file: Option<PathBuf>,
        /// Prompt token ids, comma-separated.
        #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
        ids: Option<Vec<i64>>,
        #[arg(long, default_value_t = 20)]
        max_new_tokens: usize,
        #[arg(long)]
        top_k: Option<usize>,
        /// Sample from softmax(logits / T); 0 (the default) is greedy.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        temperature: f64,
        /// Seed of the sampler: the same seed gives the same tokens.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print one line `{"new_tokens":[…],"text":"…"}` instead of streaming text.
        #[arg(long)]
        json: bool,
    },
    /// Time one whole MoE layer (route, plan, permute, experts, combine) with random weights and
    /// fresh random inputs per call; prints the median of the timed calls.
    Bench {
        /// Layer shapes, comma-separated: olmoe-1b-7b, mixtral-8x7b-scaled, qwen3-30b-a3b.
        #[arg(long, value_delimiter = ',', default_value = "olmoe-1b-7b")]
        preset: Vec<String>,
        /// Tokens per call, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,128,512,2048")]
        tokens: Vec<usize>,
        /// auto, tensor-ops or kernels.
        #[arg(long, default_value = "auto")]
        dispatch: String,
        /// Timed calls per case (after one warm-up call); at least 3.
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// One JSON object per case.
        #[arg(long)]
        json: bool,
        /// Also time the same code on one dense matmul chain of the same FLOPs (one expert,
        /// k = 1, T·k tokens) and print its rate and the ratio.
        #[arg(long)]
        dense: bool,
        /// Also time a plain read of 256 MiB of host memory by the kernels' threads before every
        /// timed call, and print its median rate and the layer's weight bandwidth against it
        /// (CPU backends: the bound a decode step streams its experts' weights at). The read
        /// leaves the caches cold for every timed call.
        #[arg(long)]
        stream: bool,
    },
    /// Time a whole checkpoint as llama-bench does: load to first token and peak memory,
    /// prefill tokens/s at each prompt length, decode ms per token after a context (medians of
    /// --runs, greedy, through `generate`).
    BenchModel {
        /// Checkpoint folder (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Prompt lengths whose prefill is timed, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "128,512")]
        prompts: Vec<usize>,
        /// Tokens before the timed decode steps.
        #[arg(long, default_value_t = 8)]
        context: usize,
        /// Decode steps timed per run.
        #[arg(long = "gen", default_value_t = 32)]
        steps: usize,
        /// Runs of each case.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Experts per token (the MoE-PHDS dial); the checkpoint's own k by default.
        #[arg(long)]
        top_k: Option<usize>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The backends of this build and the dtypes each computes in.
    Backends {
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
    },
}
