//! The OLMoE decoder: embeddings, RMSNorm, attention with q/k norms over the full projection
//! width, optional `clip_qkv`, rotary embeddings, the MoE MLP from `moe-core`, final norm and an
//! untied `lm_head`; a KV cache for incremental decoding and left-padded batches.

use burn::module::{Module, Param};
use burn::nn::{Linear, RmsNorm};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use moe_core::{CallPath, ForwardOptions, MoeLayer, Routing, SharedExpert, TopK};
use rand::SeedableRng;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand::rngs::StdRng;

use super::architecture::QkNorm;
use super::config::Mla;
use super::host::{decode_attention, linear, product};
use crate::error::RunError;

/// The shape of one layer's grouped-query attention ([`GroupedAttention`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupedAttentionConfig {
    /// Hidden size `H`.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// q/k/v projections with biases.
    pub qkv_bias: bool,
    /// The q/k norms.
    pub qk_norm: QkNorm,
    /// Their epsilon.
    pub eps: f64,
    /// Clamp for q, k and v.
    pub clip_qkv: Option<f64>,
}

impl GroupedAttentionConfig {
    /// Widths of the query and key/value projections, then of the q and k norms (one head
    /// each when they run per head).
    pub fn widths(&self) -> (usize, usize, usize, usize) {
        let (q, kv) = (
            self.heads.saturating_mul(self.head_dim),
            self.kv_heads.saturating_mul(self.head_dim),
        );
        match self.qk_norm {
            QkNorm::PerHead => (q, kv, self.head_dim, self.head_dim),
            QkNorm::Projection | QkNorm::None => (q, kv, q, kv),
        }
    }
}

/// The shape of one layer's multi-head latent attention ([`LatentAttention`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentAttentionConfig {
    /// Hidden size `H`.
    pub hidden: usize,
    /// Heads.
    pub heads: usize,
    /// The latent sizes.
    pub mla: Mla,
}

/// Self-attention of one decoder layer.
#[derive(Module, Debug)]
pub struct GroupedAttention {
    /// `[H, heads · head_dim]`.
    pub q_proj: Linear,
    /// `[H, kv_heads · head_dim]`.
    pub k_proj: Linear,
    /// `[H, kv_heads · head_dim]`.
    pub v_proj: Linear,
    /// `[heads · head_dim, H]`.
    pub o_proj: Linear,
    /// RMSNorm of the queries: over the whole projection (OLMoE), over each head (Qwen3-MoE,
    /// `per_head_norm`) or none (Mixtral).
    pub q_norm: Option<RmsNorm>,
    /// RMSNorm of the keys, like `q_norm`.
    pub k_norm: Option<RmsNorm>,
    /// Whether `q_norm` and `k_norm` run over each head of `head_dim` values.
    #[module(skip)]
    pub per_head_norm: bool,
    /// Query heads.
    #[module(skip)]
    pub heads: usize,
    /// Key/value heads.
    #[module(skip)]
    pub kv_heads: usize,
    /// Size of one head.
    #[module(skip)]
    pub head_dim: usize,
    /// Clamp for q, k and v.
    #[module(skip)]
    pub clip_qkv: Option<f64>,
}

/// Cached keys and values of one layer: `[B, kv_heads, capacity, d]` tensors whose first `len`
/// positions hold the sequence so far. A call's keys and values are written in place after
/// them (the tensors are this cache's only handles between calls); when they do not fit, the
/// capacity doubles (up to the model's context), so a sequence is copied a bounded number of
/// times instead of once per step.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    keys: Option<Tensor<4>>,
    values: Option<Tensor<4>>,
    len: usize,
    /// The model's context, if it has one: the capacity never grows past it.
    limit: Option<usize>,
}

/// Positions a layer's cache first holds room for.
const MIN_CACHE_CAPACITY: usize = 64;

/// A layer's cache after a call's keys and values were appended.
pub(crate) struct CachedKv {
    /// `[B, kv_heads, capacity, dk]`.
    pub(crate) keys: Tensor<4>,
    /// `[B, kv_heads, capacity, dv]`.
    pub(crate) values: Tensor<4>,
    /// Positions held.
    pub(crate) len: usize,
}

impl CachedKv {
    /// The positions held, as `[B, kv_heads, len, d]` views.
    fn held(self) -> (Tensor<4>, Tensor<4>) {
        (
            self.keys.narrow(2, 0, self.len),
            self.values.narrow(2, 0, self.len),
        )
    }
}

impl LayerCache {
    /// Appends this call's keys and values (`[B, heads, L, d]`) after the cached ones.
    fn append(&mut self, k: Tensor<4>, v: Tensor<4>) -> CachedKv {
        let (len, new) = (self.len, k.dims()[2]);
        let grow = |cached: Option<Tensor<4>>, fresh: &Tensor<4>| -> Tensor<4> {
            let [b, heads, _, d] = fresh.dims();
            match cached {
                Some(t) if t.dims()[2] >= len + new => t,
                cached => {
                    let wanted = (2 * (len + new)).max(MIN_CACHE_CAPACITY);
                    let capacity = self.limit.map_or(wanted, |l| wanted.min(l)).max(len + new);
                    let room = Tensor::<4>::zeros(
                        [b, heads, capacity, d],
                        (&fresh.device(), fresh.dtype()),
                    );
                    match cached {
                        Some(t) if len > 0 => {
                            room.slice_assign([0..b, 0..heads, 0..len, 0..d], t.narrow(2, 0, len))
                        }
                        _ => room,
                    }
                }
            }
        };
        let write = |room: Tensor<4>, fresh: Tensor<4>| -> Tensor<4> {
            let [b, heads, _, d] = fresh.dims();
            room.slice_assign([0..b, 0..heads, len..len + new, 0..d], fresh)
        };
        let keys = write(grow(self.keys.take(), &k), k);
        let values = write(grow(self.values.take(), &v), v);
        self.len = len + new;
        self.keys = Some(keys.clone());
        self.values = Some(values.clone());
        CachedKv {
            keys,
            values,
            len: self.len,
        }
    }
}

