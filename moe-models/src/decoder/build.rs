//! The one construction path of a decoder: [`build`] walks the architecture (what
//! [`MoeCausalLmConfig`] and its [`super::Traits`] say) and asks a [`Weights`] source for each
//! part: a checkpoint ([`FromCheckpoint`], the loader) or a random initialisation
//! ([`RandomInit`], training from scratch). Both build the same modules in the same order.

use burn::module::Param;
use burn::nn::{Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use indicatif::ProgressBar;
use moe_core::{Experts, MoeLayer, MoeLayerConfig, SharedExpert};

use super::architecture::QkNorm;
use super::config::MoeCausalLmConfig;
use super::model::{
    DecoderAttention, DecoderLayer, DecoderMlp, GroupedAttention, GroupedAttentionConfig,
    LatentAttention, LatentAttentionConfig, MoeCausalLm,
};
use crate::ExpertNaming;
use crate::block::{load_block_as, load_dense, matrix};
use crate::checkpoint::Checkpoint;
use crate::error::LoadError;

/// Where a decoder's weights come from. `name`s and `prefix`es are the Hugging Face tensor
/// names (a random source ignores them).
pub(crate) trait Weights {
    /// An RMSNorm over `size` values (`name`: its weight).
    fn norm(&mut self, name: &str, size: usize, eps: f64) -> Result<RmsNorm, LoadError>;
    /// A linear map from `inp` to `out` values (`name`: its `….weight`), with its bias when
    /// `bias`.
    fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear, LoadError>;
    /// The MoE block of decoder layer `layer` (`prefix`: its tensors', experts named as
    /// `naming` says).
    fn moe_block(
        &mut self,
        prefix: &str,
        naming: ExpertNaming,
        moe: &MoeLayerConfig,
        layer: usize,
    ) -> Result<MoeLayer, LoadError>;
    /// A dense SwiGLU MLP `h → i → h` (`prefix`: its tensors').
    fn dense_mlp(&mut self, prefix: &str, h: usize, i: usize) -> Result<SharedExpert, LoadError>;
    /// Token embeddings `[v, h]`.
    fn embeddings(&mut self, v: usize, h: usize) -> Result<Tensor<2>, LoadError>;
    /// The output head `[h, v]`; `tied`: the embeddings, for a head tied to them.
    fn lm_head(
        &mut self,
        v: usize,
        h: usize,
        tied: Option<&Tensor<2>>,
    ) -> Result<Tensor<2>, LoadError>;
    /// One more decoder layer is built.
    fn layer_built(&mut self) {}
}

/// The decoder of `config` with MoE blocks of `moe`, every weight from `weights`.
pub(crate) fn build(
    config: &MoeCausalLmConfig,
    moe: &MoeLayerConfig,
    weights: &mut impl Weights,
) -> Result<MoeCausalLm, LoadError> {
    let (h, v, eps) = (config.hidden_size, config.vocab_size, config.rms_norm_eps);
    let (moe_prefix, naming) = config.moe_prefix();
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}.");
        let input_layernorm = weights.norm(&format!("{p}input_layernorm.weight"), h, eps)?;
        let a = format!("{p}self_attn.");
        let self_attn = match config.latent_attention() {
            Some(latent) => DecoderAttention::Latent(latent_attention(weights, &a, &latent)?),
            None => DecoderAttention::Standard(grouped_attention(
                weights,
                &a,
                &config.grouped_attention(),
            )?),
        };
        let post_attention_layernorm =
            weights.norm(&format!("{p}post_attention_layernorm.weight"), h, eps)?;
        let mlp = match config.is_sparse(i) {
            true => DecoderMlp::Sparse(weights.moe_block(
                &format!("{p}{moe_prefix}"),
                naming,
                moe,
                i,
            )?),
            false => DecoderMlp::Dense(weights.dense_mlp(
                &format!("{p}mlp."),
                h,
                config.intermediate_size,
            )?),
        };
        layers.push(DecoderLayer {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
        });
        weights.layer_built();
    }
    let embed_tokens = weights.embeddings(v, h)?;
    let norm = weights.norm("model.norm.weight", h, eps)?;
    let tied = config.tie_word_embeddings.then_some(&embed_tokens);
    let lm_head = weights.lm_head(v, h, tied)?;
    Ok(MoeCausalLm {
        embed_tokens: Param::from_tensor(embed_tokens),
        layers,
        norm,
        lm_head: Param::from_tensor(lm_head),
        rope_theta: config.rope_theta,
        sliding_window: config.attention_window(),
        max_positions: config.max_position_embeddings,
    })
}

