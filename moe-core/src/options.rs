//! Per-call choices of a forward pass: the k dial, the router temperature, a capacity limit and
//! what the hash and random routers read. One loaded layer serves every combination; nothing is
//! rebuilt between calls.

use burn::tensor::{Int, Tensor};

use crate::error::MoeError;
use crate::router::TopK;

/// An expert capacity: how many `(token, slot)` pairs one expert takes in one forward call.
/// Pairs beyond it are dropped (GShard / Switch semantics): that slot contributes nothing and
/// the token keeps only its other experts, or its residual in the caller's model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    /// `ceil(factor · T · k / E)` pairs per expert for `T` tokens with `k` slots each: 1.0 is
    /// exactly the balanced share.
    Factor(f64),
    /// A fixed number of pairs per expert.
    Tokens(usize),
}

impl Capacity {
    /// Pairs one expert takes for `tokens` tokens of `top_k` slots over `num_experts` experts.
    pub fn per_expert(self, tokens: usize, top_k: usize, num_experts: usize) -> usize {
        match self {
            Capacity::Tokens(c) => c,
            Capacity::Factor(f) => {
                let share = (tokens * top_k) as f64 / num_experts.max(1) as f64;
                (f * share).ceil() as usize
            }
        }
    }

    pub(crate) fn validate(self) -> Result<(), MoeError> {
        match self {
            Capacity::Factor(f) if !f.is_finite() || f <= 0.0 => {
                Err(MoeError::InvalidCapacityFactor { value: f })
            }
            Capacity::Tokens(0) => Err(MoeError::InvalidSetting {
                name: "Capacity::Tokens",
                expected: "at least 1 pair per expert",
                value: 0.0,
            }),
            _ => Ok(()),
        }
    }
}

/// Everything a caller may choose per forward call (see [`crate::MoeLayer::try_forward_with`]).
///
/// ```
/// use moe_core::{Capacity, ForwardOptions, TopK};
/// let options = ForwardOptions::new()
///     .with_top_k(TopK::Fixed(2))
///     .with_temperature(2.0)
///     .with_capacity(Capacity::Factor(1.25));
/// assert_eq!(options.top_k, TopK::Fixed(2));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Experts per token (token-choice, hash and random routers; the expert-choice router
    /// decides per expert and ignores it).
    pub top_k: TopK,
    /// Divides the router logits before the softmax or sigmoid (a dense-to-sparse schedule
    /// anneals it); `None` is 1. [`crate::Routing::logits`] stay the raw logits.
    pub temperature: Option<f64>,
    /// Drop pairs beyond this capacity per expert; `None` is dropless.
    pub capacity: Option<Capacity>,
    /// Token ids `[T]` (flattened like the input), read by the hash router.
    pub token_ids: Option<Tensor<1, Int>>,
    /// Seed of this call's draw for the random router (advance it every training step).
    pub seed: u64,
}

impl ForwardOptions {
    /// The configured k, temperature 1, dropless, no token ids, seed 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// With this k dial.
    pub fn with_top_k(mut self, top_k: TopK) -> Self {
        self.top_k = top_k;
        self
    }

    /// With this router temperature.
    pub fn with_temperature(mut self, temperature: f64) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// With a capacity limit per expert.
    pub fn with_capacity(mut self, capacity: Capacity) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// With the token ids the hash router reads, `[T]`.
    pub fn with_token_ids(mut self, token_ids: Tensor<1, Int>) -> Self {
        self.token_ids = Some(token_ids);
        self
    }

    /// With the random router's seed for this call.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The temperature, checked: finite and positive.
    pub(crate) fn checked_temperature(&self) -> Result<f64, MoeError> {
        match self.temperature {
            None => Ok(1.0),
            Some(t) if t.is_finite() && t > 0.0 => Ok(t),
            Some(t) => Err(MoeError::InvalidTemperature { value: t }),
        }
    }
}
