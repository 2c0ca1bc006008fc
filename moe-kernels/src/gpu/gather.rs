//! Step 3, **permute**: rows gathered into expert order, on the device. Its backward pass
//! (a scatter-add) is in `backward.rs`; its tensor-op twin is `moe_core::dispatch::permute`.

use burn::backend::cubecl::dtype_to_storage_type;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::launch::{address_type, elementwise, empty_like, vector_size};

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

pub(super) fn gather_rows(x: CubeTensor, indices: CubeTensor) -> CubeTensor {
    let x = into_contiguous(x);
    let indices = into_contiguous(indices);
    let (rows, width) = (x.meta.shape()[0], x.meta.shape()[1]);
    let m = indices.meta.shape()[0];
    let out = empty_like(&x, [m, width], x.dtype);
    if m == 0 || width == 0 {
        return out;
    }
    let vector = vector_size(&x, x.dtype, width);
    let units = m * width / vector;
    let (cube_count, cube_dim) = elementwise(&x, units);
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
