//! Step 1 of a forward pass, **route**: score every expert for every token and pick experts —
//! each token its top k (token choice, here), or each expert its top tokens, a hash of the
//! token id or a random draw ([`RouterKind`], in `choice.rs`) — then apply the call's capacity
//! limit.
//!
//! The router is independent of the experts: it returns a [`Routing`] that the dispatch step,
//! load-balancing losses and statistics all read.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{Bool, DType, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::dispatch::{self, DispatchPath, DispatchStrategy, StepPath};
use crate::error::MoeError;
use crate::options::{Capacity, ForwardOptions};

mod choice;

pub use choice::{expert_choice_capacity, hash_experts, random_experts};

/// Added to the renormalisation denominator, as DeepSeek-V3 does (`+ 1e-20`); it changes no
/// f32 sum of probabilities and keeps an all-zero row finite.
const RENORM_EPSILON: f32 = 1e-20;

/// How router logits become per-expert scores.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// `softmax(logits)` over all experts (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE).
    Softmax,
    /// `sigmoid(logits)` per expert (DeepSeek-V3).
    Sigmoid,
}

/// Group-limited selection (DeepSeek-V3): experts are split into `n_group` equal groups, each
/// group is scored by the sum of its two best scores, and only the best `topk_group` groups are
/// searched for the top k.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    /// Number of expert groups (`n_group`); must divide the number of experts.
    pub n_group: usize,
    /// Groups kept per token (`topk_group`), in `1..=n_group`.
    pub topk_group: usize,
}

/// How a router picks experts. The selection bias, the group limit, renormalisation and the
/// scaling factor belong to token choice; the other kinds ignore them.
#[derive(Config, Debug, Copy, PartialEq)]
pub enum RouterKind {
    /// Every token picks its top k experts by score (OLMoE, Mixtral, Qwen, DeepSeek-V3).
    TokenChoice,
    /// Every expert picks its top `ceil(capacity_factor · T / E)` tokens by score (Zhou et al.
    /// 2022, "Mixture-of-Experts with Expert Choice Routing"): a token may get any number of
    /// experts, none included; the weights are its softmax scores. The k dial is ignored.
    /// The choice depends on every token of the call, later ones included, so in a causal
    /// language model it sees the future (as the paper notes).
    ExpertChoice {
        /// Tokens per expert as a multiple of the balanced share `T / E`.
        capacity_factor: f64,
    },
    /// A fixed function of the token id picks k distinct experts (Roller et al. 2021, "Hash
    /// Layers"), each weighted `1/k`; needs [`crate::ForwardOptions::token_ids`].
    Hash {
        /// Seed of the hash; the same seed gives the same assignment.
        seed: u64,
    },
    /// Every token draws k distinct experts uniformly at random (THOR, Zuo et al. 2022), each
    /// weighted `1/k`; the draw is fixed by this seed and [`crate::ForwardOptions::seed`].
    Random {
        /// Base seed, mixed with the call's seed.
        seed: u64,
    },
}

/// Configuration of a [`Router`].
#[derive(Config, Debug)]
pub struct RouterConfig {
    /// Hidden size of the tokens.
    pub d_model: usize,
    /// Number of routed experts `E`.
    pub num_experts: usize,
    /// Experts per token used when a forward call does not choose its own k.
    pub top_k: usize,
    /// Softmax or sigmoid scores.
    #[config(default = "Scoring::Softmax")]
    pub scoring: Scoring,
    /// Divide the selected weights by their sum (`norm_topk_prob`; always on for Mixtral).
    #[config(default = false)]
    pub normalize_top_k: bool,
    /// Learnable per-expert bias added to the scores for *selection only*; the weights stay the
    /// unbiased scores (DeepSeek-V3 `e_score_correction_bias`).
    #[config(default = false)]
    pub selection_bias: bool,
    /// Optional group-limited selection.
    #[config(default = "None")]
    pub group_limit: Option<GroupLimit>,
    /// Multiplies the final weights (`routed_scaling_factor`).
    #[config(default = 1.0)]
    pub routed_scaling_factor: f64,
    /// Token choice (top-k), expert choice, hash or random routing.
    #[config(default = "RouterKind::TokenChoice")]
    pub kind: RouterKind,
    /// Initializer of the router weight.
    #[config(default = "Initializer::Normal { mean: 0.0, std: 0.02 }")]
    pub initializer: Initializer,
}

