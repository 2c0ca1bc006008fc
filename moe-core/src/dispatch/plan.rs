//! Step 2 of a forward pass, **plan**: sort the `(token, slot)` pairs by expert, on the device.

use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor};

use super::DispatchPath;
use crate::error::MoeError;

/// Where every `(token, slot)` pair goes in expert order, and how to come back.
///
/// Pair `p = token * k + slot`. Sorting is stable: pairs routed to the same expert keep token
/// order (the sort key is `expert * T·k + p`, so ties cannot occur). Unused slots (expert id `E`)
/// sort after every real expert and are not counted.
///
/// # Shapes
/// - `sorted_pairs`, `sorted_tokens`, `inverse`: `[T·k]`
/// - `counts`, `offsets`: `[E]`
#[derive(Debug, Clone)]
pub struct DispatchPlan {
    /// Tokens `T`.
    pub num_tokens: usize,
    /// Slots per token `k`.
    pub top_k: usize,
    /// Experts `E`.
    pub num_experts: usize,
    /// The pair stored at each row of the expert-sorted order.
    pub sorted_pairs: Tensor<1, Int>,
    /// The token each expert-sorted row reads (`sorted_pairs / k`).
    pub sorted_tokens: Tensor<1, Int>,
    /// The expert-sorted row of each pair: `sorted_pairs[inverse[p]] == p`.
    pub inverse: Tensor<1, Int>,
    /// Rows routed to each expert.
    pub counts: Tensor<1, Int>,
    /// Exclusive prefix sum of `counts`: each expert's first row.
    pub offsets: Tensor<1, Int>,
}

impl DispatchPlan {
    /// Builds the plan for `expert_ids` (`[T, k]`, ids in `0..=num_experts`).
    ///
    /// With 32-bit device integers, `(E + 1) · T · k` must stay below 2³¹.
    pub fn new(expert_ids: &Tensor<2, Int>, num_experts: usize) -> Self {
        let [num_tokens, top_k] = expert_ids.dims();
        let pairs = num_tokens * top_k;
        let device = expert_ids.device();
        let int = device.settings().int_dtype;
        let int_dtype = DType::from(int);
        let ids = expert_ids.clone().reshape([pairs]).cast(int);
        let pair_index = Tensor::<1, Int>::arange(0..pairs as i64, &device).cast(int);

        let sort_key = ids.clone().mul_scalar(pairs as i64) + pair_index.clone();
        let sorted_pairs = sort_key.argsort(0).cast(int);
        let inverse = Tensor::<1, Int>::zeros([pairs], (&device, int_dtype)).scatter(
            0,
            sorted_pairs.clone(),
            pair_index,
            IndexingUpdateOp::Assign,
        );

        let ones = Tensor::<1, Int>::ones([pairs], (&device, int_dtype));
        let counts = Tensor::<1, Int>::zeros([num_experts + 1], (&device, int_dtype))
            .scatter(0, ids, ones, IndexingUpdateOp::Add)
            .narrow(0, 0, num_experts);
        let offsets = counts.clone().cumsum(0) - counts.clone();
        Self::from_parts(num_tokens, top_k, [counts, offsets, sorted_pairs, inverse])
    }

    /// The plan from `[counts, offsets, sorted_pairs, inverse]` (`[E]`, `[E]`, `[T·k]`,
    /// `[T·k]`).
    fn from_parts(num_tokens: usize, top_k: usize, parts: [Tensor<1, Int>; 4]) -> Self {
        let [counts, offsets, sorted_pairs, inverse] = parts;
        DispatchPlan {
            num_tokens,
            top_k,
            num_experts: counts.dims()[0],
            sorted_tokens: sorted_pairs.clone().div_scalar(top_k as i64),
            sorted_pairs,
            inverse,
            counts,
            offsets,
        }
    }

    /// The plan built on `path`: [`DispatchPlan::new`] with tensor ops, or one launch of the
    /// `expert_plan` kernel (a stable counting sort). Both give the same plan.
    pub fn build(
        expert_ids: &Tensor<2, Int>,
        num_experts: usize,
        path: DispatchPath,
    ) -> Result<Self, MoeError> {
        if path != DispatchPath::Kernels {
            return Ok(Self::new(expert_ids, num_experts));
        }
        let [num_tokens, top_k] = expert_ids.dims();
        let int = expert_ids.device().settings().int_dtype;
        let ids = expert_ids.clone().reshape([num_tokens * top_k]).cast(int);
        let parts = moe_kernels::expert_plan(ids, num_experts)?;
        Ok(Self::from_parts(num_tokens, top_k, parts))
    }

    /// The per-expert row counts on the host: **the one host read of a tensor-op forward
    /// pass**, needed to cut the sorted rows into one segment per expert (the kernel path
    /// reads the counts on the device instead).
    pub fn counts_to_host(&self) -> Vec<usize> {
        self.counts
            .to_data()
            .iter::<i64>()
            .map(|c| c.max(0) as usize)
            .collect()
    }
}
