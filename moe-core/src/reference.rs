//! A deliberately dumb oracle: the whole MoE layer as plain loops over tokens and slots on the
//! host, in f64 arithmetic over f32 data. For tests and benchmarks only.

use burn::tensor::Tensor;

use crate::experts::Experts;
use crate::layer::MoeLayer;
use crate::router::{RouterSettings, Scoring};

fn host<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().iter::<f32>().map(f64::from).collect()
}

/// Host copy of one set of stacked experts.
#[derive(Debug, Clone)]
struct NaiveExperts {
    d_model: usize,
    d_ff: usize,
    gate: Option<Vec<f64>>,
    up: Vec<f64>,
    down: Vec<f64>,
}

impl NaiveExperts {
    fn from_experts(experts: &Experts) -> Self {
        NaiveExperts {
            d_model: experts.d_model(),
            d_ff: experts.d_ff(),
            gate: experts.gate.as_ref().map(|g| host(g.val())),
            up: host(experts.up.val()),
            down: host(experts.down.val()),
        }
    }

    /// `down(act(x · gate) ⊙ (x · up))` for one token and one expert.
    fn apply(&self, expert: usize, x: &[f64]) -> Vec<f64> {
        let (d, f) = (self.d_model, self.d_ff);
        let project = |w: &[f64], j: usize| -> f64 {
            (0..d).map(|i| x[i] * w[expert * d * f + i * f + j]).sum()
        };
        let hidden: Vec<f64> = (0..f)
            .map(|j| {
                let up = project(&self.up, j);
                match &self.gate {
                    Some(gate) => {
                        let g = project(gate, j);
                        g / (1.0 + (-g).exp()) * up
                    }
                    None => 0.5 * up * (1.0 + libm::erf(up / std::f64::consts::SQRT_2)),
                }
            })
            .collect();
        (0..d)
            .map(|o| {
                (0..f)
                    .map(|j| hidden[j] * self.down[expert * f * d + j * d + o])
                    .sum()
            })
            .collect()
    }
}

/// The experts and weights one token was routed to by [`NaiveMoe`].
#[derive(Debug, Clone, PartialEq)]
pub struct NaiveRoute {
    /// Selected experts, best first.
    pub experts: Vec<usize>,
    /// Their combine weights.
    pub weights: Vec<f64>,
    /// Router logits of every expert.
    pub logits: Vec<f64>,
    /// Gap between the k-th and the (k+1)-th selection score (∞ when k = E): how far the
    /// choice is from a tie that float rounding could flip.
    pub margin: f64,
}

/// The oracle: a host copy of a [`MoeLayer`]'s parameters and rules.
#[derive(Debug, Clone)]
pub struct NaiveMoe {
    d_model: usize,
    num_experts: usize,
    settings: RouterSettings,
    router: Vec<f64>,
    bias: Option<Vec<f64>>,
    experts: NaiveExperts,
    shared: Option<(NaiveExperts, Option<Vec<f64>>)>,
}

/// Sorts `0..n` by descending `score`, lower index first on ties.
fn ranked(n: usize, score: impl Fn(usize) -> f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    order
}

impl NaiveMoe {
    /// Copies the layer's parameters to the host (reads the device once per tensor).
    pub fn from_layer(layer: &MoeLayer) -> Self {
        NaiveMoe {
            d_model: layer.d_model(),
            num_experts: layer.num_experts(),
            settings: layer.router.settings.clone(),
            router: host(layer.router.weight.val()),
            bias: layer.router.selection_bias.as_ref().map(|b| host(b.val())),
            experts: NaiveExperts::from_experts(&layer.experts),
            shared: layer.shared.as_ref().map(|s| {
                (
                    NaiveExperts::from_experts(&s.ffn),
                    s.gate.as_ref().map(|g| host(g.val())),
                )
            }),
        }
    }

    /// Routes one token to its `top_k` experts.
    pub fn route(&self, x: &[f64], top_k: usize) -> NaiveRoute {
        let (d, e, s) = (self.d_model, self.num_experts, &self.settings);
        let logits: Vec<f64> = (0..e)
            .map(|j| (0..d).map(|i| x[i] * self.router[i * e + j]).sum())
            .collect();
        let scores: Vec<f64> = match s.scoring {
            Scoring::Softmax => {
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let total: f64 = exp.iter().sum();
                exp.iter().map(|v| v / total).collect()
            }
            Scoring::Sigmoid => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
        };
        let choice: Vec<f64> = (0..e)
            .map(|j| scores[j] + self.bias.as_ref().map_or(0.0, |b| b[j]))
            .collect();
        let allowed: Vec<bool> = match s.group_limit {
            None => vec![true; e],
            Some(g) => {
                let size = e / g.n_group;
                let group_score = |grp: usize| -> f64 {
                    let members = ranked(size, |m| choice[grp * size + m]);
                    members
                        .iter()
                        .take(2)
                        .map(|&m| choice[grp * size + m])
                        .sum()
                };
                let kept = ranked(g.n_group, group_score);
                let kept = &kept[..g.topk_group];
                (0..e).map(|j| kept.contains(&(j / size))).collect()
            }
        };
        let candidates: Vec<usize> = ranked(e, |j| choice[j])
            .into_iter()
            .filter(|&j| allowed[j])
            .collect();
        let experts = candidates[..top_k].to_vec();
        let margin = match candidates.get(top_k) {
            Some(&next) => choice[experts[top_k - 1]] - choice[next],
            None => f64::INFINITY,
        };
        let mut weights: Vec<f64> = experts.iter().map(|&j| scores[j]).collect();
        if s.normalize_top_k {
            let total: f64 = weights.iter().sum::<f64>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= total);
        }
        weights
            .iter_mut()
            .for_each(|w| *w *= s.routed_scaling_factor);
        NaiveRoute {
            experts,
            weights,
            logits,
            margin,
        }
    }

    /// Runs the layer on `tokens` rows of `x` (`[T, d_model]`, row-major), token `t` with
    /// `top_k[t]` experts. Returns the output (`[T, d_model]`) and each token's route.
    pub fn forward(&self, x: &[f32], top_k: &[usize]) -> (Vec<f32>, Vec<NaiveRoute>) {
        let d = self.d_model;
        let mut out = Vec::with_capacity(x.len());
        let mut routes = Vec::with_capacity(top_k.len());
        for (t, &k) in top_k.iter().enumerate() {
            let token: Vec<f64> = x[t * d..(t + 1) * d].iter().map(|&v| v as f64).collect();
            let route = self.route(&token, k);
            let mut acc = vec![0.0f64; d];
            for (&expert, &w) in route.experts.iter().zip(&route.weights) {
                let y = self.experts.apply(expert, &token);
                acc.iter_mut().zip(&y).for_each(|(a, v)| *a += w * v);
            }
            if let Some((ffn, gate)) = &self.shared {
                let y = ffn.apply(0, &token);
                let scale = match gate {
                    Some(g) => {
                        let logit: f64 = (0..d).map(|i| token[i] * g[i]).sum();
                        1.0 / (1.0 + (-logit).exp())
                    }
                    None => 1.0,
                };
                acc.iter_mut().zip(&y).for_each(|(a, v)| *a += scale * v);
            }
            out.extend(acc.iter().map(|&v| v as f32));
            routes.push(route);
        }
        (out, routes)
    }
}
