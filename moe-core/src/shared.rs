//! Step 6 of a forward pass, **shared**: a dense FFN that every token goes through, added to the
//! routed output, optionally scaled by a per-token sigmoid gate (Qwen2-MoE).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor};

use crate::error::MoeError;
use crate::experts::{ExpertActivation, Experts, ExpertsConfig};

/// Configuration of a [`SharedExpert`].
#[derive(Config, Debug)]
pub struct SharedExpertConfig {
    /// Hidden size `d_model`.
    pub d_model: usize,
    /// Intermediate size (DeepSeek: `n_shared_experts * moe_intermediate_size`).
    pub d_ff: usize,
    /// Scale the output by `sigmoid(x · gate)` (Qwen2-MoE `shared_expert_gate`).
    #[config(default = false)]
    pub gated: bool,
    /// FFN form.
    #[config(default = "ExpertActivation::SwiGlu")]
    pub activation: ExpertActivation,
}

impl SharedExpertConfig {
    /// Validates the configuration and creates the parameters on `device`.
    pub fn init(&self, device: &Device) -> Result<SharedExpert, MoeError> {
        let ffn = ExpertsConfig::new(self.d_model, self.d_ff, 1)
            .with_activation(self.activation)
            .init(device)?;
        let gate = self.gated.then(|| {
            Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([self.d_model, 1], device)
        });
        Ok(SharedExpert { ffn, gate })
    }
}

/// A dense FFN applied to every token (a one-expert [`Experts`]), with an optional sigmoid gate.
#[derive(Module, Debug)]
pub struct SharedExpert {
    /// The FFN, stored as a single expert.
    pub ffn: Experts,
    /// Gate weight, `[d_model, 1]` (the transpose of Qwen2-MoE's `shared_expert_gate.weight`).
    pub gate: Option<Param<Tensor<2>>>,
}

impl SharedExpert {
    /// Builds a shared expert from existing parts, checking the gate's shape.
    pub fn from_parts(ffn: Experts, gate: Option<Tensor<2>>) -> Result<Self, MoeError> {
        if ffn.num_experts() != 1 {
            return Err(MoeError::ShapeMismatch {
                name: "shared_expert.up".into(),
                expected: vec![1, ffn.d_model(), ffn.d_ff()],
                got: ffn.up.dims().to_vec(),
            });
        }
        if let Some(g) = &gate
            && g.dims() != [ffn.d_model(), 1]
        {
            return Err(MoeError::ShapeMismatch {
                name: "shared_expert.gate".into(),
                expected: vec![ffn.d_model(), 1],
                got: g.dims().to_vec(),
            });
        }
        Ok(SharedExpert {
            ffn,
            gate: gate.map(Param::from_tensor),
        })
    }

    /// # Shapes
    /// - `x`: `[T, d_model]` → `[T, d_model]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let out = self.ffn.forward_one(0, x.clone());
        match &self.gate {
            Some(gate) => out * sigmoid(x.matmul(gate.val())),
            None => out,
        }
    }
}
