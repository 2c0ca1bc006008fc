//! The Hugging Face MoE decoders: OLMoE (allenai/OLMoE-1B-7B and its variants), Qwen2-MoE
//! (`model_type: qwen2_moe`), Qwen3-MoE (`qwen3_moe`), Mixtral (`mixtral`) and DeepSeek-V3
//! (`deepseek_v3`): config, model and checkpoint loading. They share one decoder; the config
//! says which attention (grouped-query with or without q/k norms and biases, or multi-head
//! latent), head size, expert width and naming, dense layers, shared expert and attention
//! window apply.
//!
//! `architecture.rs` holds what sets each architecture apart (one enum arm and one table row
//! each), `config.rs` the parsed `config.json`, `model.rs` the modules and their forward
//! passes, `build.rs` the one construction path (from a checkpoint or a random
//! initialisation); this file the loader's checks and entry points.

mod architecture;
mod build;
mod config;
mod host;
mod model;

pub use architecture::{
    Architecture, AttentionKind, DenseLayers, QkNorm, RoutingKind, SharedExperts, Traits,
};
pub use config::{Mla, MoeCausalLmConfig};
pub use model::{
    AttentionMask, DecoderAttention, DecoderLayer, DecoderMlp, GenerateOptions, GroupedAttention,
    GroupedAttentionConfig, KvCache, LatentAttention, LatentAttentionConfig, LayerCache,
    ModelOutput, MoeCausalLm, MoeTrace, Sampling, Stage,
};

use std::io::IsTerminal;
use std::path::Path;

use burn::tensor::{DType, Device, FloatDType};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;

/// How a checkpoint is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Dtype of every weight and of the computation (logits are always f32). Checked against
    /// the device with `supports_dtype` before anything is read.
    pub dtype: FloatDType,
    /// Draw a progress bar on stderr while the layers load (only when stderr is a terminal).
    pub progress: bool,
}

impl Default for LoadOptions {
    /// f32, no progress bar.
    fn default() -> Self {
        LoadOptions {
            dtype: FloatDType::F32,
            progress: false,
        }
    }
}

/// The float dtypes `device` computes in, of those this engine offers.
pub fn supported_dtypes(device: &Device) -> Vec<FloatDType> {
    [FloatDType::F32, FloatDType::BF16, FloatDType::F16]
        .into_iter()
        .filter(|&d| device.supports_dtype(d))
        .collect()
}

