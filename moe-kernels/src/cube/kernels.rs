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
