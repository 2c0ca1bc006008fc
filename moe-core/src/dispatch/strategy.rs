//! Which implementation runs the plan, permute, experts and combine steps: the CubeCL kernels of
//! `moe-kernels` (GPU devices), its host kernels (the flex CPU backend) or their tensor-op
//! twins. Resolved from the device before any work, so no backend ever reaches a kernel it
//! does not have.

use burn::tensor::Device;

use crate::error::MoeError;

/// The user's choice of dispatch implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DispatchStrategy {
    /// The kernels where they run (CubeCL devices: wgpu, CUDA; host kernels on flex without
    /// autodiff), tensor ops everywhere else.
    #[default]
    Auto,
    /// The kernels of the device (CubeCL or host); an error on a device neither runs on.
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
    /// The `moe_kernels::host` host kernels on the flex CPU backend: one read of the routing,
    /// a counting-sort plan, the experts on every segment spread over the threads (gather
    /// fused, weights read in place), a deterministic combine. Not differentiable.
    HostKernels,
    /// Tensor-op plan (argsort), `select`, one matmul chain per expert after a host read of
    /// the counts, gather + weighted sum.
    TensorOps,
}

impl DispatchPath {
    /// Its short name: `kernels`, `host-kernels` or `tensor-ops`.
    pub fn name(self) -> &'static str {
        match self {
            DispatchPath::Kernels => "kernels",
            DispatchPath::HostKernels => "host-kernels",
            DispatchPath::TensorOps => "tensor-ops",
        }
    }
}

impl DispatchStrategy {
    /// The path this strategy takes on `device`, whatever the call (a call's own path, which
    /// also depends on the input and the weights, is in its [`crate::MoeOutput::path`]).
    ///
    /// # Errors
    /// [`MoeError::KernelsUnavailable`] for [`DispatchStrategy::Kernels`] on a device the
    /// kernels do not run on.
    pub fn resolve(self, device: &Device) -> Result<DispatchPath, MoeError> {
        Ok(super::decision::device_step(self, device)?.ran)
    }
}
