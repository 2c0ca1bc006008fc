//! Host side of the kernels on `CubeBackend`: contiguous inputs, output allocation, vector size
//! and launch geometry.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::IntTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use super::MoeKernelOps;
use super::kernels::{
    GEMV_ROWS, GEMV_UNITS, SIDE, TILE_M, TILE_N, chunk_counts_kernel, gather_rows_kernel,
    grouped_gemv_kernel, grouped_matmul_kernel, place_pairs_kernel, route_epilogue_kernel,
    segment_outer_kernel, tile_schedule_kernel, weighted_combine_kernel,
};

/// Pairs one unit of the plan kernels scans. Short loops keep the work parallel; one unit per
/// expert scanning every pair was also cut short on lavapipe past about 2^16 loop iterations
/// (measured: wrong plans from 64 000 pairs up).
const PLAN_CHUNK: usize = 1024;

/// The widest vector the device likes for `dtype` that divides `width` (1 at worst).
fn vector_size(tensor: &CubeTensor, dtype: DType, width: usize) -> usize {
    tensor
        .client
        .io_optimized_vector_sizes(dtype.size())
        .filter(|&v| v > 0 && width.is_multiple_of(v))
        .max()
        .unwrap_or(1)
}

fn address_type(tensors: &[&CubeTensor]) -> AddressType {
    tensors
        .iter()
        .map(|t| t.required_address_type())
        .max()
        .unwrap_or_default()
}

/// The grouped-GEMM tile schedule of `rows` rows cut into segments of `counts` (see
/// `tile_schedule_kernel`): `[2 · (E + 2)]`, in `counts`' dtype.
fn tile_schedule(counts: &CubeTensor, rows: usize, block: usize) -> CubeTensor {
    let counts = into_contiguous(counts.clone());
    let experts = counts.meta.shape()[0];
    let schedule = empty_device_dtype(
        counts.client.clone(),
        counts.device.clone(),
        Shape::new([2 * (experts + 2)]),
        counts.dtype,
    );
    tile_schedule_kernel::launch(
        &counts.client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(1),
        address_type(&[&counts, &schedule]),
        counts.clone().into_tensor_arg(),
        schedule.clone().into_tensor_arg(),
        rows,
        experts,
        block,
        dtype_to_storage_type(counts.dtype),
    );
    schedule
}

/// Most row tiles of `block` rows that `rows` rows in `experts` segments (plus the rows of
/// none) can take.
fn max_row_tiles(rows: usize, experts: usize, block: usize) -> usize {
    rows / block + experts + 1
}

/// The longest average segment the GEMV-like kernel takes. Measured on lavapipe (E 64, H 2048,
/// I 128, SwiGLU then down, one call): at 64 rows per expert 4.6 s against 16.9 s for the
/// shared-memory tiles (whose barriers lavapipe runs slowly); at 8 rows 0.9 s against 4.2 s
/// for one matmul chain per expert.
const GEMV_MAX_AVERAGE: usize = 64;

/// Rows per unit of the grouped GEMM (its tiles have `SIDE ·` that many rows): the smallest of
/// 1, 2, 4 whose tile holds the average segment, so that decoding (a row or two per expert)
/// does not compute 64-row tiles.
pub(super) fn rows_per_unit(rows: usize, experts: usize) -> usize {
    let average = rows.div_ceil(experts.max(1));
    [1, 2, 4]
        .into_iter()
        .find(|r| SIDE * r >= average)
        .unwrap_or(TILE_M / SIDE)
}

/// Whether the grouped GEMM's launch grid holds every row tile (second axis ≤ 65 535) with
/// the smallest tiles either kernel uses.
pub(super) fn grouped_grid_fits(rows: usize, experts: usize) -> bool {
    max_row_tiles(rows, experts, 4) <= u16::MAX as usize
}