/// Queries per attention block: the scores and the mask of one block are
/// `[B, heads, ATTENTION_CHUNK, P]`, so a long prompt never builds an `L × L` matrix.
const ATTENTION_CHUNK: usize = 512;

/// Which cached and new positions each new position sees: causal, without left padding, within
/// the attention window. Built on the device, one block of queries at a time, from one flag
/// per position: no `L × P` mask exists on the host.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    /// `[B, 1, 1, P]`: whether each position is a real token (false: left padding).
    real: Tensor<4, Bool>,
    /// Positions cached before this call.
    past: usize,
    /// The attention window, if any.
    window: Option<usize>,
    /// The whole mask, built once for all layers when the new positions fit in one block
    /// (decode, and prompts of up to [`ATTENTION_CHUNK`] tokens).
    whole: Option<Tensor<4>>,
    /// Which positions the one new position sees, `[B, P]` row-major, when the call runs one
    /// (decoding): read by the host kernels' decode attention, made once for all layers.
    last_visible: Option<Vec<bool>>,
}

impl AttentionMask {
    /// The mask of `len` new positions after `past` cached ones, with `real` (`[B, 1, 1, P]`)
    /// flagging the real tokens among all `P`.
    /// The mask of `len` new positions after `past` cached ones, with `real` (`[B][P]`
    /// row-major, `P = past + len`) flagging the real tokens among all positions.
    fn new(
        real: Vec<bool>,
        [b, past, len]: [usize; 3],
        window: Option<usize>,
        device: &Device,
    ) -> Self {
        let p = past + len;
        let last_visible = (len == 1).then(|| {
            let window = window.unwrap_or(usize::MAX);
            (0..b * p)
                .map(|i| real[i] && past - i % p < window)
                .collect()
        });
        let real = Tensor::<4, Bool>::from_data(TensorData::new(real, [b, 1, 1, p]), device);
        let mut mask = AttentionMask {
            real,
            past,
            window,
            whole: None,
            last_visible,
        };
        if len <= ATTENTION_CHUNK {
            mask.whole = Some(mask.block(0, len));
        }
        mask
    }

    /// Which of the `P` positions the last position sees, `[B, P]` row-major, when this call
    /// runs one new position (decoding); `None` otherwise.
    pub(crate) fn visible_to_last(&self) -> Option<&[bool]> {
        self.last_visible.as_deref()
    }

    /// The additive f32 mask of queries `start..start + len`, `[B, 1, len, P]`: 0 where a
    /// query sees a position, `f32::MIN` elsewhere.
    fn block(&self, start: usize, len: usize) -> Tensor<4> {
        if let Some(whole) = &self.whole
            && start == 0
            && whole.dims()[2] == len
        {
            return whole.clone();
        }
        let [b, _, _, p] = self.real.dims();
        let device = self.real.device();
        let query = (self.past + start) as i64;
        let q = Tensor::<1, Int>::arange(query..query + len as i64, &device)
            .reshape([1, 1, len, 1])
            .expand([b, 1, len, p]);
        let k = Tensor::<1, Int>::arange(0..p as i64, &device)
            .reshape([1, 1, 1, p])
            .expand([b, 1, len, p]);
        let mut allowed = k
            .clone()
            .lower_equal(q.clone())
            .bool_and(self.real.clone().expand([b, 1, len, p]));
        if let Some(window) = self.window {
            // p > q - window, i.e. q - p < window
            allowed = allowed.bool_and(k.add_scalar(window as i64).greater(q));
        }
        Tensor::<4>::zeros([b, 1, len, p], (&device, DType::F32))
            .mask_fill(allowed.bool_not(), f32::MIN)
    }
}

/// `softmax(q·kᵀ·scale + mask)·v` (the softmax in f32), returned as `[B, L, heads, d_v]`; the
/// queries run in blocks of [`ATTENTION_CHUNK`].
fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: &AttentionMask, scale: f64) -> Tensor<4> {
    let l = q.dims()[2];
    let keys = k.swap_dims(2, 3);
    let mut blocks = Vec::with_capacity(l.div_ceil(ATTENTION_CHUNK));
    for start in (0..l).step_by(ATTENTION_CHUNK) {
        let len = ATTENTION_CHUNK.min(l - start);
        let q = match len == l {
            true => q.clone(),
            false => q.clone().narrow(2, start, len),
        };
        let scores = q.matmul(keys.clone()).mul_scalar(scale);
        let dtype = scores.dtype();
        let probs = softmax(scores.cast(DType::F32) + mask.block(start, len), 3).cast(dtype);
        blocks.push(probs.matmul(v.clone()));
    }
    let out = match blocks.len() {
        1 => blocks.pop().expect("one block"),
        _ => Tensor::cat(blocks, 2),
    };
    out.swap_dims(1, 2)
}

