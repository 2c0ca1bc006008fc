//! `config.json` of an OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral or DeepSeek-V3 checkpoint, with
//! the Hugging Face field names.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use moe_core::MoeLayerConfig;

use super::architecture::{
    Architecture, AttentionKind, DenseLayers, QkNorm, RoutingKind, SharedExperts, Traits,
};
use super::model::{GroupedAttentionConfig, LatentAttentionConfig};
use crate::error::LoadError;

/// Multi-head latent attention sizes (DeepSeek-V3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mla {
    /// Rank of the query LoRA; `None`: a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value latent.
    pub kv_lora_rank: usize,
    /// Per-head query/key size without rotation.
    pub nope: usize,
    /// Per-head rotary size.
    pub rope: usize,
    /// Per-head value size.
    pub v: usize,
    /// Rotary weights stored as interleaved pairs.
    pub interleave: bool,
}

/// The fields of an OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral or DeepSeek-V3 `config.json` this
/// engine reads (Hugging Face
/// names and defaults). The three share one decoder: Qwen3-MoE differs from OLMoE in its
/// per-head q/k norms, an explicit `head_dim`, renormalised top-k, the expert width
/// `moe_intermediate_size` and dense MLP layers (`mlp_only_layers`, `decoder_sparse_step`) of
/// width `intermediate_size`; Mixtral has no q/k norms, always renormalises its top-k, names
/// its experts `num_local_experts` (`block_sparse_moe`, `w1`/`w3`/`w2`) and may attend within a
/// `sliding_window`; Qwen2-MoE has q/k/v biases, no q/k norms and a gated shared expert;
/// DeepSeek-V3 has multi-head latent attention ([`Mla`]), `first_k_dense_replace` dense layers,
/// sigmoid group-limited routing with a selection bias, and ungated shared experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoeCausalLmConfig {
    /// The architecture, `model_type` in config.json (absent: OLMoE).
    #[serde(rename = "model_type", default)]
    pub architecture: Architecture,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size `H`.
    pub hidden_size: usize,
    /// Intermediate size of each expert `I`.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (defaults to the query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Expert activation; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling; only `null` is supported.
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// Biases on the attention projections; only `false` is supported.
    #[serde(default)]
    pub attention_bias: bool,
    /// Clamp q, k and v to ±`clip_qkv`.
    #[serde(default)]
    pub clip_qkv: Option<f64>,
    /// Routed experts `E` (Mixtral: `num_local_experts`, DeepSeek-V3: `n_routed_experts`).
    #[serde(alias = "num_local_experts", alias = "n_routed_experts")]
    pub num_experts: usize,
    /// Experts per token `k`.
    pub num_experts_per_tok: usize,
    /// Renormalise the top-k weights (false for the released OLMoE models).
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Padding token.
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// End-of-sequence token(s): an id or a list of ids.
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    /// Longest position the model was trained for.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// Size of one attention head (Qwen3-MoE; absent: `hidden_size / num_attention_heads`).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Width of each routed expert (Qwen3-MoE; absent: `intermediate_size`).
    #[serde(default)]
    pub moe_intermediate_size: Option<usize>,
    /// Every this many layers is sparse (Qwen3-MoE; absent: 1).
    #[serde(default)]
    pub decoder_sparse_step: Option<usize>,
    /// Layers with a dense MLP of width `intermediate_size` (Qwen3-MoE).
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    /// Sliding-window attention (Qwen3-MoE); only `false` is supported.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Biases on the q/k/v projections (Qwen2-MoE; absent: true there).
    #[serde(default)]
    pub qkv_bias: Option<bool>,
    /// Width of the gated shared expert (Qwen2-MoE).
    #[serde(default)]
    pub shared_expert_intermediate_size: Option<usize>,
    /// Ungated shared experts of width `moe_intermediate_size` each (DeepSeek-V3).
    #[serde(default)]
    pub n_shared_experts: Option<usize>,
    /// Multiplies the routing weights (DeepSeek-V3).
    #[serde(default)]
    pub routed_scaling_factor: Option<f64>,
    /// Expert groups (DeepSeek-V3).
    #[serde(default)]
    pub n_group: Option<usize>,
    /// Groups kept per token (DeepSeek-V3).
    #[serde(default)]
    pub topk_group: Option<usize>,
    /// The first layers with a dense MLP (DeepSeek-V3).
    #[serde(default)]
    pub first_k_dense_replace: Option<usize>,
    /// Rank of the query LoRA (DeepSeek-V3; absent: a plain `q_proj`).
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value latent (DeepSeek-V3).
    #[serde(default)]
    pub kv_lora_rank: Option<usize>,
    /// Per-head query/key size without rotation (DeepSeek-V3).
    #[serde(default)]
    pub qk_nope_head_dim: Option<usize>,
    /// Per-head rotary size (DeepSeek-V3).
    #[serde(default)]
    pub qk_rope_head_dim: Option<usize>,
    /// Per-head value size (DeepSeek-V3).
    #[serde(default)]
    pub v_head_dim: Option<usize>,
    /// The rotary weights are stored in interleaved pairs (DeepSeek-V3; absent: true).
    #[serde(default)]
    pub rope_interleave: Option<bool>,
    /// Attention window (Mixtral, when set): a position sees the `sliding_window` latest
    /// positions, itself included. Qwen3-MoE's is ignored unless `use_sliding_window`.
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

