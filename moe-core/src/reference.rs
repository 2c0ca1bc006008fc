//! A deliberately dumb oracle: the whole MoE layer as plain loops over tokens and slots on the
//! host, in f64 arithmetic over f32 data. For tests and benchmarks only.

use burn::tensor::Tensor;

use crate::experts::Experts;
use crate::layer::MoeLayer;
use crate::options::Capacity;
use crate::router::{RouterKind, RouterSettings, Scoring, hash_experts, random_experts};

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
    /// choice is from a tie that float rounding could flip. Under expert choice, the smallest
    /// gap at any expert's capacity boundary; ∞ for the hash and random routers.
    pub margin: f64,
    /// Experts this token was routed to whose capacity was full (not in `experts`).
    pub dropped: Vec<usize>,
}

/// The oracle's copy of [`crate::ForwardOptions`], with the k per token and host token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct NaiveOptions {
    /// k of every token.
    pub top_k: Vec<usize>,
    /// Router temperature.
    pub temperature: f64,
    /// Capacity limit per expert.
    pub capacity: Option<Capacity>,
    /// Token ids (hash router).
    pub token_ids: Option<Vec<u64>>,
    /// The call's seed (random router).
    pub seed: u64,
}

impl NaiveOptions {
    /// k per token, temperature 1, dropless.
    pub fn new(top_k: Vec<usize>) -> Self {
        NaiveOptions {
            top_k,
            temperature: 1.0,
            capacity: None,
            token_ids: None,
            seed: 0,
        }
    }
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

    /// Router logits of one token.
    fn logits(&self, x: &[f64]) -> Vec<f64> {
        let (d, e) = (self.d_model, self.num_experts);
        (0..e)
            .map(|j| (0..d).map(|i| x[i] * self.router[i * e + j]).sum())
            .collect()
    }

    /// Scores of one token's logits at `temperature` (softmax for expert choice).
    fn scores(&self, logits: &[f64], temperature: f64) -> Vec<f64> {
        let softmax = |l: &[f64]| -> Vec<f64> {
            let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exp: Vec<f64> = l
                .iter()
                .map(|v| (v / temperature - max / temperature).exp())
                .collect();
            let total: f64 = exp.iter().sum();
            exp.iter().map(|v| v / total).collect()
        };
        match (self.settings.kind, self.settings.scoring) {
            (RouterKind::ExpertChoice { .. }, _) | (_, Scoring::Softmax) => softmax(logits),
            (_, Scoring::Sigmoid) => logits
                .iter()
                .map(|l| 1.0 / (1.0 + (-l / temperature).exp()))
                .collect(),
        }
    }

    /// Routes one token to its `top_k` experts (token choice, temperature 1).
    pub fn route(&self, x: &[f64], top_k: usize) -> NaiveRoute {
        self.route_at(x, top_k, 1.0)
    }

