//! Reading named tensors out of safetensors data as f32, with errors that name the tensor,
//! the file, and the expected and stored shapes or dtypes.

use std::path::Path;

use half::{bf16, f16};
use safetensors::Dtype;
use safetensors::tensor::Metadata;

use crate::error::LoadError;

/// Anything tensors can be read from by name: one [`TensorSource`] or a whole
/// [`Checkpoint`](crate::checkpoint::Checkpoint).
pub trait ReadTensors {
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// The stored shape of a tensor (read from the header: nothing is allocated for its data).
    fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError>;
    /// Calls `each` with the stored dtype (F32, BF16 or F16) and consecutive pieces (whole
    /// values) of a float tensor's bytes, after checking its shape.
    fn read_chunks(
        &self,
        name: &str,
        expected: &[usize],
        each: &mut dyn FnMut(Dtype, &[u8]),
    ) -> Result<(), LoadError>;
    /// Reads a float tensor (F32, BF16 or F16) as f32, checking its shape.
    fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        read_float(self, name, expected)
    }
}

/// Reads a float tensor (F32, BF16 or F16) of `source` as `T` (f32, bf16 or f16), checking its
/// shape: values stored as `T` are copied as they are, others converted once on the way in.
pub fn read_float<T: FloatValue, S: ReadTensors + ?Sized>(
    source: &S,
    name: &str,
    expected: &[usize],
) -> Result<Vec<T>, LoadError> {
    let mut values = Vec::with_capacity(expected.iter().product());
    append_float(source, name, expected, &mut values)?;
    Ok(values)
}

/// [`read_float`], appending to `out` (several tensors into one buffer).
pub(crate) fn append_float<T: FloatValue, S: ReadTensors + ?Sized>(
    source: &S,
    name: &str,
    expected: &[usize],
    out: &mut Vec<T>,
) -> Result<(), LoadError> {
    source.read_chunks(name, expected, &mut |dtype, b| {
        T::extend_from(dtype, b, out)
    })
}

/// A float type the loader reads tensors into: f32, bf16 or f16.
pub trait FloatValue: burn::tensor::Element + Copy + Default + Send + Sync {
    /// Appends the little-endian values `bytes` of stored dtype `dtype` (F32, BF16 or F16).
    fn extend_from(dtype: Dtype, bytes: &[u8], out: &mut Vec<Self>);
}

/// Calls `put` with each value of `bytes` (stored as `dtype`: F32, BF16 or F16) as f32: one
/// loop per dtype.
fn widen(dtype: Dtype, bytes: &[u8], mut put: impl FnMut(f32)) {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .for_each(|b| put(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .for_each(|b| put(bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        _ => bytes
            .chunks_exact(2)
            .for_each(|b| put(f16::from_le_bytes([b[0], b[1]]).to_f32())),
    }
}

impl FloatValue for f32 {
    fn extend_from(dtype: Dtype, bytes: &[u8], out: &mut Vec<Self>) {
        widen(dtype, bytes, |v| out.push(v));
    }
}

impl FloatValue for bf16 {
    fn extend_from(dtype: Dtype, bytes: &[u8], out: &mut Vec<Self>) {
        match dtype {
            Dtype::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]])),
            ),
            _ => widen(dtype, bytes, |v| out.push(bf16::from_f32(v))),
        }
    }
}

impl FloatValue for f16 {
    fn extend_from(dtype: Dtype, bytes: &[u8], out: &mut Vec<Self>) {
        match dtype {
            Dtype::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]])),
            ),
            _ => widen(dtype, bytes, |v| out.push(f16::from_f32(v))),
        }
    }
}