fn default_act() -> String {
    "silu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}

/// Sizes that, when present, must be positive integers (absent ones take the defaults).
const REQUIRED_SIZES: [&str; 7] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_experts",
    "num_experts_per_tok",
];

/// Names of the expert count across architectures.
const EXPERT_COUNT_NAMES: [&str; 3] = ["num_experts", "num_local_experts", "n_routed_experts"];

/// `object` with every absent field of its architecture's defaults ([`Traits::defaults`])
/// filled in (an absent or null `model_type` is OLMoE). A `null` `mlp_only_layers` is the
/// empty list, as in transformers.
fn with_defaults(object: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    let mut object = object.clone();
    for field in ["model_type", "mlp_only_layers"] {
        if object.get(field).is_some_and(Value::is_null) {
            object.remove(field);
        }
    }
    let architecture = match object.get("model_type").and_then(Value::as_str) {
        Some(name) => Architecture::from_model_type(name),
        None => Some(Architecture::Olmoe),
    };
    let table = architecture
        .map(|a| serde_json::from_str::<serde_json::Map<String, Value>>(a.traits().defaults));
    if let Some(Ok(table)) = table {
        for (field, value) in table {
            let present = match field.as_str() {
                "num_experts" => EXPERT_COUNT_NAMES.iter().any(|n| object.contains_key(*n)),
                _ => object.contains_key(&field),
            };
            if !present {
                object.insert(field, value);
            }
        }
    }
    object
}

/// Refuses a config whose `model_type` or `architectures` name another model than those of
/// [`Architecture`] (a config without either is read as OLMoE).
fn check_architecture(object: &serde_json::Map<String, Value>) -> Result<(), LoadError> {
    let model_type = object.get("model_type").and_then(Value::as_str);
    let architectures: Vec<String> = object
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let type_ok = model_type.is_none_or(|t| Architecture::from_model_type(t).is_some());
    let arch_ok = architectures.is_empty()
        || architectures
            .iter()
            .any(|a| Architecture::from_class(a).is_some());
    match type_ok && arch_ok {
        true => Ok(()),
        false => Err(LoadError::UnsupportedArchitecture {
            model_type: model_type.unwrap_or_default().to_string(),
            architectures,
            supported: Architecture::supported(),
        }),
    }
}

/// The most decoder layers a config may claim (published MoE models have under 100).
pub const MAX_LAYERS: usize = 1 << 16;

