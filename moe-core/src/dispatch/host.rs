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

/// Calls `run` with `experts`' weights as the host kernels read them.
///
/// # Errors
/// [`MoeError::KernelsUnavailable`] for weights they cannot read in place (which
/// [`super::decide`] sends to the tensor-op path instead), and those of `run`.
fn with_matrices<R>(
    experts: &Experts,
    device: &burn::tensor::Device,
    run: impl FnOnce(&ExpertMatrices<'_>) -> Result<R, MoeError>,
) -> Result<R, MoeError> {
    let gate = experts
        .gate
        .as_ref()
        .map(|g| HostTensor::new(g.val()))
        .transpose()?;
    let up = HostTensor::new(experts.up.val())?;
    let down = HostTensor::new(experts.down.val())?;
    let unreadable = || MoeError::KernelsUnavailable {
        device: format!("{device:?} (expert weights not readable in place)"),
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
    run(&matrices)
}

/// Steps 3–4 on `x` (`[T, d_model]`) for the rows of `plan`, in the precision `x` holds
/// (bf16 rows for a bf16 computation: `x` and the hidden rows as a bf16 model rounds them).
fn experts_rows(
    matrices: &ExpertMatrices<'_>,
    plan: &HostPlan,
    x: Tensor<2>,
) -> Result<Vec<f32>, MoeError> {
    let compute = host::Compute::for_dtype(x.dtype());
    let x = HostTensor::new(x)?;
    Ok(host::grouped_ffn_in(
        &x.f32_values()?,
        plan,
        matrices,
        compute,
    )?)
}

/// `[T, d_model]` f32 values as a tensor of `dtype` on `device`.
fn upload(
    values: Vec<f32>,
    [t, d]: [usize; 2],
    device: &burn::tensor::Device,
    dtype: DType,
) -> Tensor<2> {
    let out = Tensor::<2>::from_data(TensorData::new(values, [t, d]), (device, DType::F32));
    match dtype {
        DType::F32 => out,
        other => out.cast(other),
    }
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
    let [t, k] = routing.expert_ids.dims();
    let (device, dtype) = (x.device(), x.dtype());
    with_matrices(experts, &device, |matrices| {
        // 2. plan: the one read of the routing
        let ids: Vec<i64> = routing.expert_ids.to_data().iter::<i64>().collect();
        let plan = HostPlan::new(&ids, t, k, routing.num_experts)?;
        let weights: Vec<f32> = routing.weights.to_data().iter::<f32>().collect();
        // 3–4. permute + experts (the gather is fused into the products)
        let rows = experts_rows(matrices, &plan, x)?;
        // 5. unpermute + combine
        let out = host::combine(&rows, &plan, &weights, experts.d_model())?;
        host::recycle(rows);
        Ok(upload(out, [t, experts.d_model()], &device, dtype))
    })
}

/// Expert `expert` on every row of `x` (a shared expert, a dense MLP): one segment holding
/// all the rows, in order, so no combine.
///
/// # Errors
/// As [`run_experts`].
///
/// # Shapes
/// - `x`: `[T, d_model]` → `[T, d_model]`, in `x`'s dtype
pub(crate) fn run_expert(
    experts: &Experts,
    expert: usize,
    x: Tensor<2>,
) -> Result<Tensor<2>, MoeError> {
    let t = x.dims()[0];
    let (device, dtype) = (x.device(), x.dtype());
    with_matrices(experts, &device, |matrices| {
        let plan = HostPlan::new(&vec![expert as i64; t], t, 1, experts.num_experts())?;
        let mut rows = experts_rows(matrices, &plan, x)?;
        // the buffer comes from the pool, perhaps sized for a longer call
        rows.shrink_to_fit();
        Ok(upload(rows, [t, experts.d_model()], &device, dtype))
    })
}
