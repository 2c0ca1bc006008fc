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

    /// The values as a [`Matrix`] slice in row-major order, when the storage is contiguous
    /// and f32 or bf16; `None` otherwise (a strided view, another dtype).
    pub fn matrix(&self) -> Option<Matrix<'_>> {
        let layout = self.inner.layout();
        if !layout.is_contiguous() {
            return None;
        }
        let (start, n) = (layout.start_offset(), layout.num_elements());
        let bytes = self.inner.bytes();
        match self.inner.dtype() {
            DType::F32 => {
                bytemuck::try_cast_slice::<u8, f32>(bytes.get(start * 4..(start + n) * 4)?)
                    .ok()
                    .map(Matrix::F32)
            }
            DType::BF16 => {
                bytemuck::try_cast_slice::<u8, bf16>(bytes.get(start * 2..(start + n) * 2)?)
                    .ok()
                    .map(Matrix::Bf16)
            }
            _ => None,
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
            None => self
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
