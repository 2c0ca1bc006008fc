//! The backend extension: one trait, implemented for `CubeBackend` (the kernels), generated for
//! `Fusion` (deferred like any other op) and written by hand for `Autodiff` (the backward passes).

//!
//! One file per step, each holding its device code and its launch: `plan.rs`, `gather.rs`
//! (permute), `grouped.rs` (experts), `combine.rs`, `epilogue.rs` (router); `launch.rs` the
//! helpers they share and the trait's `CubeBackend` implementation, `backward.rs` every
//! backward pass.

mod backward;
mod combine;
mod epilogue;
mod gather;
mod grouped;
mod launch;
mod plan;

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Dispatch, DispatchDevice, backend_extension};
use burn::tensor::{Device, Int, Shape, Tensor};

/// The MoE operations the kernels provide.
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait MoeKernelOps: burn::backend::Backend {
    /// `out[i, :] = x[indices[i], :]`.
    #[fusion(dtype = x, shape = Shape::new([indices[0], x[1]]))]
    fn moe_gather_rows(x: FloatTensor<Self>, indices: IntTensor<Self>) -> FloatTensor<Self>;

    /// `out[t, :] = Σ_j weights[t, j] · rows[sources[t, j], :]`.
    #[fusion(dtype = rows, shape = Shape::new([sources[0], rows[1]]))]
    fn moe_weighted_combine(
        rows: FloatTensor<Self>,
        sources: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The routing plan of `ids` (`[P]`, expert per pair, `num_experts` for unused slots):
    /// `[counts (E) | offsets (E) | sorted pairs (P) | inverse (P)]`.
    #[fusion(dtype = ids, shape = Shape::new([2 * *num_experts + 2 * ids[0]]))]
    fn moe_expert_plan(ids: IntTensor<Self>, num_experts: usize) -> IntTensor<Self>;

    /// Grouped GEMM over expert segments (`counts` rows each, in order; the rows after the last
    /// segment are zeros): `out[r] = a[r] · w[e]`, with `w` `[E, K, N]`, or `[E, N, K]` read
    /// transposed.
    #[fusion(dtype = a, shape = Shape::new([a[0], if *transposed { w[1] } else { w[2] }]))]
    fn moe_grouped_matmul(
        a: FloatTensor<Self>,
        w: FloatTensor<Self>,
        counts: IntTensor<Self>,
        transposed: bool,
    ) -> FloatTensor<Self>;

    /// SwiGLU's first half over expert segments: `silu(a[r] · gate[e]) ⊙ (a[r] · up[e])`.
    #[fusion(dtype = a, shape = Shape::new([a[0], gate[2]]))]
    fn moe_grouped_swiglu(
        a: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        counts: IntTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The router epilogue on f32 `logits` `[T, E]`: `[T, 2k]` = `[ids as f32 | weights]` per
    /// token (see `route_epilogue_kernel`). `bias` (`[E]`) is read only when `biased`.
    #[fusion(dtype = logits, shape = Shape::new([logits[0], 2 * *k]))]
    #[allow(clippy::too_many_arguments)]
    fn moe_route_epilogue(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        k: usize,
        n_group: usize,
        topk_group: usize,
        scale: f32,
        sigmoid: bool,
        biased: bool,
        normalize: bool,
    ) -> FloatTensor<Self>;

    /// Per-segment outer products `out[e] = Σ_{r in segment e} a[r]ᵀ g[r]` (`[E, K, N]`).
    #[fusion(dtype = a, shape = Shape::new([counts[0], a[1], g[1]]))]
    fn moe_segment_outer(
        a: FloatTensor<Self>,
        g: FloatTensor<Self>,
        counts: IntTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Whether `device` (or the device an autodiff device wraps) is a CubeCL device.
pub(crate) fn is_cube_device(device: &Device) -> bool {
    fn cube(device: &DispatchDevice) -> bool {
        match device {
            DispatchDevice::Cube(_) => true,
            DispatchDevice::Autodiff(inner) => cube(inner),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
    cube(device.as_dispatch())
}

/// The largest buffer the CubeCL device behind `device` binds (its `max_page_size`: the
/// smaller of the largest buffer and the largest storage binding); `None` for other devices.
pub(crate) fn max_buffer_bytes(device: &Device) -> Option<u64> {
    fn find(device: &DispatchDevice) -> Option<u64> {
        match device {
            DispatchDevice::Cube(cube) => Some(cube.client().properties().memory.max_page_size),
            DispatchDevice::Autodiff(inner) => find(inner),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
    find(device.as_dispatch())
}

pub(crate) fn gather_rows(x: Tensor<2>, indices: Tensor<1, Int>) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::moe_gather_rows(
        x.into_dispatch(),
        indices.into_dispatch(),
    ))
}

/// `(counts [E], offsets [E], sorted pairs [P], inverse [P])` of `ids` (`[P]`).
pub(crate) fn expert_plan(ids: Tensor<1, Int>, num_experts: usize) -> [Tensor<1, Int>; 4] {
    let pairs = ids.dims()[0];
    let all: Tensor<1, Int> =
        Tensor::from_dispatch(Dispatch::moe_expert_plan(ids.into_dispatch(), num_experts));
    [
        all.clone().narrow(0, 0, num_experts),
        all.clone().narrow(0, num_experts, num_experts),
        all.clone().narrow(0, 2 * num_experts, pairs),
        all.narrow(0, 2 * num_experts + pairs, pairs),
    ]
}

pub(crate) fn weighted_combine(
    rows: Tensor<2>,
    sources: Tensor<2, Int>,
    weights: Tensor<2>,
) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::moe_weighted_combine(
        rows.into_dispatch(),
        sources.into_dispatch(),
        weights.into_dispatch(),
    ))
}

/// Whether a grouped GEMM over `rows` rows and `experts` segments fits the launch grid (row
/// tiles along its second axis, at most 65 535).
pub(crate) fn grouped_grid_fits(rows: usize, experts: usize) -> bool {
    grouped::grouped_grid_fits(rows, experts)
}

pub(crate) fn grouped_matmul(
    a: Tensor<2>,
    w: Tensor<3>,
    counts: Tensor<1, Int>,
    transposed: bool,
) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::moe_grouped_matmul(
        a.into_dispatch(),
        w.into_dispatch(),
        counts.into_dispatch(),
        transposed,
    ))
}

pub(crate) fn grouped_swiglu(
    a: Tensor<2>,
    gate: Tensor<3>,
    up: Tensor<3>,
    counts: Tensor<1, Int>,
) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::moe_grouped_swiglu(
        a.into_dispatch(),
        gate.into_dispatch(),
        up.into_dispatch(),
        counts.into_dispatch(),
    ))
}

pub(crate) fn segment_outer(a: Tensor<2>, g: Tensor<2>, counts: Tensor<1, Int>) -> Tensor<3> {
    Tensor::from_dispatch(Dispatch::moe_segment_outer(
        a.into_dispatch(),
        g.into_dispatch(),
        counts.into_dispatch(),
    ))
}

/// `[ids as f32 | weights]` of the router epilogue (see `MoeKernelOps::moe_route_epilogue`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn route_epilogue(
    logits: Tensor<2>,
    bias: Tensor<1>,
    k: usize,
    n_group: usize,
    topk_group: usize,
    scale: f32,
    sigmoid: bool,
    biased: bool,
    normalize: bool,
) -> Tensor<2> {
    Tensor::from_dispatch(Dispatch::moe_route_epilogue(
        logits.into_dispatch(),
        bias.into_dispatch(),
        k,
        n_group,
        topk_group,
        scale,
        sigmoid,
        biased,
        normalize,
    ))
}
