//! Reading named tensors out of safetensors data as f32, with errors that name the tensor,
//! the file, and the expected and stored shapes or dtypes.

use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};

use crate::error::LoadError;

/// Anything tensors can be read from by name: one [`TensorSource`] or a whole
/// [`Checkpoint`](crate::checkpoint::Checkpoint).
pub trait ReadTensors {
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// Reads a float tensor (F32, BF16 or F16) as f32, checking its shape.
    fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError>;
}

impl ReadTensors for TensorSource {
    fn contains(&self, name: &str) -> bool {
        TensorSource::contains(self, name)
    }
    fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        TensorSource::read_f32(self, name, expected)
    }
}

/// The bytes of one safetensors file: memory-mapped, or owned.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }

    /// Lets the kernel drop the mapped pages of `range` from this process once a tensor has been
    /// converted: without it, every page read stays resident and loading a checkpoint would
    /// hold the file's pages and the model's copy at once.
    fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if let Bytes::Mapped(map) = self {
            // SAFETY: the map is a read-only, file-backed mapping; after MADV_DONTNEED a later
            // read of these pages faults them in again from the file, so every slice of the map
            // keeps reading the same bytes. No pointer into the range is held across this call.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.len(),
                )
            };
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

/// One safetensors file (or buffer) whose header has been checked, and its name for errors.
pub struct TensorSource {
    bytes: Bytes,
    data_start: usize,
    metadata: Metadata,
    name: String,
}

impl std::fmt::Debug for TensorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorSource")
            .field("name", &self.name)
            .finish()
    }
}

impl TensorSource {
    /// Checks `bytes` (a whole safetensors file); `name` appears in every error.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<String>) -> Result<Self, LoadError> {
        Self::new(Bytes::Owned(bytes), name.into())
    }

    /// Memory-maps the file at `path`: tensors are read straight from the page cache.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let name = path.display().to_string();
        let io = |e: std::io::Error| LoadError::Io {
            path: name.clone(),
            reason: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a checkpoint changed on disk while loading is the
        // caller's mistake, as with any reader of that file.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::new(Bytes::Mapped(map), name)
    }

    fn new(bytes: Bytes, name: String) -> Result<Self, LoadError> {
        let corrupt = |reason: String| LoadError::Corrupt {
            source_name: name.clone(),
            reason,
        };
        // Full validation: header JSON, offsets inside the file, sizes matching shape × dtype.
        SafeTensors::deserialize(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        Ok(TensorSource {
            bytes,
            data_start: 8 + header_len,
            metadata,
            name,
        })
    }

    /// The name given when opened.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        Ok(self.info(name)?.shape.clone())
    }

    fn info(&self, name: &str) -> Result<&safetensors::tensor::TensorInfo, LoadError> {
        self.metadata
            .info(name)
            .ok_or_else(|| LoadError::MissingTensor {
                name: name.to_string(),
                source_name: self.name.clone(),
            })
    }

    /// The dtype and byte range of a tensor after checking its shape.
    fn checked(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<(Dtype, std::ops::Range<usize>), LoadError> {
        let info = self.info(name)?;
        if info.shape != expected {
            return Err(LoadError::ShapeMismatch {
                name: name.to_string(),
                source_name: self.name.clone(),
                expected: expected.to_vec(),
                got: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        Ok((info.dtype, self.data_start + start..self.data_start + end))
    }

    fn unsupported(&self, name: &str, dtype: Dtype, expected: &str) -> LoadError {
        LoadError::UnsupportedDtype {
            name: name.to_string(),
            source_name: self.name.clone(),
            dtype: format!("{dtype:?}"),
            expected: expected.to_string(),
        }
    }

    /// Reads a float tensor (F32, BF16 or F16) as f32, checking its shape.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        let (dtype, range) = self.checked(name, expected)?;
        let bytes = &self.bytes.as_slice()[range.clone()];
        let values = match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => return Err(self.unsupported(name, other, "F32, BF16 or F16")),
        };
        self.bytes.release(range);
        Ok(values)
    }

    /// Reads an integer tensor (I64 or I32) as i64, checking its shape.
    pub fn read_i64(&self, name: &str, expected: &[usize]) -> Result<Vec<i64>, LoadError> {
        let (dtype, range) = self.checked(name, expected)?;
        let bytes = &self.bytes.as_slice()[range];
        Ok(match dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
            other => return Err(self.unsupported(name, other, "I64 or I32")),
        })
    }
}
