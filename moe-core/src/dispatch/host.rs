//! Steps 2–5 on the host kernels (`moe_kernels::host`), for the flex CPU backend: the routing
//! is read once, then plan, permute + experts and combine run on the stored values.

use burn::tensor::{DType, Tensor, TensorData};
use moe_kernels::host::{self, ExpertMatrices, HostPlan, HostTensor};

use super::Fallback;
use crate::error::MoeError;
use crate::experts::Experts;
use crate::router::Routing;

/// Why the host kernels cannot read `experts`' weights in place, if they cannot: a dtype
/// other than f32 or bf16, or a view other than contiguous (or bf16 stored out-major).
pub(crate) fn unreadable(experts: &Experts) -> Result<Option<Fallback>, MoeError> {
    let weights = [
        experts.gate.as_ref(),
        Some(&experts.up),
        Some(&experts.down),
    ];
    for weight in weights.into_iter().flatten() {
        let tensor = weight.val();
        let dtype = tensor.dtype();
        if HostTensor::new(tensor)?.matrix().is_none() {
            return Ok(Some(match dtype {
                DType::F32 | DType::BF16 => Fallback::WeightLayout,
                other => Fallback::WeightDType(other),
            }));
        }
    }
    Ok(None)
}

/// The experts' output for `x` as `routing` says.
///
/// # Errors
/// Those of the host kernels, and [`MoeError::KernelsUnavailable`] for weights they cannot
/// read in place (which [`super::decide`] sends to the tensor-op path instead).
///
/// # Shapes
/// - `x`: `[T, d_model]` → `[T, d_model]`, in `x`'s dtype
pub(crate) fn run_experts(
    experts: &Experts,
    x: Tensor<2>,
    routing: &Routing,
) -> Result<Tensor<2>, MoeError> {
    let gate = experts
        .gate
        .as_ref()
        .map(|g| HostTensor::new(g.val()))
        .transpose()?;
    let up = HostTensor::new(experts.up.val())?;
    let down = HostTensor::new(experts.down.val())?;
    let unreadable = || MoeError::KernelsUnavailable {
        device: format!("{:?} (expert weights not readable in place)", x.device()),
    };
    let (Some(up_m), Some(down_m)) = (up.matrix(), down.matrix()) else {
        return Err(unreadable());
    };
    let gate_m = match gate.as_ref().map(HostTensor::matrix) {
        Some(None) => return Err(unreadable()),
        other => other.flatten(),
    };
    let matrices = ExpertMatrices::new(
        gate_m,
        up_m,
        down_m,
        experts.num_experts(),
        experts.d_model(),
        experts.d_ff(),
    )?;

    let [t, k] = routing.expert_ids.dims();
    let (device, dtype) = (x.device(), x.dtype());
    // 2. plan: the one read of the routing
    let ids: Vec<i64> = routing.expert_ids.to_data().iter::<i64>().collect();
    let plan = HostPlan::new(&ids, t, k, routing.num_experts)?;
    let weights: Vec<f32> = routing.weights.to_data().iter::<f32>().collect();
    // 3–4. permute + experts (the gather is fused into the products), in bf16 for a bf16
    // computation (its activations are bf16: x, and the hidden rows rounded as they are made)
    let compute = match dtype {
        DType::BF16 => host::Compute::Bf16,
        _ => host::Compute::F32,
    };
    let x = HostTensor::new(x)?;
    let rows = match x.matrix() {
        Some(host::Matrix::F32(values)) => host::grouped_ffn_in(values, &plan, &matrices, compute)?,
        _ => host::grouped_ffn_in(&x.to_f32_vec()?, &plan, &matrices, compute)?,
    };
    // 5. unpermute + combine
    let out = host::combine(&rows, &plan, &weights, experts.d_model())?;
    host::recycle(rows);
    let out = Tensor::<2>::from_data(
        TensorData::new(out, [t, experts.d_model()]),
        (&device, DType::F32),
    );
    Ok(match dtype {
        DType::F32 => out,
        other => out.cast(other),
    })
}
