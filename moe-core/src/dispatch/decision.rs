//! The one decision of a forward call: which implementation runs the router's top-k epilogue,
//! which runs plan, permute, experts and combine, and why a faster one did not. Every fallback
//! of the hot path is decided here, from the strategy, the device, the input and the layer,
//! before any work; the call then runs exactly that and reports it
//! ([`MoeOutput::path`](crate::MoeOutput::path)).

use std::fmt;

use burn::tensor::{DType, Device};

use super::strategy::{DispatchPath, DispatchStrategy};
use crate::error::MoeError;
use crate::experts::Experts;
use crate::router::{RouterKind, RouterSettings};

/// Most tokens a forward pass routes with the fused epilogue kernel; longer inputs take the
/// composed ops: one unit per token walks the experts k times, which beats the composed ops
/// for a few tokens (decoding), not for long prompts. Measured on lavapipe at E 64, k 8
/// (medians, fused / composed): 0.40 at 1 token, 0.31 at 16, 1.42 at 128, 1.73 at 512.
pub const FUSED_EPILOGUE_MAX_TOKENS: usize = 64;

/// Most expert groups the fused epilogue keeps (its kept groups are one 32-bit mask).
pub const FUSED_EPILOGUE_MAX_GROUPS: usize = 32;

/// Why a step runs a slower implementation than the device's kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// [`DispatchStrategy::TensorOps`] asked for tensor ops.
    Requested,
    /// No kernel for this step runs on this device: the CubeCL kernels need a wgpu or CUDA
    /// device, the host kernels the flex backend (and the `flex` feature), and the router
    /// epilogue has no host kernel.
    NoKernel,
    /// The device records gradients, and this step's kernel has no backward pass (the host
    /// kernels, the fused epilogue).
    Autodiff,
    /// More tokens than the fused epilogue's limit ([`FUSED_EPILOGUE_MAX_TOKENS`]).
    ManyTokens {
        /// Tokens in the call.
        tokens: usize,
        /// The limit.
        max: usize,
    },
    /// A k per token or per sequence: the fused epilogue takes one k for every token.
    PerTokenK,
    /// More expert groups than the fused epilogue keeps ([`FUSED_EPILOGUE_MAX_GROUPS`]).
    ManyGroups {
        /// The router's `n_group`.
        groups: usize,
        /// The limit.
        max: usize,
    },
    /// Expert weights of a dtype the host kernels do not read in place (they read f32 and
    /// bf16).
    WeightDType(DType),
    /// Expert weights stored as a view the host kernels do not read in place (they read
    /// contiguous tensors, and bf16 stored out-major).
    WeightLayout,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::Requested => write!(f, "tensor ops requested"),
            Fallback::NoKernel => write!(f, "no kernel for this device"),
            Fallback::Autodiff => write!(f, "autodiff: the kernel has no backward pass"),
            Fallback::ManyTokens { tokens, max } => {
                write!(f, "{tokens} tokens, more than the fused kernel's {max}")
            }
            Fallback::PerTokenK => write!(f, "a k per token"),
            Fallback::ManyGroups { groups, max } => {
                write!(
                    f,
                    "{groups} expert groups, more than the fused kernel's {max}"
                )
            }
            Fallback::WeightDType(dtype) => {
                let dtype = format!("{dtype:?}").to_lowercase();
                write!(
                    f,
                    "{dtype} expert weights (the host kernels read f32 and bf16)"
                )
            }
            Fallback::WeightLayout => write!(f, "expert weights stored as a strided view"),
        }
    }
}

/// How one step ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepPath {
    /// The implementation that ran.
    pub ran: DispatchPath,
    /// Why it is not the device's kernel, when it is not.
    pub fallback: Option<Fallback>,
}

impl StepPath {
    fn kernel(ran: DispatchPath) -> Self {
        StepPath {
            ran,
            fallback: None,
        }
    }

    fn tensor_ops(why: Fallback) -> Self {
        StepPath {
            ran: DispatchPath::TensorOps,
            fallback: Some(why),
        }
    }
}

impl fmt::Display for StepPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fallback {
            None => write!(f, "{}", self.ran.name()),
            Some(why) => write!(f, "{} ({why})", self.ran.name()),
        }
    }
}

/// What one forward call ran, step by step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallPath {
    /// The router's top-k epilogue after the logits ([`DispatchPath::Kernels`]: the fused
    /// `moe_kernels::route_epilogue` kernel); `None` for routers that select otherwise
    /// (expert choice, hash, random).
    pub epilogue: Option<StepPath>,
    /// Plan, permute, experts, unpermute + combine.
    pub experts: StepPath,
}

