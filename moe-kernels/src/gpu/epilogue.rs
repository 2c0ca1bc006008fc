//! Step 1, the router's **epilogue**: top-k (with selection bias and group limit), weights,
//! renormalisation and scaling from the logits, one unit per token, on the device. Tensor-op
//! twin: `moe_core::Router`'s composed epilogue (also its backward pass).

// `#[cube]` functions are written in CubeCL's subset of Rust, which has no `div_ceil`,
// `checked_div`, iterator adapters or compound assignment on every type; the lints that
// ask for those do not apply to device code.
#![allow(
    clippy::manual_div_ceil,
    clippy::manual_checked_ops,
    clippy::explicit_counter_loop,
    clippy::assign_op_pattern
)]

use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::launch::{address_type, elementwise, empty_like};

/// One router score: `sigmoid(logit)`, or the softmax entry given the row's max and
/// `Σ exp(logit − max)`.
#[cube]
fn router_score(logit: f32, max: f32, total: f32, #[comptime] sigmoid: bool) -> f32 {
    if sigmoid {
        1.0f32 / (1.0f32 + f32::exp(-logit))
    } else {
        f32::exp(logit - max) / total
    }
}

/// Whether the expert with logit `a` (index `i`) ranks before the one with logit `b` (index
/// `j`) by their f32 scores, ties to the lower index — compared on the logits wherever that
/// gives the same answer, on the scores where two logits may share a score: logits within
/// `1e-5` (relative) of each other, softmax entries below `e^-80` of the row's largest, or
/// sigmoids that round to 1 (logits above 15) or to denormals (below −80).
#[cube]
fn score_before(
    a: f32,
    i: usize,
    b: f32,
    j: usize,
    max: f32,
    total: f32,
    #[comptime] sigmoid: bool,
) -> bool {
    let mut magnitude = f32::abs(a);
    if magnitude < 1.0f32 {
        magnitude = 1.0f32;
    }
    let mut exact = f32::abs(a - b) <= 1e-5f32 * magnitude;
    if sigmoid {
        exact = exact || (a > 15.0f32 && b > 15.0f32) || (a < -80.0f32 && b < -80.0f32);
    } else {
        exact = exact || (a - max < -80.0f32 && b - max < -80.0f32);
    }
    let mut before = a > b || (a == b && i < j);
    if exact {
        let sa = router_score(a, max, total, sigmoid);
        let sb = router_score(b, max, total, sigmoid);
        before = sa > sb || (sa == sb && i < j);
    }
    before
}

