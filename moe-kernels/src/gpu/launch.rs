//! `CubeBackend`'s side of the extension trait: each operation's launch lives with its kernel,
//! in the file of its step (`plan.rs`, `gather.rs`, `grouped.rs`, `combine.rs`, `epilogue.rs`);
//! here are the helpers they share.

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use super::MoeKernelOps;

/// A new tensor of `shape` in `dtype` on `like`'s device, its values unset (every launch
/// writes all of its output).
pub(super) fn empty_like<const D: usize>(
    like: &CubeTensor,
    shape: [usize; D],
    dtype: DType,
) -> CubeTensor {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::new(shape),
        dtype,
    )
}

/// The geometry of a launch of `units` units, one per output element (or vector): the cube
/// shape and how many cubes.
pub(super) fn elementwise(tensor: &CubeTensor, units: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(&tensor.client, units);
    (
        calculate_cube_count_elemwise(&tensor.client, units, cube_dim),
        cube_dim,
    )
}

/// The widest vector the device likes for `dtype` that divides `width` (1 at worst).
pub(super) fn vector_size(tensor: &CubeTensor, dtype: DType, width: usize) -> usize {
    tensor
        .client
        .io_optimized_vector_sizes(dtype.size())
        .filter(|&v| v > 0 && width.is_multiple_of(v))
        .max()
        .unwrap_or(1)
}

/// The widest index addressing any of `tensors` needs.
pub(super) fn address_type(tensors: &[&CubeTensor]) -> AddressType {
    tensors
        .iter()
        .map(|t| t.required_address_type())
        .max()
        .unwrap_or_default()
}

impl MoeKernelOps for CubeBackend {
    fn moe_route_epilogue(
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
        super::epilogue::route_epilogue(
            logits, bias, k, n_group, topk_group, scale, sigmoid, biased, normalize,
        )
    }

    fn moe_grouped_matmul(
        a: CubeTensor,
        w: CubeTensor,
        counts: CubeTensor,
        transposed: bool,
    ) -> CubeTensor {
        super::grouped::grouped_matmul(a, w, counts, transposed)
    }

    fn moe_grouped_swiglu(
        a: CubeTensor,
        gate: CubeTensor,
        up: CubeTensor,
        counts: CubeTensor,
    ) -> CubeTensor {
        super::grouped::grouped_swiglu(a, gate, up, counts)
    }

    fn moe_segment_outer(a: CubeTensor, g: CubeTensor, counts: CubeTensor) -> CubeTensor {
        super::grouped::segment_outer(a, g, counts)
    }

    fn moe_gather_rows(x: CubeTensor, indices: CubeTensor) -> CubeTensor {
        super::gather::gather_rows(x, indices)
    }

    fn moe_weighted_combine(
        rows: CubeTensor,
        sources: CubeTensor,
        weights: CubeTensor,
    ) -> CubeTensor {
        super::combine::weighted_combine(rows, sources, weights)
    }

    fn moe_expert_plan(ids: CubeTensor, num_experts: usize) -> CubeTensor {
        super::plan::expert_plan(ids, num_experts)
    }
}
