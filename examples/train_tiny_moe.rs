//! Train a small MoE language model from scratch (on the CPU by default, `--backend` for
//! another): 4 layers, 8 experts, top-2, on a 200 KB excerpt of Shakespeare (public domain)
//! shipped in `examples/data/`. Prints the loss, each layer's expert load and its balance as it
//! goes; saves and resumes checkpoints.
//!
//! ```text
//! cargo run --release --example train_tiny_moe                        # ~300 steps, a few minutes
//! cargo run --release --example train_tiny_moe -- --balance-coef 0    # no balancing loss
//! cargo run --release --example train_tiny_moe -- --aux-free 0.001 --balance-coef 0
//! cargo run --release --example train_tiny_moe -- --router expert-choice --expert-choice-factor 1.25
//! cargo run --release --example train_tiny_moe -- --steps 100 --checkpoint ckpt
//! cargo run --release --example train_tiny_moe -- --steps 200 --checkpoint ckpt --resume
//! cargo run --release --example train_tiny_moe -- --json              # last line: summary JSON
//! ```

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use moe::backend::Backend;
use moe::train::{CharCorpus, KSchedule, TrainConfig, Trainer};
use moe::{Capacity, DenseToSparse, MixedTopK, RouterKind};

const CORPUS: &str = include_str!("data/tiny_shakespeare.txt");

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Router {
    TokenChoice,
    ExpertChoice,
    Hash,
    Random,
}

/// Train a tiny MoE language model on the CPU.
#[derive(Parser, Debug)]
struct Args {
    /// Optimisation steps (in all, counting those of a resumed checkpoint).
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Print and evaluate every this many steps.
    #[arg(long, default_value_t = 25)]
    log_every: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// Routed experts per layer.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Intermediate size of each expert.
    #[arg(long, default_value_t = 128)]
    d_ff: usize,
    /// Router of every MoE block.
    #[arg(long, value_enum, default_value_t = Router::TokenChoice)]
    router: Router,
    /// Expert-choice tokens per expert, as a multiple of T / E (expert-choice router; its
    /// choice sees later tokens of the batch, so its losses are optimistic for a causal model).
    #[arg(long, default_value_t = 1.0)]
    expert_choice_factor: f64,
    /// Drop pairs beyond this capacity factor (default: dropless).
    #[arg(long)]
    capacity_factor: Option<f64>,
    /// Weight of the load-balancing loss (0: off).
    #[arg(long, default_value_t = 0.01)]
    balance_coef: f64,
    /// Weight of the router z-loss (0: off).
    #[arg(long, default_value_t = 0.001)]
    z_coef: f64,
    /// DeepSeek-V3 auxiliary-loss-free bias balancing at this rate.
    #[arg(long)]
    aux_free: Option<f64>,
    /// MoE-PHDS mixed-k schedule: the ks to draw from, e.g. 1,2,4.
    #[arg(long, value_delimiter = ',')]
    phds: Vec<usize>,
    /// Final steps of the PHDS schedule at its smallest k.
    #[arg(long, default_value_t = 0)]
    phds_curriculum: usize,
    /// Dense-to-sparse: anneal k from this value to --top-k (and the temperature from 2 to 1)
    /// over the run.
    #[arg(long)]
    dense_from_k: Option<usize>,
    /// Characters per window.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Windows per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seed of the weights and the batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint directory (written every --save-every steps and at the end).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Save every this many steps.
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// Continue from --checkpoint.
    #[arg(long)]
    resume: bool,
    /// Validation windows per evaluation.
    #[arg(long, default_value_t = 32)]
    eval_windows: usize,
    /// End with one JSON line: initial and final validation loss, load CV, steps.
    #[arg(long)]
    json: bool,
    /// Backend to train on (flex, ndarray, wgpu, cuda; as compiled in).
    #[arg(long, default_value_t = Backend::default())]
    backend: Backend,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.log_every == 0 || args.save_every == 0 {
        return Err("--log-every and --save-every must be at least 1".into());
    }
    let device = args.backend.device();
    let corpus = CharCorpus::new(CORPUS);
    let (train, valid) = corpus.split(0.1);