impl ReadTensors for TensorSource {
    fn contains(&self, name: &str) -> bool {
        TensorSource::contains(self, name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        TensorSource::shape(self, name)
    }
    fn read_chunks(
        &self,
        name: &str,
        expected: &[usize],
        each: &mut dyn FnMut(Dtype, &[u8]),
    ) -> Result<(), LoadError> {
        TensorSource::read_chunks(self, name, expected, each)
    }
}

/// The bytes of one safetensors file: an open file read with positioned reads, or a buffer.
///
/// Files are read, not memory-mapped: a file truncated by another process while it is open
/// then gives a short read, reported as [`LoadError::Io`], where a mapping would kill the
/// process with SIGBUS. The loader converts every tensor on the host anyway, so the copy costs
/// one pass over a 4 MiB buffer that stays in cache.
enum Bytes {
    File(std::fs::File),
    Owned(Vec<u8>),
}

/// Bytes read from a file per positioned read while converting a tensor.
const CHUNK: usize = 4 << 20;

impl Bytes {
    /// Calls `each` with consecutive pieces of `range`, each a whole number of `unit`-byte
    /// values; `name` is the file for errors.
    fn for_chunks(
        &self,
        range: std::ops::Range<usize>,
        unit: usize,
        name: &str,
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), LoadError> {
        match self {
            Bytes::Owned(v) => {
                each(&v[range]);
                Ok(())
            }
            Bytes::File(file) => {
                let mut buffer = vec![0u8; CHUNK.min(range.len()) / unit * unit];
                let mut at = range.start;
                while at < range.end {
                    let len = (range.end - at).min(buffer.len());
                    read_exact_at(file, &mut buffer[..len], at as u64).map_err(|e| {
                        LoadError::Io {
                            path: name.to_string(),
                            reason: format!(
                                "bytes {at}..{} (the file changed since it was opened?): {e}",
                                at + len
                            ),
                        }
                    })?;
                    each(&buffer[..len]);
                    at += len;
                }
                Ok(())
            }
        }
    }
}

#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &std::fs::File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// The largest header safetensors accepts.
const MAX_HEADER: u64 = 100_000_000;

/// Parses and checks a safetensors header: `prefix` is the file's first 8 bytes, `header` the
/// JSON after them, `file_len` the file's whole length. Offsets must be in order, sizes must
/// match shape × dtype, and the data must end exactly at the end of the file.
fn parse_header(header: &[u8], file_len: u64) -> Result<Metadata, String> {
    let metadata: Metadata = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let data_len = metadata
        .tensors()
        .values()
        .map(|info| info.data_offsets.1 as u64)
        .max()
        .unwrap_or(0);
    let expected = 8 + header.len() as u64 + data_len;
    if expected != file_len {
        return Err(format!(
            "the header describes {expected} bytes of file, the file has {file_len}"
        ));
    }
    Ok(metadata)
}

/// The byte range of a header of `n` bytes in a file of `file_len` bytes.
fn header_range(n: u64, file_len: u64) -> Result<std::ops::Range<usize>, String> {
    if n > MAX_HEADER {
        return Err(format!("a header of {n} bytes, more than {MAX_HEADER}"));
    }
    if 8 + n > file_len {
        return Err(format!(
            "a header of {n} bytes in a file of {file_len} bytes"
        ));
    }
    Ok(8..8 + n as usize)
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
        let name = name.into();
        let corrupt = |reason: String| LoadError::Corrupt {
            source_name: name.clone(),
            reason,
        };
        let prefix: [u8; 8] = bytes
            .get(..8)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| {
                corrupt(format!(
                    "{} bytes, shorter than the 8-byte header length",
                    bytes.len()
                ))
            })?;
        let n = u64::from_le_bytes(prefix);
        let header = header_range(n, bytes.len() as u64).map_err(corrupt)?;
        let metadata = parse_header(&bytes[header.clone()], bytes.len() as u64).map_err(corrupt)?;
        Ok(TensorSource {
            bytes: Bytes::Owned(bytes),
            data_start: header.end,
            metadata,
            name,
        })
    }

    /// Opens the safetensors file at `path` and checks its header; tensors are read from the
    /// file when asked for. Only a regular file is opened (a FIFO or device is an error).
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = crate::files::open_regular(path)?;
        Self::from_file(file, path.display().to_string())
    }

    /// [`TensorSource::open`] on a file already opened (and checked to be a regular file).
    pub(crate) fn from_file(file: std::fs::File, name: String) -> Result<Self, LoadError> {
        let io = |e: std::io::Error| LoadError::Io {
            path: name.clone(),
            reason: e.to_string(),
        };
        let corrupt = |reason: String| LoadError::Corrupt {
            source_name: name.clone(),
            reason,
        };
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(corrupt(format!(
                "{len} bytes, shorter than the 8-byte header length"
            )));
        }
        let mut prefix = [0u8; 8];
        read_exact_at(&file, &mut prefix, 0).map_err(io)?;
        let header = header_range(u64::from_le_bytes(prefix), len).map_err(corrupt)?;
        let mut text = vec![0u8; header.len()];
        read_exact_at(&file, &mut text, 8).map_err(io)?;
        let metadata = parse_header(&text, len).map_err(corrupt)?;
        Ok(TensorSource {
            bytes: Bytes::File(file),
            data_start: header.end,
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
        read_float(self, name, expected)
    }

    /// See [`ReadTensors::read_chunks`].
    pub fn read_chunks(
        &self,
        name: &str,
        expected: &[usize],
        each: &mut dyn FnMut(Dtype, &[u8]),
    ) -> Result<(), LoadError> {
        let (dtype, range) = self.checked(name, expected)?;
        if !matches!(dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(self.unsupported(name, dtype, "F32, BF16 or F16"));
        }
        self.bytes
            .for_chunks(range, dtype.bitsize() / 8, &self.name, |b| each(dtype, b))
    }

    /// Reads an integer tensor (I64 or I32) as i64, checking its shape.
    pub fn read_i64(&self, name: &str, expected: &[usize]) -> Result<Vec<i64>, LoadError> {
        let (dtype, range) = self.checked(name, expected)?;
        let convert: fn(&[u8], &mut Vec<i64>) =
            match dtype {
                Dtype::I64 => |b, out| {
                    out.extend(b.chunks_exact(8).map(|b| {
                        i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                    }))
                },
                Dtype::I32 => |b, out| {
                    out.extend(
                        b.chunks_exact(4)
                            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64),
                    )
                },
                other => return Err(self.unsupported(name, other, "I64 or I32")),
            };
        let mut values = Vec::with_capacity(range.len() / (dtype.bitsize() / 8));
        self.bytes
            .for_chunks(range, dtype.bitsize() / 8, &self.name, |b| {
                convert(b, &mut values)
            })?;
        Ok(values)
    }
}
