//! `moe`: inspect an MoE checkpoint, write its logits, or generate text with it.

mod bench_model;
mod cli;

use crate::cli::{Cli, Command, Dtype};

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::FloatDType;
use clap::Parser;
use moe::TopK;
use moe::backend::Backend;
use moe::moe_models::{
    GenerateOptions, KvCache, LoadOptions, MoeCausalLm, MoeCausalLmConfig, Sampling, io,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn top_k(k: Option<usize>) -> TopK {
    k.map_or(TopK::Configured, TopK::Fixed)
}

/// Loads the model of `dir`, listing on stderr the checkpoint tensors it does not use (an error
/// with `strict`).
fn load(
    dir: &Path,
    backend: Backend,
    dtype: Dtype,
    strict: bool,
) -> Result<(MoeCausalLm, MoeCausalLmConfig)> {
    let device = backend.device();
    let options = LoadOptions {
        dtype: dtype.into(),
        progress: true,
    };
    let (model, config, report) = MoeCausalLm::load_with(dir, &device, &options)?;
    if !report.unused.is_empty() {
        let count = report.unused.len();
        let shown: Vec<&str> = report.unused.iter().take(8).map(String::as_str).collect();
        let more = match count > shown.len() {
            true => format!(" and {} more", count - shown.len()),
            false => String::new(),
        };
        let what = format!(
            "{count} checkpoint tensor(s) are not used by the model: {}{more}",
            shown.join(", ")
        );
        if strict {
            return Err(format!("{what} (--strict)").into());
        }
        eprintln!("warning: {what} (--strict makes this an error)");
    }
    Ok((model, config))
}

/// The longest prompt file read (64 MiB).
const PROMPT_FILE_LIMIT: u64 = 64 << 20;

/// The prompt text of `--prompt-file` (`-`: stdin).
fn read_prompt_file(path: &Path) -> Result<String> {
    let text = match path == Path::new("-") {
        true => {
            moe::moe_models::files::read_text(std::io::stdin().lock(), path, PROMPT_FILE_LIMIT)?
        }
        false => {
            let file = std::fs::File::open(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            moe::moe_models::files::read_text(file, path, PROMPT_FILE_LIMIT)?
        }
    };
    Ok(text)
}

/// Writes the text of `tokens` that has not been printed yet (decoding the whole continuation
/// each time, so multi-token characters come out whole).
struct TextStream<'a> {
    tokenizer: &'a io::Tokenizer,
    tokens: Vec<u32>,
    printed: String,
}

impl TextStream<'_> {
    fn push(&mut self, token: i64) {
        self.tokens.push(token as u32);
        let Ok(text) = self.tokenizer.decode(&self.tokens, false) else {
            return;
        };
        if let Some(new) = text.strip_prefix(self.printed.as_str())
            && !new.ends_with('\u{fffd}')
        {
            print!("{new}");
            let _ = std::io::stdout().flush();
            self.printed = text;
        }
    }
}

fn list_backends(json: bool) {
    for backend in Backend::ALL {
        let dtypes: Vec<String> = match backend.is_compiled() {
            true => moe::moe_models::decoder::supported_dtypes(&backend.device())
                .into_iter()
                .map(|d| format!("{:?}", burn::tensor::DType::from(d)).to_lowercase())
                .collect(),
            false => Vec::new(),
        };
        let default = backend == Backend::default();
        if json {
            let value = serde_json::json!({
                "backend": backend.name(),
                "compiled": backend.is_compiled(),
                "default": default,
                "dtypes": dtypes,
            });
            println!("{value}");
        } else if backend.is_compiled() {
            let mark = if default { " (default)" } else { "" };
            println!("{:<8} {}{mark}", backend.name(), dtypes.join(", "));
        } else {
            println!(
                "{:<8} not compiled in (cargo feature `{}`)",
                backend.name(),
                backend.name()
            );
        }
    }
}

