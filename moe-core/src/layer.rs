//! The MoE layer: route → plan → permute → experts → unpermute/combine → shared, all entered
//! from [`MoeLayer::try_forward`].

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::CallPath;
use crate::dispatch::{self, DispatchStrategy};
use crate::error::MoeError;
use crate::experts::{ExpertActivation, Experts, ExpertsConfig};
use crate::options::ForwardOptions;
use crate::router::{
    GroupLimit, Router, RouterConfig, RouterKind, Routing, Scoring, SlotPlan, TopK,
};
use crate::shared::{SharedExpert, SharedExpertConfig};

/// Configuration of a [`MoeLayer`]: the router, the routed experts and an optional shared expert.
#[derive(Config, Debug)]
pub struct MoeLayerConfig {
    /// Hidden size `d_model`.
    pub d_model: usize,
    /// Intermediate size `d_ff` of each routed expert.
    pub d_ff: usize,
    /// Number of routed experts `E`.
    pub num_experts: usize,
    /// Default experts per token (a forward call may choose another, see [`TopK`]).
    pub top_k: usize,
    /// Softmax or sigmoid router scores.
    #[config(default = "Scoring::Softmax")]
    pub scoring: Scoring,
    /// Renormalise the selected weights to sum to one.
    #[config(default = false)]
    pub normalize_top_k: bool,
    /// A learnable selection-only bias per expert (DeepSeek-V3).
    #[config(default = false)]
    pub selection_bias: bool,
    /// Group-limited selection (DeepSeek-V3).
    #[config(default = "None")]
    pub group_limit: Option<GroupLimit>,
    /// Multiplies the routing weights.
    #[config(default = 1.0)]
    pub routed_scaling_factor: f64,
    /// Token choice (top-k), expert choice, hash or random routing.
    #[config(default = "RouterKind::TokenChoice")]
    pub router_kind: RouterKind,
    /// Expert FFN form.
    #[config(default = "ExpertActivation::SwiGlu")]
    pub activation: ExpertActivation,
    /// A dense expert every token also goes through.
    #[config(default = "None")]
    pub shared_expert: Option<SharedExpertConfig>,
}

impl MoeLayerConfig {
    /// OLMoE / Qwen3-MoE style: softmax → top-k, no renormalisation.
    pub fn olmoe(d_model: usize, d_ff: usize, num_experts: usize, top_k: usize) -> Self {
        Self::new(d_model, d_ff, num_experts, top_k)
    }

    /// Mixtral style: softmax → top-k, always renormalised.
    pub fn mixtral(d_model: usize, d_ff: usize, num_experts: usize, top_k: usize) -> Self {
        Self::new(d_model, d_ff, num_experts, top_k).with_normalize_top_k(true)
    }

    /// Qwen2-MoE style: OLMoE routing plus a sigmoid-gated shared expert of size `shared_d_ff`.
    pub fn qwen2_moe(
        d_model: usize,
        d_ff: usize,
        num_experts: usize,
        top_k: usize,
        shared_d_ff: usize,
    ) -> Self {
        Self::new(d_model, d_ff, num_experts, top_k).with_shared_expert(Some(
            SharedExpertConfig::new(d_model, shared_d_ff).with_gated(true),
        ))
    }

    /// DeepSeek-V3 style: sigmoid scores, selection bias, group-limited top-k, renormalised
    /// and scaled weights, and an ungated shared expert of size `shared_d_ff`.
    #[allow(clippy::too_many_arguments)]
    pub fn deepseek_v3(
        d_model: usize,
        d_ff: usize,
        num_experts: usize,
        top_k: usize,
        group_limit: GroupLimit,
        routed_scaling_factor: f64,
        shared_d_ff: usize,
    ) -> Self {
        Self::new(d_model, d_ff, num_experts, top_k)
            .with_scoring(Scoring::Sigmoid)
            .with_selection_bias(true)
            .with_group_limit(Some(group_limit))
            .with_normalize_top_k(true)
            .with_routed_scaling_factor(routed_scaling_factor)
            .with_shared_expert(Some(SharedExpertConfig::new(d_model, shared_d_ff)))
    }

