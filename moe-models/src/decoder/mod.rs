//! The Hugging Face MoE decoders: OLMoE (allenai/OLMoE-1B-7B and its variants), Qwen2-MoE
//! (`model_type: qwen2_moe`), Qwen3-MoE (`qwen3_moe`), Mixtral (`mixtral`) and DeepSeek-V3
//! (`deepseek_v3`): config, model and checkpoint loading. They share one decoder; the config
//! says which attention (grouped-query with or without q/k norms and biases, or multi-head
//! latent), head size, expert width and naming, dense layers, shared expert and attention
//! window apply.

mod architecture;
mod config;
mod model;

pub use architecture::{
    Architecture, AttentionKind, DenseLayers, QkNorm, RoutingKind, SharedExperts, Traits,
};
pub use config::{Mla, MoeCausalLmConfig};
pub use model::{
    AttentionMask, DecoderAttention, DecoderLayer, DecoderMlp, GenerateOptions, GroupedAttention,
    KvCache, LatentAttention, LayerCache, ModelOutput, MoeCausalLm, MoeTrace, Sampling, Stage,
};

use std::io::IsTerminal;
use std::path::Path;

use burn::module::Param;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moe_core::SharedExpert;

use crate::block::{load_block_as, load_dense, matrix_transposed};
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

/// Where and in which dtype tensors are created.
#[derive(Clone, Copy)]
struct Target<'a> {
    device: &'a Device,
    dtype: DType,
}

fn norm(
    ckpt: &Checkpoint,
    name: &str,
    size: usize,
    eps: f64,
    to: Target,
) -> Result<RmsNorm, LoadError> {
    let gamma = ckpt.read_f32(name, &[size])?;
    Ok(RmsNorm {
        gamma: Param::from_tensor(Tensor::<1>::from_data(
            TensorData::new(gamma, [size]),
            (to.device, to.dtype),
        )),
        epsilon: eps,
    })
}

fn linear(
    ckpt: &Checkpoint,
    name: &str,
    out: usize,
    inp: usize,
    to: Target,
) -> Result<Linear, LoadError> {
    Ok(Linear {
        weight: Param::from_tensor(matrix_transposed(
            ckpt,
            name.to_string(),
            out,
            inp,
            to.device,
            to.dtype,
        )?),
        bias: None,
    })
}

/// DeepSeek-V3's multi-head latent attention of one layer (`{a}` is `model.layers.{i}.self_attn.`).
fn latent_attention(
    ckpt: &Checkpoint,
    a: &str,
    h: usize,
    heads: usize,
    mla: Mla,
    to: Target,
) -> Result<LatentAttention, LoadError> {
    // transformers builds these two norms with their default epsilon, not the config's.
    const LATENT_EPS: f64 = 1e-6;
    let qk = mla.nope + mla.rope;
    let (q_a_proj, q_a_layernorm, q_b_proj) = match mla.q_lora_rank {
        Some(rank) => (
            Some(linear(ckpt, &format!("{a}q_a_proj.weight"), rank, h, to)?),
            Some(norm(
                ckpt,
                &format!("{a}q_a_layernorm.weight"),
                rank,
                LATENT_EPS,
                to,
            )?),
            linear(ckpt, &format!("{a}q_b_proj.weight"), heads * qk, rank, to)?,
        ),
        None => (
            None,
            None,
            linear(ckpt, &format!("{a}q_proj.weight"), heads * qk, h, to)?,
        ),
    };
    let kvl = mla.kv_lora_rank;
    let kv_a_proj_with_mqa = linear(
        ckpt,
        &format!("{a}kv_a_proj_with_mqa.weight"),
        kvl + mla.rope,
        h,
        to,
    )?;
    // interleaved rotary pairs put into the halves layout once, here, rather than every call
    let (q_b_proj, kv_a_proj_with_mqa) = match mla.interleave {
        true => (
            rope_columns_to_halves(q_b_proj, (0..heads).map(|i| i * qk + mla.nope), mla.rope),
            rope_columns_to_halves(kv_a_proj_with_mqa, [kvl], mla.rope),
        ),
        false => (q_b_proj, kv_a_proj_with_mqa),
    };
    Ok(LatentAttention {
        q_a_proj,
        q_a_layernorm,
        q_b_proj,
        kv_a_proj_with_mqa,
        kv_a_layernorm: norm(
            ckpt,
            &format!("{a}kv_a_layernorm.weight"),
            kvl,
            LATENT_EPS,
            to,
        )?,
        kv_b_proj: linear(
            ckpt,
            &format!("{a}kv_b_proj.weight"),
            heads * (mla.nope + mla.v),
            kvl,
            to,
        )?,
        o_proj: linear(ckpt, &format!("{a}o_proj.weight"), h, heads * mla.v, to)?,
        heads,
        nope_dim: mla.nope,
        rope_dim: mla.rope,
        v_dim: mla.v,
        kv_lora_rank: kvl,
    })
}