/// The routing rules a [`Router`] applies; everything in [`RouterConfig`] but the parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterSettings {
    /// Number of routed experts `E`.
    pub num_experts: usize,
    /// Default experts per token.
    pub top_k: usize,
    /// Softmax or sigmoid scores.
    pub scoring: Scoring,
    /// Renormalise the selected weights.
    pub normalize_top_k: bool,
    /// Group-limited selection.
    pub group_limit: Option<GroupLimit>,
    /// Multiplies the final weights.
    pub routed_scaling_factor: f64,
    /// Token choice, expert choice, hash or random routing.
    pub kind: RouterKind,
}

impl RouterSettings {
    /// The largest k this router can select: `E`, or what the kept groups leave.
    pub fn max_top_k(&self) -> usize {
        match self.group_limit {
            Some(g) if g.n_group > 0 => g.topk_group * (self.num_experts / g.n_group),
            _ => self.num_experts,
        }
    }

    /// Checks a k against `1..=E` and the group limit.
    pub fn check_top_k(&self, top_k: usize) -> Result<(), MoeError> {
        if top_k == 0 || top_k > self.num_experts {
            return Err(MoeError::TopKOutOfRange {
                top_k,
                num_experts: self.num_experts,
            });
        }
        if let Some(g) = self.group_limit {
            let available = self.max_top_k();
            if top_k > available {
                return Err(MoeError::TopKExceedsGroups {
                    top_k,
                    available,
                    topk_group: g.topk_group,
                    n_group: g.n_group,
                });
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), MoeError> {
        if self.num_experts == 0 {
            return Err(MoeError::ZeroSize {
                name: "num_experts",
            });
        }
        if let Some(g) = self.group_limit {
            if g.n_group == 0 || !self.num_experts.is_multiple_of(g.n_group) {
                return Err(MoeError::GroupsDoNotDivide {
                    n_group: g.n_group,
                    num_experts: self.num_experts,
                });
            }
            if g.topk_group == 0 || g.topk_group > g.n_group {
                return Err(MoeError::TopKGroupOutOfRange {
                    topk_group: g.topk_group,
                    n_group: g.n_group,
                });
            }
        }
        let scale = self.routed_scaling_factor;
        if !scale.is_finite() || scale <= 0.0 {
            return Err(MoeError::InvalidScalingFactor { value: scale });
        }
        if let RouterKind::ExpertChoice { capacity_factor } = self.kind {
            Capacity::Factor(capacity_factor).validate()?;
        }
        self.check_top_k(self.top_k)
    }
}

impl RouterConfig {
    /// The routing rules of this configuration.
    pub fn settings(&self) -> RouterSettings {
        RouterSettings {
            num_experts: self.num_experts,
            top_k: self.top_k,
            scoring: self.scoring,
            normalize_top_k: self.normalize_top_k,
            group_limit: self.group_limit,
            routed_scaling_factor: self.routed_scaling_factor,
            kind: self.kind,
        }
    }

    /// Checks the configuration without allocating anything.
    pub fn validate(&self) -> Result<(), MoeError> {
        if self.d_model == 0 {
            return Err(MoeError::ZeroSize { name: "d_model" });
        }
        self.settings().validate()
    }

    /// Validates the configuration and creates the router's parameters on `device`.
    pub fn init(&self, device: &Device) -> Result<Router, MoeError> {
        self.validate()?;
        let weight = self.initializer.init_with(
            [self.d_model, self.num_experts],
            Some(self.d_model),
            Some(self.num_experts),
            device,
        );
        let selection_bias = self
            .selection_bias
            .then(|| Initializer::Zeros.init([self.num_experts], device));
        Ok(Router {
            weight,
            selection_bias,
            settings: self.settings(),
        })
    }
}

/// How many experts each token gets in one forward call: the MoE-PHDS dial.
///
/// The same loaded layer serves every variant; nothing is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TopK {
    /// The `top_k` the layer was configured with.
    #[default]
    Configured,
    /// The same k for every token.
    Fixed(usize),
    /// One k per token (`[T]` entries for an input of `T` tokens).
    PerToken(Vec<usize>),
    /// One k per sequence: `[B]` entries for a `[B, S, d_model]` input (for a `[T, d_model]`
    /// input every token is its own sequence).
    PerSequence(Vec<usize>),
}

/// Per-token slot counts after [`TopK`] was checked against a router and an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotPlan {
    /// Slots per token, the largest k asked for.
    pub max_k: usize,
    /// One k per token when the tokens differ.
    pub per_token: Option<Vec<usize>>,
}