/// The router epilogue, one unit per token: from the f32 router logits, scores (softmax over
/// the row, or sigmoid), selection values (scores + `bias` when `biased`), group-limited
/// selection when `n_group > 0` (the `topk_group` groups with the largest sum of their two
/// best selection values; groups tie to the lower index), the top k (descending, ties to the
/// lower expert, as Burn's `topk`), their unbiased scores as weights, renormalised when
/// `normalize` (sum + 1e-20) and multiplied by `scale`.
///
/// `out[t] = [ids as f32 (k) | weights (k)]`. Nothing is kept but the last pick: pass `j`
/// takes the largest value after pass `j − 1`'s pick in (value desc, expert asc) order. Without
/// a bias the passes compare logits (the scores rank alike), so a token costs one pass of
/// exponentials (softmax) and `k` passes of comparisons.
#[cube(launch, address_type = "dynamic")]
pub(crate) fn route_epilogue_kernel(
    logits: &Tensor<f32>,
    bias: &Tensor<f32>,
    out: &mut Tensor<f32>,
    tokens: usize,
    experts: usize,
    k: usize,
    n_group: usize,
    topk_group: usize,
    scale: f32,
    #[comptime] sigmoid: bool,
    #[comptime] biased: bool,
    #[comptime] normalize: bool,
) {
    let t = ABSOLUTE_POS;
    if t >= tokens {
        terminate!();
    }
    let row = t * experts;
    // Softmax statistics (no infinities: WGSL cannot be relied on to make them).
    let mut max = logits[row];
    let mut total = 0.0f32;
    if !sigmoid {
        for i in 1..experts {
            if logits[row + i] > max {
                max = logits[row + i];
            }
        }
        for i in 0..experts {
            total += f32::exp(logits[row + i] - max);
        }
    }
    // Groups kept, as a bit mask (all when there are no groups).
    let mut kept = 0u32;
    if n_group > 0 {
        let size = experts / n_group;
        for _p in 0..topk_group {
            let mut best_score = 0.0f32;
            let mut best = n_group;
            for g in 0..n_group {
                if (kept >> g as u32) & 1u32 == 0u32 {
                    let mut first = 0.0f32;
                    let mut second = 0.0f32;
                    let mut seen = 0usize;
                    for i in g * size..g * size + size {
                        let mut v = router_score(logits[row + i], max, total, sigmoid);
                        if biased {
                            v += bias[i];
                        }
                        if seen == 0 || v > first {
                            second = first;
                            first = v;
                        } else if seen == 1 || v > second {
                            second = v;
                        }
                        seen += 1;
                    }
                    let mut score = first;
                    if size > 1 {
                        score += second;
                    }
                    if best == n_group || score > best_score {
                        best_score = score;
                        best = g;
                    }
                }
            }
            kept |= 1u32 << best as u32;
        }
    }
    // Top k over the kept experts.
    let mut last_value = 0.0f32;
    let mut last = experts;
    let mut sum = 0.0f32;
    for j in 0..k {
        let mut best_value = 0.0f32;
        let mut best = experts;
        for i in 0..experts {
            let mut allowed = true;
            if n_group > 0 {
                let g = i / (experts / n_group);
                allowed = (kept >> g as u32) & 1u32 == 1u32;
            }
            if allowed {
                if biased {
                    let v = router_score(logits[row + i], max, total, sigmoid) + bias[i];
                    let after = last == experts || v < last_value || (v == last_value && i > last);
                    if after && (best == experts || v > best_value) {
                        best_value = v;
                        best = i;
                    }
                } else {
                    // Without a bias the scores rank as the logits do (softmax and sigmoid
                    // are increasing), but for logits whose f32 scores coincide.
                    let v = logits[row + i];
                    let after = last == experts
                        || score_before(last_value, last, v, i, max, total, sigmoid);
                    if after
                        && (best == experts
                            || score_before(v, i, best_value, best, max, total, sigmoid))
                    {
                        best_value = v;
                        best = i;
                    }
                }
            }
        }
        let best_score = router_score(logits[row + best], max, total, sigmoid);
        out[t * 2 * k + j] = f32::cast_from(best);
        out[t * 2 * k + k + j] = best_score;
        sum += best_score;
        last_value = best_value;
        last = best;
    }
    for j in 0..k {
        let at = t * 2 * k + k + j;
        let mut w = out[at];
        if normalize {
            w = w / (sum + 1e-20f32);
        }
        out[at] = w * scale;
    }
}

// The arguments of `MoeKernelOps::moe_route_epilogue`, which it implements.
#[allow(clippy::too_many_arguments)]
pub(super) fn route_epilogue(
    logits: CubeTensor,
    bias: CubeTensor,
    k: usize,
    n_group: usize,
    topk_group: usize,
    scale: f32,
    sigmoid: bool,
    biased: bool,
    normalize: bool,
) -> CubeTensor {
    let logits = into_contiguous(logits);
    let bias = into_contiguous(bias);
    let (tokens, experts) = (logits.meta.shape()[0], logits.meta.shape()[1]);
    let out = empty_like(&logits, [tokens, 2 * k], logits.dtype);
    if tokens == 0 || k == 0 {
        return out;
    }
    let (cube_count, cube_dim) = elementwise(&logits, tokens);
    let address = address_type(&[&logits, &bias, &out]);
    let client = logits.client.clone();
    route_epilogue_kernel::launch(
        &client,
        cube_count,
        cube_dim,
        address,
        logits.into_tensor_arg(),
        bias.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        tokens,
        experts,
        k,
        n_group,
        topk_group,
        scale,
        sigmoid,
        biased,
        normalize,
    );
    out
}
