//! OLMoE (allenai/OLMoE-1B-7B and its variants): config, model and checkpoint loading.

mod config;
mod model;

pub use config::OlmoeConfig;
pub use model::{
    KvCache, LayerCache, ModelOutput, MoeTrace, OlmoeAttention, OlmoeDecoderLayer, OlmoeModel,
};

use std::path::Path;

use burn::module::Param;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{Device, Tensor, TensorData};

use crate::block::{ExpertNaming, load_block, matrix_transposed};
use crate::checkpoint::Checkpoint;
use crate::error::LoadError;

/// What a load used and what it left: every checkpoint tensor is either loaded or unused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors read into the model.
    pub loaded: usize,
    /// Checkpoint tensors the model has no place for (e.g. rotary caches), sorted.
    pub unused: Vec<String>,
}

fn norm(
    ckpt: &Checkpoint,
    name: &str,
    size: usize,
    eps: f64,
    device: &Device,
) -> Result<RmsNorm, LoadError> {
    let gamma = ckpt.read_f32(name, &[size])?;
    Ok(RmsNorm {
        gamma: Param::from_tensor(Tensor::<1>::from_data(
            TensorData::new(gamma, [size]),
            device,
        )),
        epsilon: eps,
    })
}

fn linear(
    ckpt: &Checkpoint,
    name: &str,
    out: usize,
    inp: usize,
    device: &Device,
) -> Result<Linear, LoadError> {
    Ok(Linear {
        weight: Param::from_tensor(matrix_transposed(ckpt, name.to_string(), out, inp, device)?),
        bias: None,
    })
}

impl OlmoeModel {
    /// Loads `dir/config.json` and the checkpoint beside it (single file or sharded).
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, OlmoeConfig, LoadReport), LoadError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| LoadError::Io {
            path: config_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let config = OlmoeConfig::from_json(&text)?;
        let ckpt = Checkpoint::open(dir)?;
        let (model, report) = Self::from_checkpoint(&ckpt, &config, device)?;
        Ok((model, config, report))
    }

    /// Builds the model from the tensors of `ckpt` (Hugging Face names), converting every
    /// weight to f32 and transposing matrices once.
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        config: &OlmoeConfig,
        device: &Device,
    ) -> Result<(Self, LoadReport), LoadError> {
        config.validate()?;
        let (h, v) = (config.hidden_size, config.vocab_size);
        let (heads, kv_heads, head_dim) = (
            config.num_attention_heads,
            config.kv_heads(),
            config.head_dim(),
        );
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let eps = config.rms_norm_eps;
        let embed = ckpt.read_f32("model.embed_tokens.weight", &[v, h])?;
        let embed_tokens = Tensor::<2>::from_data(TensorData::new(embed, [v, h]), device);
        let lm_head = if config.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            embed_tokens.clone().transpose()
        } else {
            matrix_transposed(ckpt, "lm_head.weight".into(), v, h, device)?
        };
        let moe_config = config.moe_layer();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}.");
            let a = format!("{p}self_attn.");
            layers.push(OlmoeDecoderLayer {
                input_layernorm: norm(ckpt, &format!("{p}input_layernorm.weight"), h, eps, device)?,
                self_attn: OlmoeAttention {
                    q_proj: linear(ckpt, &format!("{a}q_proj.weight"), q_width, h, device)?,
                    k_proj: linear(ckpt, &format!("{a}k_proj.weight"), kv_width, h, device)?,
                    v_proj: linear(ckpt, &format!("{a}v_proj.weight"), kv_width, h, device)?,
                    o_proj: linear(ckpt, &format!("{a}o_proj.weight"), h, q_width, device)?,
                    q_norm: norm(ckpt, &format!("{a}q_norm.weight"), q_width, eps, device)?,
                    k_norm: norm(ckpt, &format!("{a}k_norm.weight"), kv_width, eps, device)?,
                    heads,
                    kv_heads,
                    head_dim,
                    clip_qkv: config.clip_qkv,
                },
                post_attention_layernorm: norm(
                    ckpt,
                    &format!("{p}post_attention_layernorm.weight"),
                    h,
                    eps,
                    device,
                )?,
                mlp: load_block(
                    ckpt,
                    &format!("{p}mlp."),
                    ExpertNaming::Proj,
                    &moe_config,
                    device,
                )?,
            });
        }
        let model = OlmoeModel {
            embed_tokens: Param::from_tensor(embed_tokens),
            layers,
            norm: norm(ckpt, "model.norm.weight", h, eps, device)?,
            lm_head: Param::from_tensor(lm_head),
            rope_theta: config.rope_theta,
        };
        let report = LoadReport {
            loaded: ckpt.used(),
            unused: ckpt.unused(),
        };
        Ok((model, report))
    }
}
