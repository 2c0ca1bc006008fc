//! Step 4 of a forward pass, **experts**: the routed expert FFNs, stored stacked as `[E, …]`
//! tensors and applied to contiguous, expert-sorted segments of rows.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::{gelu, silu};
use burn::tensor::{Device, Int, Tensor};

use crate::dispatch;
use crate::error::MoeError;
use crate::router::Routing;

/// The expert FFN's form.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ExpertActivation {
    /// `down(silu(x · gate) ⊙ (x · up))` (OLMoE, Mixtral, Qwen, DeepSeek).
    SwiGlu,
    /// `down(gelu(x · up))`, exact (erf) GELU.
    Gelu,
}

/// Configuration of the stacked routed [`Experts`].
#[derive(Config, Debug)]
pub struct ExpertsConfig {
    /// Hidden size `d_model`.
    pub d_model: usize,
    /// Intermediate size `d_ff` of each expert.
    pub d_ff: usize,
    /// Number of experts `E`.
    pub num_experts: usize,
    /// FFN form.
    #[config(default = "ExpertActivation::SwiGlu")]
    pub activation: ExpertActivation,
    /// Initializer of every expert matrix (fan-in is the matrix's input size).
    /// The default is Burn's `Linear` default, uniform in ±1/√fan_in.
    #[config(
        default = "Initializer::KaimingUniform { gain: 0.5773502691896258, fan_out_only: false }"
    )]
    pub initializer: Initializer,
}

impl ExpertsConfig {
    /// Checks the configuration without allocating anything.
    pub fn validate(&self) -> Result<(), MoeError> {
        for (name, value) in [
            ("d_model", self.d_model),
            ("d_ff", self.d_ff),
            ("num_experts", self.num_experts),
        ] {
            if value == 0 {
                return Err(MoeError::ZeroSize { name });
            }
        }
        Ok(())
    }

    /// Validates the configuration and creates the stacked parameters on `device`.
    pub fn init(&self, device: &Device) -> Result<Experts, MoeError> {
        self.validate()?;
        let (e, d, f) = (self.num_experts, self.d_model, self.d_ff);
        let init = |shape: [usize; 3], fan_in: usize, fan_out: usize| {
            self.initializer
                .init_with(shape, Some(fan_in), Some(fan_out), device)
        };
        let gate = match self.activation {
            ExpertActivation::SwiGlu => Some(init([e, d, f], d, f)),
            ExpertActivation::Gelu => None,
        };
        Ok(Experts {
            gate,
            up: init([e, d, f], d, f),
            down: init([e, f, d], f, d),
        })
    }
}

/// `E` expert FFNs with stacked parameters.
///
/// SwiGLU experts have a `gate`; GELU MLP experts do not.
#[derive(Module, Debug)]
pub struct Experts {
    /// Gate projections, `[E, d_model, d_ff]` (SwiGLU only).
    pub gate: Option<Param<Tensor<3>>>,
    /// Up projections, `[E, d_model, d_ff]`.
    pub up: Param<Tensor<3>>,
    /// Down projections, `[E, d_ff, d_model]`.
    pub down: Param<Tensor<3>>,
}

/// Whether [`Experts::with_host_layout`] moves `t` (see [`Experts::prefers_out_major`]; not
/// out-major already).
fn out_major_wanted(t: &Tensor<3>) -> bool {
    Experts::prefers_out_major(&t.device(), t.dtype()) && !is_out_major(t)
}

/// Whether the host kernels read `t` as out-major weights.
fn is_out_major(t: &Tensor<3>) -> bool {
    #[cfg(feature = "flex")]
    {
        moe_kernels::host::HostTensor::new(t.clone())
            .is_ok_and(|h| matches!(h.matrix(), Some(moe_kernels::host::Matrix::Bf16T(_))))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = t;
        false
    }
}

/// `t` (`[E, K, N]`) as the `swap_dims(1, 2)` view of a contiguous `[E, N, K]` copy.
fn out_major(t: Tensor<3>) -> Tensor<3> {
    let (device, dtype) = (t.device(), t.dtype());
    // the view's values read out in its own order are the contiguous [E, N, K] tensor
    let data = t.swap_dims(1, 2).into_data();
    Tensor::<3>::from_data(data, (&device, dtype)).swap_dims(1, 2)
}