/// Grouped-query attention of one layer (`a`: `model.layers.{i}.self_attn.`).
fn grouped_attention(
    weights: &mut impl Weights,
    a: &str,
    config: &GroupedAttentionConfig,
) -> Result<GroupedAttention, LoadError> {
    let h = config.hidden;
    let (q_width, kv_width, q_norm_width, k_norm_width) = config.widths();
    let (bias, eps) = (config.qkv_bias, config.eps);
    let q_proj = weights.linear(&format!("{a}q_proj.weight"), q_width, h, bias)?;
    let k_proj = weights.linear(&format!("{a}k_proj.weight"), kv_width, h, bias)?;
    let v_proj = weights.linear(&format!("{a}v_proj.weight"), kv_width, h, bias)?;
    let o_proj = weights.linear(&format!("{a}o_proj.weight"), h, q_width, false)?;
    let (q_norm, k_norm) = match config.qk_norm != QkNorm::None {
        true => (
            Some(weights.norm(&format!("{a}q_norm.weight"), q_norm_width, eps)?),
            Some(weights.norm(&format!("{a}k_norm.weight"), k_norm_width, eps)?),
        ),
        false => (None, None),
    };
    Ok(GroupedAttention {
        q_proj,
        k_proj,
        v_proj,
        o_proj,
        q_norm,
        k_norm,
        per_head_norm: config.qk_norm == QkNorm::PerHead,
        heads: config.heads,
        kv_heads: config.kv_heads,
        head_dim: config.head_dim,
        clip_qkv: config.clip_qkv,
    })
}

/// DeepSeek-V3's multi-head latent attention of one layer (`a`: `model.layers.{i}.self_attn.`).
fn latent_attention(
    weights: &mut impl Weights,
    a: &str,
    config: &LatentAttentionConfig,
) -> Result<LatentAttention, LoadError> {
    // transformers builds these two norms with their default epsilon, not the config's.
    const LATENT_EPS: f64 = 1e-6;
    let (h, heads, mla) = (config.hidden, config.heads, config.mla);
    let qk = mla.nope + mla.rope;
    let (q_a_proj, q_a_layernorm, q_b_proj) = match mla.q_lora_rank {
        Some(rank) => (
            Some(weights.linear(&format!("{a}q_a_proj.weight"), rank, h, false)?),
            Some(weights.norm(&format!("{a}q_a_layernorm.weight"), rank, LATENT_EPS)?),
            weights.linear(&format!("{a}q_b_proj.weight"), heads * qk, rank, false)?,
        ),
        None => (
            None,
            None,
            weights.linear(&format!("{a}q_proj.weight"), heads * qk, h, false)?,
        ),
    };
    let kvl = mla.kv_lora_rank;
    let kv_a_proj_with_mqa = weights.linear(
        &format!("{a}kv_a_proj_with_mqa.weight"),
        kvl + mla.rope,
        h,
        false,
    )?;
    // interleaved rotary pairs put into the halves layout once, here, rather than every call
    let (q_b_proj, kv_a_proj_with_mqa) = match mla.interleave {
        true => (
            rope_columns_to_halves(q_b_proj, (0..heads).map(|i| i * qk + mla.nope), mla.rope),
            rope_columns_to_halves(kv_a_proj_with_mqa, [kvl], mla.rope),
        ),
        false => (q_b_proj, kv_a_proj_with_mqa),
    };
    let kv_a_layernorm = weights.norm(&format!("{a}kv_a_layernorm.weight"), kvl, LATENT_EPS)?;
    let kv_b_proj = weights.linear(
        &format!("{a}kv_b_proj.weight"),
        heads * (mla.nope + mla.v),
        kvl,
        false,
    )?;
    let o_proj = weights.linear(&format!("{a}o_proj.weight"), h, heads * mla.v, false)?;
    Ok(LatentAttention {
        q_a_proj,
        q_a_layernorm,
        q_b_proj,
        kv_a_proj_with_mqa,
        kv_a_layernorm,
        kv_b_proj,
        o_proj,
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

/// Weights read from a checkpoint, converted to `dtype` on the host as they are read.
pub(crate) struct FromCheckpoint<'a> {
    pub(crate) ckpt: &'a Checkpoint,
    pub(crate) device: &'a Device,
    pub(crate) dtype: DType,
    /// Advanced once per decoder layer and once each for the embeddings and the head.
    pub(crate) bar: ProgressBar,
}

impl FromCheckpoint<'_> {
    /// Whether matrices keep the checkpoint's `[out, in]` order, viewed `[in, out]`: bf16 on
    /// the host kernels where they read that layout fastest (as the experts do,
    /// `Experts::prefers_out_major`).
    fn out_major(&self) -> bool {
        Experts::prefers_out_major(self.device, self.dtype)
    }

    fn vector(&self, name: &str, size: usize) -> Result<Tensor<1>, LoadError> {
        let values = self.ckpt.read_f32(name, &[size])?;
        Ok(Tensor::<1>::from_data(
            TensorData::new(values, [size]),
            (self.device, self.dtype),
        ))
    }
}

impl Weights for FromCheckpoint<'_> {
    fn norm(&mut self, name: &str, size: usize, eps: f64) -> Result<RmsNorm, LoadError> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(self.vector(name, size)?),
            epsilon: eps,
        })
    }

    fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear, LoadError> {
        let weight = matrix(
            self.ckpt,
            name.to_string(),
            (out, inp),
            (self.device, self.dtype),
            self.out_major(),
        )?;
        let bias = match bias {
            true => {
                let bias_name = format!("{}.bias", name.trim_end_matches(".weight"));
                Some(Param::from_tensor(self.vector(&bias_name, out)?))
            }
            false => None,
        };
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    fn moe_block(
        &mut self,
        prefix: &str,
        naming: ExpertNaming,
        moe: &MoeLayerConfig,
        _layer: usize,
    ) -> Result<MoeLayer, LoadError> {
        load_block_as(self.ckpt, prefix, naming, moe, self.device, self.dtype)
    }

    fn dense_mlp(&mut self, prefix: &str, h: usize, i: usize) -> Result<SharedExpert, LoadError> {
        let ffn = load_dense(self.ckpt, prefix, h, i, self.device, self.dtype)?;
        Ok(SharedExpert::from_parts(ffn, None)?)
    }

    fn embeddings(&mut self, v: usize, h: usize) -> Result<Tensor<2>, LoadError> {
        // stored [V, H] is the layout: the out-major read, without its [in, out] view
        let name = "model.embed_tokens.weight".to_string();
        let embed = matrix(self.ckpt, name, (v, h), (self.device, self.dtype), true)?;
        self.bar.inc(1);
        Ok(embed.transpose())
    }

    fn lm_head(
        &mut self,
        v: usize,
        h: usize,
        tied: Option<&Tensor<2>>,
    ) -> Result<Tensor<2>, LoadError> {
        self.bar.inc(1);
        match tied {
            Some(embed) if !self.ckpt.contains("lm_head.weight") => Ok(embed.clone().transpose()),
            _ => matrix(
                self.ckpt,
                "lm_head.weight".into(),
                (v, h),
                (self.device, self.dtype),
                self.out_major(),
            ),
        }
    }

    fn layer_built(&mut self) {
        self.bar.inc(1);
    }
}

