//! Dropless dispatch: **plan** (sort pairs by expert), **permute** (gather rows into expert
//! order), **experts** (one segment per expert), **unpermute + combine** (gather back and sum
//! the k weighted rows of each token). Deterministic: no scatter-add touches activations.

pub(crate) mod decision;
#[cfg(feature = "flex")]
mod host;
mod plan;
pub(crate) mod strategy;

// `CallPath`, `DispatchPath` and `DispatchStrategy` are the crate root's.
pub use decision::{FUSED_EPILOGUE_MAX_GROUPS, FUSED_EPILOGUE_MAX_TOKENS, Fallback, StepPath};
pub(crate) use decision::{decide, epilogue, experts_step};
#[cfg(feature = "flex")]
pub(crate) use host::run_expert;
pub use plan::DispatchPlan;
pub(crate) use strategy::{DispatchPath, DispatchStrategy};

use burn::tensor::{DType, Tensor};

use crate::error::MoeError;
use crate::experts::Experts;
use crate::router::Routing;

/// Step 3, **permute**: the first `active_rows` expert-sorted rows of `x` (the rows of unused
/// slots, which sort last, are left out).
///
/// # Shapes
/// - `x`: `[T, d_model]` → `[active_rows, d_model]`
pub fn permute(
    x: Tensor<2>,
    plan: &DispatchPlan,
    active_rows: usize,
    path: DispatchPath,
) -> Result<Tensor<2>, MoeError> {
    let rows = plan.sorted_tokens.clone().narrow(0, 0, active_rows);
    Ok(match path {
        DispatchPath::Kernels => moe_kernels::gather_rows(x, rows)?,
        DispatchPath::TensorOps | DispatchPath::HostKernels => x.select(0, rows),
    })
}

/// Step 5, **unpermute + combine**: gathers each token's k expert outputs back into token order
/// and sums them weighted by the routing weights, accumulating in f32. Rows missing from
/// `expert_rows` (unused slots) count as zero.
///
/// # Shapes
/// - `expert_rows`: `[active_rows, d_model]` in expert order
/// - `weights`: `[T, k]`
/// - output: `[T, d_model]`, in `expert_rows`' dtype
pub fn combine(
    expert_rows: Tensor<2>,
    plan: &DispatchPlan,
    weights: &Tensor<2>,
    path: DispatchPath,
) -> Result<Tensor<2>, MoeError> {
    let (t, k) = (plan.num_tokens, plan.top_k);
    if path == DispatchPath::Kernels {
        // Slots whose row is past `active_rows` (unused slots) are skipped by the kernel.
        let sources = plan.inverse.clone().reshape([t, k]);
        return Ok(moe_kernels::weighted_combine(
            expert_rows,
            sources,
            weights.clone(),
        )?);
    }
    let [active_rows, d_model] = expert_rows.dims();
    let dtype = expert_rows.dtype();
    let rows = if active_rows < t * k {
        let device = expert_rows.device();
        let unused = Tensor::<2>::zeros([t * k - active_rows, d_model], (&device, dtype));
        Tensor::cat(vec![expert_rows, unused], 0)
    } else {
        expert_rows
    };
    let per_slot = rows
        .select(0, plan.inverse.clone())
        .reshape([t, k, d_model]);
    let weighted = per_slot.cast(DType::F32) * weights.clone().cast(DType::F32).unsqueeze_dim(2);
    Ok(weighted.sum_dim(1).reshape([t, d_model]).cast(dtype))
}

/// Steps 2–5 for one routing: plan, permute, experts, combine, on the implementation `path`
/// that the call's one decision chose (`decision.rs`; it runs that one or fails, it never
/// falls back).
///
/// - [`DispatchPath::Kernels`]: the plan kernel, then every pair's row is permuted (unused
///   slots last) and [`Experts::forward_grouped`] runs all experts in grouped-GEMM launches
///   whose tiles find their expert from the counts on the device. Nothing is read back to
///   the host and no launch is made per expert.
/// - [`DispatchPath::HostKernels`]: one host read of the routing, then the `moe_kernels::host`
///   plan, experts (gather fused, weights read in place, threads across experts) and combine.
///   the call's decision sends expert weights it cannot read in place (f16, a strided view) to the
///   tensor-op path.
/// - [`DispatchPath::TensorOps`]: the tensor-op plan, **one host read** of the per-expert
///   counts, then [`Experts::forward_segments`] (one matmul chain per non-empty expert).
///
/// # Shapes
/// - `x`: `[T, d_model]` → `[T, d_model]`
pub fn run_experts(
    experts: &Experts,
    x: Tensor<2>,
    routing: &Routing,
    path: DispatchPath,
) -> Result<Tensor<2>, MoeError> {
    if path == DispatchPath::HostKernels {
        #[cfg(feature = "flex")]
        return host::run_experts(experts, x, routing);
        #[cfg(not(feature = "flex"))]
        return Err(MoeError::KernelsUnavailable {
            device: format!("{:?} (built without the `flex` feature)", x.device()),
        });
    }
    let plan = DispatchPlan::build(&routing.expert_ids, routing.num_experts, path)?;
    let expert_rows = match path {
        DispatchPath::Kernels => {
            let pairs = plan.num_tokens * plan.top_k;
            let sorted_rows = permute(x, &plan, pairs, path)?;
            experts.forward_grouped(sorted_rows, plan.counts.clone())?
        }
        DispatchPath::TensorOps | DispatchPath::HostKernels => {
            let counts = plan.counts_to_host();
            let active_rows = counts.iter().sum();
            let sorted_rows = permute(x, &plan, active_rows, path)?;
            experts.forward_segments(sorted_rows, &counts)
        }
    };
    combine(expert_rows, &plan, &routing.weights, path)
}