impl Experts {
    /// Builds experts from existing stacked tensors, checking that their shapes agree.
    ///
    /// # Shapes
    /// - `gate`, `up`: `[E, d_model, d_ff]`
    /// - `down`: `[E, d_ff, d_model]`
    pub fn from_tensors(
        gate: Option<Tensor<3>>,
        up: Tensor<3>,
        down: Tensor<3>,
    ) -> Result<Self, MoeError> {
        let [e, d, f] = up.dims();
        if e == 0 || d == 0 || f == 0 {
            return Err(MoeError::ShapeMismatch {
                name: "experts.up".into(),
                expected: vec![e.max(1), d.max(1), f.max(1)],
                got: vec![e, d, f],
            });
        }
        let check = |name: &str, got: [usize; 3], expected: [usize; 3]| {
            if got == expected {
                Ok(())
            } else {
                Err(MoeError::ShapeMismatch {
                    name: name.into(),
                    expected: expected.to_vec(),
                    got: got.to_vec(),
                })
            }
        };
        if let Some(g) = &gate {
            check("experts.gate", g.dims(), [e, d, f])?;
        }
        check("experts.down", down.dims(), [e, f, d])?;
        Ok(Experts {
            gate: gate.map(Param::from_tensor),
            up: Param::from_tensor(up),
            down: Param::from_tensor(down),
        })
    }

    /// The same experts with their bf16 weights stored **out-major** where the host kernels
    /// decode faster from that layout (a flex device, and
    /// [`moe_kernels::host::bf16_out_major_preferred`]: x86-64 with AVX-512 BF16): each tensor keeps
    /// its shape (`[E, K, N]`) and values, but becomes the `swap_dims(1, 2)` view of a
    /// contiguous `[E, N, K]` copy, each output's weights side by side (the Hugging Face
    /// `[out, in]` order; one copy of the weights, made once). Everything else (f32 weights,
    /// other devices, weights already out-major) is returned as it is.
    ///
    /// Decoding (a few tokens per expert) then streams bf16 weights at the f32 panel's rate;
    /// the tensor-op paths read the view as any other.
    pub fn with_host_layout(self) -> Self {
        // `Param::map` keeps each parameter's id (and so any optimizer state keyed by it)
        let relayout = |p: Param<Tensor<3>>| -> Param<Tensor<3>> {
            match out_major_wanted(&p.val()) {
                true => p.map(out_major),
                false => p,
            }
        };
        Experts {
            gate: self.gate.map(relayout),
            up: relayout(self.up),
            down: relayout(self.down),
        }
    }

    /// Whether expert weights of `dtype` on `device` are best stored out-major (see
    /// [`Experts::with_host_layout`]): bf16, on a device the host kernels run on (flex), on a
    /// CPU where they decode faster from that layout
    /// ([`moe_kernels::host::bf16_out_major_preferred`]). Checkpoint loaders ask this to build
    /// the out-major tensors directly (Hugging Face stores `[out, in]` already).
    pub fn prefers_out_major(device: &Device, dtype: burn::tensor::DType) -> bool {
        dtype == burn::tensor::DType::BF16
            && moe_kernels::host::host_available(device)
            && moe_kernels::host::bf16_out_major_preferred()
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.up.dims()[0]
    }

    /// Hidden size `d_model`.
    pub fn d_model(&self) -> usize {
        self.up.dims()[1]
    }

    /// Intermediate size `d_ff`.
    pub fn d_ff(&self) -> usize {
        self.up.dims()[2]
    }

    /// The FFN form, given by the presence of a gate.
    pub fn activation(&self) -> ExpertActivation {
        match self.gate {
            Some(_) => ExpertActivation::SwiGlu,
            None => ExpertActivation::Gelu,
        }
    }

    /// [`Experts::forward_expert`] where the experts step of [`Experts::forward`] would run
    /// (the one decision, [`dispatch::experts_step`]): on the host kernels when it picks them
    /// for these weights, tensor ops elsewhere. Shared experts and dense MLPs run through it.
    ///
    /// # Shapes
    /// - `x`: `[n, d_model]` → `[n, d_model]`
    pub(crate) fn forward_one(&self, expert: usize, x: Tensor<2>) -> Tensor<2> {
        #[cfg(feature = "flex")]
        if let Ok(path) =
            dispatch::experts_step(dispatch::DispatchStrategy::Auto, &x.device(), self)
            && path.ran == dispatch::DispatchPath::HostKernels
            // the host kernels fail only on shapes the layer has already checked
            && let Ok(out) = dispatch::run_expert(self, expert, x.clone())
        {
            return out;
        }
        self.forward_expert(expert, x)
    }

