//! Device code. Rows are read and written as vectors of `N` elements (`N` divides the width);
//! indices of any integer dtype; every out-of-range index is skipped, never read.

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