    /// Routes one token to its `top_k` experts by token choice at `temperature`.
    fn route_at(&self, x: &[f64], top_k: usize, temperature: f64) -> NaiveRoute {
        let (e, s) = (self.num_experts, &self.settings);
        let logits = self.logits(x);
        let scores = self.scores(&logits, temperature);
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
            dropped: Vec::new(),
        }
    }

    /// Every token's route under the router's kind and `options`, before any capacity limit.
    // Index loops over experts and slots read like the definitions they check.
    #[allow(clippy::needless_range_loop)]
    fn routes(&self, x: &[f64], options: &NaiveOptions) -> Vec<NaiveRoute> {
        let (d, e) = (self.d_model, self.num_experts);
        let tokens = options.top_k.len();
        let token = |t: usize| &x[t * d..(t + 1) * d];
        let uniform = |t: usize, experts: Vec<usize>| NaiveRoute {
            weights: vec![1.0 / experts.len().max(1) as f64; experts.len()],
            experts,
            logits: self.logits(token(t)),
            margin: f64::INFINITY,
            dropped: Vec::new(),
        };
        match self.settings.kind {
            RouterKind::TokenChoice => (0..tokens)
                .map(|t| self.route_at(token(t), options.top_k[t], options.temperature))
                .collect(),
            RouterKind::Hash { seed } => {
                let ids = options
                    .token_ids
                    .as_ref()
                    .expect("hash routing needs token ids");
                (0..tokens)
                    .map(|t| uniform(t, hash_experts(seed, ids[t], e, options.top_k[t])))
                    .collect()
            }
            RouterKind::Random { seed } => random_experts(seed, options.seed, e, &options.top_k)
                .into_iter()
                .enumerate()
                .map(|(t, experts)| uniform(t, experts))
                .collect(),
            RouterKind::ExpertChoice { capacity_factor } => {
                let logits: Vec<Vec<f64>> = (0..tokens).map(|t| self.logits(token(t))).collect();
                let scores: Vec<Vec<f64>> = logits
                    .iter()
                    .map(|l| self.scores(l, options.temperature))
                    .collect();
                let capacity = crate::router::expert_choice_capacity(tokens, e, capacity_factor);
                let mut taken = vec![Vec::new(); tokens];
                let mut margin = f64::INFINITY;
                for j in 0..e {
                    let order = ranked(tokens, |t| scores[t][j]);
                    for &t in &order[..capacity] {
                        taken[t].push(j);
                    }
                    if let Some(&next) = order.get(capacity) {
                        margin = margin.min(scores[order[capacity - 1]][j] - scores[next][j]);
                    }
                }
                taken
                    .into_iter()
                    .enumerate()
                    .map(|(t, experts)| {
                        let experts = {
                            let order = ranked(experts.len(), |m| scores[t][experts[m]]);
                            order.iter().map(|&m| experts[m]).collect::<Vec<_>>()
                        };
                        NaiveRoute {
                            weights: experts.iter().map(|&j| scores[t][j]).collect(),
                            experts,
                            logits: logits[t].clone(),
                            margin,
                            dropped: Vec::new(),
                        }
                    })
                    .collect()
            }
        }
    }

    /// Runs the layer in f64 on `x` (`[T, d_model]`, row-major) with `options`: the router's
    /// kind, temperature, then the capacity limit (pairs ranked all first slots in token order,
    /// then all second slots, …). Returns the output and each token's route.
    #[allow(clippy::needless_range_loop)]
    pub fn forward_options(
        &self,
        x: &[f64],
        options: &NaiveOptions,
    ) -> (Vec<f64>, Vec<NaiveRoute>) {
        let d = self.d_model;
        let mut routes = self.routes(x, options);
        if let Some(capacity) = options.capacity {
            let slots = routes.iter().map(|r| r.experts.len()).max().unwrap_or(0);
            let limit = capacity.per_expert(routes.len(), slots, self.num_experts);
            let mut used = vec![0usize; self.num_experts];
            let mut keep: Vec<Vec<bool>> =
                routes.iter().map(|r| vec![true; r.experts.len()]).collect();
            for slot in 0..slots {
                for (t, route) in routes.iter().enumerate() {
                    if let Some(&j) = route.experts.get(slot) {
                        used[j] += 1;
                        keep[t][slot] = used[j] <= limit;
                    }
                }
            }
            for (route, keep) in routes.iter_mut().zip(keep) {
                let pairs: Vec<(usize, f64, bool)> = route
                    .experts
                    .iter()
                    .zip(&route.weights)
                    .zip(keep)
                    .map(|((&j, &w), k)| (j, w, k))
                    .collect();
                route.experts = pairs.iter().filter(|p| p.2).map(|p| p.0).collect();
                route.weights = pairs.iter().filter(|p| p.2).map(|p| p.1).collect();
                route.dropped = pairs.iter().filter(|p| !p.2).map(|p| p.0).collect();
            }
        }
        let mut out = Vec::with_capacity(x.len());
        for (t, route) in routes.iter().enumerate() {
            let token = &x[t * d..(t + 1) * d];
            let mut acc = vec![0.0f64; d];
            for (&expert, &w) in route.experts.iter().zip(&route.weights) {
                let y = self.experts.apply(expert, token);
                acc.iter_mut().zip(&y).for_each(|(a, v)| *a += w * v);
            }
            if let Some((ffn, gate)) = &self.shared {
                let y = ffn.apply(0, token);
                let scale = match gate {
                    Some(g) => {
                        let logit: f64 = (0..d).map(|i| token[i] * g[i]).sum();
                        1.0 / (1.0 + (-logit).exp())
                    }
                    None => 1.0,
                };
                acc.iter_mut().zip(&y).for_each(|(a, v)| *a += scale * v);
            }
            out.extend(acc);
        }
        (out, routes)
    }

    /// Runs the layer on `tokens` rows of `x` (`[T, d_model]`, row-major), token `t` with
    /// `top_k[t]` experts. Returns the output (`[T, d_model]`) and each token's route.
    pub fn forward(&self, x: &[f32], top_k: &[usize]) -> (Vec<f32>, Vec<NaiveRoute>) {
        let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (out, routes) = self.forward_options(&x, &NaiveOptions::new(top_k.to_vec()));
        (out.iter().map(|&v| v as f32).collect(), routes)
    }
}