impl SlotPlan {
    /// Resolves `top_k` for `num_tokens` tokens grouped in sequences of `seq_len` tokens.
    pub(crate) fn resolve(
        top_k: &TopK,
        settings: &RouterSettings,
        num_tokens: usize,
        seq_len: usize,
    ) -> Result<Self, MoeError> {
        let fixed = |k: usize| -> Result<Self, MoeError> {
            settings.check_top_k(k)?;
            Ok(SlotPlan {
                max_k: k,
                per_token: None,
            })
        };
        let (rows, repeat) = match top_k {
            TopK::Configured => return fixed(settings.top_k),
            TopK::Fixed(k) => return fixed(*k),
            TopK::PerToken(rows) => (rows, 1),
            TopK::PerSequence(rows) => (rows, seq_len.max(1)),
        };
        let expected = num_tokens / repeat;
        if rows.len() != expected {
            return Err(MoeError::RowTopKLength {
                expected,
                got: rows.len(),
            });
        }
        let max = settings.max_top_k();
        if let Some((row, &k)) = rows.iter().enumerate().find(|(_, k)| **k == 0 || **k > max) {
            return Err(MoeError::RowTopKOutOfRange { row, k, max });
        }
        let max_k = rows.iter().copied().max().unwrap_or(1).max(1);
        if rows.iter().all(|&k| k == max_k) {
            return Ok(SlotPlan {
                max_k,
                per_token: None,
            });
        }
        let per_token = rows
            .iter()
            .flat_map(|&k| std::iter::repeat_n(k, repeat))
            .collect();
        Ok(SlotPlan {
            max_k,
            per_token: Some(per_token),
        })
    }
}

/// The result of routing `T` tokens: what every later step, loss or statistic reads.
///
/// # Shapes
/// - `logits`, `scores`: `[T, E]`, f32 (absent on a hand-made routing)
/// - `expert_ids`: `[T, k]`, descending score order per token
/// - `weights`: `[T, k]`, f32
///
/// With a per-token k, the slots past a token's own k hold the id `E` (one past the last expert)
/// and the weight 0: dispatch skips them.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Router logits `x · W` in f32.
    pub logits: Option<Tensor<2>>,
    /// Softmax or sigmoid of the logits, before any selection bias.
    pub scores: Option<Tensor<2>>,
    /// Selected experts.
    pub expert_ids: Tensor<2, Int>,
    /// Weight of each selected expert in the combine.
    pub weights: Tensor<2>,
    /// Number of routed experts `E`.
    pub num_experts: usize,
    /// Pairs dropped per expert `[E]` by a capacity limit (absent when dropless). Their slots
    /// hold the id `E` and the weight 0.
    pub dropped: Option<Tensor<1, Int>>,
}

impl Routing {
    /// A routing made by hand (or by another router): checks that `expert_ids` and `weights`
    /// are both `[T, k]` and that every id lies in `0..=num_experts` (`num_experts` marks an
    /// unused slot; this reads the ids once).
    pub fn new(
        expert_ids: Tensor<2, Int>,
        weights: Tensor<2>,
        num_experts: usize,
    ) -> Result<Self, MoeError> {
        let ids = expert_ids.dims();
        let w = weights.dims();
        if ids != w {
            return Err(MoeError::ShapeMismatch {
                name: "routing weights".into(),
                expected: ids.to_vec(),
                got: w.to_vec(),
            });
        }
        if num_experts == 0 {
            return Err(MoeError::ZeroSize {
                name: "num_experts",
            });
        }
        // One read of the ids: every later step indexes with them.
        let bad = expert_ids
            .to_data()
            .iter::<i64>()
            .enumerate()
            .find(|(_, id)| *id < 0 || *id > num_experts as i64);
        if let Some((position, id)) = bad {
            return Err(MoeError::ExpertIdOutOfRange {
                position,
                id,
                num_experts,
            });
        }
        Ok(Routing {
            logits: None,
            scores: None,
            expert_ids,
            weights: weights.cast(DType::F32),
            num_experts,
            dropped: None,
        })
    }