/// A preset layer shape: (name, config).
fn bench_preset(name: &str) -> Result<moe::MoeLayerConfig> {
    Ok(match name {
        "olmoe-1b-7b" => moe::MoeLayerConfig::olmoe(2048, 1024, 64, 8),
        "mixtral-8x7b-scaled" => moe::MoeLayerConfig::mixtral(1024, 3584, 8, 2),
        "qwen3-30b-a3b" => moe::MoeLayerConfig::olmoe(2048, 768, 128, 8).with_normalize_top_k(true),
        other => {
            return Err(format!(
                "unknown preset `{other}` (olmoe-1b-7b, mixtral-8x7b-scaled, qwen3-30b-a3b)"
            )
            .into());
        }
    })
}

/// What `moe bench` was asked besides the shapes.
struct BenchOptions<'a> {
    dispatch: &'a str,
    runs: usize,
    json: bool,
    dense: bool,
    stream: bool,
}

/// A layer of `config` on `device` with its expert weights in `float` (the router computes in
/// f32 whatever its weight's dtype).
fn bench_layer(
    config: &moe::MoeLayerConfig,
    device: &burn::tensor::Device,
    float: FloatDType,
    strategy: moe::DispatchStrategy,
) -> Result<moe::MoeLayer> {
    use burn::module::Param;
    use burn::tensor::Tensor;
    let mut layer = config.init(device)?.with_dispatch(strategy);
    let cast = |p: &Param<Tensor<3>>| p.val().cast(float);
    layer.experts = moe::Experts::from_tensors(
        layer.experts.gate.as_ref().map(cast),
        cast(&layer.experts.up),
        cast(&layer.experts.down),
    )?
    .with_host_layout();
    Ok(layer)
}

/// Median seconds of `runs` calls of `layer` on fresh `[t, H]` inputs (after one warm-up
/// call), and the mean number of experts a call touched. `between` runs before every timed
/// call, off the clock.
fn time_layer(
    layer: &moe::MoeLayer,
    t: usize,
    float: FloatDType,
    runs: usize,
    rng: &mut rand::rngs::StdRng,
    between: &mut dyn FnMut(),
) -> Result<(f64, f64, moe::CallPath)> {
    use burn::tensor::{DType, Tensor, TensorData};
    use rand::RngExt;
    let device = layer.router.weight.device();
    let (h, e) = (layer.d_model(), layer.num_experts());
    let call = |x: Tensor<2>| -> Result<(f64, Vec<i64>, moe::CallPath)> {
        let start = Instant::now();
        let out = layer.try_forward(x, &moe::TopK::Configured)?;
        let _ = out.hidden.sum().into_data();
        let _ = device.sync();
        let seconds = start.elapsed().as_secs_f64();
        let ids = out.routing.expert_ids.into_data().iter::<i64>().collect();
        Ok((seconds, ids, out.path))
    };
    // Fresh host values for every call, uploaded before the clock starts: no call repeats
    // another's input (a device generator could, and lavapipe then answers from a cache).
    let mut fresh = || {
        let values: Vec<f32> = (0..t * h)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        let x = Tensor::<2>::from_data(TensorData::new(values, [t, h]), (&device, DType::F32))
            .cast(float);
        let _ = x.clone().sum().into_data();
        x
    };
    // warm-up: shader compilation, allocations
    let (_, _, mut path) = call(fresh())?;
    let mut times = Vec::with_capacity(runs);
    let mut touched = 0usize;
    for _ in 0..runs {
        let x = fresh();
        between();
        let (seconds, ids, ran) = call(x)?;
        path = ran;
        times.push(seconds);
        let mut seen = vec![false; e];
        for id in ids {
            if let Some(s) = seen.get_mut(id as usize) {
                *s = true;
            }
        }
        touched += seen.iter().filter(|&&s| s).count();
    }
    let median = median_of(&mut times).expect("at least one timed call");
    Ok((median, touched as f64 / runs as f64, path))
}