/// `layer` (no bias) with each block of `rope` output columns starting at `starts`, stored as
/// interleaved pairs `(x0, x1), (x2, x3), …`, reordered to the halves layout
/// `[x0, x2, …, x1, x3, …]` that rotate-half RoPE reads. A permutation of output columns: the
/// products are the same values, in the order the attention wants them.
fn rope_columns_to_halves(
    layer: Linear,
    starts: impl IntoIterator<Item = usize>,
    rope: usize,
) -> Linear {
    let weight = layer.weight.val();
    let [_, out] = weight.dims();
    let mut order: Vec<i64> = (0..out as i64).collect();
    for start in starts {
        for j in 0..rope / 2 {
            order[start + j] = (start + 2 * j) as i64;
            order[start + rope / 2 + j] = (start + 2 * j + 1) as i64;
        }
    }
    let device = weight.device();
    let order = Tensor::<1, Int>::from_data(TensorData::new(order, [out]), &device);
    Linear {
        weight: Param::from_tensor(weight.select(1, order)),
        bias: layer.bias,
    }
}

/// [`linear`] plus its bias (`….bias` beside `….weight`) when `bias` is set.
fn linear_biased(
    ckpt: &Checkpoint,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
    to: Target,
) -> Result<Linear, LoadError> {
    let mut layer = linear(ckpt, name, out, inp, to)?;
    if bias {
        let bias_name = format!("{}.bias", name.trim_end_matches(".weight"));
        let values = ckpt.read_f32(&bias_name, &[out])?;
        layer.bias = Some(Param::from_tensor(Tensor::<1>::from_data(
            TensorData::new(values, [out]),
            (to.device, to.dtype),
        )));
    }
    Ok(layer)
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
        let to = Target {
            device,
            dtype: options.dtype.into(),
        };
        let bar = progress_bar(options.progress, config.num_hidden_layers + 2, ckpt.name());
        let (h, v) = (config.hidden_size, config.vocab_size);
        let (heads, kv_heads, head_dim) = (
            config.num_attention_heads,
            config.kv_heads(),
            config.head_dim(),
        );
        let (q_width, kv_width, q_norm_width, k_norm_width) = config.attention_widths();
        let eps = config.rms_norm_eps;
        let embed = ckpt.read_f32("model.embed_tokens.weight", &[v, h])?;
        let embed_tokens =
            Tensor::<2>::from_data(TensorData::new(embed, [v, h]), (to.device, to.dtype));
        bar.inc(1);
        let lm_head = if config.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            embed_tokens.clone().transpose()
        } else {
            matrix_transposed(ckpt, "lm_head.weight".into(), v, h, device, to.dtype)?
        };
        bar.inc(1);
        let moe_config = config.moe_layer();
        let (moe_prefix, naming) = config.moe_prefix();
        let qkv_bias = config.has_qkv_bias();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}.");
            let a = format!("{p}self_attn.");
            layers.push(DecoderLayer {
                input_layernorm: norm(ckpt, &format!("{p}input_layernorm.weight"), h, eps, to)?,
                self_attn: match config.mla() {
                    Some(mla) => {
                        DecoderAttention::Latent(latent_attention(ckpt, &a, h, heads, mla, to)?)
                    }
                    None => DecoderAttention::Standard(GroupedAttention {
                        q_proj: linear_biased(
                            ckpt,
                            &format!("{a}q_proj.weight"),
                            q_width,
                            h,
                            qkv_bias,
                            to,
                        )?,
                        k_proj: linear_biased(
                            ckpt,
                            &format!("{a}k_proj.weight"),
                            kv_width,
                            h,
                            qkv_bias,
                            to,
                        )?,
                        v_proj: linear_biased(
                            ckpt,
                            &format!("{a}v_proj.weight"),
                            kv_width,
                            h,
                            qkv_bias,
                            to,
                        )?,
                        o_proj: linear(ckpt, &format!("{a}o_proj.weight"), h, q_width, to)?,
                        q_norm: match config.has_qk_norm() {
                            true => Some(norm(
                                ckpt,
                                &format!("{a}q_norm.weight"),
                                q_norm_width,
                                eps,
                                to,
                            )?),
                            false => None,
                        },
                        k_norm: match config.has_qk_norm() {
                            true => Some(norm(
                                ckpt,
                                &format!("{a}k_norm.weight"),
                                k_norm_width,
                                eps,
                                to,
                            )?),
                            false => None,
                        },
                        per_head_norm: config.per_head_qk_norm(),
                        heads,
                        kv_heads,
                        head_dim,
                        clip_qkv: config.clip_qkv,
                    }),
                },
                post_attention_layernorm: norm(
                    ckpt,
                    &format!("{p}post_attention_layernorm.weight"),
                    h,
                    eps,
                    to,
                )?,
                mlp: match config.is_sparse(i) {
                    true => DecoderMlp::Sparse(load_block_as(
                        ckpt,
                        &format!("{p}{moe_prefix}"),
                        naming,
                        &moe_config,
                        device,
                        to.dtype,
                    )?),
                    false => DecoderMlp::Dense(SharedExpert::from_parts(
                        load_dense(
                            ckpt,
                            &format!("{p}mlp."),
                            h,
                            config.intermediate_size,
                            device,
                            to.dtype,
                        )?,
                        None,
                    )?),
                },
            });
            bar.inc(1);
        }
        let model = MoeCausalLm {
            embed_tokens: Param::from_tensor(embed_tokens),
            layers,
            norm: norm(ckpt, "model.norm.weight", h, eps, to)?,
            lm_head: Param::from_tensor(lm_head),
            rope_theta: config.rope_theta,
            sliding_window: config.attention_window(),
            max_positions: config.max_position_embeddings,
        };
        bar.finish_and_clear();
        let report = LoadReport {
            loaded: ckpt.used(),
            unused: ckpt.unused(),
        };
        Ok((model, report))
    }
}