    /// The same routing with every pair past an expert's capacity dropped, in GShard's
    /// priority order (all first slots in token order, then all second slots, …). Dropped
    /// slots hold the id `E` and the weight 0; [`Routing::dropped`] counts them per expert
    /// (added to any earlier count). The capacity of [`Capacity::Factor`] counts `T · k` pairs.
    ///
    /// # Errors
    /// A capacity factor that is not finite and positive.
    pub fn with_capacity(self, capacity: Capacity) -> Result<Routing, MoeError> {
        capacity.validate()?;
        let (t, k, e) = (self.num_tokens(), self.top_k(), self.num_experts);
        let per_expert = capacity.per_expert(t, k, e);
        let (expert_ids, weights, dropped) =
            choice::drop_over_capacity(self.expert_ids, self.weights, e, per_expert);
        let dropped = match self.dropped {
            Some(earlier) => earlier + dropped,
            None => dropped,
        };
        Ok(Routing {
            expert_ids,
            weights,
            dropped: Some(dropped),
            ..self
        })
    }

    /// Number of tokens `T`.
    pub fn num_tokens(&self) -> usize {
        self.expert_ids.dims()[0]
    }

    /// Slots per token `k`.
    pub fn top_k(&self) -> usize {
        self.expert_ids.dims()[1]
    }

    /// Tokens sent to each expert, `[E]` (unused slots are not counted).
    pub fn expert_counts(&self) -> Tensor<1, Int> {
        let device = self.expert_ids.device();
        let ids = self.expert_ids.clone().reshape([-1]);
        let n = ids.dims()[0];
        let ones = Tensor::<1, Int>::ones([n], &device).cast(ids.dtype());
        Tensor::<1, Int>::zeros([self.num_experts + 1], (&device, ids.dtype()))
            .scatter(0, ids, ones, IndexingUpdateOp::Add)
            .narrow(0, 0, self.num_experts)
    }
}

/// Linear router: `logits = x · W` (f32), scores, optional bias and group limit, top-k,
/// optional renormalisation and scaling.
#[derive(Module, Debug)]
pub struct Router {
    /// Router weight, `[d_model, E]` (the transpose of Hugging Face's `gate.weight`).
    pub weight: Param<Tensor<2>>,
    /// Selection-only bias, `[E]`.
    pub selection_bias: Option<Param<Tensor<1>>>,
    /// Routing rules.
    #[module(skip)]
    pub settings: RouterSettings,
}

impl Router {
    /// Routes `x` with the given k.
    ///
    /// # Shapes
    /// - `x`: `[T, d_model]`
    pub fn route(&self, x: Tensor<2>, top_k: &TopK) -> Result<Routing, MoeError> {
        self.route_with(x, top_k, DispatchStrategy::Auto)
    }

    /// Routes `x` with the given k, the epilogue after the logits run by `strategy`: the fused
    /// `moe_kernels::route_epilogue` kernel (kernel path, where no gradient is needed, k is the
    /// same for every token and there are at most
    /// [`FUSED_EPILOGUE_MAX_TOKENS`](crate::dispatch::FUSED_EPILOGUE_MAX_TOKENS) tokens) or the
    /// composed tensor ops, as [`crate::CallPath`] reports.
    ///
    /// # Shapes
    /// - `x`: `[T, d_model]`
    pub fn route_with(
        &self,
        x: Tensor<2>,
        top_k: &TopK,
        strategy: DispatchStrategy,
    ) -> Result<Routing, MoeError> {
        let options = ForwardOptions::new().with_top_k(top_k.clone());
        self.route_options(x, &options, strategy)
    }

    /// Routes `x` with every per-call choice of `options` (k, temperature, capacity, token
    /// ids, seed), the epilogue run by `strategy` as in [`Router::route_with`].
    ///
    /// # Shapes
    /// - `x`: `[T, d_model]`
    pub fn route_options(
        &self,
        x: Tensor<2>,
        options: &ForwardOptions,
        strategy: DispatchStrategy,
    ) -> Result<Routing, MoeError> {
        let [t, d] = x.dims();
        let d_model = self.weight.dims()[0];
        if d != d_model {
            return Err(MoeError::HiddenSizeMismatch {
                expected: d_model,
                got: d,
            });
        }
        let slots = SlotPlan::resolve(&options.top_k, &self.settings, t, 1)?;
        let per_token = slots.per_token.is_some();
        let epilogue =
            dispatch::epilogue(strategy, &x.device(), &self.settings, Some(t), per_token)?;
        self.route_slots(x, &slots, options, epilogue)
    }

    /// Checks `top_k` for `num_tokens` tokens in sequences of `seq_len` tokens without routing
    /// anything: the error a forward call with that dial would return, or `Ok`.
    pub fn check_top_k(
        &self,
        top_k: &TopK,
        num_tokens: usize,
        seq_len: usize,
    ) -> Result<(), MoeError> {
        SlotPlan::resolve(top_k, &self.settings, num_tokens, seq_len).map(|_| ())
    }

