//! Device code. Rows are read and written as vectors of `N` elements (`N` divides the width);
//! indices of any integer dtype; every out-of-range index is skipped, never read.

// `#[cube]` functions are written in CubeCL's subset of Rust, which has no `div_ceil`,
// `checked_div`, iterator adapters or compound assignment on every type; the lints that
// ask for those do not apply to device code.
#![allow(
    clippy::manual_div_ceil,
    clippy::manual_checked_ops,
    clippy::explicit_counter_loop,
    clippy::assign_op_pattern
)]

use cubecl::prelude::*;

/// One unit per output vector: `out[r, c] = x[indices[r], c]`.
#[cube(launch, address_type = "dynamic")]
pub(crate) fn gather_rows_kernel<F: Float, I: Numeric, N: Size>(
    x: &Tensor<Vector<F, N>>,
    indices: &Tensor<I>,
    out: &mut Tensor<Vector<F, N>>,
    rows: usize,
    row_vectors: usize,
    units: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    if ABSOLUTE_POS >= units {
        terminate!();
    }
    let r = ABSOLUTE_POS / row_vectors;
    let c = ABSOLUTE_POS % row_vectors;
    let source = usize::cast_from(indices[r]);
    if source < rows {
        out[ABSOLUTE_POS] = x[source * row_vectors + c];
    } else {
        out[ABSOLUTE_POS] = Vector::new(F::from_int(0));
    }
}

/// One unit per output vector: `out[t, c] = Σ_j w[t, j] · rows[sources[t, j], c]`, in f32, in
/// slot order.
#[cube(launch, address_type = "dynamic")]
pub(crate) fn weighted_combine_kernel<F: Float, W: Float, I: Numeric, N: Size>(
    rows: &Tensor<Vector<F, N>>,
    sources: &Tensor<I>,
    weights: &Tensor<W>,
    out: &mut Tensor<Vector<F, N>>,
    num_rows: usize,
    k: usize,
    row_vectors: usize,
    units: usize,
    #[define(F, W, I)] _dtypes: [ElemType; 3],
) {
    if ABSOLUTE_POS >= units {
        terminate!();
    }
    let t = ABSOLUTE_POS / row_vectors;
    let c = ABSOLUTE_POS % row_vectors;
    let mut acc = Vector::<f32, N>::new(0.0);
    for j in 0..k {
        let slot = t * k + j;
        let source = usize::cast_from(sources[slot]);
        if source < num_rows {
            let w = Vector::<f32, N>::new(f32::cast_from(weights[slot]));
            acc += Vector::<f32, N>::cast_from(rows[source * row_vectors + c]) * w;
        }
    }
    out[ABSOLUTE_POS] = Vector::cast_from(acc);
}

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

    if e == experts {
        #[unroll]
        for i in 0..rows {
            #[unroll]
            for j in 0..PER_UNIT {
                let row = row0 + ty + SIDE * i;
                let col = col0 + tx + SIDE * j;
                if row < row_end && col < n {
                    out[row * n + col] = F::from_int(0);
                }
            }
        }
        terminate!();
    }

    let lin = ty * SIDE + tx;
    let busy = row0 + ty < row_end;
    let mut acc = Array::<f32>::new(comptime!(rows * PER_UNIT));
    let mut acc2 = Array::<f32>::new(comptime!(rows * PER_UNIT));
    #[unroll]
    for i in 0..comptime!(rows * PER_UNIT) {
        acc[i] = 0.0f32;
        acc2[i] = 0.0f32;
    }
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
            #[unroll]
            for kk in 0..TILE_K {
                let mut av = Array::<f32>::new(rows);
                #[unroll]
                for i in 0..rows {
                    av[i] = sa[kk * tile_m + ty + SIDE * i];
                }
                #[unroll]
                for j in 0..PER_UNIT {
                    let bv = sw[kk * TILE_N + tx + SIDE * j];
                    #[unroll]
                    for i in 0..rows {
                        acc[i * PER_UNIT + j] += av[i] * bv;
                    }
                    if gated {
                        let bv2 = sw2[kk * TILE_N + tx + SIDE * j];
                        #[unroll]
                        for i in 0..rows {
                            acc2[i * PER_UNIT + j] += av[i] * bv2;
                        }
                    }
                }
            }
        }
        sync_cube();
    }

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
                out[row * n + col] = F::cast_from(value);
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
        #[unroll]
        for rr in 0..TILE_K {
            let mut av = Array::<f32>::new(PER_UNIT);
            #[unroll]
            for i in 0..PER_UNIT {
                av[i] = sa[rr * TILE_M + ty + SIDE * i];
            }
            #[unroll]
            for j in 0..PER_UNIT {
                let bv = sg[rr * TILE_N + tx + SIDE * j];
                #[unroll]
                for i in 0..PER_UNIT {
                    acc[i * PER_UNIT + j] += av[i] * bv;
                }
            }
        }
        sync_cube();
    }
    let base = e * kdim * n;
    #[unroll]
    for i in 0..PER_UNIT {
        #[unroll]
        for j in 0..PER_UNIT {
            let k = k0 + ty + SIDE * i;
            let col = col0 + tx + SIDE * j;
            if k < kdim && col < n {
                out[base + k * n + col] = F::cast_from(acc[i * PER_UNIT + j]);
            }
        }
    }
}

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
