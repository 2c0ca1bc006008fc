//! Burn flex tensors read as host slices, without a copy: the bridge between the host kernels
//! and the default CPU backend.

use burn::tensor::{DType, Device, Tensor};
use burn_flex::{Flex, FlexTensor};
use half::bf16;

use super::Matrix;
use crate::KernelError;

/// Whether the host kernels run on `device`: a Burn flex device without autodiff (the host
/// kernels record no gradient).
pub fn host_available(device: &Device) -> bool {
    matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
}

/// Whether `device` is a flex device behind autodiff: one the host kernels would run on but
/// for the gradients they do not record.
pub fn host_under_autodiff(device: &Device) -> bool {
    use burn::backend::DispatchDevice;
    matches!(device.as_dispatch(), DispatchDevice::Autodiff(inner)
        if matches!(**inner, DispatchDevice::Flex(_)))
}

/// A float tensor of the flex backend, readable as a slice of its stored values. Holding it
/// keeps the storage alive; nothing is copied (the storage is shared with the tensor's other
/// handles, such as a module's parameter).
#[derive(Debug, Clone)]
pub struct HostTensor {
    inner: FlexTensor,
    dims: Vec<usize>,
}

impl HostTensor {
    /// Takes hold of `tensor`'s storage.
    ///
    /// # Errors
    /// [`KernelError::Unsupported`] when the tensor is not a flex tensor (another backend,
    /// or an autodiff device).
    pub fn new<const D: usize>(tensor: Tensor<D>) -> Result<Self, KernelError> {
        let device = tensor.device();
        let dims = tensor.dims().to_vec();
        let inner = tensor
            .try_into_primitive::<Flex>()
            .map_err(|_| KernelError::Unsupported {
                op: "host kernels",
                device: format!("{device:?}"),
                compiled: "flex (no autodiff)",
            })?;
        Ok(Self { inner, dims })
    }

    /// The tensor's shape.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The tensor's dtype.
    pub fn dtype(&self) -> DType {
        self.inner.dtype()
    }

    /// The values as a [`Matrix`] slice: row-major when the storage is contiguous (f32 or
    /// bf16); [`Matrix::Bf16T`] when a bf16 tensor `[…, K, N]` is the `swap_dims` of its last
    /// two dims of a contiguous `[…, N, K]` one (the out-major layout); `None` otherwise
    /// (another view, another dtype).
    pub fn matrix(&self) -> Option<Matrix<'_>> {
        let layout = self.inner.layout();
        let (start, n) = (layout.start_offset(), layout.num_elements());
        let bytes = self.inner.bytes();
        let bf16s = || -> Option<&[bf16]> {
            bytemuck::try_cast_slice::<u8, bf16>(bytes.get(start * 2..(start + n) * 2)?).ok()
        };
        match (layout.is_contiguous(), self.inner.dtype()) {
            (true, DType::F32) => {
                bytemuck::try_cast_slice::<u8, f32>(bytes.get(start * 4..(start + n) * 4)?)
                    .ok()
                    .map(Matrix::F32)
            }
            (true, DType::BF16) => bf16s().map(Matrix::Bf16),
            (false, DType::BF16) if last_two_swapped(&self.dims, layout.strides()) => {
                bf16s().map(Matrix::Bf16T)
            }
            _ => None,
        }
    }

    /// The values as f32: the stored slice when it is contiguous f32, else widened into a new
    /// vector ([`HostTensor::to_f32_vec`]).
    ///
    /// # Errors
    /// As [`HostTensor::to_f32_vec`].
    pub fn f32_values(&self) -> Result<std::borrow::Cow<'_, [f32]>, KernelError> {
        match self.matrix() {
            Some(Matrix::F32(values)) => Ok(values.into()),
            _ => Ok(self.to_f32_vec()?.into()),
        }
    }

    /// The values widened to f32 in a new vector (any float dtype, any layout).
    ///
    /// # Errors
    /// [`KernelError::DTypes`] when the values cannot be read as f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, KernelError> {
        Ok(match self.matrix() {
            Some(Matrix::F32(v)) => v.to_vec(),
            Some(Matrix::Bf16(v)) => v.iter().map(|v| v.to_f32()).collect(),
            // not in row-major order: the backend reads it out
            Some(Matrix::Bf16T(_)) | None => self
                .inner
                .clone()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|_| KernelError::DTypes {
                    op: "HostTensor::to_f32_vec",
                    first: self.inner.dtype(),
                    second: DType::F32,
                })?,
        })
    }
}

/// Whether `strides` make a tensor of `dims` `[…, K, N]` the view, with its last two dims
/// swapped, of a contiguous `[…, N, K]` tensor: stride 1 along K, K along N, and the leading
/// dims contiguous over the `N · K` blocks.
fn last_two_swapped(dims: &[usize], strides: &[isize]) -> bool {
    let d = dims.len();
    if d < 2 || strides.len() != d {
        return false;
    }
    let (k, n) = (dims[d - 2], dims[d - 1]);
    let mut expected = (n * k) as isize;
    for i in (0..d - 2).rev() {
        if dims[i] > 1 && strides[i] != expected {
            return false;
        }
        expected *= dims[i] as isize;
    }
    (k <= 1 || strides[d - 2] == 1) && (n <= 1 || strides[d - 1] == k as isize)
}

#[cfg(test)]
mod tests {
    use super::last_two_swapped;

    #[test]
    fn out_major_views_are_recognised_and_nothing_else() {
        // [2, 3, 4] as the swap of a contiguous [2, 4, 3]
        assert!(last_two_swapped(&[2, 3, 4], &[12, 1, 3]));
        assert!(last_two_swapped(&[3, 4], &[1, 3]));
        // contiguous, a swap of other dims, a strided slice, a lone leading dim
        assert!(!last_two_swapped(&[2, 3, 4], &[12, 4, 1]));
        assert!(!last_two_swapped(&[2, 3, 4], &[1, 8, 2]));
        assert!(!last_two_swapped(&[2, 3, 4], &[24, 1, 3]));
        assert!(last_two_swapped(&[1, 3, 4], &[99, 1, 3]));
        assert!(!last_two_swapped(&[4], &[1]));
    }
}
