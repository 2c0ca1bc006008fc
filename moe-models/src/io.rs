//! Small file helpers for the command-line tool and examples: tokenizers and f32 outputs.

use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::error::LoadError;

/// The tokenizer type of `tokenizer.json` files (from the `tokenizers` crate).
pub use tokenizers::Tokenizer;

/// Loads `dir/tokenizer.json` when the folder has one.
pub fn load_tokenizer(dir: &Path) -> Result<Option<tokenizers::Tokenizer>, LoadError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    tokenizers::Tokenizer::from_file(&path)
        .map(Some)
        .map_err(|e| LoadError::Corrupt {
            source_name: path.display().to_string(),
            reason: e.to_string(),
        })
}

/// Writes one f32 tensor named `name` with `shape` to a safetensors file.
pub fn write_f32(
    path: &Path,
    name: &str,
    shape: &[usize],
    values: &[f32],
) -> Result<(), LoadError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let io = |reason: String| LoadError::Io {
        path: path.display().to_string(),
        reason,
    };
    let view =
        TensorView::new(Dtype::F32, shape.to_vec(), &bytes).map_err(|e| io(e.to_string()))?;
    safetensors::serialize_to_file(vec![(name, view)], None, path).map_err(|e| io(e.to_string()))
}
