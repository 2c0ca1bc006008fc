//! Small file helpers for the command-line tool and examples: tokenizers and f32 outputs.

use std::io::Write;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::error::LoadError;
use crate::files;

/// The tokenizer type of `tokenizer.json` files (from the `tokenizers` crate).
pub use tokenizers::Tokenizer;

/// Loads `dir/tokenizer.json` when the folder has one (a regular file inside the folder, see
/// [`files::open_in_folder`]).
pub fn load_tokenizer(dir: &Path) -> Result<Option<tokenizers::Tokenizer>, LoadError> {
    const NAME: &str = "tokenizer.json";
    if !files::exists_in_folder(dir, NAME) {
        return Ok(None);
    }
    let text = files::read_text_in_folder(dir, NAME, files::TOKENIZER_LIMIT)?;
    text.parse::<tokenizers::Tokenizer>()
        .map(Some)
        .map_err(|e| LoadError::Corrupt {
            source_name: dir.join(NAME).display().to_string(),
            reason: e.to_string(),
        })
}

/// Writes one f32 tensor named `name` with `shape` as a safetensors file to `path`, or to
/// stdout when `path` is `-`.
///
/// The file the user named is written in place: a symbolic link is followed, an existing
/// file keeps its mode and owner (it is truncated, not replaced), and anything but a regular
/// file (a device, a FIFO, a directory) is refused before a byte is written. Errors name
/// `path`.
pub fn write_f32(
    path: &Path,
    name: &str,
    shape: &[usize],
    values: &[f32],
) -> Result<(), LoadError> {
    let io = |reason: String| LoadError::Io {
        path: path.display().to_string(),
        reason,
    };
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        TensorView::new(Dtype::F32, shape.to_vec(), &bytes).map_err(|e| io(e.to_string()))?;
    let file_bytes =
        safetensors::serialize(vec![(name, view)], None).map_err(|e| io(e.to_string()))?;
    if path == Path::new("-") {
        let mut out = std::io::stdout().lock();
        return out
            .write_all(&file_bytes)
            .and_then(|()| out.flush())
            .map_err(|e| io(e.to_string()));
    }
    let mut file = open_for_writing(path)?;
    file.set_len(0)
        .and_then(|()| file.write_all(&file_bytes))
        .and_then(|()| file.sync_data())
        .map_err(|e| io(e.to_string()))
}

/// Opens `path` for writing without truncating it, creating it (mode 0666 less the umask)
/// when absent, and refuses anything that is not a regular file. The open does not block on a
/// FIFO.
fn open_for_writing(path: &Path) -> Result<std::fs::File, LoadError> {
    let io = |reason: String| LoadError::Io {
        path: path.display().to_string(),
        reason,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = match options.open(path) {
        Ok(file) => file,
        // A FIFO without a reader answers ENXIO to a non-blocking open.
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(io(
                "is a FIFO: only a regular file (or `-` for stdout) is written".into(),
            ));
        }
        Err(e) => return Err(io(e.to_string())),
    };
    let meta = file.metadata().map_err(|e| io(e.to_string()))?;
    if !meta.is_file() {
        return Err(io(
            "is not a regular file (a device, FIFO or socket): only a regular file (or `-` for stdout) is written"
                .into(),
        ));
    }
    Ok(file)
}
