//! Step 2, **plan**: the (token, slot) pairs sorted by expert (histogram, offsets, stable
//! placement, inverse), on the device. Tensor-op twin `moe_core::dispatch::DispatchPlan`, host
//! kernel `crate::host::HostPlan`.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::IntTensorOps;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::launch::{address_type, elementwise, empty_like};

/// Pairs one unit of the plan kernels scans. Short loops keep the work parallel; one unit per
/// expert scanning every pair was also cut short on lavapipe past about 2^16 loop iterations
/// (measured: wrong plans from 64 000 pairs up).
const PLAN_CHUNK: usize = 1024;

/// Step 1 of the routing plan, one unit per (expert `e` in `0..=experts`, chunk `c` of `chunk`
/// pairs): `counts[e · chunks + c]` = pairs of chunk `c` routed to `e`. Ids above `experts`
/// count as `experts` (unused slots). Row-major over (expert, chunk), so the exclusive prefix
/// sum of `counts` is where each unit's pairs start in the expert-sorted order.
#[cube(launch, address_type = "dynamic")]
pub(crate) fn chunk_counts_kernel<I: Numeric>(
    ids: &Tensor<I>,
    counts: &mut Tensor<I>,
    pairs: usize,
    experts: usize,
    chunk: usize,
    chunks: usize,
    #[define(I)] _dtype: ElemType,
) {
    let e = ABSOLUTE_POS / chunks;
    let c = ABSOLUTE_POS % chunks;
    if e > experts {
        terminate!();
    }
    let start = c * chunk;
    let end = usize::min(start + chunk, pairs);
    let mut mine = 0usize;
    for p in start..end {
        if usize::min(usize::cast_from(ids[p]), experts) == e {
            mine += 1;
        }
    }
    counts[ABSOLUTE_POS] = I::cast_from(mine);
}

/// Step 2, one unit per (expert, chunk) as in [`chunk_counts_kernel`], given `inclusive`, the
/// inclusive prefix sum of its counts: writes the unit's pairs, in pair order, at their
/// positions in the expert-sorted order and each pair's position into the inverse — a stable
/// counting sort, no atomics. The first chunk of each real expert also writes its count and
/// offset.
///
/// `out` = `[counts (E) | offsets (E) | sorted pairs (P) | inverse (P)]`.
#[cube(launch, address_type = "dynamic")]
pub(crate) fn place_pairs_kernel<I: Numeric>(
    ids: &Tensor<I>,
    counts: &Tensor<I>,
    inclusive: &Tensor<I>,
    out: &mut Tensor<I>,
    pairs: usize,
    experts: usize,
    chunk: usize,
    chunks: usize,
    #[define(I)] _dtype: ElemType,
) {
    let e = ABSOLUTE_POS / chunks;
    let c = ABSOLUTE_POS % chunks;
    if e > experts {
        terminate!();
    }
    let first = usize::cast_from(inclusive[ABSOLUTE_POS]) - usize::cast_from(counts[ABSOLUTE_POS]);
    if c == 0 && e < experts {
        let last = e * chunks + chunks - 1;
        out[e] = I::cast_from(usize::cast_from(inclusive[last]) - first);
        out[experts + e] = I::cast_from(first);
    }
    let sorted = 2 * experts;
    let inverse = sorted + pairs;
    let start = c * chunk;
    let end = usize::min(start + chunk, pairs);
    let mut position = first;
    for p in start..end {
        if usize::min(usize::cast_from(ids[p]), experts) == e {
            out[sorted + position] = I::cast_from(p);
            out[inverse + p] = I::cast_from(position);
            position += 1;
        }
    }
}

pub(super) fn expert_plan(ids: CubeTensor, num_experts: usize) -> CubeTensor {
    let ids = into_contiguous(ids);
    let pairs = ids.meta.shape()[0];
    let out = empty_like(&ids, [2 * num_experts + 2 * pairs], ids.dtype);
    // Every unit scans one chunk of pairs for one expert (short loops, many units).
    let chunks = pairs.div_ceil(PLAN_CHUNK).max(1);
    let units = (num_experts + 1) * chunks;
    let counts = empty_like(&ids, [units], ids.dtype);
    let (cube_count, cube_dim) = elementwise(&ids, units);
    let dtype = dtype_to_storage_type(ids.dtype);
    chunk_counts_kernel::launch(
        &ids.client,
        cube_count.clone(),
        cube_dim,
        address_type(&[&ids, &counts]),
        ids.clone().into_tensor_arg(),
        counts.clone().into_tensor_arg(),
        pairs,
        num_experts,
        PLAN_CHUNK,
        chunks,
        dtype,
    );
    let inclusive = <CubeBackend as IntTensorOps<CubeBackend>>::int_cumsum(counts.clone(), 0);
    place_pairs_kernel::launch(
        &out.client,
        cube_count,
        cube_dim,
        address_type(&[&ids, &counts, &inclusive, &out]),
        ids.into_tensor_arg(),
        counts.into_tensor_arg(),
        inclusive.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        pairs,
        num_experts,
        PLAN_CHUNK,
        chunks,
        dtype,
    );
    out
}