impl fmt::Display for CallPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "experts {}", self.experts)?;
        if let Some(epilogue) = &self.epilogue {
            write!(f, ", epilogue {epilogue}")?;
        }
        Ok(())
    }
}

/// What a call that routes with `settings` and runs `experts` on `device` runs.
///
/// - `tokens`: the call's tokens;
/// - `per_token_k`: whether the call's k varies between tokens.
///
/// # Errors
/// [`MoeError::KernelsUnavailable`] for [`DispatchStrategy::Kernels`] on a device no kernel
/// runs on.
pub(crate) fn decide(
    strategy: DispatchStrategy,
    device: &Device,
    settings: &RouterSettings,
    experts: &Experts,
    tokens: usize,
    per_token_k: bool,
) -> Result<CallPath, MoeError> {
    Ok(CallPath {
        epilogue: epilogue(strategy, device, settings, Some(tokens), per_token_k)?,
        experts: experts_step(strategy, device, experts)?,
    })
}

/// The implementation of plan, permute, experts and combine on `device`, for any experts
/// (what [`DispatchStrategy::resolve`] answers).
pub(crate) fn device_step(
    strategy: DispatchStrategy,
    device: &Device,
) -> Result<StepPath, MoeError> {
    let host = cfg!(feature = "flex") && moe_kernels::host::host_available(device);
    match strategy {
        DispatchStrategy::TensorOps => Ok(StepPath::tensor_ops(Fallback::Requested)),
        _ if moe_kernels::available(device) => Ok(StepPath::kernel(DispatchPath::Kernels)),
        _ if host => Ok(StepPath::kernel(DispatchPath::HostKernels)),
        DispatchStrategy::Kernels => Err(MoeError::KernelsUnavailable {
            device: format!("{device:?}"),
        }),
        DispatchStrategy::Auto if moe_kernels::host::host_under_autodiff(device) => {
            Ok(StepPath::tensor_ops(Fallback::Autodiff))
        }
        DispatchStrategy::Auto => Ok(StepPath::tensor_ops(Fallback::NoKernel)),
    }
}

/// The implementation of plan, permute, experts and combine for `experts` on `device`: the
/// device's, unless the host kernels cannot read these weights in place.
pub(crate) fn experts_step(
    strategy: DispatchStrategy,
    device: &Device,
    experts: &Experts,
) -> Result<StepPath, MoeError> {
    let step = device_step(strategy, device)?;
    #[cfg(feature = "flex")]
    if step.ran == DispatchPath::HostKernels
        && let Some(why) = super::host::unreadable(experts)?
    {
        return Ok(StepPath::tensor_ops(why));
    }
    #[cfg(not(feature = "flex"))]
    let _ = experts;
    Ok(step)
}

/// The implementation of the router's top-k epilogue, or `None` when the router selects
/// otherwise.
pub(crate) fn epilogue(
    strategy: DispatchStrategy,
    device: &Device,
    settings: &RouterSettings,
    tokens: Option<usize>,
    per_token_k: bool,
) -> Result<Option<StepPath>, MoeError> {
    let device_step = device_step(strategy, device)?;
    if !matches!(settings.kind, RouterKind::TokenChoice) {
        return Ok(None);
    }
    let tokens = tokens.unwrap_or(0);
    let groups = settings.group_limit.map_or(0, |g| g.n_group);
    let why = match () {
        _ if strategy == DispatchStrategy::TensorOps => Some(Fallback::Requested),
        _ if device_step.ran != DispatchPath::Kernels => Some(Fallback::NoKernel),
        _ if moe_kernels::is_autodiff(device) => Some(Fallback::Autodiff),
        _ if tokens > FUSED_EPILOGUE_MAX_TOKENS => Some(Fallback::ManyTokens {
            tokens,
            max: FUSED_EPILOGUE_MAX_TOKENS,
        }),
        _ if per_token_k => Some(Fallback::PerTokenK),
        _ if groups > FUSED_EPILOGUE_MAX_GROUPS => Some(Fallback::ManyGroups {
            groups,
            max: FUSED_EPILOGUE_MAX_GROUPS,
        }),
        _ => None,
    };
    Ok(Some(match why {
        None => StepPath::kernel(DispatchPath::Kernels),
        Some(why) => StepPath::tensor_ops(why),
    }))
}