/// Fresh weights for training from scratch: matrices and embeddings drawn from `init`, norms
/// at 1, MoE blocks from their config (hash and random routers seeded per layer).
pub(crate) struct RandomInit<'a> {
    pub(crate) device: &'a Device,
    pub(crate) init: Initializer,
}

impl Weights for RandomInit<'_> {
    fn norm(&mut self, _name: &str, size: usize, eps: f64) -> Result<RmsNorm, LoadError> {
        Ok(RmsNormConfig::new(size).with_epsilon(eps).init(self.device))
    }

    fn linear(
        &mut self,
        _name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear, LoadError> {
        Ok(LinearConfig::new(inp, out)
            .with_bias(bias)
            .with_initializer(self.init.clone())
            .init(self.device))
    }

    fn moe_block(
        &mut self,
        _prefix: &str,
        _naming: ExpertNaming,
        moe: &MoeLayerConfig,
        layer: usize,
    ) -> Result<MoeLayer, LoadError> {
        Ok(layer_router(moe, layer).init(self.device)?)
    }

    fn dense_mlp(&mut self, _prefix: &str, h: usize, i: usize) -> Result<SharedExpert, LoadError> {
        Ok(moe_core::SharedExpertConfig::new(h, i).init(self.device)?)
    }

    fn embeddings(&mut self, v: usize, h: usize) -> Result<Tensor<2>, LoadError> {
        Ok(self
            .init
            .init_with([v, h], Some(h), Some(v), self.device)
            .val())
    }

    /// Always a head of its own (a tied head would be a copy that trains apart anyway).
    fn lm_head(
        &mut self,
        v: usize,
        h: usize,
        _tied: Option<&Tensor<2>>,
    ) -> Result<Tensor<2>, LoadError> {
        Ok(self
            .init
            .init_with([h, v], Some(h), Some(v), self.device)
            .val())
    }
}

/// `moe` for decoder layer `layer`: hash and random routers get a seed of their own per layer,
/// so that a token is not sent to the same expert indices in every layer.
fn layer_router(moe: &MoeLayerConfig, layer: usize) -> MoeLayerConfig {
    use moe_core::RouterKind;
    let mix = |seed: u64| seed ^ (layer as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
    let kind = match moe.router_kind {
        RouterKind::Hash { seed } => RouterKind::Hash { seed: mix(seed) },
        RouterKind::Random { seed } => RouterKind::Random { seed: mix(seed) },
        other => other,
    };
    moe.clone().with_router_kind(kind)
}