/// One launch of `grouped_matmul_kernel`: `w2` is the up projection when gated.
fn launch_grouped(
    a: CubeTensor,
    w: CubeTensor,
    w2: Option<CubeTensor>,
    counts: CubeTensor,
    transposed: bool,
) -> CubeTensor {
    let a = into_contiguous(a);
    let w = into_contiguous(w);
    let (rows, kdim) = (a.meta.shape()[0], a.meta.shape()[1]);
    let experts = w.meta.shape()[0];
    let n = match transposed {
        true => w.meta.shape()[1],
        false => w.meta.shape()[2],
    };
    let out = empty_device_dtype(
        a.client.clone(),
        a.device.clone(),
        Shape::new([rows, n]),
        a.dtype,
    );
    if rows == 0 || n == 0 {
        return out;
    }
    let per_unit = rows_per_unit(rows, experts);
    // Segments of at most GEMV_MAX_AVERAGE rows on average, weights read along N: the
    // GEMV-like kernel (register tiles, no shared memory, no barrier). Longer segments and
    // transposed weights (the backward pass): shared-memory tiles, which read each weight once
    // per 64 rows.
    let gemv = rows.div_ceil(experts.max(1)) <= GEMV_MAX_AVERAGE && !transposed;
    let gemv_rows = if rows.div_ceil(experts.max(1)) <= 4 {
        4
    } else {
        GEMV_ROWS
    };
    let block = if gemv { gemv_rows } else { SIDE * per_unit };
    let schedule = tile_schedule(&counts, rows, block);
    let gated = w2.is_some();
    let w2 = match w2 {
        Some(w2) => into_contiguous(w2),
        // Never read: a stand-in for the missing second matrix, one vector of any width long.
        None => empty_device_dtype(
            a.client.clone(),
            a.device.clone(),
            Shape::new([1, 1, 16]),
            a.dtype,
        ),
    };
    let cube_count = CubeCount::Static(
        n.div_ceil(TILE_N) as u32,
        max_row_tiles(rows, experts, block) as u32,
        1,
    );
    let address = address_type(&[&a, &w, &w2, &schedule, &out]);
    let dtypes = [
        dtype_to_storage_type(a.dtype),
        dtype_to_storage_type(schedule.dtype),
    ];
    let client = a.client.clone();
    if gemv {
        let vector = vector_size(&w, w.dtype, n);
        let n_vectors = n / vector;
        grouped_gemv_kernel::launch(
            &client,
            CubeCount::Static(
                n_vectors.div_ceil(GEMV_UNITS) as u32,
                max_row_tiles(rows, experts, block) as u32,
                1,
            ),
            CubeDim::new_1d(GEMV_UNITS.min(n_vectors) as u32),
            address,
            vector,
            a.into_tensor_arg(),
            w.into_tensor_arg(),
            w2.into_tensor_arg(),
            schedule.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            kdim,
            n_vectors,
            experts,
            gemv_rows,
            gated,
            dtypes,
        );
        return out;
    }
    grouped_matmul_kernel::launch(
        &client,
        cube_count,
        CubeDim::new_2d(SIDE as u32, SIDE as u32),
        address,
        a.into_tensor_arg(),
        w.into_tensor_arg(),
        w2.into_tensor_arg(),
        schedule.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        kdim,
        n,
        experts,
        per_unit,
        transposed,
        gated,
        dtypes,
    );
    out
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
        let logits = into_contiguous(logits);
        let bias = into_contiguous(bias);
        let (tokens, experts) = (logits.meta.shape()[0], logits.meta.shape()[1]);
        let out = empty_device_dtype(
            logits.client.clone(),
            logits.device.clone(),
            Shape::new([tokens, 2 * k]),
            logits.dtype,
        );
        if tokens == 0 || k == 0 {
            return out;
        }
        let cube_dim = CubeDim::new(&logits.client, tokens);
        let cube_count = calculate_cube_count_elemwise(&logits.client, tokens, cube_dim);
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

    fn moe_grouped_matmul(
        a: CubeTensor,
        w: CubeTensor,
        counts: CubeTensor,
        transposed: bool,
    ) -> CubeTensor {
        launch_grouped(a, w, None, counts, transposed)
    }

    fn moe_grouped_swiglu(
        a: CubeTensor,
        gate: CubeTensor,
        up: CubeTensor,
        counts: CubeTensor,
    ) -> CubeTensor {
        launch_grouped(a, gate, Some(up), counts, false)
    }

    fn moe_segment_outer(a: CubeTensor, g: CubeTensor, counts: CubeTensor) -> CubeTensor {
        let a = into_contiguous(a);
        let g = into_contiguous(g);
        let (rows, kdim) = (a.meta.shape()[0], a.meta.shape()[1]);
        let n = g.meta.shape()[1];
        let experts = counts.meta.shape()[0];
        let out = empty_device_dtype(
            a.client.clone(),
            a.device.clone(),
            Shape::new([experts, kdim, n]),
            a.dtype,
        );
        if experts == 0 || kdim == 0 || n == 0 {
            return out;
        }
        // Only the segment bounds of the schedule are read here; any block will do.
        let schedule = tile_schedule(&counts, rows, TILE_M);
        let cube_count = CubeCount::Static(
            n.div_ceil(TILE_N) as u32,
            kdim.div_ceil(TILE_M) as u32,
            experts as u32,
        );
        let address = address_type(&[&a, &g, &schedule, &out]);
        let dtypes = [
            dtype_to_storage_type(a.dtype),
            dtype_to_storage_type(schedule.dtype),
        ];
        let client = a.client.clone();
        segment_outer_kernel::launch(
            &client,
            cube_count,
            CubeDim::new_2d(SIDE as u32, SIDE as u32),
            address,
            a.into_tensor_arg(),
            g.into_tensor_arg(),
            schedule.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            kdim,
            n,
            experts,
            dtypes,
        );
        out
    }

    fn moe_gather_rows(x: CubeTensor, indices: CubeTensor) -> CubeTensor {
        let x = into_contiguous(x);
        let indices = into_contiguous(indices);
        let (rows, width) = (x.meta.shape()[0], x.meta.shape()[1]);
        let m = indices.meta.shape()[0];
        let out = empty_device_dtype(
            x.client.clone(),
            x.device.clone(),
            Shape::new([m, width]),
            x.dtype,
        );
        if m == 0 || width == 0 {
            return out;
        }
        let vector = vector_size(&x, x.dtype, width);
        let units = m * width / vector;
        let cube_dim = CubeDim::new(&x.client, units);
        let cube_count = calculate_cube_count_elemwise(&x.client, units, cube_dim);
        let address = address_type(&[&x, &indices, &out]);
        let dtypes = [
            dtype_to_storage_type(x.dtype),
            dtype_to_storage_type(indices.dtype),
        ];
        gather_rows_kernel::launch(
            &out.client,
            cube_count,
            cube_dim,
            address,
            vector,
            x.into_tensor_arg(),
            indices.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            width / vector,
            units,
            dtypes,
        );
        out
    }

    fn moe_weighted_combine(
        rows: CubeTensor,
        sources: CubeTensor,
        weights: CubeTensor,
    ) -> CubeTensor {
        let rows = into_contiguous(rows);
        let sources = into_contiguous(sources);
        let weights = into_contiguous(weights);
        let (num_rows, width) = (rows.meta.shape()[0], rows.meta.shape()[1]);
        let (t, k) = (sources.meta.shape()[0], sources.meta.shape()[1]);
        let out = empty_device_dtype(
            rows.client.clone(),
            rows.device.clone(),
            Shape::new([t, width]),
            rows.dtype,
        );
        if t == 0 || width == 0 {
            return out;
        }
        let vector = vector_size(&rows, rows.dtype, width);
        let units = t * width / vector;
        let cube_dim = CubeDim::new(&rows.client, units);
        let cube_count = calculate_cube_count_elemwise(&rows.client, units, cube_dim);
        let address = address_type(&[&rows, &sources, &weights, &out]);
        let dtypes = [
            dtype_to_storage_type(rows.dtype),
            dtype_to_storage_type(weights.dtype),
            dtype_to_storage_type(sources.dtype),
        ];
        weighted_combine_kernel::launch(
            &out.client,
            cube_count,
            cube_dim,
            address,
            vector,
            rows.into_tensor_arg(),
            sources.into_tensor_arg(),
            weights.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            num_rows,
            k,
            width / vector,
            units,
            dtypes,
        );
        out
    }

    fn moe_expert_plan(ids: CubeTensor, num_experts: usize) -> CubeTensor {
        let ids = into_contiguous(ids);
        let pairs = ids.meta.shape()[0];
        let out = empty_device_dtype(
            ids.client.clone(),
            ids.device.clone(),
            Shape::new([2 * num_experts + 2 * pairs]),
            ids.dtype,
        );
        // Every unit scans one chunk of pairs for one expert (short loops, many units).
        let chunks = pairs.div_ceil(PLAN_CHUNK).max(1);
        let units = (num_experts + 1) * chunks;
        let counts = empty_device_dtype(
            ids.client.clone(),
            ids.device.clone(),
            Shape::new([units]),
            ids.dtype,
        );
        let cube_dim = CubeDim::new(&ids.client, units);
        let cube_count = calculate_cube_count_elemwise(&ids.client, units, cube_dim);
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
}
