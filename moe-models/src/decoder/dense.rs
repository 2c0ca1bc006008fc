//! The decoder's dense products (attention projections, the lm_head): on the host kernels
//! where they run (the flex backend without autodiff, weights stored f32 or bf16 in a layout
//! they read in place), Burn's matmul elsewhere. The host kernels stream each weight once over
//! all threads in its stored dtype; flex's bf16 matmul widens the whole matrix to f32 on every
//! call, on one thread.

use burn::nn::Linear;
use burn::tensor::Tensor;

/// `linear(x)`: `x · weight + bias`.
///
/// # Shapes
/// - `x`: `[B, L, in]` → `[B, L, out]`, in `x`'s dtype
pub(crate) fn linear(layer: &Linear, x: Tensor<3>) -> Tensor<3> {
    let out = product(x, &layer.weight.val());
    match &layer.bias {
        Some(bias) => out + bias.val().unsqueeze_dims(&[0, 1]),
        None => out,
    }
}

/// `x · w`.
///
/// # Shapes
/// - `x`: `[B, L, K]`, `w`: `[K, N]` → `[B, L, N]`, in `x`'s dtype
pub(crate) fn product(x: Tensor<3>, w: &Tensor<2>) -> Tensor<3> {
    #[cfg(feature = "flex")]
    if let Some(out) = host::product(&x, w) {
        return out;
    }
    x.matmul(w.clone().unsqueeze_dim(0))
}

#[cfg(feature = "flex")]
mod host {
    use burn::tensor::{DType, Tensor, TensorData};
    use moe_kernels::host::{self, Compute, HostTensor};

    /// `x · w` on the host kernels, or `None` where they do not run: another backend,
    /// autodiff, a weight stored in another dtype or view.
    pub(super) fn product(x: &Tensor<3>, w: &Tensor<2>) -> Option<Tensor<3>> {
        let device = x.device();
        if !host::host_available(&device) || !matches!(x.dtype(), DType::F32 | DType::BF16) {
            return None;
        }
        let [b, l, k] = x.dims();
        let [w_in, n] = w.dims();
        let weight = HostTensor::new(w.clone()).ok()?;
        let matrix = weight.matrix()?;
        let rows = HostTensor::new(x.clone()).ok()?;
        let compute = match x.dtype() {
            DType::BF16 => Compute::Bf16,
            _ => Compute::F32,
        };
        let out = match rows.matrix() {
            Some(host::Matrix::F32(values)) => host::dense(values, matrix, w_in, n, compute),
            _ => host::dense(&rows.to_f32_vec().ok()?, matrix, w_in, n, compute),
        };
        // the shapes agree by construction; a mismatch takes the matmul, which reports it
        let out = out.ok().filter(|_| k == w_in)?;
        let out = Tensor::<3>::from_data(TensorData::new(out, [b, l, n]), (&device, DType::F32));
        Some(out.cast(x.dtype()))
    }
}
