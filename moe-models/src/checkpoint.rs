//! A Hugging Face checkpoint folder: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`, memory-mapped; remembers which tensors were read.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use crate::error::LoadError;
use crate::files;
use crate::tensors::{ReadTensors, TensorSource};

/// Every safetensors file of a checkpoint, and the tensors read so far.
#[derive(Debug)]
pub struct Checkpoint {
    sources: Vec<TensorSource>,
    index: HashMap<String, usize>,
    used: RefCell<BTreeSet<String>>,
    name: String,
}

impl Checkpoint {
    /// A checkpoint made of one source (a file or a buffer).
    pub fn from_source(source: TensorSource) -> Self {
        let name = source.name().to_string();
        let index = source.names().into_iter().map(|n| (n, 0)).collect();
        Checkpoint {
            sources: vec![source],
            index,
            used: RefCell::default(),
            name,
        }
    }

    /// Opens `dir/model.safetensors.index.json` and its shards if present, else
    /// `dir/model.safetensors`.
    ///
    /// Every file is opened through [`files::open_in_folder`]: a shard must be named by a
    /// relative path without `..`, resolve (after symbolic links) inside `dir` — or inside the
    /// `blobs` folder of a Hugging Face hub cache when `dir` is one of its snapshots — and be a
    /// regular file; anything else is [`LoadError::UnsafePath`] or [`LoadError::Io`] before a
    /// byte of it is read.
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        const INDEX: &str = "model.safetensors.index.json";
        const SINGLE: &str = "model.safetensors";
        if !files::exists_in_folder(dir, INDEX) {
            if !files::exists_in_folder(dir, SINGLE) {
                return Err(LoadError::Io {
                    path: dir.display().to_string(),
                    reason: format!("neither {SINGLE} nor {INDEX} is there"),
                });
            }
            let (file, path) = files::open_in_folder(dir, SINGLE)?;
            let source = TensorSource::from_file(file, path.display().to_string())?;
            return Ok(Self::from_source(source));
        }
        let index_path = dir.join(INDEX);
        let text = files::read_text_in_folder(dir, INDEX, files::INDEX_LIMIT)?;
        let corrupt = |reason: String| LoadError::Corrupt {
            source_name: index_path.display().to_string(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| corrupt("no `weight_map` object".into()))?;
        let mut shards: Vec<&str> = Vec::new();
        let mut shard_of: HashMap<&str, usize> = HashMap::new();
        let mut index = HashMap::with_capacity(map.len());
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| corrupt(format!("weight_map[{tensor:?}] is not a file name")))?;
            let shard = *shard_of.entry(file).or_insert_with(|| {
                shards.push(file);
                shards.len() - 1
            });
            index.insert(tensor.clone(), shard);
        }
        let sources = shards
            .iter()
            .map(|f| {
                let (file, path) = files::open_in_folder(dir, f)?;
                TensorSource::from_file(file, path.display().to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (tensor, &shard) in &index {
            if !sources[shard].contains(tensor) {
                return Err(LoadError::MissingTensor {
                    name: tensor.clone(),
                    source_name: sources[shard].name().to_string(),
                });
            }
        }
        Ok(Checkpoint {
            sources,
            index,
            used: RefCell::default(),
            name: dir.display().to_string(),
        })
    }

    /// The folder or file name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the checkpoint holds a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn source(&self, name: &str) -> Result<&TensorSource, LoadError> {
        let shard = self
            .index
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                name: name.to_string(),
                source_name: self.name.clone(),
            })?;
        self.used.borrow_mut().insert(name.to_string());
        Ok(&self.sources[*shard])
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        let shard = self
            .index
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                name: name.to_string(),
                source_name: self.name.clone(),
            })?;
        self.sources[*shard].shape(name)
    }

    /// Reads a float tensor as f32 (see [`TensorSource::read_f32`]) and marks it used.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>, LoadError> {
        self.source(name)?.read_f32(name, expected)
    }

    /// Tensors never read, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut names: Vec<String> = self
            .index
            .keys()
            .filter(|n| !used.contains(*n))
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Every tensor name, unsorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Tensors read so far.
    pub fn used(&self) -> usize {
        self.used.borrow().len()
    }
}

impl ReadTensors for Checkpoint {
    fn contains(&self, name: &str) -> bool {
        Checkpoint::contains(self, name)
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        Checkpoint::shape(self, name)
    }
    fn read_chunks(
        &self,
        name: &str,
        expected: &[usize],
        each: &mut dyn FnMut(safetensors::Dtype, &[u8]),
    ) -> Result<(), LoadError> {
        self.source(name)?.read_chunks(name, expected, each)
    }
}
