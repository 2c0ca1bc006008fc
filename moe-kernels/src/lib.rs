//! # moe-kernels
//!
//! CubeCL kernels for the MoE hot path, written once for Burn's `CubeBackend` (the one
//! implementation that wgpu, CUDA and ROCm run) and reached through a Burn backend extension,
//! in the order of a forward pass:
//!
//! - [`route_epilogue`] — the router after its logits (scores, selection bias, group-limited
//!   top-k, renormalisation, scaling) in one pass per token.
//! - [`expert_plan`] — histogram, exclusive offsets, the stable permutation of (token, slot)
//!   pairs by expert and its inverse, in one launch (a counting sort, no atomics).
//! - [`gather_rows`] — permute: copy rows of `x` into expert order, vectorised along the row.
//! - [`grouped_swiglu`], [`grouped_matmul`] — the experts: one launch runs every expert on its
//!   segment of expert-sorted rows (a tiled GEMM whose tiles each belong to one expert, found
//!   on the device from the counts: no host read, no per-expert launch), the SwiGLU gate and up
//!   projections fused with the activation. [`segment_outer`] is their weight gradient.
//! - [`weighted_combine`] — unpermute + combine: each output row gathers its k expert rows and
//!   sums them weighted, accumulating in f32, without atomics.
//!
//! Each has a tensor-op twin in `moe-core` (composed router ops, argsort plan, `select`,
//! per-expert matmuls, gather + weighted sum) that gives the same answer and runs everywhere;
//! [`available`] says whether the kernels run on a device. All but the router epilogue are
//! differentiable on an autodiff device: the backward of a gather is a scatter-add, the
//! combine gives gradients to the rows and to the weights, the grouped GEMMs to their input
//! (the same kernels reading the weights transposed) and to the weights ([`segment_outer`]).
//!
//! Without the `cube` feature (switched on by `wgpu` or `cuda`) nothing here runs and
//! [`available`] is false for every device.
//!
//! [`host`] holds the **host kernels**, the same steps on the CPU for the flex backend (plan,
//! experts with the gather fused and the weights read in place, combine), on plain slices;
//! its `flex` feature adds the bridge from Burn flex tensors.
#![warn(missing_docs)]

use burn::tensor::{Device, Int, Tensor};

#[cfg(feature = "cube")]
mod gpu;
pub mod host;

/// Why a kernel was not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// The device is not a CubeCL device, or this build has no CubeCL backend.
    #[error(
        "{op}: the MoE kernels do not run on {device} (they run on CubeCL devices: wgpu, cuda; CubeCL kernels compiled in: {compiled})"
    )]
    Unsupported {
        /// The kernel.
        op: &'static str,
        /// The device asked for.
        device: String,
        /// Whether this build has the CubeCL kernels at all.
        compiled: &'static str,
    },
    /// Input shapes that do not fit together.
    #[error("{op}: {reason}")]
    Shape {
        /// The kernel.
        op: &'static str,
        /// The shapes involved.
        reason: String,
    },
    /// Float inputs of different dtypes.
    #[error("{op}: inputs have different dtypes ({first:?} and {second:?})")]
    DTypes {
        /// The kernel.
        op: &'static str,
        /// Dtype of the first input.
        first: burn::tensor::DType,
        /// Dtype of the other input.
        second: burn::tensor::DType,
    },
    /// Inputs on different devices.
    #[error("{op}: inputs are on different devices ({first} and {second})")]
    Devices {
        /// The kernel.
        op: &'static str,
        /// Device of the first input.
        first: String,
        /// Device of the other input.
        second: String,
    },
}

/// Whether the kernels of this crate run on `device` (a CubeCL device, possibly with autodiff,
/// in a build with the `cube` feature).
pub fn available(device: &Device) -> bool {
    #[cfg(feature = "cube")]
    {
        gpu::is_cube_device(device)
    }
    #[cfg(not(feature = "cube"))]
    {
        let _ = device;
        false
    }
}

/// The largest tensor, in bytes, a CubeCL device can hold in one buffer and bind to a kernel
/// (lavapipe: 128 MiB); `None` on devices without such a limit (CPU backends) or without the
/// `cube` feature. A larger tensor fails inside the runtime (wgpu poisons the device), so
/// loaders check against this first.
pub fn max_buffer_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cube")]
    {
        gpu::max_buffer_bytes(device)
    }
    #[cfg(not(feature = "cube"))]
    {
        let _ = device;
        None
    }
}

/// Whether `device` is an autodiff device (whose tensors may carry gradients).
pub fn is_autodiff(device: &Device) -> bool {
    matches!(
        device.as_dispatch(),
        burn::backend::DispatchDevice::Autodiff(_)
    )
}