    /// Applies expert `expert` to every row of `x` with tensor ops (the twin of the host and
    /// GPU kernels). Where `x` and the weights differ in dtype
    /// (f32 rows on bf16 weights, as the host kernels also take them) it computes in f32 and
    /// returns `x`'s dtype.
    ///
    /// # Shapes
    /// - `x`: `[n, d_model]` → `[n, d_model]`
    pub fn forward_expert(&self, expert: usize, x: Tensor<2>) -> Tensor<2> {
        use burn::tensor::DType;
        let (d, f) = (self.d_model(), self.d_ff());
        let dtype = x.dtype();
        let mixed = [Some(&self.up), Some(&self.down), self.gate.as_ref()]
            .into_iter()
            .flatten()
            .any(|p| p.val().dtype() != dtype);
        let slice = |p: &Param<Tensor<3>>, rows: usize, cols: usize| {
            let w = p.val().narrow(0, expert, 1).reshape([rows, cols]);
            if mixed { w.cast(DType::F32) } else { w }
        };
        let x = if mixed { x.cast(DType::F32) } else { x };
        let up = x.clone().matmul(slice(&self.up, d, f));
        let hidden = match &self.gate {
            Some(gate) => silu(x.matmul(slice(gate, d, f))) * up,
            None => gelu(up),
        };
        let out = hidden.matmul(slice(&self.down, f, d));
        if mixed { out.cast(dtype) } else { out }
    }

    /// Applies the experts to `x` as `routing` says (any routing, not only this crate's router):
    /// plan, permute, experts, combine — with the kernels ([`Experts::forward_grouped`]) where
    /// they run, tensor ops ([`Experts::forward_segments`]) elsewhere.
    ///
    /// # Shapes
    /// - `x`: `[T, d_model]`, `routing`: `T` tokens → `[T, d_model]`
    pub fn forward(&self, x: Tensor<2>, routing: &Routing) -> Result<Tensor<2>, MoeError> {
        let [t, d] = x.dims();
        if d != self.d_model() {
            return Err(MoeError::HiddenSizeMismatch {
                expected: self.d_model(),
                got: d,
            });
        }
        if routing.num_experts != self.num_experts() || routing.num_tokens() != t {
            return Err(MoeError::ShapeMismatch {
                name: "routing [tokens, experts]".into(),
                expected: vec![t, self.num_experts()],
                got: vec![routing.num_tokens(), routing.num_experts],
            });
        }
        let path = dispatch::experts_step(dispatch::DispatchStrategy::Auto, &x.device(), self)?;
        dispatch::run_experts(self, x, routing, path.ran)
    }

    /// Runs every expert on its segment of expert-sorted rows with the grouped-GEMM kernels of
    /// `moe-kernels`: rows `offset_e .. offset_e + counts[e]` go to expert `e`, and the rows
    /// after the last segment (unused slots) come out as zeros. Two launches for SwiGLU
    /// experts (gate and up fused with the activation, then down), whatever the number of
    /// experts; `counts` stays on the device. Differentiable on an autodiff device.
    ///
    /// # Shapes
    /// - `sorted_rows`: `[P, d_model]`, `counts`: `[E]` → `[P, d_model]`
    ///
    /// # Errors
    /// [`MoeError::Kernel`] on a device the kernels do not run on, or with a `counts` of
    /// another length than `E`.
    pub fn forward_grouped(
        &self,
        sorted_rows: Tensor<2>,
        counts: Tensor<1, Int>,
    ) -> Result<Tensor<2>, MoeError> {
        let hidden = match &self.gate {
            Some(gate) => {
                moe_kernels::grouped_swiglu(sorted_rows, gate.val(), self.up.val(), counts.clone())?
            }
            None => gelu(moe_kernels::grouped_matmul(
                sorted_rows,
                self.up.val(),
                counts.clone(),
                false,
            )?),
        };
        Ok(moe_kernels::grouped_matmul(
            hidden,
            self.down.val(),
            counts,
            false,
        )?)
    }

    /// Runs each expert on its contiguous segment of expert-sorted rows: rows
    /// `offset_e .. offset_e + counts[e]` go to expert `e`, empty experts are skipped.
    ///
    /// # Shapes
    /// - `sorted_rows`: `[Σ counts, d_model]` → `[Σ counts, d_model]`
    pub fn forward_segments(&self, sorted_rows: Tensor<2>, counts: &[usize]) -> Tensor<2> {
        let mut outputs = Vec::with_capacity(counts.len());
        let mut start = 0;
        for (expert, &count) in counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let segment = sorted_rows.clone().narrow(0, start, count);
            outputs.push(self.forward_expert(expert, segment));
            start += count;
        }
        match outputs.len() {
            0 => sorted_rows,
            1 => outputs.pop().unwrap_or(sorted_rows),
            _ => Tensor::cat(outputs, 0),
        }
    }
}