/// Fails with a typed error unless `device` computes in `dtype`.
pub fn check_dtype(device: &Device, dtype: FloatDType) -> Result<(), LoadError> {
    if device.supports_dtype(dtype) {
        return Ok(());
    }
    Err(LoadError::UnsupportedComputeDtype {
        dtype: format!("{:?}", DType::from(dtype)),
        device: format!("{device:?}"),
        supported: supported_dtypes(device)
            .iter()
            .map(|&d| format!("{:?}", DType::from(d)))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Fails with [`LoadError::TensorTooLarge`] when a parameter of `config` in `dtype` exceeds
/// `limit` bytes (the device's largest buffer, see `moe_kernels::max_buffer_bytes`).
pub fn check_fits(
    config: &MoeCausalLmConfig,
    dtype: FloatDType,
    limit: Option<u64>,
    device: &Device,
) -> Result<(), LoadError> {
    let Some(limit) = limit else {
        return Ok(());
    };
    let size = DType::from(dtype).size() as u64;
    let (v, h, i, e) = (
        config.vocab_size as u64,
        config.hidden_size as u64,
        config.expert_size() as u64,
        config.num_experts as u64,
    );
    for (name, elements) in [
        ("model.embed_tokens.weight", v.saturating_mul(h)),
        ("lm_head.weight", v.saturating_mul(h)),
        (
            "mlp.experts (stacked gate/up/down)",
            e.saturating_mul(h).saturating_mul(i),
        ),
    ] {
        let bytes = elements.saturating_mul(size);
        if bytes > limit {
            return Err(LoadError::TensorTooLarge {
                name: name.to_string(),
                bytes,
                dtype: format!("{:?}", DType::from(dtype)),
                device: format!("{device:?}"),
                limit,
            });
        }
    }
    Ok(())
}

/// Reads and validates `dir/config.json` (a regular file of at most 16 MiB inside `dir`).
pub fn read_config(dir: &Path) -> Result<MoeCausalLmConfig, LoadError> {
    let text = crate::files::read_text_in_folder(dir, "config.json", crate::files::CONFIG_LIMIT)?;
    MoeCausalLmConfig::from_json(&text)
}

/// Checks the sizes `config` claims against the tensors `ckpt` holds (their shapes only:
/// nothing is read or allocated), so that a config that disagrees with its checkpoint fails
/// with [`LoadError::ConfigMismatch`] naming the field and the tensor, before any buffer sized
/// from the config exists. Checks the embeddings (vocabulary and hidden size), the layer count,
/// and the first sparse and first dense layer's widths; every other tensor's shape is checked
/// as it is read, before anything of its size is allocated.
pub fn check_against(config: &MoeCausalLmConfig, ckpt: &Checkpoint) -> Result<(), LoadError> {
    let mismatch =
        |field: &str, value: String, name: &str, shape: Vec<usize>| LoadError::ConfigMismatch {
            field: field.to_string(),
            value,
            found: format!("tensor `{name}` has shape {shape:?}"),
        };
    let (v, h) = (config.vocab_size, config.hidden_size);
    let embed = "model.embed_tokens.weight";
    let shape = ckpt.shape(embed)?;
    if shape != [v, h] {
        return Err(mismatch(
            "vocab_size, hidden_size",
            format!("{v}, {h}"),
            embed,
            shape,
        ));
    }
    let layers = ckpt
        .names()
        .filter_map(|n| {
            n.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |last| last + 1);
    if config.num_hidden_layers > layers {
        return Err(LoadError::ConfigMismatch {
            field: "num_hidden_layers".into(),
            value: config.num_hidden_layers.to_string(),
            found: format!("the checkpoint holds {layers} layers (model.layers.N.*)"),
        });
    }
    let same = |field: &str, value: String, name: &str, want: &[usize]| {
        let shape = ckpt.shape(name)?;
        match shape == want {
            true => Ok(()),
            false => Err(mismatch(field, value, name, shape)),
        }
    };
    let n = config.num_hidden_layers;
    if let Some(layer) = (0..n).find(|&i| config.is_sparse(i)) {
        let (prefix, naming) = config.moe_prefix();
        let p = format!("model.layers.{layer}.{prefix}");
        let e = config.num_experts;
        same(
            "num_experts",
            e.to_string(),
            &format!("{p}gate.weight"),
            &[e, h],
        )?;
        let size = config.expert_size();
        let field = match config.moe_intermediate_size {
            Some(_) => "moe_intermediate_size",
            None => "intermediate_size",
        };
        let packed = format!("{p}experts.gate_up_proj");
        match ckpt.contains(&packed) {
            true => same(
                field,
                size.to_string(),
                &packed,
                &[e, size.saturating_mul(2), h],
            )?,
            false => {
                let gate = naming.names()[0];
                let name = format!("{p}experts.0.{gate}.weight");
                same(field, size.to_string(), &name, &[size, h])?
            }
        }
        if let Some(s) = config.shared_expert_size() {
            let name = format!("{p}shared_expert.gate_proj.weight");
            same(
                "shared_expert_intermediate_size",
                s.to_string(),
                &name,
                &[s, h],
            )?;
        }
        if config.traits().shared == SharedExperts::Ungated {
            let shared = config.moe_layer().shared_expert.map_or(0, |s| s.d_ff);
            let name = format!("{p}shared_experts.gate_proj.weight");
            let value = config.n_shared_experts.unwrap_or(0).to_string();
            match (shared, ckpt.contains(&name)) {
                (0, true) => {
                    return Err(mismatch(
                        "n_shared_experts",
                        value,
                        &name,
                        ckpt.shape(&name)?,
                    ));
                }
                (0, false) => {}
                (width, _) => same("n_shared_experts", value, &name, &[width, h])?,
            }
        }
    }
    if let Some(layer) = (0..n).find(|&i| !config.is_sparse(i)) {
        let name = format!("model.layers.{layer}.mlp.gate_proj.weight");
        let i = config.intermediate_size;
        same("intermediate_size", i.to_string(), &name, &[i, h])?;
    }
    Ok(())
}

/// A bar over the parts of the model (embeddings, output head, each layer) on stderr, or a
/// hidden one.
fn progress_bar(show: bool, steps: usize, name: &str) -> ProgressBar {
    if !show || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} parts, {elapsed}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("loading {name}"));
    bar
}

/// What a load used and what it left: every checkpoint tensor is either loaded or unused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors read into the model.
    pub loaded: usize,
    /// Checkpoint tensors the model has no place for (e.g. rotary caches), sorted.
    pub unused: Vec<String>,
}

impl MoeCausalLm {
    /// Loads `dir/config.json` and the checkpoint beside it (single file or sharded) in f32.
    pub fn load(
        dir: &Path,
        device: &Device,
    ) -> Result<(Self, MoeCausalLmConfig, LoadReport), LoadError> {
        Self::load_with(dir, device, &LoadOptions::default())
    }

    /// [`MoeCausalLm::load`] with a compute dtype and an optional progress bar.
    pub fn load_with(
        dir: &Path,
        device: &Device,
        options: &LoadOptions,
    ) -> Result<(Self, MoeCausalLmConfig, LoadReport), LoadError> {
        check_dtype(device, options.dtype)?;
        let config = read_config(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let (model, report) = Self::from_checkpoint_with(&ckpt, &config, device, options)?;
        Ok((model, config, report))
    }

    /// Builds the model from the tensors of `ckpt` (Hugging Face names), converting every
    /// weight to f32 and transposing matrices once.
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        config: &MoeCausalLmConfig,
        device: &Device,
    ) -> Result<(Self, LoadReport), LoadError> {
        Self::from_checkpoint_with(ckpt, config, device, &LoadOptions::default())
    }

    /// [`MoeCausalLm::from_checkpoint`] in `options.dtype`. Each tensor is converted on the
    /// host as it is read, so the weights exist once in the compute dtype plus one tensor in
    /// transit.
    pub fn from_checkpoint_with(
        ckpt: &Checkpoint,
        config: &MoeCausalLmConfig,
        device: &Device,
        options: &LoadOptions,
    ) -> Result<(Self, LoadReport), LoadError> {
        config.validate()?;
        check_dtype(device, options.dtype)?;
        check_fits(
            config,
            options.dtype,
            moe_core::moe_kernels::max_buffer_bytes(device),
            device,
        )?;
        check_against(config, ckpt)?;
        let mut weights = build::FromCheckpoint {
            ckpt,
            device,
            dtype: options.dtype.into(),
            bar: progress_bar(options.progress, config.num_hidden_layers + 2, ckpt.name()),
        };
        let model = build::build(config, &config.moe_layer(), &mut weights)?;
        weights.bar.finish_and_clear();
        let report = LoadReport {
            loaded: ckpt.used(),
            unused: ckpt.unused(),
        };
        Ok((model, report))
    }
}

impl MoeCausalLm {
    /// A freshly initialised model of `config`'s shape whose MoE blocks follow `moe` (any
    /// router kind, shared expert or selection bias; hash and random routers are seeded per
    /// layer), for training from scratch: projections
    /// and embeddings drawn from `N(0, 0.02²)` (OLMoE's `initializer_range`), norms at 1.
    ///
    /// # Errors
    /// An invalid `config`, or a `moe` whose `d_model` is not `hidden_size`.
    pub fn init(
        config: &MoeCausalLmConfig,
        moe: &moe_core::MoeLayerConfig,
        device: &Device,
    ) -> Result<Self, LoadError> {
        config.validate()?;
        if moe.d_model != config.hidden_size {
            return Err(LoadError::Moe(moe_core::MoeError::HiddenSizeMismatch {
                expected: config.hidden_size,
                got: moe.d_model,
            }));
        }
        let mut weights = build::RandomInit {
            device,
            init: burn::nn::Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            },
        };
        build::build(config, moe, &mut weights)
    }
}
