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
    /// `config.json` is missing a field, has an impossible value or asks for something this
    /// engine does not implement.
    #[error("config.json: `{field}` {reason}")]
    Config {
        /// The offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file is not valid safetensors (truncated, bad header, sizes that do not add up).
    #[error("{source_name} is not a valid safetensors file: {reason}")]
    Corrupt {
        /// The file (or buffer).
        source_name: String,
        /// What the parser reported.
        reason: String,
    },
    /// The weights do not form a valid layer.
    #[error(transparent)]
    Moe(#[from] MoeError),
}
