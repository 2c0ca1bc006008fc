//! The architectures the decoder runs, as data: one enum arm and one row of [`TABLE`] each,
//! saying everything that sets the architecture apart (its names, its transformers defaults,
//! its attention, norms, biases, dense layers, routing and shared experts). The config and
//! the loader ask the row; nothing else matches on the architecture.

use crate::ExpertNaming;

/// An architecture this engine runs (`config.json`'s `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Architecture {
    /// `olmoe` (`OlmoeForCausalLM`); also a config without `model_type`.
    #[default]
    Olmoe,
    /// `qwen2_moe` (`Qwen2MoeForCausalLM`).
    Qwen2Moe,
    /// `qwen3_moe` (`Qwen3MoeForCausalLM`).
    Qwen3Moe,
    /// `mixtral` (`MixtralForCausalLM`).
    Mixtral,
    /// `deepseek_v3` (`DeepseekV3ForCausalLM`).
    DeepseekV3,
}

/// How attention normalises q and k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// Not at all.
    None,
    /// One RMSNorm over the whole q (and k) projection (OLMoE).
    Projection,
    /// One RMSNorm per head (Qwen3-MoE).
    PerHead,
}

/// The kind of attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Grouped-query attention over per-head q, k, v projections.
    Grouped,
    /// DeepSeek's multi-head latent attention (see [`super::Mla`]).
    Latent,
}

/// Which decoder layers have a dense MLP instead of the MoE block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseLayers {
    /// Those `mlp_only_layers` names and those off the `decoder_sparse_step` (transformers'
    /// Qwen rule; both absent: none).
    Listed,
    /// The first `first_k_dense_replace` (DeepSeek).
    FirstK,
}

/// How the router scores and selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingKind {
    /// Softmax top-k, renormalised as `norm_topk_prob` says.
    Softmax,
    /// Softmax top-k, always renormalised (Mixtral).
    SoftmaxRenormalised,
    /// Sigmoid scores with a selection bias, group-limited, scaled (DeepSeek-V3).
    GroupLimitedSigmoid,
}

/// The experts every token also runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedExperts {
    /// None.
    None,
    /// One expert of `shared_expert_intermediate_size` behind a sigmoid gate (Qwen2-MoE).
    Gated,
    /// `n_shared_experts` ungated experts of `moe_intermediate_size` (DeepSeek-V3).
    Ungated,
}