/// Rotate-half RoPE: `x · cos + rotate_half(x) · sin`.
fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    x.clone() * cos.clone() + rotate_half(x) * sin.clone()
}

fn rotate_half(x: Tensor<4>) -> Tensor<4> {
    let [b, h, l, d] = x.dims();
    let first = x.clone().narrow(3, 0, d / 2);
    let second = x.narrow(3, d / 2, d / 2);
    Tensor::cat(vec![second.neg(), first], 3).reshape([b, h, l, d])
}

impl GroupedAttention {
    /// # Shapes
    /// - `x`: `[B, L, H]`; `cos`, `sin`: `[B, 1, L, head_dim]`; `mask`: which of the `P`
    ///   cached and new positions each new one sees → `[B, L, H]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &AttentionMask,
        cache: &mut LayerCache,
    ) -> Tensor<3> {
        let [b, l, _] = x.dims();
        let normed = |t: Tensor<3>, heads: usize, norm: &Option<RmsNorm>| match norm {
            None => t,
            Some(norm) if self.per_head_norm => norm
                .forward(t.reshape([b, l, heads, self.head_dim]))
                .reshape([b, l, heads * self.head_dim]),
            Some(norm) => norm.forward(t),
        };
        let mut q = normed(linear(&self.q_proj, x.clone()), self.heads, &self.q_norm);
        let mut k = normed(linear(&self.k_proj, x.clone()), self.kv_heads, &self.k_norm);
        let mut v = linear(&self.v_proj, x);
        if let Some(clip) = self.clip_qkv {
            q = q.clamp(-clip, clip);
            k = k.clamp(-clip, clip);
            v = v.clamp(-clip, clip);
        }
        let split =
            |t: Tensor<3>, heads: usize| t.reshape([b, l, heads, self.head_dim]).swap_dims(1, 2);
        let q = split(q, self.heads);
        let k = split(k, self.kv_heads);
        let v = split(v, self.kv_heads);
        let q = apply_rope(q, cos, sin);
        let k = apply_rope(k, cos, sin);

        let cached = cache.append(k, v);
        let scale = (self.head_dim as f64).sqrt().recip();
        if let Some(out) = decode_attention(&q, &cached, mask, scale) {
            return linear(
                &self.o_proj,
                out.reshape([b, l, self.heads * self.head_dim]),
            );
        }
        let (k, v) = cached.held();
        let repeat = self.heads / self.kv_heads;
        let expand = |t: Tensor<4>| -> Tensor<4> {
            if repeat == 1 {
                return t;
            }
            let [b, kv, p, d] = t.dims();
            t.unsqueeze_dim::<5>(2)
                .expand([b, kv, repeat, p, d])
                .reshape([b, kv * repeat, p, d])
        };
        let (k, v) = (expand(k), expand(v));
        let out = attend(q, k, v, mask, scale).reshape([b, l, self.heads * self.head_dim]);
        linear(&self.o_proj, out)
    }
}

/// DeepSeek-V3's multi-head latent attention: queries through a low-rank projection (or a
/// plain one), keys and values from one compressed latent plus a decoupled rotary part shared
/// by every head. The rotary columns of `q_b_proj` and `kv_a_proj_with_mqa` are held in the
/// halves layout rotate-half RoPE reads (a checkpoint's interleaved pairs are reordered at load).
#[derive(Module, Debug)]
pub struct LatentAttention {
    /// `[H, q_lora_rank]` (absent without a query LoRA).
    pub q_a_proj: Option<Linear>,
    /// RMSNorm over the query latent.
    pub q_a_layernorm: Option<RmsNorm>,
    /// `[q_lora_rank, heads · (nope + rope)]`, or `[H, …]` as `q_proj` without a LoRA.
    pub q_b_proj: Linear,
    /// `[H, kv_lora_rank + rope]`: the latent and the shared rotary key.
    pub kv_a_proj_with_mqa: Linear,
    /// RMSNorm over the key/value latent.
    pub kv_a_layernorm: RmsNorm,
    /// `[kv_lora_rank, heads · (nope + v)]`.
    pub kv_b_proj: Linear,
    /// `[heads · v, H]`.
    pub o_proj: Linear,
    /// Heads.
    #[module(skip)]
    pub heads: usize,
    /// Per-head query/key size without rotation (`qk_nope_head_dim`).
    #[module(skip)]
    pub nope_dim: usize,
    /// Per-head rotary size (`qk_rope_head_dim`).
    #[module(skip)]
    pub rope_dim: usize,
    /// Per-head value size (`v_head_dim`).
    #[module(skip)]
    pub v_dim: usize,
    /// Size of the key/value latent (`kv_lora_rank`).
    #[module(skip)]
    pub kv_lora_rank: usize,
}