/// The largest head (or rotary) size a config may claim (published models use 64 to 256).
pub const MAX_HEAD: usize = 1 << 16;

fn invalid(field: &str, reason: impl Into<String>) -> LoadError {
    LoadError::Config {
        field: field.to_string(),
        reason: reason.into(),
    }
}

impl MoeCausalLmConfig {
    /// OLMoE-1B-7B (0924/0125): 16 layers, H 2048, 16 heads, 64 experts of I 1024, top-8.
    pub fn olmoe_1b_7b() -> Self {
        MoeCausalLmConfig {
            architecture: Architecture::Olmoe,
            vocab_size: 50304,
            hidden_size: 2048,
            intermediate_size: 1024,
            num_hidden_layers: 16,
            num_attention_heads: 16,
            num_key_value_heads: Some(16),
            hidden_act: default_act(),
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            attention_bias: false,
            clip_qkv: None,
            num_experts: 64,
            num_experts_per_tok: 8,
            norm_topk_prob: false,
            tie_word_embeddings: false,
            pad_token_id: Some(1),
            eos_token_id: Some(Value::from(50279)),
            max_position_embeddings: Some(4096),
            head_dim: None,
            moe_intermediate_size: None,
            decoder_sparse_step: None,
            mlp_only_layers: Vec::new(),
            use_sliding_window: false,
            sliding_window: None,
            qkv_bias: None,
            shared_expert_intermediate_size: None,
            n_shared_experts: None,
            routed_scaling_factor: None,
            n_group: None,
            topk_group: None,
            first_k_dense_replace: None,
            q_lora_rank: None,
            kv_lora_rank: None,
            qk_nope_head_dim: None,
            qk_rope_head_dim: None,
            v_head_dim: None,
            rope_interleave: None,
        }
    }