    /// The router part of this configuration.
    pub fn router(&self) -> RouterConfig {
        RouterConfig::new(self.d_model, self.num_experts, self.top_k)
            .with_scoring(self.scoring)
            .with_normalize_top_k(self.normalize_top_k)
            .with_selection_bias(self.selection_bias)
            .with_group_limit(self.group_limit)
            .with_routed_scaling_factor(self.routed_scaling_factor)
            .with_kind(self.router_kind)
    }

    /// The routed-experts part of this configuration.
    pub fn experts(&self) -> ExpertsConfig {
        ExpertsConfig::new(self.d_model, self.d_ff, self.num_experts)
            .with_activation(self.activation)
    }

    /// Checks the whole configuration without allocating anything.
    pub fn validate(&self) -> Result<(), MoeError> {
        self.router().validate()?;
        self.experts().validate()?;
        if let Some(shared) = &self.shared_expert {
            if shared.d_model != self.d_model {
                return Err(MoeError::HiddenSizeMismatch {
                    expected: self.d_model,
                    got: shared.d_model,
                });
            }
            if shared.d_ff == 0 {
                return Err(MoeError::ZeroSize {
                    name: "shared_expert.d_ff",
                });
            }
        }
        Ok(())
    }

    /// Validates the configuration and creates the layer on `device`.
    pub fn init(&self, device: &Device) -> Result<MoeLayer, MoeError> {
        self.validate()?;
        Ok(MoeLayer {
            router: self.router().init(device)?,
            experts: self.experts().init(device)?,
            shared: self
                .shared_expert
                .as_ref()
                .map(|s| s.init(device))
                .transpose()?,
            dispatch: DispatchStrategy::Auto,
        })
    }
}

/// What a forward pass returns: the hidden states and the routing that produced them.
#[derive(Debug, Clone)]
pub struct MoeOutput<const D: usize> {
    /// Layer output, the input's shape.
    pub hidden: Tensor<D>,
    /// Routing of the `T = B·S` tokens, for losses and statistics.
    pub routing: Routing,
    /// What ran, step by step, and why a faster implementation did not.
    pub path: CallPath,
}

/// A dropless Mixture-of-Experts layer.
#[derive(Module, Debug)]
pub struct MoeLayer {
    /// Picks k experts per token.
    pub router: Router,
    /// The routed experts.
    pub experts: Experts,
    /// The optional dense expert.
    pub shared: Option<SharedExpert>,
    /// Kernels or tensor ops for permute and combine (resolved per call from the device).
    #[module(skip)]
    pub dispatch: DispatchStrategy,
}

impl MoeLayer {
    /// Builds a layer from parts (loaded weights), checking that their sizes agree.
    pub fn from_parts(
        router: Router,
        experts: Experts,
        shared: Option<SharedExpert>,
    ) -> Result<Self, MoeError> {
        let [d_model, num_experts] = router.weight.dims();
        let expected = [num_experts, d_model, experts.d_ff()];
        if experts.up.dims() != expected {
            return Err(MoeError::ShapeMismatch {
                name: "experts.up".into(),
                expected: expected.to_vec(),
                got: experts.up.dims().to_vec(),
            });
        }
        if router.settings.num_experts != num_experts {
            return Err(MoeError::ShapeMismatch {
                name: "router.weight".into(),
                expected: vec![d_model, router.settings.num_experts],
                got: vec![d_model, num_experts],
            });
        }
        if let Some(bias) = &router.selection_bias
            && bias.dims() != [num_experts]
        {
            return Err(MoeError::ShapeMismatch {
                name: "router.selection_bias".into(),
                expected: vec![num_experts],
                got: bias.dims().to_vec(),
            });
        }
        if let Some(s) = &shared
            && s.ffn.d_model() != d_model
        {
            return Err(MoeError::HiddenSizeMismatch {
                expected: d_model,
                got: s.ffn.d_model(),
            });
        }
        Ok(MoeLayer {
            router,
            experts,
            shared,
            dispatch: DispatchStrategy::Auto,
        })
    }

    /// The same layer with permute and combine run by `strategy`.
    pub fn with_dispatch(mut self, strategy: DispatchStrategy) -> Self {
        self.dispatch = strategy;
        self
    }

