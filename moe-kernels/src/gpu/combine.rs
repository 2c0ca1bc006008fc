//! Step 5, **unpermute + combine**: each token's k expert rows summed with their weights, on
//! the device. Backward in `backward.rs`; tensor-op twin `moe_core::dispatch::combine`, host
//! kernel `crate::host::combine`.

use burn::backend::cubecl::dtype_to_storage_type;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::launch::{address_type, elementwise, empty_like, vector_size};

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

pub(super) fn weighted_combine(
    rows: CubeTensor,
    sources: CubeTensor,
    weights: CubeTensor,
) -> CubeTensor {
    let rows = into_contiguous(rows);
    let sources = into_contiguous(sources);
    let weights = into_contiguous(weights);
    let (num_rows, width) = (rows.meta.shape()[0], rows.meta.shape()[1]);
    let (t, k) = (sources.meta.shape()[0], sources.meta.shape()[1]);
    let out = empty_like(&rows, [t, width], rows.dtype);
    if t == 0 || width == 0 {
        return out;
    }
    let vector = vector_size(&rows, rows.dtype, width);
    let units = t * width / vector;
    let (cube_count, cube_dim) = elementwise(&rows, units);
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