    /// The epilogue after the logits: the top `top_k` experts of each token and their weights
    /// (scores, selection bias, group limit, renormalisation and scaling as configured), by
    /// `strategy` — the fused `moe_kernels::route_epilogue` kernel where the kernels run and no
    /// gradient is needed (whatever the number of tokens), the composed tensor ops otherwise.
    ///
    /// # Shapes
    /// - `logits`: `[T, E]` → expert ids `[T, k]`, weights `[T, k]` (f32)
    pub fn select(
        &self,
        logits: Tensor<2>,
        top_k: usize,
        strategy: DispatchStrategy,
    ) -> Result<(Tensor<2, Int>, Tensor<2>), MoeError> {
        let [t, e] = logits.dims();
        if e != self.settings.num_experts {
            return Err(MoeError::ShapeMismatch {
                name: "router logits".into(),
                expected: vec![t, self.settings.num_experts],
                got: vec![t, e],
            });
        }
        self.settings.check_top_k(top_k)?;
        let slots = SlotPlan {
            max_k: top_k,
            per_token: None,
        };
        let epilogue = dispatch::epilogue(strategy, &logits.device(), &self.settings, None, false)?;
        let logits = logits.cast(DType::F32);
        let (ids, weights, _) = self.epilogue(logits, &slots, fused(epilogue))?;
        Ok((ids, weights))
    }

    /// Routing once the input and the slot counts are known to be valid: logits, the kind's
    /// selection at the call's temperature (the top-k epilogue run as `epilogue` says), then
    /// the call's capacity limit.
    pub(crate) fn route_slots(
        &self,
        x: Tensor<2>,
        slots: &SlotPlan,
        options: &ForwardOptions,
        epilogue: Option<StepPath>,
    ) -> Result<Routing, MoeError> {
        let temperature = options.checked_temperature()?;
        if let Some(capacity) = options.capacity {
            capacity.validate()?;
        }
        let tokens = x.dims()[0];
        let device = x.device();
        let num_experts = self.settings.num_experts;
        if tokens == 0 {
            // No work, and no zero-row matmul (Burn 0.22.1's ndarray divides by zero on one).
            return Ok(Routing {
                logits: Some(Tensor::zeros([0, num_experts], &device)),
                scores: Some(Tensor::zeros([0, num_experts], &device)),
                expert_ids: Tensor::zeros([0, slots.max_k], &device),
                weights: Tensor::zeros([0, slots.max_k], &device),
                num_experts,
                dropped: options
                    .capacity
                    .map(|_| Tensor::zeros([num_experts], &device)),
            });
        }
        let logits = x
            .cast(DType::F32)
            .matmul(self.weight.val().cast(DType::F32));
        let scaled = match temperature == 1.0 {
            true => logits.clone(),
            false => logits.clone().div_scalar(temperature),
        };
        let uniform = |experts: Vec<Vec<usize>>| {
            choice::uniform_routing(&experts, slots.max_k, num_experts, &device)
        };
        let per_token_k = || {
            slots
                .per_token
                .clone()
                .unwrap_or_else(|| vec![slots.max_k; tokens])
        };
        let (expert_ids, weights, scores) = match self.settings.kind {
            RouterKind::TokenChoice => {
                let (ids, weights, scores) =
                    self.epilogue(scaled.clone(), slots, fused(epilogue))?;
                (ids, weights, scores.unwrap_or_else(|| self.scores(scaled)))
            }
            RouterKind::ExpertChoice { capacity_factor } => {
                let scores = softmax(scaled, 1);
                let (ids, weights) = choice::expert_choice(scores.clone(), capacity_factor);
                (ids, weights, scores)
            }
            RouterKind::Hash { seed } => {
                let token_ids = choice::host_token_ids(options.token_ids.as_ref(), tokens)?;
                let experts = token_ids
                    .iter()
                    .zip(per_token_k())
                    .map(|(&id, k)| hash_experts(seed, id, num_experts, k))
                    .collect();
                let (ids, weights) = uniform(experts);
                (ids, weights, self.scores(scaled))
            }
            RouterKind::Random { seed } => {
                let experts = random_experts(seed, options.seed, num_experts, &per_token_k());
                let (ids, weights) = uniform(experts);
                (ids, weights, self.scores(scaled))
            }
        };
        let routing = Routing {
            logits: Some(logits),
            scores: Some(scores),
            expert_ids,
            weights,
            num_experts,
            dropped: None,
        };
        match options.capacity {
            Some(capacity) => routing.with_capacity(capacity),
            None => Ok(routing),
        }
    }