    /// Hidden size `d_model`.
    pub fn d_model(&self) -> usize {
        self.experts.d_model()
    }

    /// Number of routed experts `E`.
    pub fn num_experts(&self) -> usize {
        self.experts.num_experts()
    }

    /// Forward pass at the configured k.
    ///
    /// # Shapes
    /// - `x`: `[T, d_model]` or `[B, S, d_model]` → same shape
    ///
    /// # Panics
    /// On the errors [`MoeLayer::try_forward`] returns.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self.try_forward(x, &TopK::Configured) {
            Ok(out) => out.hidden,
            Err(err) => panic!("MoeLayer::forward: {err}"),
        }
    }

    /// Forward pass with a k chosen for this call (the MoE-PHDS dial), returning the routing too.
    ///
    /// # Shapes
    /// - `x`: `[T, d_model]` or `[B, S, d_model]` → `hidden` of the same shape
    ///
    /// # Errors
    /// A rank other than 2 or 3, a last axis other than `d_model`, a k out of range, a
    /// per-row k list of the wrong length, or [`DispatchStrategy::Kernels`] on a device the
    /// kernels do not run on.
    pub fn try_forward<const D: usize>(
        &self,
        x: Tensor<D>,
        top_k: &TopK,
    ) -> Result<MoeOutput<D>, MoeError> {
        self.try_forward_with(x, &ForwardOptions::new().with_top_k(top_k.clone()))
    }

    /// Forward pass with every per-call choice of `options`: the k dial, the router
    /// temperature, a capacity limit (dropped pairs contribute nothing), the token ids of the
    /// hash router and the random router's seed.
    ///
    /// # Shapes
    /// - `x`: `[T, d_model]` or `[B, S, d_model]` → `hidden` of the same shape
    /// - `options.token_ids`: `[T]` (`T = B·S`, row-major)
    ///
    /// # Errors
    /// Those of [`MoeLayer::try_forward`], a temperature or capacity factor that is not finite
    /// and positive, and (hash router) missing, negative or miscounted token ids.
    pub fn try_forward_with<const D: usize>(
        &self,
        x: Tensor<D>,
        options: &ForwardOptions,
    ) -> Result<MoeOutput<D>, MoeError> {
        // check the input, flatten to [T, d_model]
        let dims = x.dims();
        let seq_len = match D {
            2 => 1,
            3 => dims[1],
            rank => return Err(MoeError::WrongRank { rank }),
        };
        let d_model = self.d_model();
        if dims[D - 1] != d_model {
            return Err(MoeError::HiddenSizeMismatch {
                expected: d_model,
                got: dims[D - 1],
            });
        }
        let tokens = dims[..D - 1].iter().product();
        let slots = SlotPlan::resolve(&options.top_k, &self.router.settings, tokens, seq_len)?;
        // The one decision of what runs, and why.
        let path = dispatch::decide(
            self.dispatch,
            &x.device(),
            &self.router.settings,
            &self.experts,
            tokens,
            slots.per_token.is_some(),
        )?;
        if tokens == 0 {
            // Nothing to route or compute: an empty output and an empty routing.
            // (not a reshape: Burn reads a 0 in a reshape as "keep this axis")
            let flat = Tensor::<2>::zeros([0, d_model], (&x.device(), x.dtype()));
            let routing = self
                .router
                .route_slots(flat, &slots, options, path.epilogue)?;
            return Ok(MoeOutput {
                hidden: x,
                routing,
                path,
            });
        }
        let x = x.reshape([tokens, d_model]);

        // 1. route
        let routing = self
            .router
            .route_slots(x.clone(), &slots, options, path.epilogue)?;
        // 2–5. plan, permute, experts, unpermute + combine
        let routed = dispatch::run_experts(&self.experts, x.clone(), &routing, path.experts.ran)?;
        // 6. shared
        let hidden = match &self.shared {
            Some(shared) => routed + shared.forward(x),
            None => routed,
        };
        Ok(MoeOutput {
            hidden: hidden.reshape(dims),
            routing,
            path,
        })
    }
}