    let router = match args.router {
        Router::TokenChoice => RouterKind::TokenChoice,
        Router::ExpertChoice => RouterKind::ExpertChoice {
            capacity_factor: args.expert_choice_factor,
        },
        Router::Hash => RouterKind::Hash { seed: args.seed },
        Router::Random => RouterKind::Random { seed: args.seed },
    };
    let schedule = match (&args.phds[..], args.dense_from_k) {
        ([], None) => KSchedule::Fixed,
        (ks, None) => KSchedule::Mixed(MixedTopK::new(
            ks.to_vec(),
            args.steps,
            args.phds_curriculum,
            args.seed,
        )?),
        ([], Some(from)) => {
            KSchedule::DenseToSparse(DenseToSparse::new(from, args.top_k, 2.0, 1.0, args.steps)?)
        }
        _ => return Err("--phds and --dense-from-k are exclusive".into()),
    };
    let config = TrainConfig {
        layers: args.layers,
        d_model: args.d_model,
        heads: 4.min(args.d_model),
        d_ff: args.d_ff,
        experts: args.experts,
        top_k: args.top_k,
        router,
        selection_bias: args.aux_free.is_some(),
        seq_len: args.seq_len,
        batch: args.batch,
        lr: args.lr,
        balance_coef: args.balance_coef,
        z_coef: args.z_coef,
        aux_free_rate: args.aux_free,
        capacity: args.capacity_factor.map(Capacity::Factor),
        schedule,
        seed: args.seed,
        ..TrainConfig::tiny()
    };

    let mut trainer = match (&args.checkpoint, args.resume) {
        (Some(dir), true) => {
            let t = Trainer::resume(config.clone(), dir, &device)?;
            println!("resumed {} at step {}", dir.display(), t.step);
            t
        }
        (None, true) => return Err("--resume needs --checkpoint".into()),
        _ => Trainer::new(config.clone(), corpus.vocab.len(), &device)?,
    };
    println!(
        "tiny MoE LM on {}: {} layers, d_model {}, {} experts of d_ff {}, top-{}, router {:?}; {} characters, vocabulary {}",
        args.backend,
        config.layers,
        config.d_model,
        config.experts,
        config.d_ff,
        config.top_k,
        args.router,
        corpus.ids.len(),
        corpus.vocab.len()
    );

    let initial = trainer.eval_loss(valid, args.top_k, args.eval_windows)?;
    println!("step {:>4}  validation loss {initial:.4}", trainer.step);
    let tail = (args.steps / 10).max(1);
    let mut last_cvs = Vec::new();
    let start = Instant::now();
    let first_step = trainer.step;
    while trainer.step < args.steps {
        let report = trainer.train_step(train)?;
        if report.step + tail >= args.steps {
            last_cvs.push(report.load_cv);
        }
        let done = trainer.step;
        if done % args.log_every == 0 || done == args.steps {
            let val = trainer.eval_loss(valid, args.top_k, args.eval_windows)?;
            let rate = (done - first_step) as f64 / start.elapsed().as_secs_f64();
            let share: Vec<String> = report.load[0]
                .iter()
                .map(|&c| {
                    let total: usize = report.load[0].iter().sum();
                    format!("{:>3.0}", 100.0 * c as f64 / total.max(1) as f64)
                })
                .collect();
            println!(
                "step {done:>4}  loss {:.4}  validation {val:.4}  balance {:.3}  z {:.3}  load CV {:.3}  k {}  dropped {}  layer-0 load % [{}]  {rate:.1} steps/s",
                report.lm_loss,
                report.balance_loss,
                report.z_loss,
                report.load_cv,
                report.top_k,
                report.dropped,
                share.join(" ")
            );
        }
        if let Some(dir) = &args.checkpoint
            && (done % args.save_every == 0 || done == args.steps)
        {
            trainer.save(dir)?;
        }
    }
    let final_loss = trainer.eval_loss(valid, args.top_k, args.eval_windows)?;
    let mut by_k = Vec::new();
    for k in [1, 2, 4] {
        if k <= args.experts {
            by_k.push((k, trainer.eval_loss(valid, k, args.eval_windows)?));
        }
    }
    for (k, loss) in &by_k {
        println!("validation loss at k = {k}: {loss:.4}");
    }
    let load_cv = match last_cvs.len() {
        0 => f64::NAN,
        n => last_cvs.iter().sum::<f64>() / n as f64,
    };
    if args.json {
        let by_k: serde_json::Map<String, serde_json::Value> = by_k
            .iter()
            .map(|(k, l)| (k.to_string(), serde_json::json!(l)))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "initial_loss": initial,
                "final_loss": final_loss,
                "load_cv": load_cv,
                "steps": trainer.step,
                "loss_by_k": by_k,
                "seconds": start.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!(
            "validation loss {initial:.4} → {final_loss:.4} in {} steps; load CV over the last {tail} steps {load_cv:.3}",
            trainer.step
        );
    }
    Ok(())
}
