//! Step 4, **experts**: the grouped expert GEMM (every expert on its segment of sorted rows, in
//! one launch) and the SwiGLU variant, the GEMV-like kernel for short segments, and the
//! per-segment outer products of the backward pass (in `backward.rs`). Tensor-op twin
//! `moe_core::Experts::forward_segments`, host kernel `crate::host::grouped_ffn`.

// `#[cube]` functions are written in CubeCL's subset of Rust, which has no `div_ceil`,
// `checked_div`, iterator adapters or compound assignment on every type; the lints that
// ask for those do not apply to device code.
#![allow(
    clippy::manual_div_ceil,
    clippy::manual_checked_ops,
    clippy::explicit_counter_loop,
    clippy::assign_op_pattern
)]

use burn::backend::cubecl::dtype_to_storage_type;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::CubeDim;
use cubecl::prelude::*;

use super::launch::{address_type, empty_like, vector_size};

/// The grouped-GEMM tile schedule of `rows` rows cut into segments of `counts` (see
/// `tile_schedule_kernel`): `[2 · (E + 2)]`, in `counts`' dtype.
fn tile_schedule(counts: &CubeTensor, rows: usize, block: usize) -> CubeTensor {
    let counts = into_contiguous(counts.clone());
    let experts = counts.meta.shape()[0];
    let schedule = empty_like(&counts, [2 * (experts + 2)], counts.dtype);
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
    let out = empty_like(&a, [rows, n], a.dtype);
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
        None => empty_like(&a, [1, 1, 16], a.dtype),
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

// ---------------------------------------------------------------------------------------------
// Grouped expert GEMM. Rows sorted by expert form one segment per expert; a cube computes one
// `(SIDE · rows) × TILE_N` output tile of one segment with a `SIDE × SIDE` grid of units, each
// holding `rows × PER_UNIT` accumulators (f32, whatever the storage dtype). Unit (x, y) owns rows
// `y + SIDE·i` and columns `x + SIDE·j` of the tile, so neighbouring units touch neighbouring
// columns in global and shared memory.
// ---------------------------------------------------------------------------------------------

/// Rows of a segment-outer-product tile (of K), and of the tallest grouped-GEMM tile.
pub(crate) const TILE_M: usize = 64;
/// Columns of a grouped-GEMM tile.
pub(crate) const TILE_N: usize = 64;
/// Depth of one step of the reduction, staged through shared memory.
pub(crate) const TILE_K: usize = 16;
/// Units along each side of a cube.
pub(crate) const SIDE: usize = 16;
const PER_UNIT: usize = 4;
const UNITS: usize = SIDE * SIDE;
/// Elements each unit stages per operand per step (`TILE_M · TILE_K / UNITS`).
const STAGED: usize = 4;

/// The tile schedule of a grouped GEMM, one unit: `E + 1` segments (the experts, then the rows
/// no expert owns, `rows - Σ counts`), each cut into `ceil(len / block)` tiles.
///
/// `schedule = [first tile of each segment (E + 2: the last is the total) |
///              first row of each segment (E + 2: the last is rows)]`.
///
/// Counts are clamped so that segments never run past `rows`.
#[cube(launch, address_type = "dynamic")]
pub(crate) fn tile_schedule_kernel<I: Numeric>(
    counts: &Tensor<I>,
    schedule: &mut Tensor<I>,
    rows: usize,
    experts: usize,
    #[comptime] block: usize,
    #[define(I)] _dtype: ElemType,
) {
    if ABSOLUTE_POS > 0 {
        terminate!();
    }
    let mut tiles = 0usize;
    let mut start = 0usize;
    for e in 0..experts + 1 {
        schedule[e] = I::cast_from(tiles);
        schedule[experts + 2 + e] = I::cast_from(start);
        let mut len = rows - start;
        if e < experts {
            len = usize::min(usize::cast_from(counts[e]), len);
        }
        tiles += (len + block - 1) / block;
        start += len;
    }
    schedule[experts + 1] = I::cast_from(tiles);
    schedule[2 * experts + 3] = I::cast_from(rows);
}

/// The segment of row tile `tile` in a tile schedule: the last one starting at or before it
/// (binary search; empty segments start where the next one does, so they are never picked).
#[cube]
fn tile_segment<I: Numeric>(schedule: &Tensor<I>, tile: usize, experts: usize) -> usize {
    let mut lo = 0usize;
    let mut hi = experts + 1;
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if usize::cast_from(schedule[mid]) <= tile {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Element `(k, col)` of expert `e`'s matrix, stored `[E, K, N]`, or `[E, N, K]` when
/// `transposed`; zero outside the matrix.
#[cube]
fn weight_at<F: Float>(
    w: &Tensor<F>,
    e: usize,
    k: usize,
    col: usize,
    kdim: usize,
    n: usize,
    #[comptime] transposed: bool,
) -> f32 {
    let mut value = 0.0f32;
    if k < kdim && col < n {
        let base = e * kdim * n;
        if transposed {
            value = f32::cast_from(w[base + col * kdim + k]);
        } else {
            value = f32::cast_from(w[base + k * n + col]);
        }
    }
    value
}

/// Grouped GEMM over expert segments: for every row `r` of expert `e`'s segment,
/// `out[r, :] = a[r, :] · w[e]` — or, when `gated`, `silu(a[r, :] · w[e]) ⊙ (a[r, :] · w2[e])`
/// (SwiGLU's gate and up projections in one pass, the activation applied to the f32
/// accumulators). Rows of no expert are written as zeros. Cube (x, y) = (column tile, tile of
/// the schedule); cubes past the schedule's tiles end at once.
///
/// A tile has `SIDE · rows` rows (`rows` per unit: 1, 2 or 4, picked by the host from the
/// average segment length, so that short segments do not pay for 64-row tiles) and `TILE_N`
/// columns. Units whose rows all lie past the segment skip the arithmetic (they still stage
/// their share of the weights).
#[cube(launch, address_type = "dynamic")]
pub(crate) fn grouped_matmul_kernel<F: Float, I: Numeric>(
    a: &Tensor<F>,
    w: &Tensor<F>,
    w2: &Tensor<F>,
    schedule: &Tensor<I>,
    out: &mut Tensor<F>,
    kdim: usize,
    n: usize,
    experts: usize,
    #[comptime] rows: usize,
    #[comptime] transposed: bool,
    #[comptime] gated: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let tile_m = comptime!(SIDE * rows);
    let tile = CUBE_POS_Y as usize;
    if tile >= usize::cast_from(schedule[experts + 1]) {
        terminate!();
    }
    let e = tile_segment::<I>(schedule, tile, experts);
    let row0 = usize::cast_from(schedule[experts + 2 + e])
        + (tile - usize::cast_from(schedule[e])) * tile_m;
    let row_end = usize::min(usize::cast_from(schedule[experts + 3 + e]), row0 + tile_m);
    let col0 = CUBE_POS_X as usize * TILE_N;
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;

    let mut acc = Array::<f32>::new(comptime!(rows * PER_UNIT));
    let mut acc2 = Array::<f32>::new(comptime!(rows * PER_UNIT));
    #[unroll]
    for i in 0..comptime!(rows * PER_UNIT) {
        acc[i] = 0.0f32;
        acc2[i] = 0.0f32;
    }
    if e == experts {
        // Rows of no expert: zeros.
        store_tile::<F>(
            out, &acc, &acc2, 0, row0, row_end, col0, n, tx, ty, rows, false,
        );
        terminate!();
    }

    let lin = ty * SIDE + tx;
    let busy = row0 + ty < row_end;
    let mut sa = Shared::<[f32]>::new_slice(TILE_K * tile_m);
    let mut sw = Shared::<[f32]>::new_slice(TILE_K * TILE_N);
    let mut sw2 = Shared::<[f32]>::new_slice(TILE_K * TILE_N);
    let steps = (kdim + TILE_K - 1) / TILE_K;
    for s in 0..steps {
        let k0 = s * TILE_K;
        // a: tile_m rows × TILE_K, read along k (`rows` elements per unit).
        #[unroll]
        for q in 0..rows {
            let idx = lin + q * UNITS;
            let r = idx / TILE_K;
            let ka = idx % TILE_K;
            let row = row0 + r;
            let mut value = 0.0f32;
            if row < row_end && k0 + ka < kdim {
                value = f32::cast_from(a[row * kdim + k0 + ka]);
            }
            sa[ka * tile_m + r] = value;
        }
        // w: TILE_K × TILE_N, read along the stored inner axis.
        #[unroll]
        for q in 0..STAGED {
            let idx = lin + q * UNITS;
            let mut kw = idx / TILE_N;
            let mut cw = idx % TILE_N;
            if transposed {
                kw = idx % TILE_K;
                cw = idx / TILE_K;
            }
            sw[kw * TILE_N + cw] = weight_at::<F>(w, e, k0 + kw, col0 + cw, kdim, n, transposed);
            if gated {
                sw2[kw * TILE_N + cw] =
                    weight_at::<F>(w2, e, k0 + kw, col0 + cw, kdim, n, transposed);
            }
        }
        sync_cube();
        if busy {
            tile_fma(&sa, &sw, &mut acc, tile_m, tx, ty, rows);
            if gated {
                tile_fma(&sa, &sw2, &mut acc2, tile_m, tx, ty, rows);
            }
        }
        sync_cube();
    }
    store_tile::<F>(
        out, &acc, &acc2, 0, row0, row_end, col0, n, tx, ty, rows, gated,
    );
}

/// One staged slice of K into a unit's register tile: for its `rows` × `PER_UNIT` outputs,
/// `acc[i · PER_UNIT + j] += Σ_kk a[kk · a_stride + ty + SIDE · i] · b[kk · TILE_N + tx + SIDE · j]`
/// over the `TILE_K` staged rows, in that order (the grouped GEMM, once per weight of a gated
/// pair, and the outer products of the backward pass).
#[cube]
fn tile_fma(
    a: &Shared<[f32]>,
    b: &Shared<[f32]>,
    acc: &mut Array<f32>,
    a_stride: usize,
    tx: usize,
    ty: usize,
    #[comptime] rows: usize,
) {
    #[unroll]
    for kk in 0..TILE_K {
        let mut av = Array::<f32>::new(rows);
        #[unroll]
        for i in 0..rows {
            av[i] = a[kk * a_stride + ty + SIDE * i];
        }
        #[unroll]
        for j in 0..PER_UNIT {
            let bv = b[kk * TILE_N + tx + SIDE * j];
            #[unroll]
            for i in 0..rows {
                acc[i * PER_UNIT + j] += av[i] * bv;
            }
        }
    }
}

/// Writes a unit's register tile to `out[base + row · n + col]` for the rows below `row_end`
/// and the columns below `n`, through SwiGLU (`silu(acc) · acc2`) when `gated`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_tile<F: Float>(
    out: &mut Tensor<F>,
    acc: &Array<f32>,
    acc2: &Array<f32>,
    base: usize,
    row0: usize,
    row_end: usize,
    col0: usize,
    n: usize,
    tx: usize,
    ty: usize,
    #[comptime] rows: usize,
    #[comptime] gated: bool,
) {
    #[unroll]
    for i in 0..rows {
        #[unroll]
        for j in 0..PER_UNIT {
            let row = row0 + ty + SIDE * i;
            let col = col0 + tx + SIDE * j;
            if row < row_end && col < n {
                let mut value = acc[i * PER_UNIT + j];
                if gated {
                    value = value / (1.0f32 + f32::exp(-value)) * acc2[i * PER_UNIT + j];
                }
                out[base + row * n + col] = F::cast_from(value);
            }
        }
    }
}

/// Units of a [`grouped_gemv_kernel`] cube, one per column vector.
pub(crate) const GEMV_UNITS: usize = 256;
/// Most rows of a [`grouped_gemv_kernel`] tile.
pub(crate) const GEMV_ROWS: usize = 16;

/// The grouped GEMM of [`grouped_matmul_kernel`] for short segments (decoding: a row or a few
/// per expert), with `w` stored `[E, K, N]`: one unit per vector of `V` output columns, each
/// walking K once and keeping the tile's (at most `rows` ≤ `GEMV_ROWS`) rows in registers, so every
/// weight is read once per tile in vectors, neighbouring units read neighbouring weights, and
/// no shared memory or barrier is needed. Cube x = `GEMV_UNITS` column vectors, y = tile of
/// the schedule.
#[cube(launch, address_type = "dynamic")]
pub(crate) fn grouped_gemv_kernel<F: Float, I: Numeric, V: Size>(
    a: &Tensor<F>,
    w: &Tensor<Vector<F, V>>,
    w2: &Tensor<Vector<F, V>>,
    schedule: &Tensor<I>,
    out: &mut Tensor<Vector<F, V>>,
    kdim: usize,
    n_vectors: usize,
    experts: usize,
    #[comptime] rows: usize,
    #[comptime] gated: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let tile = CUBE_POS_Y as usize;
    let col = CUBE_POS_X as usize * GEMV_UNITS + UNIT_POS_X as usize;
    if tile >= usize::cast_from(schedule[experts + 1]) || col >= n_vectors {
        terminate!();
    }
    let e = tile_segment::<I>(schedule, tile, experts);
    let row0 =
        usize::cast_from(schedule[experts + 2 + e]) + (tile - usize::cast_from(schedule[e])) * rows;
    let row_end = usize::min(usize::cast_from(schedule[experts + 3 + e]), row0 + rows);
    let active = row_end - row0;
    if e == experts {
        for r in row0..row_end {
            out[r * n_vectors + col] = Vector::new(F::from_int(0));
        }
        terminate!();
    }
    let mut acc = Array::<Vector<f32, V>>::new(rows);
    let mut acc2 = Array::<Vector<f32, V>>::new(rows);
    #[unroll]
    for i in 0..rows {
        acc[i] = Vector::new(0.0f32);
        acc2[i] = Vector::new(0.0f32);
    }
    let base = e * kdim * n_vectors + col;
    for k in 0..kdim {
        let wv = Vector::<f32, V>::cast_from(w[base + k * n_vectors]);
        let mut wv2 = Vector::<f32, V>::new(0.0f32);
        if gated {
            wv2 = Vector::<f32, V>::cast_from(w2[base + k * n_vectors]);
        }
        #[unroll]
        for i in 0..rows {
            if i < active {
                let av = Vector::<f32, V>::new(f32::cast_from(a[(row0 + i) * kdim + k]));
                acc[i] += av * wv;
                if gated {
                    acc2[i] += av * wv2;
                }
            }
        }
    }
    #[unroll]
    for i in 0..rows {
        if i < active {
            let mut value = acc[i];
            if gated {
                let one = Vector::<f32, V>::new(1.0f32);
                value = value / (one + Vector::exp(-value)) * acc2[i];
            }
            out[(row0 + i) * n_vectors + col] = Vector::cast_from(value);
        }
    }
}

/// Per-segment outer products (the weight gradient of a grouped GEMM): for each expert `e`,
/// `out[e] = Σ_{r in segment e} a[r, :]ᵀ · g[r, :]`, `[K, N]`. Cube (x, y, z) = (column tile,
/// tile of K, expert); an empty segment gives zeros.
#[cube(launch, address_type = "dynamic")]
pub(crate) fn segment_outer_kernel<F: Float, I: Numeric>(
    a: &Tensor<F>,
    g: &Tensor<F>,
    schedule: &Tensor<I>,
    out: &mut Tensor<F>,
    kdim: usize,
    n: usize,
    experts: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let e = CUBE_POS_Z as usize;
    let k0 = CUBE_POS_Y as usize * TILE_M;
    let col0 = CUBE_POS_X as usize * TILE_N;
    let first = usize::cast_from(schedule[experts + 2 + e]);
    let end = usize::cast_from(schedule[experts + 3 + e]);
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let lin = ty * SIDE + tx;
    let mut acc = Array::<f32>::new(PER_UNIT * PER_UNIT);
    #[unroll]
    for i in 0..PER_UNIT * PER_UNIT {
        acc[i] = 0.0f32;
    }
    let mut sa = Shared::<[f32]>::new_slice(TILE_K * TILE_M);
    let mut sg = Shared::<[f32]>::new_slice(TILE_K * TILE_N);
    let steps = (end - first + TILE_K - 1) / TILE_K;
    for s in 0..steps {
        let r0 = first + s * TILE_K;
        #[unroll]
        for q in 0..STAGED {
            let idx = lin + q * UNITS;
            // TILE_K rows × TILE_M columns of a, TILE_K rows × TILE_N of g, read along rows.
            let rr = idx / TILE_M;
            let m = idx % TILE_M;
            let row = r0 + rr;
            let mut va = 0.0f32;
            if row < end && k0 + m < kdim {
                va = f32::cast_from(a[row * kdim + k0 + m]);
            }
            sa[rr * TILE_M + m] = va;
            let rg = idx / TILE_N;
            let c = idx % TILE_N;
            let row_g = r0 + rg;
            let mut vg = 0.0f32;
            if row_g < end && col0 + c < n {
                vg = f32::cast_from(g[row_g * n + col0 + c]);
            }
            sg[rg * TILE_N + c] = vg;
        }
        sync_cube();
        tile_fma(&sa, &sg, &mut acc, TILE_M, tx, ty, PER_UNIT);
        sync_cube();
    }
    // Rows of this tile are K indices of expert e's `[K, N]` block.
    store_tile::<F>(
        out,
        &acc,
        &acc,
        e * kdim * n,
        k0,
        kdim,
        col0,
        n,
        tx,
        ty,
        PER_UNIT,
        false,
    );
}

pub(super) fn grouped_matmul(
    a: CubeTensor,
    w: CubeTensor,
    counts: CubeTensor,
    transposed: bool,
) -> CubeTensor {
    launch_grouped(a, w, None, counts, transposed)
}

pub(super) fn grouped_swiglu(
    a: CubeTensor,
    gate: CubeTensor,
    up: CubeTensor,
    counts: CubeTensor,
) -> CubeTensor {
    launch_grouped(a, gate, Some(up), counts, false)
}

pub(super) fn segment_outer(a: CubeTensor, g: CubeTensor, counts: CubeTensor) -> CubeTensor {
    let a = into_contiguous(a);
    let g = into_contiguous(g);
    let (rows, kdim) = (a.meta.shape()[0], a.meta.shape()[1]);
    let n = g.meta.shape()[1];
    let experts = counts.meta.shape()[0];
    let out = empty_like(&a, [experts, kdim, n], a.dtype);
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