    /// Parses `config.json` text and validates it; errors name the offending field.
    pub fn from_json(text: &str) -> Result<Self, LoadError> {
        let value: Value = serde_json::from_str(text).map_err(|e| LoadError::Config {
            field: "config.json".into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let object = value
            .as_object()
            .ok_or_else(|| invalid("config.json", "must be a JSON object"))?;
        check_architecture(object)?;
        for field in REQUIRED_SIZES {
            let value = match field {
                "num_experts" => object
                    .get(field)
                    .or_else(|| object.get("num_local_experts"))
                    .or_else(|| object.get("n_routed_experts")),
                _ => object.get(field),
            };
            if let Some(v) = value
                && v.as_i64().is_none_or(|n| n < 1)
            {
                return Err(invalid(
                    field,
                    format!("must be a positive integer, got {v}"),
                ));
            }
        }
        let value = Value::Object(with_defaults(object));
        let config: MoeCausalLmConfig =
            serde_json::from_value(value).map_err(|e| invalid("config.json", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Widths of the query and key/value projections, then of the q and k norms (one head
    /// each when they run per head).
    pub fn attention_widths(&self) -> (usize, usize, usize, usize) {
        self.grouped_attention().widths()
    }

    /// The shape of every layer's grouped-query attention (what the attention of a config
    /// without latent attention is).
    pub fn grouped_attention(&self) -> GroupedAttentionConfig {
        GroupedAttentionConfig {
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            qkv_bias: self.has_qkv_bias(),
            qk_norm: self.traits().qk_norm,
            eps: self.rms_norm_eps,
            clip_qkv: self.clip_qkv,
        }
    }

    /// The shape of every layer's latent attention, if attention is latent (DeepSeek-V3).
    pub fn latent_attention(&self) -> Option<LatentAttentionConfig> {
        self.mla().map(|mla| LatentAttentionConfig {
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            mla,
        })
    }

    /// What sets this config's architecture apart.
    pub fn traits(&self) -> &'static Traits {
        self.architecture.traits()
    }

    /// Whether the q/k/v projections carry biases (Qwen2-MoE, unless `qkv_bias` is false).
    pub fn has_qkv_bias(&self) -> bool {
        self.traits().qkv_bias && self.qkv_bias.unwrap_or(true)
    }

    /// The multi-head latent attention sizes (DeepSeek-V3), if attention is latent.
    pub fn mla(&self) -> Option<Mla> {
        if self.traits().attention != AttentionKind::Latent {
            return None;
        }
        Some(Mla {
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank?,
            nope: self.qk_nope_head_dim?,
            rope: self.qk_rope_head_dim?,
            v: self.v_head_dim?,
            interleave: self.rope_interleave.unwrap_or(true),
        })
    }

    /// Whether attention normalises q and k (OLMoE, Qwen3-MoE; not Mixtral or Qwen2-MoE).
    pub fn has_qk_norm(&self) -> bool {
        self.traits().qk_norm != QkNorm::None
    }

    /// The q/k RMSNorm of attention runs over each head (Qwen3-MoE) rather than over the whole
    /// projection (OLMoE).
    pub fn per_head_qk_norm(&self) -> bool {
        self.traits().qk_norm == QkNorm::PerHead
    }

    /// The attention window, if attention is windowed.
    pub fn attention_window(&self) -> Option<usize> {
        match self.traits().window_needs_flag {
            true => self.sliding_window.filter(|_| self.use_sliding_window),
            false => self.sliding_window,
        }
    }

    /// Prefix of a sparse block's tensors within a layer and their expert naming.
    pub fn moe_prefix(&self) -> (&'static str, crate::ExpertNaming) {
        self.traits().moe_block
    }

    /// Width of each routed expert.
    pub fn expert_size(&self) -> usize {
        self.moe_intermediate_size.unwrap_or(self.intermediate_size)
    }

    /// Whether decoder layer `layer` has the MoE block (else a dense MLP of width
    /// `intermediate_size`), as transformers' Qwen3-MoE decides it.
    pub fn is_sparse(&self, layer: usize) -> bool {
        if self.traits().dense_layers == DenseLayers::FirstK {
            return layer >= self.first_k_dense_replace.unwrap_or(0);
        }
        let step = self.decoder_sparse_step.unwrap_or(1).max(1);
        !self.mlp_only_layers.contains(&layer) && (layer + 1).is_multiple_of(step)
    }

    /// End-of-sequence ids.
    pub fn eos_ids(&self) -> Vec<i64> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
            Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_i64).collect(),
            _ => Vec::new(),
        }
    }

    /// Checks what this engine supports; errors name the field.
    pub fn validate(&self) -> Result<(), LoadError> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1, got 0"));
            }
        }
        if self.hidden_act != "silu" {
            return Err(invalid(
                "hidden_act",
                format!("`{}` is not supported (only `silu`)", self.hidden_act),
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(invalid(
                "rope_scaling",
                "RoPE scaling is not supported (only null)",
            ));
        }
        if self.attention_bias {
            return Err(invalid(
                "attention_bias",
                "attention biases are not supported",
            ));
        }
        if self.use_sliding_window {
            return Err(invalid(
                "use_sliding_window",
                "sliding-window attention is not supported (only false)",
            ));
        }
        if self.traits().shared == SharedExperts::Gated
            && self.shared_expert_intermediate_size.is_none_or(|s| s == 0)
        {
            return Err(invalid(
                "shared_expert_intermediate_size",
                format!("must be at least 1 for {}", self.architecture.model_type()),
            ));
        }
        if self.traits().attention == AttentionKind::Latent {
            let mla = self.mla().ok_or_else(|| {
                invalid(
                    "kv_lora_rank / qk_nope_head_dim / qk_rope_head_dim / v_head_dim",
                    "are all needed for deepseek_v3",
                )
            })?;
            if mla.rope % 2 != 0 || mla.rope == 0 || mla.kv_lora_rank == 0 || mla.v == 0 {
                return Err(invalid(
                    "qk_rope_head_dim / kv_lora_rank / v_head_dim",
                    format!(
                        "must be positive (and the rotary size even), got {} / {} / {}",
                        mla.rope, mla.kv_lora_rank, mla.v
                    ),
                ));
            }
            self.moe_layer().validate()?;
        }
        if self.sliding_window == Some(0) {
            return Err(invalid("sliding_window", "must be at least 1, got 0"));
        }
        if self.decoder_sparse_step == Some(0) {
            return Err(invalid("decoder_sparse_step", "must be at least 1, got 0"));
        }
        if self.head_dim == Some(0) || self.moe_intermediate_size == Some(0) {
            return Err(invalid(
                "head_dim / moe_intermediate_size",
                "must be at least 1, got 0",
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(invalid(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.kv_heads(),
                    self.num_attention_heads
                ),
            ));
        }
        if self.num_experts_per_tok > self.num_experts {
            return Err(invalid(
                "num_experts_per_tok",
                format!(
                    "{} exceeds num_experts {}",
                    self.num_experts_per_tok, self.num_experts
                ),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(invalid(
                "rms_norm_eps",
                format!("must be > 0, got {}", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid(
                "rope_theta",
                format!("must be > 0, got {}", self.rope_theta),
            ));
        }
        if let Some(clip) = self.clip_qkv
            && !(clip.is_finite() && clip > 0.0)
        {
            return Err(invalid("clip_qkv", format!("must be > 0, got {clip}")));
        }
        self.validate_sizes()?;
        Ok(())
    }

    /// The sizes the decoder assumes: a bounded layer count, heads that divide the widths,
    /// an even rotary size, finite rotary frequencies and scales, and parameter counts that
    /// fit in 64 bits.
    fn validate_sizes(&self) -> Result<(), LoadError> {
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(invalid(
                "num_hidden_layers",
                format!(
                    "{} is more than this engine loads ({MAX_LAYERS})",
                    self.num_hidden_layers
                ),
            ));
        }
        if let Some(head_dim) = self.head_dim
            && head_dim > MAX_HEAD
        {
            return Err(invalid(
                "head_dim",
                format!("{head_dim} is more than this engine loads ({MAX_HEAD})"),
            ));
        }
        if self.mla().is_none() {
            let head_dim = self.head_dim();
            let field = match self.head_dim {
                Some(_) => "head_dim",
                None => "hidden_size / num_attention_heads",
            };
            if head_dim < 2 || !head_dim.is_multiple_of(2) {
                return Err(invalid(
                    field,
                    format!(
                        "gives a head size of {head_dim}: rotary embeddings need an even head size of at least 2"
                    ),
                ));
            }
        }
        if let Some(m) = self.mla() {
            for (field, size) in [
                ("qk_nope_head_dim", Some(m.nope)),
                ("q_lora_rank", m.q_lora_rank),
            ] {
                if size == Some(0) {
                    return Err(invalid(field, "must be at least 1, got 0"));
                }
            }
        }
        let rope = self.rope_dim();
        if rope > MAX_HEAD {
            return Err(invalid(
                "head_dim / qk_rope_head_dim",
                format!("gives a rotary size of {rope}, more than {MAX_HEAD}"),
            ));
        }
        // theta^(2i/d) is monotone in i: the extreme frequencies are at i = 1 and i = d/2 - 1
        let frequencies = self.rope_frequencies();
        let extremes = [frequencies.get(1), frequencies.last()];
        if let Some(bad) = extremes
            .into_iter()
            .flatten()
            .find(|f| !(f.is_finite() && **f > 0.0))
        {
            return Err(invalid(
                "rope_theta",
                format!(
                    "{} gives a rotary frequency of {bad} in f32 (1 / theta^(2i/d) must be finite and positive)",
                    self.rope_theta
                ),
            ));
        }
        if let Some(scale) = self.routed_scaling_factor
            && !((scale as f32).is_finite() && scale > 0.0)
        {
            return Err(invalid(
                "routed_scaling_factor",
                format!("must be a positive number that f32 holds, got {scale}"),
            ));
        }
        self.parameter_counts()?;
        Ok(())
    }

    /// The MoE layer of every sparse decoder block.
    pub fn moe_layer(&self) -> MoeLayerConfig {
        if self.traits().routing == RoutingKind::GroupLimitedSigmoid {
            let groups =
                moe_core::GroupLimit::new(self.n_group.unwrap_or(1), self.topk_group.unwrap_or(1));
            let shared = self.deepseek_shared_size();
            let config = MoeLayerConfig::deepseek_v3(
                self.hidden_size,
                self.expert_size(),
                self.num_experts,
                self.num_experts_per_tok,
                groups,
                self.routed_scaling_factor.unwrap_or(1.0),
                shared,
            )
            .with_normalize_top_k(self.norm_topk_prob);
            return match shared {
                0 => config.with_shared_expert(None),
                _ => config,
            };
        }
        MoeLayerConfig::olmoe(
            self.hidden_size,
            self.expert_size(),
            self.num_experts,
            self.num_experts_per_tok,
        )
        .with_normalize_top_k(
            self.norm_topk_prob || self.traits().routing == RoutingKind::SoftmaxRenormalised,
        )
        .with_shared_expert(
            self.shared_expert_size().map(|size| {
                moe_core::SharedExpertConfig::new(self.hidden_size, size).with_gated(true)
            }),
        )
    }

    /// Width of DeepSeek-V3's ungated shared experts together (`n_shared_experts` experts of
    /// `moe_intermediate_size`; none when the config names none).
    fn deepseek_shared_size(&self) -> usize {
        self.expert_size()
            .saturating_mul(self.n_shared_experts.unwrap_or(0))
    }

    /// Width of the gated shared expert (Qwen2-MoE), if the blocks have one.
    pub fn shared_expert_size(&self) -> Option<usize> {
        self.shared_expert_intermediate_size
            .filter(|_| self.traits().shared == SharedExperts::Gated)
    }

    /// How many of the decoder layers have the MoE block (the others a dense MLP), worked out
    /// without walking the layers.
    pub fn sparse_layers(&self) -> usize {
        let n = self.num_hidden_layers;
        if self.traits().dense_layers == DenseLayers::FirstK {
            return n - self.first_k_dense_replace.unwrap_or(0).min(n);
        }
        let step = self.decoder_sparse_step.unwrap_or(1).max(1);
        let mut dense: Vec<usize> = self
            .mlp_only_layers
            .iter()
            .copied()
            .filter(|&l| l < n && (l + 1) % step == 0)
            .collect();
        dense.sort_unstable();
        dense.dedup();
        n / step - dense.len()
    }

    /// Parameters in total and those one token uses (`k` of `E` experts).
    ///
    /// # Errors
    /// [`LoadError::Config`] when a count does not fit in a `u64` (sizes no checkpoint can
    /// have); [`MoeCausalLmConfig::validate`] refuses such configs.
    pub fn parameter_counts(&self) -> Result<(u64, u64), LoadError> {
        // Saturating u128 arithmetic: every term is a sum of products of non-negative sizes,
        // so a saturated term still compares above u64::MAX.
        let n = |x: usize| x as u128;
        let (h, v) = (n(self.hidden_size), n(self.vocab_size));
        // The widths saturate at usize::MAX; every term they enter is at least twice one of
        // them, so a saturated width still makes the count overflow u64, as it should.
        let (q, kv, q_norm, k_norm) = self.attention_widths();
        let (q, kv, q_norm, k_norm) = (n(q), n(kv), n(q_norm), n(k_norm));
        let qk_norms = match self.has_qk_norm() {
            true => q_norm.saturating_add(k_norm),
            false => 0,
        };
        let biases = match self.has_qkv_bias() {
            true => q.saturating_add(kv.saturating_mul(2)),
            false => 0,
        };
        let sum = |terms: &[u128]| terms.iter().fold(0u128, |a, &t| a.saturating_add(t));
        let mul = |terms: &[u128]| terms.iter().fold(1u128, |a, &t| a.saturating_mul(t));
        let attention = match self.mla() {
            None => sum(&[mul(&[2, h, q]), mul(&[2, h, kv]), qk_norms, biases]),
            Some(m) => {
                let heads = n(self.num_attention_heads);
                let qk = n(m.nope).saturating_add(n(m.rope));
                let kvl = n(m.kv_lora_rank);
                let query = match m.q_lora_rank {
                    Some(r) => sum(&[mul(&[h, n(r)]), n(r), mul(&[n(r), heads, qk])]),
                    None => mul(&[h, heads, qk]),
                };
                sum(&[
                    query,
                    mul(&[h, kvl.saturating_add(n(m.rope))]),
                    kvl,
                    mul(&[kvl, heads, n(m.nope).saturating_add(n(m.v))]),
                    mul(&[heads, n(m.v), h]),
                ])
            }
        };
        let experts = n(self.num_experts);
        let shared = match self.traits().shared == SharedExperts::Ungated {
            // ungated shared experts, and the selection bias
            true => sum(&[
                mul(&[
                    3,
                    h,
                    n(self.expert_size()),
                    n(self.n_shared_experts.unwrap_or(0)),
                ]),
                experts,
            ]),
            false => self
                .shared_expert_size()
                .map_or(0, |s| sum(&[mul(&[3, h, n(s)]), h])), // shared expert and its gate
        };
        let expert = mul(&[3, h, n(self.expert_size())]);
        let dense_mlp = mul(&[3, h, n(self.intermediate_size)]);
        let head = match self.tie_word_embeddings {
            true => 0,
            false => mul(&[v, h]),
        };
        let outside = sum(&[mul(&[v, h]), head, h]);
        let per_layer = sum(&[attention, mul(&[2, h])]);
        let router = mul(&[h, experts]);
        let sparse = n(self.sparse_layers());
        let dense = n(self.num_hidden_layers) - sparse;
        let common = sum(&[
            outside,
            mul(&[n(self.num_hidden_layers), per_layer]),
            mul(&[dense, dense_mlp]),
        ]);
        let total = sum(&[
            common,
            mul(&[sparse, sum(&[router, mul(&[experts, expert]), shared])]),
        ]);
        let active = sum(&[
            common,
            mul(&[
                sparse,
                sum(&[router, mul(&[n(self.num_experts_per_tok), expert]), shared]),
            ]),
        ]);
        match (u64::try_from(total), u64::try_from(active)) {
            (Ok(total), Ok(active)) => Ok((total, active)),
            _ => Err(invalid(
                "hidden_size / intermediate_size / num_experts / num_hidden_layers / vocab_size",
                "give more parameters than a 64-bit count holds",
            )),
        }
    }

    /// The rotary frequencies `1 / theta^(2i / d)` of a head's `d` rotary values, in f32 as
    /// transformers computes them.
    pub fn rope_frequencies(&self) -> Vec<f32> {
        rope_frequencies(self.rope_theta, self.rope_dim())
    }

    /// Size of the rotated part of a head: the head size, or DeepSeek-V3's `qk_rope_head_dim`.
    pub fn rope_dim(&self) -> usize {
        match self.mla() {
            Some(m) => m.rope,
            None => self.head_dim(),
        }
    }
}

/// `1 / theta^(2i / dim)` for `i < dim / 2`, in f32 (rotate-half RoPE).
pub(crate) fn rope_frequencies(theta: f64, dim: usize) -> Vec<f32> {
    let theta = theta as f32;
    (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
        .collect()
}