fn check_device(op: &'static str, device: &Device) -> Result<(), KernelError> {
    if available(device) {
        return Ok(());
    }
    Err(KernelError::Unsupported {
        op,
        device: format!("{device:?}"),
        compiled: if cfg!(feature = "cube") { "yes" } else { "no" },
    })
}

fn same_device(op: &'static str, a: &Device, b: &Device) -> Result<(), KernelError> {
    match a == b {
        true => Ok(()),
        false => Err(KernelError::Devices {
            op,
            first: format!("{a:?}"),
            second: format!("{b:?}"),
        }),
    }
}

/// Permute: `out[i, :] = x[indices[i], :]`.
///
/// An index outside `0..rows` gives a zero row (the kernel never reads out of bounds).
///
/// # Shapes
/// - `x`: `[rows, width]`, any float dtype the device computes in
/// - `indices`: `[m]`
/// - output: `[m, width]`, `x`'s dtype
pub fn gather_rows(x: Tensor<2>, indices: Tensor<1, Int>) -> Result<Tensor<2>, KernelError> {
    const OP: &str = "gather_rows";
    check_device(OP, &x.device())?;
    same_device(OP, &x.device(), &indices.device())?;
    #[cfg(feature = "cube")]
    {
        Ok(gpu::gather_rows(x, indices))
    }
    #[cfg(not(feature = "cube"))]
    {
        unreachable!("check_device refuses every device without the cube feature")
    }
}

/// Unpermute + combine: `out[t, :] = Σ_j weights[t, j] · rows[sources[t, j], :]`, accumulated in
/// f32 in slot order. A source outside `0..m` contributes nothing.
///
/// # Shapes
/// - `rows`: `[m, width]` (the experts' outputs in expert order)
/// - `sources`: `[t, k]`, the row of each (token, slot) pair
/// - `weights`: `[t, k]`, any float dtype
/// - output: `[t, width]`, `rows`' dtype
pub fn weighted_combine(
    rows: Tensor<2>,
    sources: Tensor<2, Int>,
    weights: Tensor<2>,
) -> Result<Tensor<2>, KernelError> {
    const OP: &str = "weighted_combine";
    check_device(OP, &rows.device())?;
    same_device(OP, &rows.device(), &sources.device())?;
    same_device(OP, &rows.device(), &weights.device())?;
    if sources.dims() != weights.dims() {
        return Err(KernelError::Shape {
            op: OP,
            reason: format!(
                "sources {:?} and weights {:?} differ",
                sources.dims(),
                weights.dims()
            ),
        });
    }
    #[cfg(feature = "cube")]
    {
        Ok(gpu::weighted_combine(rows, sources, weights))
    }
    #[cfg(not(feature = "cube"))]
    {
        unreachable!("check_device refuses every device without the cube feature")
    }
}

/// The routing plan of `ids` (`[P]`: the expert of each (token, slot) pair, `num_experts` for
/// an unused slot): `[counts, offsets, sorted_pairs, inverse]`.
///
/// - `counts[e]`: pairs routed to expert `e`; `offsets[e]`: pairs routed to a lower expert.
/// - `sorted_pairs`: the pairs ordered by expert, pair order kept within an expert (stable);
///   unused slots last.
/// - `inverse[p]`: the position of pair `p` in `sorted_pairs`.
///
/// # Shapes
/// - `ids`: `[P]` → `[E]`, `[E]`, `[P]`, `[P]`, in `ids`' dtype
pub fn expert_plan(
    ids: Tensor<1, Int>,
    num_experts: usize,
) -> Result<[Tensor<1, Int>; 4], KernelError> {
    const OP: &str = "expert_plan";
    check_device(OP, &ids.device())?;
    if num_experts == 0 {
        return Err(KernelError::Shape {
            op: OP,
            reason: "num_experts must be at least 1".into(),
        });
    }
    #[cfg(feature = "cube")]
    {
        Ok(gpu::expert_plan(ids, num_experts))
    }
    #[cfg(not(feature = "cube"))]
    {
        unreachable!("check_device refuses every device without the cube feature")
    }
}

fn same_dtype(op: &'static str, a: &Tensor<2>, b: &Tensor<3>) -> Result<(), KernelError> {
    match a.dtype() == b.dtype() {
        true => Ok(()),
        false => Err(KernelError::DTypes {
            op,
            first: a.dtype(),
            second: b.dtype(),
        }),
    }
}