/// The middle value of `values` (sorted in place; the upper one of an even count), or `None`
/// when there are none.
fn median_of(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Times `config` at each token count and prints one line (or JSON object) per case.
fn bench(
    backend: Backend,
    dtype: Dtype,
    preset: &str,
    tokens: &[usize],
    options: &BenchOptions<'_>,
) -> Result<()> {
    use moe::DispatchStrategy;
    use rand::SeedableRng;

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let runs = options.runs;
    let config = bench_preset(preset)?;
    let strategy = match options.dispatch {
        "auto" => DispatchStrategy::Auto,
        "tensor-ops" => DispatchStrategy::TensorOps,
        "kernels" => DispatchStrategy::Kernels,
        other => {
            return Err(format!("unknown dispatch `{other}` (auto, tensor-ops, kernels)").into());
        }
    };
    if runs < 3 {
        return Err(format!("--runs must be at least 3, got {runs}").into());
    }
    if let Some(&t) = tokens.iter().find(|&&t| t == 0) {
        return Err(format!("--tokens: every count must be at least 1, got {t}").into());
    }
    let device = backend.device();
    let float: FloatDType = dtype.into();
    moe::moe_models::decoder::check_dtype(&device, float)?;
    // Kernels on a device without them: an error before any work.
    strategy.resolve(&device)?;
    let stacked = (config.num_experts * config.d_model * config.d_ff) as u64
        * burn::tensor::DType::from(float).size() as u64;
    if let Some(limit) = moe::moe_kernels::max_buffer_bytes(&device)
        && stacked > limit
    {
        return Err(format!(
            "{preset}: a stacked expert tensor needs {stacked} bytes, more than this device's largest buffer ({limit} bytes)"
        )
        .into());
    }
    let layer = bench_layer(&config, &device, float, strategy)?;
    let (h, i, e, k) = (
        config.d_model,
        config.d_ff,
        config.num_experts,
        config.top_k,
    );
    let bytes = burn::tensor::DType::from(float).size() as f64;
    let matrices = if config.activation == moe::ExpertActivation::SwiGlu {
        3.0
    } else {
        2.0
    };
    // One expert with every (token, slot) row: the same expert FLOPs as one dense chain.
    let dense = match options.dense {
        true => {
            let one = moe::MoeLayerConfig::new(h, i, 1, 1).with_activation(config.activation);
            Some(bench_layer(&one, &device, float, strategy)?)
        }
        false => None,
    };
    // A host buffer far larger than the last-level cache, read whole before every timed call.
    if options.stream && !moe::moe_kernels::host::host_available(&device) {
        return Err(format!(
            "--stream reads host memory beside the layer: it needs a CPU backend, not {}",
            backend.name()
        )
        .into());
    }
    let stream_buffer = match options.stream {
        true => vec![1.0f32; 256 << 18],
        false => Vec::new(),
    };
    let stream_rates = std::cell::RefCell::new(Vec::<f64>::new());
    let mut read_stream = || {
        if !stream_buffer.is_empty() {
            let start = Instant::now();
            std::hint::black_box(moe::moe_kernels::host::stream_sum(&stream_buffer));
            let seconds = start.elapsed().as_secs_f64();
            let bytes = std::mem::size_of_val(stream_buffer.as_slice()) as f64;
            stream_rates.borrow_mut().push(bytes / seconds);
        }
    };
    let dtype_name = format!("{:?}", burn::tensor::DType::from(float)).to_lowercase();
    for &t in tokens {
        let (median, touched, path) =
            time_layer(&layer, t, float, runs, &mut rng, &mut read_stream)?;
        let path_name = path.experts.ran.name();
        let stream_gbps = median_of(&mut stream_rates.take()).map(|r| r / 1e9);
        let flops = t as f64 * (2.0 * (h * e) as f64 + matrices * 2.0 * (k * h * i) as f64);
        let weight_bytes = touched * matrices * (h * i) as f64 * bytes + (h * e) as f64 * bytes;
        let weight_gbps = weight_bytes / median / 1e9;
        let dense_gflops = match &dense {
            Some(layer) => {
                let (median, _, _) = time_layer(layer, t * k, float, runs, &mut rng, &mut || {})?;
                let flops = (t * k) as f64 * (2.0 * h as f64 + matrices * 2.0 * (h * i) as f64);
                Some(flops / median / 1e9)
            }
            None => None,
        };
        let gflops = flops / median / 1e9;
        if options.json {
            let mut value = serde_json::json!({
                "preset": preset,
                "tokens": t,
                "backend": backend.name(),
                "dispatch": path_name,
                "path": path.to_string(),
                "dtype": dtype_name,
                "median_ms": median * 1e3,
                "gflops": gflops,
                "weight_gbps": weight_gbps,
            });
            if let Some(d) = dense_gflops {
                value["dense_gflops"] = serde_json::json!(d);
            }
            if let Some(s) = stream_gbps {
                value["stream_gbps"] = serde_json::json!(s);
            }
            println!("{value}");
        } else {
            let dense = dense_gflops.map_or(String::new(), |d| {
                format!("  dense {d:>7.1} GFLOP/s ({:.0}%)", 100.0 * gflops / d)
            });
            let stream = stream_gbps.map_or(String::new(), |s| {
                format!("  stream {s:>5.1} GB/s ({:.0}%)", 100.0 * weight_gbps / s)
            });
            println!(
                "{preset:<20} T={t:<5} {backend:<7} {path_name:<12} {dtype_name:<4} median {:>9.3} ms  {gflops:>7.1} GFLOP/s  {weight_gbps:>6.1} GB/s of weights{dense}{stream}  [{path}]",
                median * 1e3,
            );
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let backend: Backend = cli.backend.parse()?;
    match cli.command {
        Command::Inspect { model, json } => {
            let c = moe::moe_models::decoder::read_config(&model)?;
            // With the weights present, the config's sizes must agree with their shapes.
            if moe::moe_models::files::exists_in_folder(&model, "model.safetensors")
                || moe::moe_models::files::exists_in_folder(&model, "model.safetensors.index.json")
            {
                let ckpt = moe::moe_models::Checkpoint::open(&model)?;
                moe::moe_models::decoder::check_against(&c, &ckpt)?;
            }
            let (total, active) = c.parameter_counts()?;
            let architecture = c.architecture.model_type();
            let dense_layers: Vec<usize> = (0..c.num_hidden_layers)
                .filter(|&i| !c.is_sparse(i))
                .collect();
            if json {
                let value = serde_json::json!({
                    "architecture": architecture,
                    "layers": c.num_hidden_layers,
                    "dense_layers": dense_layers,
                    "hidden_size": c.hidden_size,
                    "intermediate_size": c.expert_size(),
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
                println!("architecture      {architecture}");
                println!("layers            {}", c.num_hidden_layers);
                if !dense_layers.is_empty() {
                    println!("dense MLP layers  {dense_layers:?}");
                }
                println!("hidden size       {}", c.hidden_size);
                println!("expert size       {}", c.expert_size());
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
        Command::Backends { json } => list_backends(json),
        Command::Bench {
            preset,
            tokens,
            dispatch,
            runs,
            json,
            dense,
            stream,
        } => {
            for p in &preset {
                let options = BenchOptions {
                    dispatch: &dispatch,
                    runs,
                    json,
                    dense,
                    stream,
                };
                bench(backend, cli.dtype, p, &tokens, &options)?;
            }
        }
        Command::BenchModel {
            model,
            prompts,
            context,
            steps,
            runs,
            top_k: k,
            json,
        } => {
            let start = Instant::now();
            let (m, _) = load(&model, backend, cli.dtype, cli.strict)?;
            let load_seconds = start.elapsed().as_secs_f64();
            let bench = bench_model::ModelBench {
                prompts: &prompts,
                context,
                steps,
                runs,
                top_k: top_k(k),
                json,
            };
            bench_model::bench_model(&m, &model, load_seconds, &bench)?;
        }
        Command::Logits {
            model,
            ids,
            out,
            top_k: k,
        } => {
            let (m, config) = load(&model, backend, cli.dtype, cli.strict)?;
            let mut cache = KvCache::new(m.layers.len(), 1);
            let l = ids.len();
            let result = m.forward(&[ids], &[vec![true; l]], &mut cache, &top_k(k), false)?;
            let values: Vec<f32> = result.logits.into_data().iter::<f32>().collect();
            io::write_f32(&out, "logits", &[l, config.vocab_size], &values)?;
        }
        Command::Generate {
            model,
            prompt,
            prompt_file,
            ids,
            max_new_tokens,
            top_k: k,
            temperature,
            seed,
            json,
        } => {
            let (m, config) = load(&model, backend, cli.dtype, cli.strict)?;
            let tokenizer = io::load_tokenizer(&model)?;
            let prompt = match prompt_file {
                Some(path) => Some(read_prompt_file(&path)?),
                None => prompt,
            };
            let ids = match (prompt, ids) {
                (Some(text), _) => {
                    let tok = tokenizer.as_ref().ok_or(
                        "--prompt and --prompt-file need tokenizer.json in the model folder",
                    )?;
                    let enc = tok
                        .encode(text, false)
                        .map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
                    enc.get_ids().iter().map(|&id| id as i64).collect()
                }
                (None, Some(ids)) => ids,
                (None, None) => {
                    return Err("give --prompt TEXT, --prompt-file FILE or --ids 1,2,3".into());
                }
            };
            let options = GenerateOptions {
                top_k: top_k(k),
                sampling: Sampling::Temperature { temperature, seed },
                stop_tokens: config.eos_ids(),
                ..GenerateOptions::greedy(max_new_tokens)
            };
            let mut stream = match (&tokenizer, json) {
                (Some(tokenizer), false) => Some(TextStream {
                    tokenizer,
                    tokens: Vec::new(),
                    printed: String::new(),
                }),
                _ => None,
            };
            let start = Instant::now();
            // the first token ends the prompt's pass (prefill); the others are decode steps
            let mut first_token: Option<f64> = None;
            let new = m.generate(&ids, &options, &mut |token| {
                first_token.get_or_insert_with(|| start.elapsed().as_secs_f64());
                match &mut stream {
                    Some(stream) => stream.push(token),
                    None if !json => {
                        print!("{token} ");
                        let _ = std::io::stdout().flush();
                    }
                    None => {}
                }
            })?;
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
                // The stream printed the text (or ids) as they came.
                println!();
            }
            eprintln!(
                "{} new tokens in {seconds:.2} s ({:.1} tokens/s)",
                new.len(),
                new.len() as f64 / seconds.max(1e-9)
            );
            if let Some(prefill) = first_token {
                let steps = new.len().saturating_sub(1);
                let decode = seconds - prefill;
                let mut line = format!(
                    "prefill: {} prompt tokens in {prefill:.3} s ({:.1} tokens/s)",
                    ids.len(),
                    ids.len() as f64 / prefill.max(1e-9)
                );
                if steps > 0 {
                    line += &format!(
                        "; decode: {steps} tokens in {decode:.3} s ({:.1} ms per token, {:.1} tokens/s)",
                        decode * 1e3 / steps as f64,
                        steps as f64 / decode.max(1e-9)
                    );
                }
                eprintln!("{line}");
            }
        }
    }
    Ok(())
}

/// A command-line mistake as one line: clap's message and hints, without usage and help text.
fn one_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
        .collect();
    parts.join("; ")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(), // --help, --version
        Err(err) => {
            eprintln!("{}", one_line(&err));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
