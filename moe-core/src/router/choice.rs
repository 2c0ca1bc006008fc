//! The routers besides token choice: expert choice, hash and random. Each returns the same
//! `[T, k]` ids and weights as the top-k epilogue, with the id `E` and the weight 0 in slots a
//! token does not use, so every dispatch path runs them unchanged.

use burn::tensor::{Bool, Device, IndexingUpdateOp, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::error::MoeError;
use crate::options::Capacity;

/// Tokens one expert takes under expert choice: `ceil(capacity_factor · T / E)`, at least 1 and
/// at most `T`.
pub fn expert_choice_capacity(tokens: usize, num_experts: usize, capacity_factor: f64) -> usize {
    Capacity::Factor(capacity_factor)
        .per_expert(tokens, 1, num_experts)
        .clamp(1, tokens.max(1))
}

/// Expert choice: every expert takes the tokens with its highest scores. A token's slots hold
/// the experts that took it, best score first, then unused slots; there are as many slots as
/// the most-chosen token needs (one host read of that count).
///
/// # Shapes
/// - `scores`: `[T, E]` → ids `[T, k]`, weights `[T, k]` with `k ≤ E`
pub(super) fn expert_choice(
    scores: Tensor<2>,
    capacity_factor: f64,
) -> (Tensor<2, Int>, Tensor<2>) {
    let [t, e] = scores.dims();
    let device = scores.device();
    if t == 0 {
        let ids = Tensor::<2, Int>::zeros([0, 1], &device);
        return (ids, Tensor::<2>::zeros([0, 1], &device));
    }
    let capacity = expert_choice_capacity(t, e, capacity_factor);
    let fixed = scores.clone().detach();
    // Top tokens of every expert along the token axis, on the contiguous scores: Burn 0.22.1's
    // wgpu `topk_with_indices` returns wrong indices for a transposed input.
    let (_, taken) = fixed.clone().topk_with_indices(capacity, 0); // [C, E]
    let picked = Tensor::<2>::zeros([t, e], &device).scatter(
        0,
        taken,
        Tensor::<2>::ones([capacity, e], &device),
        IndexingUpdateOp::Assign,
    ); // [T, E], 1 where the expert took the token
    let most = picked
        .clone()
        .sum_dim(1)
        .max()
        .into_data()
        .iter::<f32>()
        .next()
        .unwrap_or(1.0);
    let slots = (most.round() as usize).clamp(1, e);
    // Taken experts first (key ≥ 1), best score first; the rest (key 0) after.
    let key = picked.clone() * fixed.add_scalar(1.0);
    let (_, ids) = key.topk_with_indices(slots, 1);
    let unused = picked.gather(1, ids.clone()).lower_elem(0.5);
    let weights = scores.gather(1, ids.clone()).mask_fill(unused.clone(), 0.0);
    (ids.mask_fill(unused, e as i64), weights)
}

/// Token ids on the host, checked: one per token, none negative.
pub(super) fn host_token_ids(
    ids: Option<&Tensor<1, Int>>,
    tokens: usize,
) -> Result<Vec<u64>, MoeError> {
    let ids = ids.ok_or(MoeError::MissingTokenIds { tokens })?;
    let got = ids.dims()[0];
    if got != tokens {
        return Err(MoeError::TokenIdsLength {
            expected: tokens,
            got,
        });
    }
    ids.to_data()
        .iter::<i64>()
        .enumerate()
        .map(|(position, id)| {
            u64::try_from(id).map_err(|_| MoeError::NegativeTokenId { position, id })
        })
        .collect()
}

/// The experts of one token under hash routing: the first `k` of a permutation of `0..E` fixed
/// by `(seed, id)`, so the experts at a smaller k are a prefix of those at a larger one.
pub fn hash_experts(seed: u64, token_id: u64, num_experts: usize, k: usize) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed ^ token_id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order = rand::seq::index::sample(&mut rng, num_experts, num_experts).into_vec();
    order.truncate(k);
    order
}

/// The experts of every token under random routing: `k_t` distinct experts per token, drawn in
/// token order from one generator seeded by `(seed, call_seed)`.
pub fn random_experts(
    seed: u64,
    call_seed: u64,
    num_experts: usize,
    per_token_k: &[usize],
) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed ^ call_seed.rotate_left(32) ^ 0x5851_F42D_4C95_7F2D);
    per_token_k
        .iter()
        .map(|&k| rand::seq::index::sample(&mut rng, num_experts, k).into_vec())
        .collect()
}

/// Uploads per-token expert lists as `[T, slots]` ids and `1/k_t` weights, unused slots last.
pub(super) fn uniform_routing(
    experts: &[Vec<usize>],
    slots: usize,
    num_experts: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2>) {
    let t = experts.len();
    let mut ids = vec![num_experts as i64; t * slots];
    let mut weights = vec![0.0f32; t * slots];
    for (row, chosen) in experts.iter().enumerate() {
        let w = 1.0 / chosen.len().max(1) as f32;
        for (slot, &expert) in chosen.iter().enumerate() {
            ids[row * slots + slot] = expert as i64;
            weights[row * slots + slot] = w;
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [t, slots]), device),
        Tensor::from_data(TensorData::new(weights, [t, slots]), device),
    )
}

/// Drops every `(token, slot)` pair past `capacity` in its expert, in GShard's priority order:
/// all first slots in token order, then all second slots, and so on. Returns the kept ids
/// (dropped and unused slots hold `E`), the kept weights (0 where dropped) and the pairs dropped
/// per expert `[E]`.
pub(crate) fn drop_over_capacity(
    ids: Tensor<2, Int>,
    weights: Tensor<2>,
    num_experts: usize,
    capacity: usize,
) -> (Tensor<2, Int>, Tensor<2>, Tensor<1, Int>) {
    let [t, k] = ids.dims();
    // Slot-major order: pair (slot j, token i) at j·T + i.
    let ordered = ids.clone().transpose().reshape([t * k]);
    // One-hot by comparison (`one_hot` reads its input back to check it): [kT, E + 1]; an id
    // above E matches no column and counts nowhere.
    let columns = Tensor::<1, Int>::arange(0..num_experts as i64 + 1, &ids.device());
    let one_hot = ordered
        .clone()
        .unsqueeze_dim::<2>(1)
        .equal(columns.unsqueeze_dim(0))
        .int();
    let position = one_hot
        .clone()
        .cumsum(0)
        .gather(1, ordered.clone().reshape([t * k, 1]))
        .reshape([t * k]); // 1-based rank of the pair in its expert
    let real = ordered.lower_elem(num_experts as i64);
    let over: Tensor<1, Bool> = position.greater_elem(capacity as i64).bool_and(real);
    let dropped = one_hot
        .narrow(1, 0, num_experts)
        .mask_fill(
            over.clone()
                .bool_not()
                .reshape([t * k, 1])
                .expand([t * k, num_experts]),
            0,
        )
        .sum_dim(0)
        .reshape([num_experts]);
    let over = over.reshape([k, t]).transpose(); // back to [T, k]
    (
        ids.mask_fill(over.clone(), num_experts as i64),
        weights.mask_fill(over, 0.0),
        dropped,
    )
}