/// `moe` for decoder layer `layer`: hash and random routers get a seed of their own per layer,
/// so that a token is not sent to the same expert indices in every layer.
fn layer_router(moe: &moe_core::MoeLayerConfig, layer: usize) -> moe_core::MoeLayerConfig {
    use moe_core::RouterKind;
    let mix = |seed: u64| seed ^ (layer as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
    let kind = match moe.router_kind {
        RouterKind::Hash { seed } => RouterKind::Hash { seed: mix(seed) },
        RouterKind::Random { seed } => RouterKind::Random { seed: mix(seed) },
        other => other,
    };
    moe.clone().with_router_kind(kind)
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
        use burn::nn::{Initializer, LinearConfig, RmsNormConfig};
        config.validate()?;
        if config.mla().is_some() {
            return Err(LoadError::Config {
                field: "model_type".into(),
                reason:
                    "MoeCausalLm::init does not build multi-head latent attention (deepseek_v3) yet"
                        .into(),
            });
        }
        let h = config.hidden_size;
        if moe.d_model != h {
            return Err(LoadError::Moe(moe_core::MoeError::HiddenSizeMismatch {
                expected: h,
                got: moe.d_model,
            }));
        }
        let (heads, kv_heads, head_dim) = (
            config.num_attention_heads,
            config.kv_heads(),
            config.head_dim(),
        );
        let (q_width, kv_width, q_norm_width, k_norm_width) = config.attention_widths();
        let init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let linear_with = |inp: usize, out: usize, bias: bool| {
            LinearConfig::new(inp, out)
                .with_bias(bias)
                .with_initializer(init.clone())
                .init(device)
        };
        let linear = |inp: usize, out: usize| linear_with(inp, out, false);
        let qkv_bias = config.has_qkv_bias();
        let norm = |size: usize| {
            RmsNormConfig::new(size)
                .with_epsilon(config.rms_norm_eps)
                .init(device)
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            layers.push(DecoderLayer {
                input_layernorm: norm(h),
                self_attn: DecoderAttention::Standard(GroupedAttention {
                    q_proj: linear_with(h, q_width, qkv_bias),
                    k_proj: linear_with(h, kv_width, qkv_bias),
                    v_proj: linear_with(h, kv_width, qkv_bias),
                    o_proj: linear(q_width, h),
                    q_norm: config.has_qk_norm().then(|| norm(q_norm_width)),
                    k_norm: config.has_qk_norm().then(|| norm(k_norm_width)),
                    per_head_norm: config.per_head_qk_norm(),
                    heads,
                    kv_heads,
                    head_dim,
                    clip_qkv: config.clip_qkv,
                }),
                post_attention_layernorm: norm(h),
                mlp: match config.is_sparse(i) {
                    true => DecoderMlp::Sparse(layer_router(moe, i).init(device)?),
                    false => DecoderMlp::Dense(
                        moe_core::SharedExpertConfig::new(h, config.intermediate_size)
                            .init(device)?,
                    ),
                },
            });
        }
        let v = config.vocab_size;
        Ok(MoeCausalLm {
            embed_tokens: init.init_with([v, h], Some(h), Some(v), device),
            layers,
            norm: norm(h),
            lm_head: init.init_with([h, v], Some(h), Some(v), device),
            rope_theta: config.rope_theta,
            sliding_window: config.attention_window(),
            max_positions: config.max_position_embeddings,
        })
    }
}