    /// Softmax or sigmoid scores of f32 logits.
    fn scores(&self, logits: Tensor<2>) -> Tensor<2> {
        match self.settings.scoring {
            Scoring::Softmax => softmax(logits, 1),
            Scoring::Sigmoid => sigmoid(logits),
        }
    }

    /// Ids, weights and (from the composed ops) scores from f32 logits; by the fused kernel
    /// when `fused`.
    fn epilogue(
        &self,
        logits: Tensor<2>,
        slots: &SlotPlan,
        fused: bool,
    ) -> Result<(Tensor<2, Int>, Tensor<2>, Option<Tensor<2>>), MoeError> {
        let s = &self.settings;
        let num_experts = s.num_experts;
        let device = logits.device();
        if fused {
            let spec = moe_kernels::EpilogueSpec {
                top_k: slots.max_k,
                sigmoid: s.scoring == Scoring::Sigmoid,
                normalize: s.normalize_top_k,
                scale: s.routed_scaling_factor as f32,
                groups: s.group_limit.map(|g| (g.n_group, g.topk_group)),
            };
            let bias = self.selection_bias.as_ref().map(|b| b.val());
            let (expert_ids, weights) = moe_kernels::route_epilogue(logits, bias, spec)?;
            return Ok((expert_ids, weights, None));
        }
        let scores = self.scores(logits);

        let mut choice = scores.clone().detach();
        if let Some(bias) = &self.selection_bias {
            choice = choice + bias.val().detach().cast(DType::F32).unsqueeze_dim(0);
        }
        if let Some(groups) = s.group_limit {
            choice = keep_best_groups(choice, groups);
        }
        let (_, mut expert_ids) = choice.topk_with_indices(slots.max_k, 1);
        let mut weights = scores.clone().gather(1, expert_ids.clone());

        if let Some(per_token) = &slots.per_token {
            let t = per_token.len();
            let unused: Vec<bool> = per_token
                .iter()
                .flat_map(|&k| (0..slots.max_k).map(move |slot| slot >= k))
                .collect();
            let unused =
                Tensor::<2, Bool>::from_data(TensorData::new(unused, [t, slots.max_k]), &device);
            weights = weights.mask_fill(unused.clone(), 0.0);
            expert_ids = expert_ids.mask_fill(unused, num_experts as i64);
        }
        if s.normalize_top_k {
            let total = weights.clone().sum_dim(1).add_scalar(RENORM_EPSILON);
            weights = weights / total;
        }
        if s.routed_scaling_factor != 1.0 {
            weights = weights.mul_scalar(s.routed_scaling_factor);
        }
        Ok((expert_ids, weights, Some(scores)))
    }
}

/// Whether the decision sends the epilogue to the fused kernel.
fn fused(epilogue: Option<StepPath>) -> bool {
    epilogue.is_some_and(|e| e.ran == DispatchPath::Kernels)
}

/// Masks (to -inf) every expert outside the `topk_group` best groups of each token; a group's
/// score is the sum of its two best entries (its only entry when groups have one expert).
///
/// DeepSeek's reference fills with -inf; transformers 4.57 fills with 0, which differs only
/// when a biased score is negative.
fn keep_best_groups(choice: Tensor<2>, groups: GroupLimit) -> Tensor<2> {
    let [t, e] = choice.dims();
    let group_size = e / groups.n_group;
    let grouped = choice.clone().reshape([t, groups.n_group, group_size]);
    let group_scores = grouped
        .topk(group_size.min(2), 2)
        .sum_dim(2)
        .reshape([t, groups.n_group]);
    let (_, best_groups) = group_scores.topk_with_indices(groups.topk_group, 1);
    let device = choice.device();
    let ones = Tensor::<2>::ones([t, groups.topk_group], &device);
    let kept = Tensor::<2>::zeros([t, groups.n_group], &device)
        .scatter(1, best_groups, ones, IndexingUpdateOp::Assign)
        .reshape([t, groups.n_group, 1])
        .expand([t, groups.n_group, group_size])
        .reshape([t, e]);
    choice.mask_fill(kept.lower_elem(0.5), f32::NEG_INFINITY)
}