impl LatentAttention {
    /// # Shapes
    /// As [`GroupedAttention::forward`], with `cos`, `sin`: `[B, 1, L, rope_dim]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &AttentionMask,
        cache: &mut LayerCache,
    ) -> Tensor<3> {
        let [b, l, _] = x.dims();
        let (heads, nope, rope, v_dim) = (self.heads, self.nope_dim, self.rope_dim, self.v_dim);
        let q = match (&self.q_a_proj, &self.q_a_layernorm) {
            (Some(a), Some(norm)) => linear(&self.q_b_proj, norm.forward(linear(a, x.clone()))),
            _ => linear(&self.q_b_proj, x.clone()),
        };
        let q = q.reshape([b, l, heads, nope + rope]).swap_dims(1, 2);
        let q_pass = q.clone().narrow(3, 0, nope);
        let q_rot = q.narrow(3, nope, rope);

        let latent = linear(&self.kv_a_proj_with_mqa, x);
        let kv = linear(
            &self.kv_b_proj,
            self.kv_a_layernorm
                .forward(latent.clone().narrow(2, 0, self.kv_lora_rank)),
        )
        .reshape([b, l, heads, nope + v_dim])
        .swap_dims(1, 2);
        let k_pass = kv.clone().narrow(3, 0, nope);
        let value = kv.narrow(3, nope, v_dim);
        let k_rot = latent
            .narrow(2, self.kv_lora_rank, rope)
            .reshape([b, 1, l, rope]);
        let q_rot = apply_rope(q_rot, cos, sin);
        let k_rot = apply_rope(k_rot, cos, sin).expand([b, heads, l, rope]);
        let q = Tensor::cat(vec![q_pass, q_rot], 3);
        let k = Tensor::cat(vec![k_pass, k_rot], 3);

        let cached = cache.append(k, value);
        let scale = ((nope + rope) as f64).sqrt().recip();
        let out = match decode_attention(&q, &cached, mask, scale) {
            Some(out) => out,
            None => {
                let (k, value) = cached.held();
                attend(q, k, value, mask, scale)
            }
        }
        .reshape([b, l, heads * v_dim]);
        linear(&self.o_proj, out)
    }
}

/// The attention of one decoder layer.
#[derive(Module, Debug)]
pub enum DecoderAttention {
    /// Multi-head (or grouped-query) attention: OLMoE, Qwen, Mixtral.
    Standard(GroupedAttention),
    /// Multi-head latent attention: DeepSeek-V3.
    Latent(LatentAttention),
}

impl DecoderAttention {
    /// Size of the rotary part of a head.
    pub fn rope_dim(&self) -> usize {
        match self {
            DecoderAttention::Standard(a) => a.head_dim,
            DecoderAttention::Latent(a) => a.rope_dim,
        }
    }

    /// See [`GroupedAttention::forward`].
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        mask: &AttentionMask,
        cache: &mut LayerCache,
    ) -> Tensor<3> {
        match self {
            DecoderAttention::Standard(a) => a.forward(x, cos, sin, mask, cache),
            DecoderAttention::Latent(a) => a.forward(x, cos, sin, mask, cache),
        }
    }
}

/// The MLP of one decoder layer.
// One per layer and never moved on a hot path: boxing the MoE block would only add an
// indirection to every call.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum DecoderMlp {
    /// The MoE block.
    Sparse(MoeLayer),
    /// A dense SwiGLU MLP (Qwen3-MoE's `mlp_only_layers`), as an ungated one-expert FFN.
    Dense(SharedExpert),
}

impl DecoderMlp {
    /// The MoE block, if this layer has one.
    pub fn moe(&self) -> Option<&MoeLayer> {
        match self {
            DecoderMlp::Sparse(moe) => Some(moe),
            DecoderMlp::Dense(_) => None,
        }
    }

    /// The MoE block, mutably, if this layer has one.
    pub fn moe_mut(&mut self) -> Option<&mut MoeLayer> {
        match self {
            DecoderMlp::Sparse(moe) => Some(moe),
            DecoderMlp::Dense(_) => None,
        }
    }
}

/// One decoder layer: `h = x + attn(norm(x))`, `out = h + mlp(norm(h))`.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Self-attention.
    pub self_attn: DecoderAttention,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// The MoE block or a dense MLP.
    pub mlp: DecoderMlp,
}

/// What every decoder layer of one forward call shares: the rotary tables, the mask and the
/// MoE blocks' per-call options.
struct LayerInputs<'a> {
    cos: &'a Tensor<4>,
    sin: &'a Tensor<4>,
    mask: &'a AttentionMask,
    options: &'a ForwardOptions,
    /// Fail with [`RunError::NonFinite`] at the first step whose output is not finite.
    check: bool,
}

impl DecoderLayer {
    /// Layer `index` on `x` (`[B, L, H]`) after what `cache` holds: `h = x + attn(norm(x))`,
    /// `out = h + mlp(norm(h))`, and the MoE block's trace when `trace`.
    fn forward(
        &self,
        x: Tensor<3>,
        inputs: &LayerInputs<'_>,
        cache: &mut LayerCache,
        index: usize,
        trace: bool,
    ) -> Result<(Tensor<3>, Option<MoeTrace>), RunError> {
        let attn_in = self.input_layernorm.forward(x.clone());
        let h = x + self
            .self_attn
            .forward(attn_in, inputs.cos, inputs.sin, inputs.mask, cache);
        verify(inputs.check, &h, Stage::Attention(index))?;
        let mlp_in = self.post_attention_layernorm.forward(h.clone());
        let (out, moe_trace) = match &self.mlp {
            DecoderMlp::Sparse(moe_layer) => {
                let moe = moe_layer.try_forward_with(mlp_in.clone(), inputs.options)?;
                let out = h + moe.hidden.clone();
                let moe_trace = trace.then(|| MoeTrace {
                    layer: index,
                    input: mlp_in,
                    routing: moe.routing,
                    output: moe.hidden,
                    path: moe.path,
                });
                (out, moe_trace)
            }
            DecoderMlp::Dense(mlp) => {
                let [b, l, hidden] = mlp_in.dims();
                let out = mlp.forward(mlp_in.reshape([b * l, hidden]));
                (h + out.reshape([b, l, hidden]), None)
            }
        };
        verify(inputs.check, &out, Stage::Mlp(index))?;
        Ok((out, moe_trace))
    }
}