/// Checks the segment counts of a grouped call over `rows` rows and `experts` matrices.
fn check_segments(
    op: &'static str,
    rows: usize,
    experts: usize,
    counts: &Tensor<1, Int>,
) -> Result<(), KernelError> {
    let [e] = counts.dims();
    if e != experts {
        return Err(KernelError::Shape {
            op,
            reason: format!("counts has {e} entries for {experts} experts"),
        });
    }
    #[cfg(feature = "cube")]
    if !gpu::grouped_grid_fits(rows, experts) {
        return Err(KernelError::Shape {
            op,
            reason: format!(
                "{rows} rows in {experts} segments need more than 65535 row tiles of the launch grid"
            ),
        });
    }
    let _ = rows;
    Ok(())
}

/// Grouped expert GEMM: `a`'s rows are cut, in order, into one segment per expert
/// (`counts[e]` rows for expert `e`), and every row is multiplied by its expert's matrix:
/// `out[r, :] = a[r, :] · w[e]` (`w[e]ᵀ` when `transposed`). Rows after the last segment give
/// zeros; a segment running past the last row is cut there. One launch, accumulating in f32;
/// the counts stay on the device.
///
/// # Shapes
/// - `a`: `[P, K]`
/// - `w`: `[E, K, N]`, or `[E, N, K]` when `transposed`, `a`'s dtype
/// - `counts`: `[E]`, non-negative
/// - output: `[P, N]`, `a`'s dtype
pub fn grouped_matmul(
    a: Tensor<2>,
    w: Tensor<3>,
    counts: Tensor<1, Int>,
    transposed: bool,
) -> Result<Tensor<2>, KernelError> {
    const OP: &str = "grouped_matmul";
    check_device(OP, &a.device())?;
    same_device(OP, &a.device(), &w.device())?;
    same_device(OP, &a.device(), &counts.device())?;
    same_dtype(OP, &a, &w)?;
    let [rows, k] = a.dims();
    let [experts, w_in, w_out] = w.dims();
    let (w_k, _n) = if transposed {
        (w_out, w_in)
    } else {
        (w_in, w_out)
    };
    if w_k != k {
        return Err(KernelError::Shape {
            op: OP,
            reason: format!(
                "a {:?} has {k} columns but w {:?}{} has {w_k} rows",
                a.dims(),
                w.dims(),
                if transposed { " (transposed)" } else { "" },
            ),
        });
    }
    check_segments(OP, rows, experts, &counts)?;
    #[cfg(feature = "cube")]
    {
        Ok(gpu::grouped_matmul(a, w, counts, transposed))
    }
    #[cfg(not(feature = "cube"))]
    {
        unreachable!("check_device refuses every device without the cube feature")
    }
}

/// Grouped SwiGLU input half: for each row `r` of expert `e`'s segment (as in
/// [`grouped_matmul`]), `out[r, :] = silu(a[r, :] · gate[e]) ⊙ (a[r, :] · up[e])`, both
/// products and the activation in one pass over the f32 accumulators.
///
/// # Shapes
/// - `a`: `[P, K]`; `gate`, `up`: `[E, K, N]`; `counts`: `[E]` → `[P, N]`
pub fn grouped_swiglu(
    a: Tensor<2>,
    gate: Tensor<3>,
    up: Tensor<3>,
    counts: Tensor<1, Int>,
) -> Result<Tensor<2>, KernelError> {
    const OP: &str = "grouped_swiglu";
    check_device(OP, &a.device())?;
    for other in [gate.device(), up.device(), counts.device()] {
        same_device(OP, &a.device(), &other)?;
    }
    same_dtype(OP, &a, &gate)?;
    same_dtype(OP, &a, &up)?;
    let [rows, k] = a.dims();
    let [experts, gate_k, _] = gate.dims();
    if gate_k != k || up.dims() != gate.dims() {
        return Err(KernelError::Shape {
            op: OP,
            reason: format!(
                "a {:?}, gate {:?} and up {:?} do not fit ([P, K], [E, K, N], [E, K, N])",
                a.dims(),
                gate.dims(),
                up.dims()
            ),
        });
    }
    check_segments(OP, rows, experts, &counts)?;
    #[cfg(feature = "cube")]
    {
        Ok(gpu::grouped_swiglu(a, gate, up, counts))
    }
    #[cfg(not(feature = "cube"))]
    {
        unreachable!("check_device refuses every device without the cube feature")
    }
}

