//! `moe`: inspect an MoE checkpoint, write its logits, or generate text with it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use moe::TopK;
use moe::backend::Backend;
use moe::moe_models::{KvCache, OlmoeConfig, OlmoeModel, io};

#[derive(Parser)]
#[command(name = "moe", version, about = "Mixture-of-Experts models on Burn")]
struct Cli {
    /// Backend to run on (flex, ndarray, wgpu, cuda; as compiled in).
    #[arg(long, global = true, default_value_t = Backend::default().to_string())]
    backend: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<i64>,
        #[arg(long)]
        out: PathBuf,
        /// Experts per token (the MoE-PHDS dial); the checkpoint's own k by default.
        #[arg(long)]
        top_k: Option<usize>,
    },
    /// Greedy continuation of a prompt.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// Prompt text (needs tokenizer.json in the folder).
        #[arg(long, conflicts_with = "ids")]
        prompt: Option<String>,
        /// Prompt token ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        ids: Option<Vec<i64>>,
        #[arg(long, default_value_t = 20)]
        max_new_tokens: usize,
        #[arg(long)]
        top_k: Option<usize>,
        /// Print one line `{"new_tokens":[…],"text":"…"}`.
        #[arg(long)]
        json: bool,
    },
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn top_k(k: Option<usize>) -> TopK {
    k.map_or(TopK::Configured, TopK::Fixed)
}

fn check_ids(ids: &[i64], config: &OlmoeConfig) -> Result<()> {
    if ids.is_empty() {
        return Err("no token ids given".into());
    }
    match ids
        .iter()
        .find(|&&id| id < 0 || id as usize >= config.vocab_size)
    {
        Some(id) => Err(format!(
            "token id {id} is outside the vocabulary 0..{}",
            config.vocab_size
        )
        .into()),
        None => Ok(()),
    }
}

fn read_config(dir: &Path) -> Result<OlmoeConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(OlmoeConfig::from_json(&text)?)
}

fn run(cli: Cli) -> Result<()> {
    let device = cli.backend.parse::<Backend>()?.device();
    match cli.command {
        Command::Inspect { model, json } => {
            let c = read_config(&model)?;
            let (total, active) = c.parameter_counts();
            if json {
                let value = serde_json::json!({
                    "architecture": "olmoe",
                    "layers": c.num_hidden_layers,
                    "hidden_size": c.hidden_size,
                    "intermediate_size": c.intermediate_size,
                    "heads": c.num_attention_heads,
                    "kv_heads": c.kv_heads(),
                    "experts": c.num_experts,
                    "top_k": c.num_experts_per_tok,
                    "norm_topk_prob": c.norm_topk_prob,
                    "vocab_size": c.vocab_size,
                    "total_parameters": total,
                    "active_parameters": active,
                });
                println!("{value}");
            } else {
                println!("architecture      olmoe");
                println!("layers            {}", c.num_hidden_layers);
                println!("hidden size       {}", c.hidden_size);
                println!("expert size       {}", c.intermediate_size);
                println!(
                    "heads (kv)        {} ({})",
                    c.num_attention_heads,
                    c.kv_heads()
                );
                println!(
                    "experts, top-k    {}, {}",
                    c.num_experts, c.num_experts_per_tok
                );
                println!("vocabulary        {}", c.vocab_size);
                println!("parameters        {total} total, {active} active per token");
            }
        }
        Command::Logits {
            model,
            ids,
            out,
            top_k: k,
        } => {
            let (m, config, _) = OlmoeModel::load(&model, &device)?;
            check_ids(&ids, &config)?;
            let mut cache = KvCache::new(m.layers.len(), 1);
            let l = ids.len();
            let result = m.forward(&[ids], &[vec![true; l]], &mut cache, &top_k(k), false)?;
            let values: Vec<f32> = result.logits.into_data().iter::<f32>().collect();
            io::write_f32(&out, "logits", &[l, config.vocab_size], &values)?;
        }
        Command::Generate {
            model,
            prompt,
            ids,
            max_new_tokens,
            top_k: k,
            json,
        } => {
            let (m, config, _) = OlmoeModel::load(&model, &device)?;
            let tokenizer = io::load_tokenizer(&model)?;
            let ids = match (prompt, ids) {
                (Some(text), _) => {
                    let tok = tokenizer
                        .as_ref()
                        .ok_or("--prompt needs tokenizer.json in the model folder")?;
                    let enc = tok
                        .encode(text, false)
                        .map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
                    enc.get_ids().iter().map(|&id| id as i64).collect()
                }
                (None, Some(ids)) => ids,
                (None, None) => return Err("give --prompt TEXT or --ids 1,2,3".into()),
            };
            check_ids(&ids, &config)?;
            let start = Instant::now();
            let (new, _) = m.generate_greedy(&ids, max_new_tokens, &top_k(k), true)?;
            let seconds = start.elapsed().as_secs_f64();
            let text = match &tokenizer {
                Some(tok) => {
                    let ids: Vec<u32> = new.iter().map(|&id| id as u32).collect();
                    Some(
                        tok.decode(&ids, false)
                            .map_err(|e| format!("cannot decode: {e}"))?,
                    )
                }
                None => None,
            };
            if json {
                let mut value = serde_json::json!({ "new_tokens": new });
                if let Some(text) = &text {
                    value["text"] = serde_json::Value::from(text.as_str());
                }
                println!("{value}");
            } else {
                match &text {
                    Some(text) => println!("{text}"),
                    None => println!("{new:?}"),
                }
            }
            eprintln!(
                "{} tokens in {seconds:.2} s ({:.1} tokens/s)",
                new.len(),
                new.len() as f64 / seconds.max(1e-9)
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