/// What one layer's MoE block saw and produced (for parity tests and statistics).
#[derive(Debug, Clone)]
pub struct MoeTrace {
    /// The decoder layer.
    pub layer: usize,
    /// Input of the MoE block, `[B, L, H]`.
    pub input: Tensor<3>,
    /// Routing of its `B·L` tokens.
    pub routing: Routing,
    /// Output of the MoE block before the residual add, `[B, L, H]`.
    pub output: Tensor<3>,
    /// What the MoE block ran, step by step.
    pub path: CallPath,
}

/// The whole causal language model.
#[derive(Module, Debug)]
pub struct MoeCausalLm {
    /// Token embeddings, `[vocab, H]`.
    pub embed_tokens: Param<Tensor<2>>,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Output projection, `[H, vocab]`.
    pub lm_head: Param<Tensor<2>>,
    /// RoPE base.
    #[module(skip)]
    pub rope_theta: f64,
    /// Attention window (Mixtral): a position sees this many latest positions, itself
    /// included; `None` sees them all.
    #[module(skip)]
    pub sliding_window: Option<usize>,
    /// The longest sequence (cached and new positions) a call may reach
    /// (`max_position_embeddings`); `None`: no limit.
    #[module(skip)]
    pub max_positions: Option<usize>,
}

/// Keys and values of every layer plus the attention mask and positions seen so far, for one
/// batch of sequences.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// `mask[b][p]`: whether position `p` of row `b` is a real token (false: left padding).
    mask: Vec<Vec<bool>>,
}

impl KvCache {
    /// An empty cache for `batch` rows of a model with `layers` layers.
    pub fn new(layers: usize, batch: usize) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); layers],
            mask: vec![Vec::new(); batch],
        }
    }

    /// Positions held so far.
    pub fn len(&self) -> usize {
        self.mask.first().map_or(0, Vec::len)
    }

    /// Whether nothing has been run yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every position from `len` on (a call that failed leaves the cache as it was).
    fn truncate(&mut self, len: usize) {
        for row in &mut self.mask {
            row.truncate(len);
        }
        for layer in &mut self.layers {
            layer.len = layer.len.min(len);
        }
    }
}

/// Where non-finite values first appear in a forward call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The token embeddings.
    Embeddings,
    /// The attention of a decoder layer (its output added to the residual stream).
    Attention(usize),
    /// The MLP (MoE block or dense) of a decoder layer.
    Mlp(usize),
    /// The final norm and the output head.
    Head,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Embeddings => write!(f, "the token embeddings"),
            Stage::Attention(i) => write!(f, "layer {i}'s attention"),
            Stage::Mlp(i) => write!(f, "layer {i}'s MLP"),
            Stage::Head => write!(f, "the final norm and lm_head"),
        }
    }
}

/// `Ok` unless `check` and `t` holds a non-finite value, which fails at `stage`.
fn verify<const D: usize>(check: bool, t: &Tensor<D>, stage: Stage) -> Result<(), RunError> {
    match !check || all_finite(t) {
        true => Ok(()),
        false => Err(RunError::NonFinite { stage }),
    }
}

/// Whether every value of `t` is a finite number (one reduction and one read).
fn all_finite<const D: usize>(t: &Tensor<D>) -> bool {
    t.clone()
        .is_finite()
        .all()
        .into_data()
        .iter::<bool>()
        .all(|ok| ok)
}

/// Logits of a forward call and, when asked for, each layer's MoE trace.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// `[B, L, vocab]`, f32.
    pub logits: Tensor<3>,
    /// One entry per sparse layer when tracing.
    pub moe: Vec<MoeTrace>,
}

