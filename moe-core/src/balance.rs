//! Training-time balance: the losses read from a [`Routing`] (Switch/GShard load balancing as
//! OLMoE computes it, the ST-MoE router z-loss), DeepSeek-V3's auxiliary-loss-free bias update,
//! and the load statistics a training loop prints.

use burn::tensor::{Int, Tensor};

use crate::error::MoeError;
use crate::router::{Router, Routing};

/// Pairs the router selected per expert as f32 `[E]`, before any capacity limit (kept pairs
/// plus [`Routing::dropped`]); unused slots left out. Switch and GShard measure the load this
/// way: counting after the cut would cap an overloaded expert at its capacity and hide the
/// overload the loss exists to correct.
fn load(routing: &Routing) -> Tensor<1> {
    let kept = routing.expert_counts();
    match &routing.dropped {
        Some(dropped) => (kept + dropped.clone()).float(),
        None => kept.float(),
    }
}

/// The Switch / GShard load-balancing loss in the form OLMoE (and every Hugging Face MoE)
/// multiplies by `router_aux_loss_coef`:
///
/// `E · Σ_e f_e · P_e`, with `f_e` = pairs the router selected for expert `e` (dropped ones
/// included) divided by the tokens `T` (so `Σ_e f_e = k` at one k per token) and `P_e` the
/// mean score of expert `e` over the tokens. The scores are those the router used: after the
/// call's temperature; with a selection bias, the counts follow the biased choice.
///
/// It is `k` when routing is perfectly balanced and grows as the load concentrates. Gradients
/// flow through the scores `P` (the counts are piecewise constant). For the loss of a whole
/// model, see [`load_balancing_loss_layers`].
///
/// # Errors
/// [`MoeError::MissingRoutingPart`] for a routing without scores (one made by hand).
pub fn load_balancing_loss(routing: &Routing) -> Result<Tensor<1>, MoeError> {
    load_balancing_loss_layers(std::slice::from_ref(routing))
}

/// The load-balancing loss of several layers as transformers computes it for a whole model
/// (`load_balancing_loss_func` over every layer's router logits): the tokens of all layers are
/// pooled, so `f_e` counts the pairs of every layer over `L · T` tokens and `P_e` is the mean
/// score over them, then `E · Σ_e f_e · P_e`.
///
/// Pooling lets one layer's overload offset another's on the same expert index; to balance
/// every layer, average [`load_balancing_loss`] over the layers (Switch / GShard, and what
/// `moe::train` does).
///
/// # Errors
/// No routing, routings over different numbers of experts, or one without scores.
pub fn load_balancing_loss_layers(routings: &[Routing]) -> Result<Tensor<1>, MoeError> {
    let first = routings.first().ok_or(MoeError::InvalidSetting {
        name: "routings",
        expected: "at least one",
        value: 0.0,
    })?;
    let num_experts = first.num_experts;
    let mut total: Option<(Tensor<1>, Tensor<1>)> = None;
    let mut tokens = 0usize;
    for routing in routings {
        if routing.num_experts != num_experts {
            return Err(MoeError::ShapeMismatch {
                name: "routing experts".into(),
                expected: vec![num_experts],
                got: vec![routing.num_experts],
            });
        }
        let scores = routing.scores.clone().ok_or(MoeError::MissingRoutingPart {
            what: "load_balancing_loss",
            field: "scores",
        })?;
        tokens += routing.num_tokens();
        let counts = load(routing);
        let score_sum = scores.sum_dim(0).reshape([num_experts]);
        total = Some(match total {
            None => (counts, score_sum),
            Some((c, s)) => (c + counts, s + score_sum),
        });
    }
    let (counts, score_sum) = total.expect("at least one routing");
    let tokens = tokens.max(1) as f64;
    let fraction = counts.div_scalar(tokens); // f_e
    let mean_score = score_sum.div_scalar(tokens); // P_e
    Ok((fraction * mean_score).sum().mul_scalar(num_experts as f64))
}

/// The router z-loss of ST-MoE (Zoph et al. 2022): the mean over tokens of
/// `(log Σ_e exp(logit_e))²`, which keeps the router logits small.
///
/// # Errors
/// [`MoeError::MissingRoutingPart`] for a routing without logits (one made by hand).
pub fn router_z_loss(routing: &Routing) -> Result<Tensor<1>, MoeError> {
    let logits = routing.logits.clone().ok_or(MoeError::MissingRoutingPart {
        what: "router_z_loss",
        field: "logits",
    })?;
    let peak = logits.clone().max_dim(1).detach(); // [T, 1]
    let log_sum_exp = (logits - peak.clone()).exp().sum_dim(1).log() + peak;
    Ok(log_sum_exp.square().mean())
}

/// DeepSeek-V3's auxiliary-loss-free balancing: after each training step, every expert's
/// selection bias moves by `update_rate` down when its load (pairs selected, dropped ones
/// included) is above the mean and up when it is below (unchanged when equal). The bias only picks experts; it changes no weight and
/// needs no loss term or gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuxFreeBalancer {
    /// The bias update speed `γ` (DeepSeek-V3 uses 0.001).
    pub update_rate: f64,
}

impl AuxFreeBalancer {
    /// A balancer moving the biases by `update_rate` per step.
    ///
    /// # Errors
    /// [`MoeError::InvalidSetting`] unless the rate is finite and positive.
    pub fn new(update_rate: f64) -> Result<Self, MoeError> {
        if !update_rate.is_finite() || update_rate <= 0.0 {
            return Err(MoeError::InvalidSetting {
                name: "update_rate",
                expected: "finite and > 0",
                value: update_rate,
            });
        }
        Ok(AuxFreeBalancer { update_rate })
    }

    /// Moves `router`'s selection bias by the load of `routing` (the routing that router
    /// produced this step). The parameter keeps its id, so optimizer state stays attached.
    ///
    /// # Errors
    /// [`MoeError::NoSelectionBias`] when the router has no selection bias, and
    /// [`MoeError::ShapeMismatch`] when the routing has another number of experts.
    pub fn update(&self, router: &mut Router, routing: &Routing) -> Result<(), MoeError> {
        let num_experts = router.settings.num_experts;
        if routing.num_experts != num_experts {
            return Err(MoeError::ShapeMismatch {
                name: "routing experts".into(),
                expected: vec![num_experts],
                got: vec![routing.num_experts],
            });
        }
        let bias = router
            .selection_bias
            .take()
            .ok_or(MoeError::NoSelectionBias)?;
        let counts = load(routing);
        let mean = counts.clone().mean();
        let step = (mean.expand([num_experts]) - counts)
            .sign()
            .mul_scalar(self.update_rate);
        router.selection_bias = Some(bias.map(|b| {
            let dtype = b.dtype();
            let step = step.to_device(&b.device()).cast(dtype);
            (b.detach() + step).detach()
        }));
        Ok(())
    }
}

/// Pairs routed to each expert, on the host (one read).
pub fn expert_load(routing: &Routing) -> Vec<usize> {
    host_counts(routing.expert_counts())
}

fn host_counts(counts: Tensor<1, Int>) -> Vec<usize> {
    counts
        .into_data()
        .iter::<i64>()
        .map(|c| c.max(0) as usize)
        .collect()
}

/// Coefficient of variation of a load vector: population standard deviation over mean (0 for
/// a perfectly even load or no load at all).
pub fn load_cv(load: &[usize]) -> f64 {
    if load.is_empty() {
        return 0.0;
    }
    let n = load.len() as f64;
    let mean = load.iter().sum::<usize>() as f64 / n;
    if mean == 0.0 {
        return 0.0;
    }
    let var = load.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean
}