/// What sets one architecture apart.
#[derive(Debug, Clone, Copy)]
pub struct Traits {
    /// `config.json`'s `model_type`.
    pub model_type: &'static str,
    /// The transformers class in `architectures`.
    pub class: &'static str,
    /// q/k norms.
    pub qk_norm: QkNorm,
    /// q/k/v biases (unless the config's `qkv_bias` is false).
    pub qkv_bias: bool,
    /// `sliding_window` applies only with `use_sliding_window` (as transformers' Qwen stores it).
    pub window_needs_flag: bool,
    /// Prefix of the MoE block's tensors within a layer, and the naming of its experts.
    pub moe_block: (&'static str, ExpertNaming),
    /// The attention.
    pub attention: AttentionKind,
    /// The dense layers.
    pub dense_layers: DenseLayers,
    /// The routing.
    pub routing: RoutingKind,
    /// The shared experts.
    pub shared: SharedExperts,
    /// Every field transformers 4.57 gives a default when config.json lacks it, as that
    /// architecture's config class does (`tests/data/config-defaults.json` holds the classes'
    /// own values, written by `scripts/fixtures/config_defaults.py`, and a test compares the
    /// two). Fields derived from others when absent (OLMoE's `num_key_value_heads`, the head
    /// size) are left out and derived as transformers derives them; Qwen's `sliding_window` is
    /// unset unless `use_sliding_window`, as transformers stores it.
    pub defaults: &'static str,
}

/// One row per architecture, in the order of [`Architecture`].
const TABLE: [(Architecture, Traits); 5] = [
    (
        Architecture::Olmoe,
        Traits {
            model_type: "olmoe",
            class: "OlmoeForCausalLM",
            qk_norm: QkNorm::Projection,
            qkv_bias: false,
            window_needs_flag: false,
            moe_block: ("mlp.", ExpertNaming::Proj),
            attention: AttentionKind::Grouped,
            dense_layers: DenseLayers::Listed,
            routing: RoutingKind::Softmax,
            shared: SharedExperts::None,
            defaults: r#"{"vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048,
                "num_hidden_layers": 16, "num_attention_heads": 16, "hidden_act": "silu",
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "pad_token_id": 1,
                "eos_token_id": 50279, "tie_word_embeddings": false, "rope_theta": 10000.0,
                "attention_bias": false, "num_experts_per_tok": 8, "num_experts": 64,
                "norm_topk_prob": false}"#,
        },
    ),
    (
        Architecture::Qwen2Moe,
        Traits {
            model_type: "qwen2_moe",
            class: "Qwen2MoeForCausalLM",
            qk_norm: QkNorm::None,
            qkv_bias: true,
            window_needs_flag: true,
            moe_block: ("mlp.", ExpertNaming::Proj),
            attention: AttentionKind::Grouped,
            dense_layers: DenseLayers::Listed,
            routing: RoutingKind::Softmax,
            shared: SharedExperts::Gated,
            defaults: r#"{"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
                "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
                "tie_word_embeddings": false, "rope_theta": 10000.0, "use_sliding_window": false,
                "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
                "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4,
                "num_experts": 60, "norm_topk_prob": false, "mlp_only_layers": [],
                "qkv_bias": true}"#,
        },
    ),
    (
        Architecture::Qwen3Moe,
        Traits {
            model_type: "qwen3_moe",
            class: "Qwen3MoeForCausalLM",
            qk_norm: QkNorm::PerHead,
            qkv_bias: false,
            window_needs_flag: true,
            moe_block: ("mlp.", ExpertNaming::Proj),
            attention: AttentionKind::Grouped,
            dense_layers: DenseLayers::Listed,
            routing: RoutingKind::Softmax,
            shared: SharedExperts::None,
            defaults: r#"{"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 4,
                "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
                "tie_word_embeddings": false, "rope_theta": 10000.0, "attention_bias": false,
                "use_sliding_window": false, "decoder_sparse_step": 1,
                "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_experts": 128,
                "norm_topk_prob": false, "mlp_only_layers": []}"#,
        },
    ),
    (
        Architecture::Mixtral,
        Traits {
            model_type: "mixtral",
            class: "MixtralForCausalLM",
            qk_norm: QkNorm::None,
            qkv_bias: false,
            window_needs_flag: false,
            moe_block: ("block_sparse_moe.", ExpertNaming::Mixtral),
            attention: AttentionKind::Grouped,
            dense_layers: DenseLayers::Listed,
            routing: RoutingKind::SoftmaxRenormalised,
            shared: SharedExperts::None,
            defaults: r#"{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
                "eos_token_id": 2, "tie_word_embeddings": false, "rope_theta": 1000000.0,
                "num_experts_per_tok": 2, "num_experts": 8}"#,
        },
    ),
    (
        Architecture::DeepseekV3,
        Traits {
            model_type: "deepseek_v3",
            class: "DeepseekV3ForCausalLM",
            qk_norm: QkNorm::None,
            qkv_bias: false,
            window_needs_flag: false,
            moe_block: ("mlp.", ExpertNaming::Proj),
            attention: AttentionKind::Latent,
            dense_layers: DenseLayers::FirstK,
            routing: RoutingKind::GroupLimitedSigmoid,
            shared: SharedExperts::Ungated,
            defaults: r#"{"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
                "num_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
                "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
                "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
                "first_k_dense_replace": 3, "norm_topk_prob": true, "hidden_act": "silu",
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "eos_token_id": 1,
                "tie_word_embeddings": false, "rope_theta": 10000.0, "rope_interleave": true,
                "attention_bias": false}"#,
        },
    ),
];

impl Architecture {
    /// Every architecture, in the order of the enum.
    pub const ALL: [Architecture; 5] = [
        Architecture::Olmoe,
        Architecture::Qwen2Moe,
        Architecture::Qwen3Moe,
        Architecture::Mixtral,
        Architecture::DeepseekV3,
    ];

    /// What sets this architecture apart.
    pub fn traits(self) -> &'static Traits {
        &TABLE[self as usize].1
    }

    /// Its `model_type`.
    pub fn model_type(self) -> &'static str {
        self.traits().model_type
    }

    /// The architecture of a `model_type`, if this engine runs it.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.traits().model_type == model_type)
    }

    /// The architecture of a transformers class name, if this engine runs it.
    pub fn from_class(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.traits().class == class)
    }

    /// `model_type (Class), …` of every architecture, for error messages.
    pub fn supported() -> String {
        Self::ALL
            .iter()
            .map(|a| format!("{} ({})", a.traits().model_type, a.traits().class))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl serde::Serialize for Architecture {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.model_type())
    }
}

impl<'de> serde::Deserialize<'de> for Architecture {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Architecture::from_model_type(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "model_type {name:?} is not supported; supported: {}",
                Architecture::supported()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_the_order_of_the_enum_and_names_are_unique() {
        for (i, (arch, traits)) in TABLE.iter().enumerate() {
            assert_eq!(*arch as usize, i);
            assert_eq!(Architecture::ALL[i], *arch);
            assert_eq!(
                Architecture::from_model_type(traits.model_type),
                Some(*arch)
            );
            assert_eq!(Architecture::from_class(traits.class), Some(*arch));
            let defaults: serde_json::Value = serde_json::from_str(traits.defaults).unwrap();
            assert!(defaults.is_object(), "{}", traits.model_type);
        }
        assert_eq!(Architecture::from_model_type("dbrx"), None);
    }
}