impl MoeCausalLm {
    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.dims()[0]
    }

    /// The dtype the model computes in (that of its weights).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.val().dtype()
    }

    /// Checks a call's ids, mask and cache against each other and the model.
    fn check_input(
        &self,
        ids: &[Vec<i64>],
        mask: &[Vec<bool>],
        cache: &KvCache,
    ) -> Result<(), RunError> {
        let (rows, len) = (ids.len(), ids.first().map_or(0, Vec::len));
        if rows == 0 || len == 0 {
            return Err(RunError::EmptyInput { rows, len });
        }
        if let Some((row, r)) = ids.iter().enumerate().find(|(_, r)| r.len() != len) {
            return Err(RunError::RaggedBatch {
                row,
                len: r.len(),
                expected: len,
            });
        }
        let bad_mask_row = mask.iter().position(|m| m.len() != len);
        if mask.len() != rows || bad_mask_row.is_some() {
            let row = bad_mask_row.unwrap_or(0);
            return Err(RunError::MaskShape {
                rows,
                len,
                mask_rows: mask.len(),
                row,
                mask_len: mask.get(row).map_or(0, Vec::len),
            });
        }
        if cache.mask.len() != rows || cache.layers.len() != self.layers.len() {
            return Err(RunError::CacheShape {
                cache_rows: cache.mask.len(),
                cache_layers: cache.layers.len(),
                rows,
                layers: self.layers.len(),
            });
        }
        if let Some(max) = self.max_positions
            && cache.len() + len > max
        {
            return Err(RunError::ContextTooLong {
                cached: cache.len(),
                len,
                max,
            });
        }
        let vocab = self.vocab_size();
        for (row, r) in ids.iter().enumerate() {
            if let Some((position, &id)) = r
                .iter()
                .enumerate()
                .find(|&(_, &id)| id < 0 || id as usize >= vocab)
            {
                return Err(RunError::TokenOutOfVocab {
                    id,
                    row,
                    position,
                    vocab,
                });
            }
        }
        Ok(())
    }

    /// Runs `ids` (`[B, L]`, row-major) after what `cache` holds. `mask` (`[B][L]`) marks real
    /// tokens (false for left padding); positions count the real tokens of each row, as
    /// transformers' `generate` does. Every MoE layer runs with `top_k`.
    ///
    /// # Errors
    /// Empty or ragged rows, a mask or cache of another shape, ids outside the vocabulary, or
    /// a `top_k` the MoE layers reject — checked before any work is done or state changes.
    pub fn forward(
        &self,
        ids: &[Vec<i64>],
        mask: &[Vec<bool>],
        cache: &mut KvCache,
        top_k: &TopK,
        trace: bool,
    ) -> Result<ModelOutput, RunError> {
        let options = ForwardOptions::new().with_top_k(top_k.clone());
        self.forward_with(ids, mask, cache, &options, trace)
    }

    /// [`MoeCausalLm::forward`] with every per-call choice of the MoE layers (k, router
    /// temperature, capacity, the random router's seed). The hash router is given the call's
    /// token ids.
    ///
    /// Every call checks that its logits are finite (one reduction over them). When they are
    /// not — NaN or infinite weights, an f16 overflow, a config whose values blow up — the
    /// call runs again with a check after each step to find where non-finite values first
    /// appear, leaves the cache as it was, and fails with [`RunError::NonFinite`].
    ///
    /// # Errors
    /// Those of [`MoeCausalLm::forward`], of [`MoeLayer::try_forward_with`], and
    /// [`RunError::NonFinite`].
    pub fn forward_with(
        &self,
        ids: &[Vec<i64>],
        mask: &[Vec<bool>],
        cache: &mut KvCache,
        options: &ForwardOptions,
        trace: bool,
    ) -> Result<ModelOutput, RunError> {
        self.forward_checked(ids, mask, cache, options, trace, false)
    }

    /// [`MoeCausalLm::forward_with`]; with `last_only` the logits are those of each row's
    /// last position only (`[B, 1, vocab]`): the lm_head multiplies one row per sequence.
    fn forward_checked(
        &self,
        ids: &[Vec<i64>],
        mask: &[Vec<bool>],
        cache: &mut KvCache,
        options: &ForwardOptions,
        trace: bool,
        last_only: bool,
    ) -> Result<ModelOutput, RunError> {
        self.check_input(ids, mask, cache)?;
        if let Some(moe) = self.layers.iter().find_map(|layer| layer.mlp.moe()) {
            // k is checked once here so that a bad dial fails before the cache is touched.
            moe.router
                .check_top_k(&options.top_k, ids.len() * ids[0].len(), ids[0].len())?;
        }
        let past = cache.len();
        let out = self.run(ids, mask, cache, options, trace, false, last_only);
        match out {
            Ok(out) if all_finite(&out.logits) => Ok(out),
            Ok(_) => {
                cache.truncate(past);
                let stage = match self.run(ids, mask, cache, options, false, true, last_only) {
                    Err(RunError::NonFinite { stage }) => stage,
                    Err(other) => return Err(other),
                    // the values differ between two runs (should not happen): report the head
                    Ok(_) => Stage::Head,
                };
                cache.truncate(past);
                Err(RunError::NonFinite { stage })
            }
            Err(e) => {
                cache.truncate(past);
                Err(e)
            }
        }
    }

    /// The forward pass of a checked call. With `check`, fails with [`RunError::NonFinite`] at
    /// the first step whose output holds a non-finite value.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        ids: &[Vec<i64>],
        mask: &[Vec<bool>],
        cache: &mut KvCache,
        options: &ForwardOptions,
        trace: bool,
        check: bool,
        last_only: bool,
    ) -> Result<ModelOutput, RunError> {
        let device = self.embed_tokens.device();
        let dtype = self.dtype();
        let b = ids.len();
        let l = ids[0].len();
        let past = cache.len();
        for (row, m) in cache.mask.iter_mut().zip(mask) {
            row.extend_from_slice(m);
        }

        // Positions: real tokens seen so far in the row, minus one, clamped at zero.
        let mut positions = Vec::with_capacity(b * l);
        for row in &cache.mask {
            let mut seen = row[..past].iter().filter(|&&m| m).count() as i64;
            for &m in &row[past..] {
                seen += m as i64;
                positions.push((seen - 1).max(0) as f32);
            }
        }
        let (cos, sin) = self.rope(&positions, b, l, &device);
        let (cos, sin) = (cos.cast(dtype), sin.cast(dtype));

        // Causal, padding and window mask, from one flag per position.
        let real: Vec<bool> = cache.mask.iter().flatten().copied().collect();
        let mask = AttentionMask::new(real, [b, past, l], self.sliding_window, &device);

        let flat: Vec<i64> = ids.iter().flatten().copied().collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(flat, [b * l]), &device);
        let options = options.clone().with_token_ids(ids.clone());
        let hidden_size = self.embed_tokens.dims()[1];
        let mut x = self
            .embed_tokens
            .val()
            .select(0, ids)
            .reshape([b, l, hidden_size]);
        verify(check, &x, Stage::Embeddings)?;
        let inputs = LayerInputs {
            cos: &cos,
            sin: &sin,
            mask: &mask,
            options: &options,
            check,
        };
        let mut traces = Vec::new();
        for (index, (layer, layer_cache)) in
            self.layers.iter().zip(cache.layers.iter_mut()).enumerate()
        {
            layer_cache.limit = self.max_positions;
            let (out, moe_trace) = layer.forward(x, &inputs, layer_cache, index, trace)?;
            x = out;
            traces.extend(moe_trace);
        }
        // The head reads only the positions whose logits are wanted.
        let x = match last_only {
            true => x.narrow(1, l - 1, 1),
            false => x,
        };
        let logits = product(self.norm.forward(x), &self.lm_head.val()).cast(DType::F32);
        verify(check, &logits, Stage::Head)?;
        Ok(ModelOutput {
            logits,
            moe: traces,
        })
    }

    /// `cos` and `sin` tables, `[B, 1, L, rope_dim]`, for the given positions (rotate-half RoPE;
    /// `rope_dim` is the head size of standard attention).
    fn rope(
        &self,
        positions: &[f32],
        b: usize,
        l: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let head_dim = self
            .layers
            .first()
            .map_or(2, |layer| layer.self_attn.rope_dim());
        let inv_freq = super::config::rope_frequencies(self.rope_theta, head_dim);
        let mut cos = Vec::with_capacity(positions.len() * head_dim);
        let mut sin = Vec::with_capacity(positions.len() * head_dim);
        for &p in positions {
            for _ in 0..2 {
                for &f in &inv_freq {
                    let angle = p * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<4>::from_data(
                TensorData::new(v, [b, 1, l, head_dim]),
                (device, DType::F32),
            )
        };
        (table(cos), table(sin))
    }
}

/// How each new token is chosen from the last position's logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (lowest id on ties), as transformers' greedy search.
    Greedy,
    /// A draw from `softmax(logits / temperature)` with a generator seeded by `seed`: the same
    /// seed gives the same tokens. Temperature 0 means greedy.
    Temperature {
        /// Finite and ≥ 0.
        temperature: f64,
        /// Seed of the random generator.
        seed: u64,
    },
}

