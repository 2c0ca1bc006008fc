//! Which implementation runs the plan, permute, experts and combine steps: the CubeCL kernels of
//! `moe-kernels` or their tensor-op twins. Resolved from the device before any work, so no backend ever
//! reaches a kernel it does not have.

use burn::tensor::Device;

use crate::error::MoeError;

/// The user's choice of dispatch implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DispatchStrategy {
    /// The kernels where they run (CubeCL devices: wgpu, CUDA), tensor ops everywhere else.
    #[default]
    Auto,
    /// The kernels; an error on a device they do not run on.
    Kernels,
    /// Burn tensor ops (`select`, gather + weighted sum) on every device.
    TensorOps,
}

/// The implementation a call runs, after [`DispatchStrategy::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DispatchPath {
    /// The `moe_kernels` plan, gather, grouped-GEMM experts and weighted combine: no host
    /// read, no per-expert launch.
    Kernels,
    /// Tensor-op plan (argsort), `select`, one matmul chain per expert after a host read of
    /// the counts, gather + weighted sum.
    TensorOps,
}

impl DispatchStrategy {
    /// The path this strategy takes on `device`.
    ///
    /// # Errors
    /// [`MoeError::KernelsUnavailable`] for [`DispatchStrategy::Kernels`] on a device the
    /// kernels do not run on.
    pub fn resolve(self, device: &Device) -> Result<DispatchPath, MoeError> {
        let kernels = moe_kernels::available(device);
        match (self, kernels) {
            (DispatchStrategy::Auto, true) | (DispatchStrategy::Kernels, true) => {
                Ok(DispatchPath::Kernels)
            }
            (DispatchStrategy::Auto, false) | (DispatchStrategy::TensorOps, _) => {
                Ok(DispatchPath::TensorOps)
            }
            (DispatchStrategy::Kernels, false) => Err(MoeError::KernelsUnavailable {
                device: format!("{device:?}"),
            }),
        }
    }
}
