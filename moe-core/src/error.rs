//! The one error type of `moe-core`.

/// Every way a configuration, a parameter or an input can be rejected by `moe-core`.
///
/// Each variant carries the numbers that were wrong, and its message says what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MoeError {
    /// A size in a configuration is zero.
    #[error("{name} must be at least 1, got 0")]
    ZeroSize {
        /// The configuration field.
        name: &'static str,
    },
    /// `top_k` is 0 or larger than the number of experts.
    #[error("top_k ({top_k}) must be in 1..={num_experts}")]
    TopKOutOfRange {
        /// The requested number of experts per token.
        top_k: usize,
        /// The number of routed experts.
        num_experts: usize,
    },
    /// Group-limited routing with a group count that does not divide the experts.
    #[error("n_group ({n_group}) must divide num_experts ({num_experts})")]
    GroupsDoNotDivide {
        /// The number of expert groups.
        n_group: usize,
        /// The number of routed experts.
        num_experts: usize,
    },
    /// Group-limited routing keeping more groups than exist (or none).
    #[error("topk_group ({topk_group}) must be in 1..={n_group}")]
    TopKGroupOutOfRange {
        /// The number of groups kept per token.
        topk_group: usize,
        /// The number of expert groups.
        n_group: usize,
    },
    /// `top_k` is larger than the experts the kept groups leave to choose from.
    #[error(
        "top_k ({top_k}) exceeds the {available} experts left by keeping {topk_group} of {n_group} groups"
    )]
    TopKExceedsGroups {
        /// The requested number of experts per token.
        top_k: usize,
        /// `topk_group * num_experts / n_group`.
        available: usize,
        /// The number of groups kept per token.
        topk_group: usize,
        /// The number of expert groups.
        n_group: usize,
    },
    /// `routed_scaling_factor` is not a finite positive number.
    #[error("routed_scaling_factor must be finite and > 0, got {value}")]
    InvalidScalingFactor {
        /// The rejected factor.
        value: f64,
    },
    /// The input's last axis is not the layer's hidden size.
    #[error("input hidden size is {got}, but the layer expects d_model = {expected}")]
    HiddenSizeMismatch {
        /// The layer's `d_model`.
        expected: usize,
        /// The size of the input's last axis.
        got: usize,
    },
    /// The input is neither `[T, d_model]` nor `[B, S, d_model]`.
    #[error("input must have rank 2 [T, d_model] or 3 [B, S, d_model], got rank {rank}")]
    WrongRank {
        /// The input's rank.
        rank: usize,
    },
    /// A per-row `top_k` list does not have one entry per row.
    #[error("per-row top_k has {got} entries, but the input has {expected} rows")]
    RowTopKLength {
        /// Tokens (per-token k) or sequences (per-sequence k) in the input.
        expected: usize,
        /// Entries in the list.
        got: usize,
    },
    /// One entry of a per-row `top_k` list is out of range.
    #[error("per-row top_k of row {row} is {k}, but it must be in 1..={max}")]
    RowTopKOutOfRange {
        /// The offending row.
        row: usize,
        /// Its requested k.
        k: usize,
        /// The largest k the router allows.
        max: usize,
    },
    /// A parameter or a hand-made routing has the wrong shape.
    #[error("{name} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// What was checked.
        name: String,
        /// The shape it should have.
        expected: Vec<usize>,
        /// The shape it has.
        got: Vec<usize>,
    },
    /// [`DispatchStrategy::Kernels`](crate::dispatch::DispatchStrategy::Kernels) was asked for
    /// on a device the kernels do not run on.
    #[error("the dispatch kernels do not run on {device}; use DispatchStrategy::Auto or TensorOps")]
    KernelsUnavailable {
        /// The device.
        device: String,
    },
    /// A hand-made routing names an expert that does not exist.
    #[error(
        "expert id {id} at flat position {position} is outside 0..={num_experts} (E marks an unused slot)"
    )]
    ExpertIdOutOfRange {
        /// Row-major position in `expert_ids`.
        position: usize,
        /// The id.
        id: i64,
        /// The number of experts `E`.
        num_experts: usize,
    },
    /// A capacity factor that is not a finite positive number.
    #[error("capacity factor must be finite and > 0, got {value}")]
    InvalidCapacityFactor {
        /// The rejected factor.
        value: f64,
    },
    /// A router temperature that is not a finite positive number.
    #[error("router temperature must be finite and > 0, got {value}")]
    InvalidTemperature {
        /// The rejected temperature.
        value: f64,
    },
    /// The hash router was called without token ids.
    #[error("the hash router needs the token ids: ForwardOptions::with_token_ids([{tokens}] ids)")]
    MissingTokenIds {
        /// Tokens in the input.
        tokens: usize,
    },
    /// The token ids are not one per token.
    #[error("token_ids has {got} entries, but the input has {expected} tokens")]
    TokenIdsLength {
        /// Tokens in the input.
        expected: usize,
        /// Ids given.
        got: usize,
    },
    /// A token id is negative.
    #[error("token id {id} at position {position} is negative")]
    NegativeTokenId {
        /// Where it is.
        position: usize,
        /// The id.
        id: i64,
    },
    /// A loss or statistic needs a part of the routing that a hand-made routing lacks.
    #[error(
        "{what} needs routing.{field}, which this routing does not have (a hand-made routing?)"
    )]
    MissingRoutingPart {
        /// The loss or statistic.
        what: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// Auxiliary-loss-free balancing on a router without a selection bias.
    #[error(
        "auxiliary-loss-free balancing moves the selection bias, but this router has none (RouterConfig::with_selection_bias(true))"
    )]
    NoSelectionBias,
    /// A rate, fraction or count in a training setting is out of range.
    #[error("{name} must be {expected}, got {value}")]
    InvalidSetting {
        /// The setting.
        name: &'static str,
        /// The allowed range, in words.
        expected: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// A kernel refused its inputs.
    #[error(transparent)]
    Kernel(#[from] moe_kernels::KernelError),
}