/// Per-segment outer products, the weight gradient of [`grouped_matmul`]:
/// `out[e] = Σ_{r in segment e} a[r, :]ᵀ · g[r, :]`, accumulated in f32; an empty segment gives
/// zeros.
///
/// # Shapes
/// - `a`: `[P, K]`; `g`: `[P, N]`; `counts`: `[E]` → `[E, K, N]`
pub fn segment_outer(
    a: Tensor<2>,
    g: Tensor<2>,
    counts: Tensor<1, Int>,
) -> Result<Tensor<3>, KernelError> {
    const OP: &str = "segment_outer";
    check_device(OP, &a.device())?;
    same_device(OP, &a.device(), &g.device())?;
    same_device(OP, &a.device(), &counts.device())?;
    if a.dtype() != g.dtype() {
        return Err(KernelError::DTypes {
            op: OP,
            first: a.dtype(),
            second: g.dtype(),
        });
    }
    let [rows, _] = a.dims();
    if g.dims()[0] != rows {
        return Err(KernelError::Shape {
            op: OP,
            reason: format!("a {:?} and g {:?} have different rows", a.dims(), g.dims()),
        });
    }
    let [experts] = counts.dims();
    if experts == 0 {
        return Err(KernelError::Shape {
            op: OP,
            reason: "counts must have at least one entry".into(),
        });
    }
    #[cfg(feature = "cube")]
    {
        Ok(gpu::segment_outer(a, g, counts))
    }
    #[cfg(not(feature = "cube"))]
    {
        unreachable!("check_device refuses every device without the cube feature")
    }
}

/// What the fused router epilogue computes after the logits (see [`route_epilogue`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpilogueSpec {
    /// Experts per token.
    pub top_k: usize,
    /// Sigmoid scores (DeepSeek-V3) instead of a softmax over the experts.
    pub sigmoid: bool,
    /// Divide the selected weights by their sum (+ 1e-20).
    pub normalize: bool,
    /// Multiplies the final weights.
    pub scale: f32,
    /// Group-limited selection: `(n_group, topk_group)`; at most 32 groups.
    pub groups: Option<(usize, usize)>,
}

/// The fused router epilogue, one pass per token over the f32 `logits`: scores (softmax or
/// sigmoid), selection values (scores + `bias`), group-limited selection, the top k (ties to
/// the lower expert, as Burn's `topk`), their unbiased scores as weights, renormalisation and
/// scaling — what the router's composed tensor ops give, in one launch.
///
/// The weights carry no gradient: on an autodiff device they are constants (the router uses
/// its composed ops where it needs gradients).
///
/// # Shapes
/// - `logits`: `[T, E]`, f32; `bias`: `[E]`
/// - output: expert ids `[T, k]` (the device's int dtype) and weights `[T, k]` (f32)
pub fn route_epilogue(
    logits: Tensor<2>,
    bias: Option<Tensor<1>>,
    spec: EpilogueSpec,
) -> Result<(Tensor<2, Int>, Tensor<2>), KernelError> {
    const OP: &str = "route_epilogue";
    check_device(OP, &logits.device())?;
    let [tokens, experts] = logits.dims();
    let k = spec.top_k;
    let shape = |reason: String| KernelError::Shape { op: OP, reason };
    if logits.dtype() != burn::tensor::DType::F32 {
        return Err(shape(format!(
            "logits must be f32, not {:?}",
            logits.dtype()
        )));
    }
    if experts == 0 || k == 0 || k > experts {
        return Err(shape(format!("k = {k} is not in 1..={experts}")));
    }
    let (n_group, topk_group) = spec.groups.unwrap_or((0, 0));
    if spec.groups.is_some() {
        if n_group == 0 || n_group > 32 || experts % n_group != 0 {
            return Err(shape(format!(
                "{n_group} groups: must divide the {experts} experts and be at most 32"
            )));
        }
        if topk_group == 0 || topk_group > n_group || k > topk_group * (experts / n_group) {
            return Err(shape(format!(
                "k = {k} from {topk_group} of {n_group} groups of {} experts",
                experts / n_group
            )));
        }
    }
    if let Some(b) = &bias {
        same_device(OP, &logits.device(), &b.device())?;
        if b.dims() != [experts] {
            return Err(shape(format!("bias {:?} for {experts} experts", b.dims())));
        }
    }
    let _ = tokens;
    #[cfg(feature = "cube")]
    {
        let device = logits.device();
        let biased = bias.is_some();
        let bias = bias
            .map(|b| b.cast(burn::tensor::DType::F32))
            .unwrap_or_else(|| Tensor::zeros([1], &device));
        let out = gpu::route_epilogue(
            logits,
            bias,
            k,
            n_group,
            topk_group,
            spec.scale,
            spec.sigmoid,
            biased,
            spec.normalize,
        );
        let ids = out.clone().narrow(1, 0, k).int();
        Ok((ids, out.narrow(1, k, k)))
    }
    #[cfg(not(feature = "cube"))]
    {
        unreachable!("check_device refuses every device without the cube feature")
    }
}