/// What [`MoeCausalLm::generate`] does.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to add.
    pub max_new_tokens: usize,
    /// Experts per token in every MoE layer (the MoE-PHDS dial).
    pub top_k: TopK,
    /// Greedy or sampled.
    pub sampling: Sampling,
    /// Run one token per step against the KV cache (true) or re-run the whole sequence.
    pub use_cache: bool,
    /// Generation ends after any of these tokens (e.g. the config's `eos_token_id`).
    pub stop_tokens: Vec<i64>,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens` with the checkpoint's k and the KV cache.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerateOptions {
            max_new_tokens,
            top_k: TopK::Configured,
            sampling: Sampling::Greedy,
            use_cache: true,
            stop_tokens: Vec::new(),
        }
    }
}

/// Draws from `softmax(logits / temperature)` (`[1, vocab]` logits).
fn sample(
    logits: Tensor<2>,
    temperature: f64,
    rng: &mut StdRng,
    step: usize,
) -> Result<i64, RunError> {
    let values: Vec<f32> = logits.into_data().iter::<f32>().collect();
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() || values.iter().any(|v| v.is_nan()) {
        return Err(RunError::NonFiniteLogits { step });
    }
    let weights = values
        .iter()
        .map(|&v| ((v as f64 - max) / temperature).exp());
    let distribution =
        WeightedIndex::new(weights).map_err(|_| RunError::NonFiniteLogits { step })?;
    Ok(distribution.sample(rng) as i64)
}

/// Index of the largest value of each row of `[rows, vocab]` logits (lowest index on ties).
fn argmax_rows(logits: Tensor<2>) -> Vec<i64> {
    logits.argmax(1).into_data().iter::<i64>().collect()
}

impl MoeCausalLm {
    /// Generates up to `options.max_new_tokens` after `prompt`, calling `on_token` with each
    /// new token as soon as it is chosen, and returns them all. Generation also ends when the
    /// sequence fills the model's context ([`MoeCausalLm::max_positions`]); a prompt longer than
    /// the context is [`RunError::ContextTooLong`].
    ///
    /// # Errors
    /// As [`MoeCausalLm::forward`]; a temperature that is negative or not finite.
    pub fn generate(
        &self,
        prompt: &[i64],
        options: &GenerateOptions,
        on_token: &mut dyn FnMut(i64),
    ) -> Result<Vec<i64>, RunError> {
        let (tokens, _) = self.decode(prompt, options, false, on_token)?;
        Ok(tokens)
    }

    /// Greedy decoding of one prompt: `max_new` tokens, each the argmax of the last position's
    /// logits. With `use_cache` every step runs one token against the KV cache; without it
    /// every step re-runs the whole sequence. Returns the new tokens and the logits that chose
    /// them (`[max_new, vocab]`).
    pub fn generate_greedy(
        &self,
        prompt: &[i64],
        max_new: usize,
        top_k: &TopK,
        use_cache: bool,
    ) -> Result<(Vec<i64>, Tensor<2>), RunError> {
        let options = GenerateOptions {
            top_k: top_k.clone(),
            use_cache,
            ..GenerateOptions::greedy(max_new)
        };
        self.decode(prompt, &options, true, &mut |_| {})
    }

    /// The decoding loop; keeps each step's logits when `keep_logits`.
    fn decode(
        &self,
        prompt: &[i64],
        options: &GenerateOptions,
        keep_logits: bool,
        on_token: &mut dyn FnMut(i64),
    ) -> Result<(Vec<i64>, Tensor<2>), RunError> {
        let mut sampler = match options.sampling {
            Sampling::Temperature { temperature, .. }
                if !(temperature.is_finite() && temperature >= 0.0) =>
            {
                return Err(RunError::InvalidTemperature(temperature));
            }
            Sampling::Temperature { temperature, seed } if temperature > 0.0 => {
                Some((temperature, StdRng::seed_from_u64(seed)))
            }
            _ => None,
        };
        let layers = self.layers.len();
        let vocab = self.vocab_size();
        let mut sequence = prompt.to_vec();
        let mut cache = KvCache::new(layers, 1);
        let mut step_logits = Vec::new();
        for step in 0..options.max_new_tokens {
            // Generation ends at the model's context: step `s` runs `prompt + s` positions.
            if step > 0
                && self
                    .max_positions
                    .is_some_and(|max| prompt.len() + step > max)
            {
                break;
            }
            // With the cache, only the tokens it has not seen; without, the whole sequence.
            let ids = match (options.use_cache, step) {
                (true, 0) | (false, _) => sequence.clone(),
                (true, _) => sequence[sequence.len() - 1..].to_vec(),
            };
            if !options.use_cache {
                cache = KvCache::new(layers, 1);
            }
            let mask = vec![vec![true; ids.len()]];
            let out = self.forward_checked(
                std::slice::from_ref(&ids),
                &mask,
                &mut cache,
                &ForwardOptions::new().with_top_k(options.top_k.clone()),
                false,
                true,
            )?;
            let last = out.logits.reshape([1, vocab]);
            let token = match &mut sampler {
                None => argmax_rows(last.clone())[0],
                Some((temperature, rng)) => sample(last.clone(), *temperature, rng, step)?,
            };
            sequence.push(token);
            on_token(token);
            if keep_logits {
                step_logits.push(last);
            }
            if options.stop_tokens.contains(&token) {
                break;
            }
        }
        let logits = match step_logits.is_empty() {
            true => Tensor::<2>::zeros([0, vocab], (&self.embed_tokens.device(), DType::F32)),
            false => Tensor::cat(step_logits, 0),
        };
        Ok((sequence[prompt.len()..].to_vec(), logits))
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    /// `[1, 2, l, 3]` keys numbered from `first`.
    fn numbered(first: usize, l: usize) -> Tensor<4> {
        let values: Vec<f32> = (0..2 * l * 3).map(|i| (first + i) as f32).collect();
        Tensor::from_data(TensorData::new(values, [1, 2, l, 3]), &Device::flex())
    }

    fn host(t: Tensor<4>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    /// Appends of several lengths hold exactly the concatenation of what was appended; the
    /// capacity grows by doubling from 64, never past the model's context (nor below what is
    /// held), and truncation only moves the length.
    #[test]
    fn the_cache_holds_what_was_appended_within_its_limit() {
        for limit in [None, Some(5), Some(200)] {
            let mut cache = LayerCache {
                limit,
                ..LayerCache::default()
            };
            let parts = [
                numbered(0, 3),
                numbered(100, 1),
                numbered(200, 1),
                numbered(300, 2),
            ];
            let mut want: Vec<Tensor<4>> = Vec::new();
            for (i, part) in parts.iter().enumerate() {
                let cached = cache.append(part.clone(), part.clone());
                want.push(part.clone());
                let len: usize = want.iter().map(|t| t.dims()[2]).sum();
                assert_eq!(cached.len, len);
                let capacity = cached.keys.dims()[2];
                let expected = match (limit, i) {
                    (Some(5), 0) => 5,
                    (Some(5), 3) => 7, // past the context: what is held
                    (Some(5), _) => 5,
                    _ => 64,
                };
                assert_eq!(capacity, expected, "limit {limit:?} after part {i}");
                let (k, v) = cached.held();
                let all = host(Tensor::cat(want.clone(), 2));
                assert_eq!(host(k), all, "limit {limit:?} after part {i}");
                assert_eq!(host(v), all);
            }
            // a failed call forgets the last part; the next append overwrites it
            cache.len = 4;
            want.truncate(2);
            let cached = cache.append(numbered(400, 1), numbered(400, 1));
            want.push(numbered(400, 1));
            let (k, _) = cached.held();
            assert_eq!(host(k), host(Tensor::cat(want, 2)));
        }
    }
}
