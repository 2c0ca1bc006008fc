//! The one error type of `moe-models`.

use moe_core::MoeError;

/// Every way loading a checkpoint can fail; each names the tensor and the numbers involved.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from {source_name}")]
    MissingTensor {
        /// Full checkpoint name.
        name: String,
        /// The file (or buffer) searched.
        source_name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` in {source_name} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Full checkpoint name.
        name: String,
        /// The file (or buffer) it came from.
        source_name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape stored.
        got: Vec<usize>,
    },
    /// A tensor is stored in a dtype we do not read.
    #[error("tensor `{name}` in {source_name} has dtype {dtype}, expected {expected}")]
    UnsupportedDtype {
        /// Full checkpoint name.
        name: String,
        /// The file (or buffer) it came from.
        source_name: String,
        /// The stored dtype.
        dtype: String,
        /// The dtypes that would have been read.
        expected: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What the system said.
        reason: String,
    },
    /// A model folder names a file outside itself (e.g. a shard `../x.safetensors` in
    /// `model.safetensors.index.json`, or a symbolic link leading out of the folder).
    #[error("{folder}: refusing to read `{name}`: {reason}")]
    UnsafePath {
        /// The model folder.
        folder: String,
        /// The name as the folder gave it.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// `config.json` disagrees with the checkpoint's tensors.
    #[error("config.json says {field} = {value}, but {found}")]
    ConfigMismatch {
        /// The config field (or fields).
        field: String,
        /// Its value in config.json.
        value: String,
        /// What the checkpoint holds instead (a tensor and its shape).
        found: String,
    },
    /// `config.json` is missing a field, has an impossible value or asks for something this
    /// engine does not implement.
    #[error("config.json: `{field}` {reason}")]
    Config {
        /// The offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `config.json` names an architecture this engine does not run.
    #[error(
        "config.json: model_type {model_type:?} (architectures {architectures:?}) is not supported; supported: {supported}"
    )]
    UnsupportedArchitecture {
        /// Its `model_type` (empty when absent).
        model_type: String,
        /// Its `architectures`.
        architectures: Vec<String>,
        /// What is supported.
        supported: String,
    },
    /// The file is not valid safetensors (truncated, bad header, sizes that do not add up).
    #[error("{source_name} is not a valid safetensors file: {reason}")]
    Corrupt {
        /// The file (or buffer).
        source_name: String,
        /// What the parser reported.
        reason: String,
    },
    /// The device cannot compute in the dtype asked for (see `Device::supports_dtype`).
    #[error("the {device} device cannot compute in {dtype}; use one of: {supported}")]
    UnsupportedComputeDtype {
        /// The dtype asked for.
        dtype: String,
        /// The device.
        device: String,
        /// The float dtypes it does compute in.
        supported: String,
    },
    /// A parameter is larger than the device can hold in one buffer.
    #[error(
        "`{name}` needs {bytes} bytes as {dtype}, more than the {device} device's largest buffer ({limit} bytes); use a smaller dtype or another backend"
    )]
    TensorTooLarge {
        /// The parameter.
        name: String,
        /// Its size in the compute dtype.
        bytes: u64,
        /// The compute dtype.
        dtype: String,
        /// The device.
        device: String,
        /// The device's largest buffer.
        limit: u64,
    },
    /// The weights do not form a valid layer.
    #[error(transparent)]
    Moe(#[from] MoeError),
}

/// Every way running a loaded model can fail on bad input; each names the numbers involved.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No sequence, or sequences of length zero.
    #[error("empty input: {rows} rows of {len} tokens")]
    EmptyInput {
        /// Rows given.
        rows: usize,
        /// Tokens in the first row.
        len: usize,
    },
    /// The rows of a batch differ in length (pad them on the left and mask the padding).
    #[error("row {row} has {len} tokens, row 0 has {expected}")]
    RaggedBatch {
        /// The offending row.
        row: usize,
        /// Its length.
        len: usize,
        /// The length of row 0.
        expected: usize,
    },
    /// The mask does not have the shape of the ids.
    #[error(
        "mask has {mask_rows} rows (row {row}: {mask_len} entries) for ids of {rows} rows of {len}"
    )]
    MaskShape {
        /// Rows of ids.
        rows: usize,
        /// Tokens per row.
        len: usize,
        /// Rows of the mask.
        mask_rows: usize,
        /// First row whose length differs (or 0).
        row: usize,
        /// Its length.
        mask_len: usize,
    },
    /// The KV cache was made for another batch size or layer count.
    #[error(
        "the KV cache holds {cache_rows} rows and {cache_layers} layers, the call has {rows} rows and the model {layers} layers"
    )]
    CacheShape {
        /// Rows the cache holds.
        cache_rows: usize,
        /// Layers the cache holds.
        cache_layers: usize,
        /// Rows of the call.
        rows: usize,
        /// Layers of the model.
        layers: usize,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {id} (row {row}, position {position}) is outside the vocabulary 0..{vocab}")]
    TokenOutOfVocab {
        /// The id.
        id: i64,
        /// Its row.
        row: usize,
        /// Its position in the row.
        position: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Sampling temperature that is not a finite number ≥ 0.
    #[error("temperature must be a finite number >= 0, got {0}")]
    InvalidTemperature(f64),
    /// The logits of a step are not finite numbers, so no token can be drawn.
    #[error("step {step}: the logits hold NaN or infinite values")]
    NonFiniteLogits {
        /// The generation step.
        step: usize,
    },
    /// The call would reach more positions than the model was made for.
    #[error(
        "{cached} cached + {len} new tokens exceed the model's context of {max} positions (max_position_embeddings)"
    )]
    ContextTooLong {
        /// Positions already in the KV cache.
        cached: usize,
        /// Tokens in this call (per row).
        len: usize,
        /// The model's limit.
        max: usize,
    },
    /// The forward pass produced NaN or infinite values (non-finite weights, an f16 overflow,
    /// or a config whose values blow up).
    #[error(
        "non-finite values (NaN or infinity) first appear in {stage}; check the weights and config, or compute in a wider dtype (--dtype f32)"
    )]
    NonFinite {
        /// The first step whose output is not finite.
        stage: crate::decoder::Stage,
    },
    /// The MoE layers rejected the call (e.g. k out of range).
    #[error(transparent)]
    Moe(#[from] MoeError),
}
