//! Opening the files of a model folder: only regular files, only inside the folder the user
//! named, never blocking on a FIFO, with a bound on how much text is read.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::error::LoadError;

fn io_error(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Io {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Opens `path` for reading and checks that it is a regular file. The open itself does not
/// block: a FIFO, a device or a directory is refused by a check of the opened file (so no name
/// can be swapped between the check and the read).
pub fn open_regular(path: &Path) -> Result<File, LoadError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO for reading blocks until a writer comes; O_NONBLOCK returns at once.
        // Regular files ignore the flag.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options
        .open(path)
        .map_err(|e| io_error(path, e.to_string()))?;
    let meta = file.metadata().map_err(|e| io_error(path, e.to_string()))?;
    if !meta.is_file() {
        let kind = match meta.file_type() {
            t if t.is_dir() => "a directory",
            _ => "not a regular file (a FIFO, socket or device)",
        };
        return Err(io_error(path, format!("is {kind}")));
    }
    Ok(file)
}

/// `name` as a path inside a model folder: relative, made of plain components only (no `..`,
/// no root, no drive), not empty.
fn plain_relative(name: &str) -> Option<&Path> {
    let path = Path::new(name);
    let plain = !name.is_empty()
        && !name.contains('\0')
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && path.components().any(|c| matches!(c, Component::Normal(_)));
    plain.then_some(path)
}

/// The folders a file of model folder `dir` may resolve into: the folder itself and, when
/// `dir` is a Hugging Face hub snapshot (`…/snapshots/<revision>`), the repository's `blobs`
/// folder its symbolic links point into.
fn allowed_roots(dir: &Path) -> Vec<PathBuf> {
    let mut roots = vec![dir.to_path_buf()];
    if let Some(snapshots) = dir.parent()
        && snapshots.file_name().is_some_and(|n| n == "snapshots")
        && let Some(repo) = snapshots.parent()
    {
        roots.push(repo.join("blobs"));
    }
    roots
}

/// Opens the file `name` of model folder `dir`, where `name` comes from the folder's own files
/// (a shard of `model.safetensors.index.json`) or is one of the fixed names. The name must be a
/// plain relative path, and the file it names, after resolving symbolic links, must lie inside
/// the folder (or in the `blobs` folder of a Hugging Face hub cache, see `allowed_roots`) and
/// be a regular file. Returns the file and the path it was opened by.
pub fn open_in_folder(dir: &Path, name: &str) -> Result<(File, PathBuf), LoadError> {
    let Some(relative) = plain_relative(name) else {
        return Err(LoadError::UnsafePath {
            folder: dir.display().to_string(),
            name: name.to_string(),
            reason: "a file of the model folder must be a relative path without `..`".into(),
        });
    };
    let path = dir.join(relative);
    let folder = dir
        .canonicalize()
        .map_err(|e| io_error(dir, e.to_string()))?;
    let resolved = path
        .canonicalize()
        .map_err(|e| io_error(&path, e.to_string()))?;
    if !allowed_roots(&folder)
        .iter()
        .any(|root| resolved.starts_with(root))
    {
        return Err(LoadError::UnsafePath {
            folder: dir.display().to_string(),
            name: name.to_string(),
            reason: format!("it resolves to {}, outside the folder", resolved.display()),
        });
    }
    Ok((open_regular(&path)?, path))
}

/// Whether model folder `dir` has an entry called `name` (of any kind: opening it decides
/// whether it may be read).
pub fn exists_in_folder(dir: &Path, name: &str) -> bool {
    std::fs::symlink_metadata(dir.join(name)).is_ok()
}

/// Reads the text file `name` of model folder `dir` (see [`open_in_folder`]), refusing one
/// larger than `limit` bytes.
pub fn read_text_in_folder(dir: &Path, name: &str, limit: u64) -> Result<String, LoadError> {
    let (file, path) = open_in_folder(dir, name)?;
    read_text(file, &path, limit)
}

/// Reads at most `limit` bytes of UTF-8 text from `file` (opened from `path`).
pub fn read_text(file: impl Read, path: &Path, limit: u64) -> Result<String, LoadError> {
    let mut text = String::new();
    file.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(|e| io_error(path, e.to_string()))?;
    if text.len() as u64 > limit {
        return Err(io_error(
            path,
            format!("is larger than {limit} bytes, the most this file may hold"),
        ));
    }
    Ok(text)
}

/// The most `config.json` may hold (real ones are a few KB).
pub const CONFIG_LIMIT: u64 = 16 << 20;
/// The most `model.safetensors.index.json` may hold (real ones are well under 1 MB).
pub const INDEX_LIMIT: u64 = 64 << 20;
/// The most `tokenizer.json` may hold (real ones are up to a few tens of MB).
pub const TOKENIZER_LIMIT: u64 = 512 << 20;
