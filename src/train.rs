//! Training a small MoE language model from scratch: a character-level corpus, a tiny OLMoE
//! whose MoE blocks follow any router, AdamW, the balance losses and hooks
//! (`moe::load_balancing_loss`, `moe::AuxFreeBalancer`, …), the k schedules
//! (`moe::DenseToSparse`, `moe::MixedTopK`), and checkpoints that resume bit for bit.
//! `examples/train_tiny_moe.rs` is the command line over it.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use moe_core::{
    AuxFreeBalancer, Capacity, DenseToSparse, ForwardOptions, MixedTopK, MoeError, MoeLayerConfig,
    RouterKind, TopK, expert_load, load_balancing_loss, load_cv, router_z_loss,
};
use moe_models::decoder::{KvCache, MoeCausalLm, MoeCausalLmConfig};
use moe_models::{LoadError, RunError};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

/// What can stop training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting of [`TrainConfig`] is out of range.
    #[error("{0}")]
    Moe(#[from] MoeError),
    /// The model could not be built.
    #[error("{0}")]
    Load(#[from] LoadError),
    /// A forward call failed.
    #[error("{0}")]
    Run(#[from] RunError),
    /// The corpus cannot feed one training window.
    #[error(
        "the corpus has {chars} characters; a window of seq_len {seq_len} needs at least {needed}"
    )]
    CorpusTooShort {
        /// Characters in the (training part of the) corpus.
        chars: usize,
        /// The window length.
        seq_len: usize,
        /// Characters needed.
        needed: usize,
    },
    /// Text to encode holds a character the vocabulary lacks.
    #[error("character {ch:?} at position {position} is not in the vocabulary")]
    UnknownChar {
        /// The character.
        ch: char,
        /// Its index in the text.
        position: usize,
    },
    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// A character-level vocabulary and the encoded text.
#[derive(Debug, Clone, PartialEq)]
pub struct CharCorpus {
    /// The characters, sorted; a character's id is its index.
    pub vocab: Vec<char>,
    /// The text as ids.
    pub ids: Vec<i64>,
}

impl CharCorpus {
    /// The vocabulary of `text` (its distinct characters) and `text` encoded with it.
    pub fn new(text: &str) -> Self {
        let mut vocab: Vec<char> = text.chars().collect();
        vocab.sort_unstable();
        vocab.dedup();
        let ids = text
            .chars()
            .map(|c| vocab.binary_search(&c).unwrap_or(0) as i64)
            .collect();
        CharCorpus { vocab, ids }
    }

    /// Encodes `text` with this vocabulary.
    ///
    /// # Errors
    /// [`TrainError::UnknownChar`] for a character outside the vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TrainError> {
        text.chars()
            .enumerate()
            .map(|(position, ch)| {
                self.vocab
                    .binary_search(&ch)
                    .map(|i| i as i64)
                    .map_err(|_| TrainError::UnknownChar { ch, position })
            })
            .collect()
    }

    /// Decodes ids (ids outside the vocabulary become `?`).
    pub fn decode(&self, ids: &[i64]) -> String {
        ids.iter()
            .map(|&i| *self.vocab.get(i as usize).unwrap_or(&'?'))
            .collect()
    }

    /// The first `1 - valid_fraction` of the ids for training, the rest for validation.
    pub fn split(&self, valid_fraction: f64) -> (&[i64], &[i64]) {
        let cut = ((self.ids.len() as f64) * (1.0 - valid_fraction.clamp(0.0, 1.0))) as usize;
        self.ids.split_at(cut)
    }
}

/// How k (and the router temperature) change over training.
#[derive(Debug, Clone, PartialEq)]
pub enum KSchedule {
    /// The configured k at temperature 1 on every step.
    Fixed,
    /// MoE-PHDS mixed-k fine-tuning.
    Mixed(MixedTopK),
    /// A dense-to-sparse anneal of k and temperature.
    DenseToSparse(DenseToSparse),
}

impl KSchedule {
    /// `(k, temperature)` of `step`, `configured` when fixed.
    pub fn at(&self, step: usize, configured: usize) -> (usize, f64) {
        match self {
            KSchedule::Fixed => (configured, 1.0),
            KSchedule::Mixed(m) => (m.k_at(step), 1.0),
            KSchedule::DenseToSparse(d) => d.at(step),
        }
    }
}

/// The model, data and optimisation settings of a training run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Attention heads.
    pub heads: usize,
    /// Intermediate size of each expert.
    pub d_ff: usize,
    /// Routed experts per layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// The router of every MoE block.
    pub router: RouterKind,
    /// Give the routers a selection bias (needed by `aux_free_rate`).
    pub selection_bias: bool,
    /// Characters per training window.
    pub seq_len: usize,
    /// Windows per step.
    pub batch: usize,
    /// AdamW learning rate (after a linear warm-up over `warmup` steps).
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Weight of the load-balancing loss (0: off).
    pub balance_coef: f64,
    /// Weight of the router z-loss (0: off).
    pub z_coef: f64,
    /// Auxiliary-loss-free bias balancing at this rate (needs `selection_bias`).
    pub aux_free_rate: Option<f64>,
    /// Drop pairs beyond this capacity (dropless when `None`).
    pub capacity: Option<Capacity>,
    /// k (and temperature) per step.
    pub schedule: KSchedule,
    /// Seed of the initial weights and of every batch.
    pub seed: u64,
}

impl TrainConfig {
    /// The default small model: 4 layers, d 64, 4 heads, 8 experts of d_ff 128, top-2,
    /// windows of 64 characters, 16 per step.
    pub fn tiny() -> Self {
        TrainConfig {
            layers: 4,
            d_model: 64,
            heads: 4,
            d_ff: 128,
            experts: 8,
            top_k: 2,
            router: RouterKind::TokenChoice,
            selection_bias: false,
            seq_len: 64,
            batch: 16,
            lr: 3e-3,
            warmup: 20,
            balance_coef: 0.01,
            z_coef: 0.001,
            aux_free_rate: None,
            capacity: None,
            schedule: KSchedule::Fixed,
            seed: 0,
        }
    }

    /// The OLMoE shape of this configuration over `vocab` characters.
    pub fn model(&self, vocab: usize) -> MoeCausalLmConfig {
        MoeCausalLmConfig {
            vocab_size: vocab,
            hidden_size: self.d_model,
            intermediate_size: self.d_ff,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: Some(self.heads),
            num_experts: self.experts,
            num_experts_per_tok: self.top_k,
            eos_token_id: None,
            pad_token_id: None,
            max_position_embeddings: Some(self.seq_len),
            ..MoeCausalLmConfig::olmoe_1b_7b()
        }
    }

    /// The MoE block of every layer.
    pub fn moe(&self) -> MoeLayerConfig {
        MoeLayerConfig::olmoe(self.d_model, self.d_ff, self.experts, self.top_k)
            .with_router_kind(self.router)
            .with_selection_bias(self.selection_bias)
    }

    /// Checks the settings a model does not check itself.
    fn validate(&self) -> Result<(), TrainError> {
        let bad = |name, expected, value: f64| {
            Err(TrainError::Moe(MoeError::InvalidSetting {
                name,
                expected,
                value,
            }))
        };
        if self.seq_len == 0 || self.batch == 0 {
            return bad("seq_len and batch", "at least 1", 0.0);
        }
        if !self.lr.is_finite() || self.lr <= 0.0 {
            return bad("lr", "finite and > 0", self.lr);
        }
        for (name, coef) in [("balance_coef", self.balance_coef), ("z_coef", self.z_coef)] {
            if !coef.is_finite() || coef < 0.0 {
                return bad(name, "finite and >= 0", coef);
            }
        }
        if self.aux_free_rate.is_some() && !self.selection_bias {
            return Err(TrainError::Moe(MoeError::NoSelectionBias));
        }
        Ok(())
    }
}

/// What one training step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The step (0-based) this report is about.
    pub step: usize,
    /// Next-character cross-entropy (nats).
    pub lm_loss: f64,
    /// Load-balancing loss of each layer, averaged over layers.
    pub balance_loss: f64,
    /// Router z-loss, averaged over layers.
    pub z_loss: f64,
    /// Pairs per expert, one row per layer.
    pub load: Vec<Vec<usize>>,
    /// Coefficient of variation of the load, averaged over layers.
    pub load_cv: f64,
    /// Pairs dropped by the capacity limit, all layers.
    pub dropped: usize,
    /// k of this step.
    pub top_k: usize,
    /// Router temperature of this step.
    pub temperature: f64,
}

/// A model being trained, its optimizer and its position in the run.
pub struct Trainer {
    /// The model (on an autodiff device).
    pub model: MoeCausalLm,
    optim: ModuleOptimizer,
    /// The run's settings.
    pub config: TrainConfig,
    /// The vocabulary size.
    pub vocab: usize,
    /// Steps taken so far.
    pub step: usize,
    device: Device,
}

/// Next-token cross-entropy of `[B, L, V]` logits against `[B, L]` targets, mean over tokens.
fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, l, _] = logits.dims();
    let picked = log_softmax(logits, 2).gather(2, targets.reshape([b, l, 1]));
    picked.mean().neg()
}

/// Held while a trainer seeds the device generator and draws its weights.
static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Draws every lazily initialised parameter now, in the module's order, so that the weights
/// depend on the seed alone and not on when each parameter is first used.
struct Materialize;

impl ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

fn host_scalar(t: Tensor<1>) -> f64 {
    t.into_data().iter::<f32>().next().unwrap_or(f32::NAN) as f64
}

impl Trainer {
    /// A freshly initialised model for a `vocab`-character corpus on `device` (made an autodiff
    /// device here). The weights depend only on `config.seed` (trainers initialise one at a
    /// time; other code drawing from the device's generator meanwhile would change them).
    ///
    /// # Errors
    /// A setting out of range.
    pub fn new(config: TrainConfig, vocab: usize, device: &Device) -> Result<Self, TrainError> {
        config.validate()?;
        let device = device.clone().autodiff();
        let model = {
            // The device's generator is global: one initialisation at a time in this process.
            let _one_at_a_time = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            device.seed(config.seed);
            let model = MoeCausalLm::init(&config.model(vocab), &config.moe(), &device)?;
            model.visit(&mut Materialize);
            model
        };
        Ok(Trainer {
            model,
            optim: AdamWConfig::new().with_weight_decay(0.01).init(),
            config,
            vocab,
            step: 0,
            device,
        })
    }

    /// The windows of step `step`: `batch` random offsets into `data`, fixed by the seed and
    /// the step (so a resumed run sees the same batches).
    fn windows(&self, data: &[i64], step: usize) -> Result<Vec<Vec<i64>>, TrainError> {
        let len = self.config.seq_len + 1;
        if data.len() < len {
            return Err(TrainError::CorpusTooShort {
                chars: data.len(),
                seq_len: self.config.seq_len,
                needed: len,
            });
        }
        let mut rng = StdRng::seed_from_u64(
            self.config.seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        Ok((0..self.config.batch)
            .map(|_| {
                let start = rng.random_range(0..=data.len() - len);
                data[start..start + len].to_vec()
            })
            .collect())
    }

    /// Losses of `model` on `windows` (inputs are all but the last character, targets all but
    /// the first) and each layer's routing.
    fn losses(
        model: &MoeCausalLm,
        windows: &[Vec<i64>],
        options: &ForwardOptions,
        device: &Device,
    ) -> Result<(Tensor<1>, Vec<moe_core::Routing>), TrainError> {
        let inputs: Vec<Vec<i64>> = windows.iter().map(|w| w[..w.len() - 1].to_vec()).collect();
        let targets: Vec<i64> = windows.iter().flat_map(|w| w[1..].to_vec()).collect();
        let (b, l) = (inputs.len(), inputs[0].len());
        let mask = vec![vec![true; l]; b];
        let mut cache = KvCache::new(model.layers.len(), b);
        let out = model.forward_with(&inputs, &mask, &mut cache, options, true)?;
        let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [b, l]), device);
        let lm = cross_entropy(out.logits, targets);
        Ok((lm, out.moe.into_iter().map(|t| t.routing).collect()))
    }

    /// One optimisation step on a batch of `data`.
    ///
    /// # Errors
    /// A corpus shorter than one window, or a forward call the model rejects.
    pub fn train_step(&mut self, data: &[i64]) -> Result<StepReport, TrainError> {
        let step = self.step;
        let windows = self.windows(data, step)?;
        let (top_k, temperature) = self.config.schedule.at(step, self.config.top_k);
        let mut options = ForwardOptions::new()
            .with_top_k(TopK::Fixed(top_k))
            .with_temperature(temperature)
            .with_seed(self.config.seed ^ step as u64);
        if let Some(capacity) = self.config.capacity {
            options = options.with_capacity(capacity);
        }
        let (lm, routings) = Self::losses(&self.model, &windows, &options, &self.device)?;
        let layers = routings.len().max(1) as f64;
        // Balance every layer on its own (Switch / GShard), averaged over layers. Pooling the
        // layers' tokens first, as transformers' `load_balancing_loss_func` does, lets one
        // layer's overload offset another's: on this model it left the per-layer load CV at
        // 0.63 against 0.21 per layer (600 steps, coefficient 0.01).
        let mut balance = Tensor::<1>::zeros([1], &self.device);
        let mut z = Tensor::<1>::zeros([1], &self.device);
        for routing in &routings {
            balance = balance + load_balancing_loss(routing)?;
            z = z + router_z_loss(routing)?;
        }
        let (balance, z) = (balance.div_scalar(layers), z.div_scalar(layers));
        let loss = lm.clone()
            + balance.clone().mul_scalar(self.config.balance_coef)
            + z.clone().mul_scalar(self.config.z_coef);
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        let warm = ((step + 1) as f64 / self.config.warmup.max(1) as f64).min(1.0);
        let model = self.model.clone();
        self.model = self.optim.step(self.config.lr * warm, model, grads);

        if let Some(rate) = self.config.aux_free_rate {
            let balancer = AuxFreeBalancer::new(rate)?;
            let sparse = self
                .model
                .layers
                .iter_mut()
                .filter_map(|layer| layer.mlp.moe_mut());
            for (moe, routing) in sparse.zip(&routings) {
                balancer.update(&mut moe.router, routing)?;
            }
        }
        let load: Vec<Vec<usize>> = routings.iter().map(expert_load).collect();
        let dropped = routings
            .iter()
            .filter_map(|r| r.dropped.clone())
            .map(|d| {
                d.into_data()
                    .iter::<i64>()
                    .map(|c| c.max(0) as usize)
                    .sum::<usize>()
            })
            .sum();
        self.step += 1;
        Ok(StepReport {
            step,
            lm_loss: host_scalar(lm),
            balance_loss: host_scalar(balance),
            z_loss: host_scalar(z),
            load_cv: load.iter().map(|l| load_cv(l)).sum::<f64>() / layers,
            load,
            dropped,
            top_k,
            temperature,
        })
    }

    /// Mean next-character loss over `windows` evenly spaced windows of `data` at `top_k` and
    /// the schedule's current temperature, without gradients (the same windows every call).
    ///
    /// # Errors
    /// A corpus shorter than one window, or a k the routers reject.
    pub fn eval_loss(&self, data: &[i64], top_k: usize, windows: usize) -> Result<f64, TrainError> {
        let len = self.config.seq_len + 1;
        if data.len() < len {
            return Err(TrainError::CorpusTooShort {
                chars: data.len(),
                seq_len: self.config.seq_len,
                needed: len,
            });
        }
        let model = self.model.valid();
        let device = model.embed_tokens.device();
        let stride = ((data.len() - len) / windows.max(1)).max(1);
        // At the temperature the schedule has reached (1 unless it anneals one).
        let (_, temperature) = self.config.schedule.at(self.step, top_k);
        let all: Vec<Vec<i64>> = (0..windows.max(1))
            .map(|i| {
                let start = (i * stride).min(data.len() - len);
                data[start..start + len].to_vec()
            })
            .collect();
        let mut options = ForwardOptions::new()
            .with_top_k(TopK::Fixed(top_k))
            .with_temperature(temperature)
            .with_seed(self.config.seed);
        if let Some(capacity) = self.config.capacity {
            options = options.with_capacity(capacity);
        }
        let mut total = 0.0;
        let chunks = all.chunks(self.config.batch.max(1));
        let count = chunks.len() as f64;
        for chunk in chunks {
            let (lm, _) = Self::losses(&model, chunk, &options, &device)?;
            total += host_scalar(lm);
        }
        Ok(total / count)
    }

    /// Writes the model, the optimizer state and the run's position to `dir`.
    ///
    /// # Errors
    /// A file that cannot be written.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let fail = |path: &Path, reason: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(dir, e.to_string()))?;
        let model = dir.join("model.bpk");
        self.model
            .clone()
            .save_file(&model)
            .map_err(|e| fail(&model, e.to_string()))?;
        let optim = dir.join("optimizer.bpk");
        self.optim
            .save(&optim)
            .map_err(|e| fail(&optim, e.to_string()))?;
        let state = dir.join("state.json");
        let text = json!({ "step": self.step, "vocab": self.vocab }).to_string();
        std::fs::write(&state, text).map_err(|e| fail(&state, e.to_string()))
    }

    /// A run continued from `dir` (written by [`Trainer::save`]) with the same `config`.
    ///
    /// # Errors
    /// A missing or unreadable file, or one that does not fit the configured model.
    pub fn resume(config: TrainConfig, dir: &Path, device: &Device) -> Result<Self, TrainError> {
        let fail = |path: &Path, reason: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let state = dir.join("state.json");
        let text = std::fs::read_to_string(&state).map_err(|e| fail(&state, e.to_string()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| fail(&state, e.to_string()))?;
        let field = |name: &str| {
            value[name]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| fail(&state, format!("no integer field {name:?}")))
        };
        let (step, vocab) = (field("step")?, field("vocab")?);
        let mut trainer = Trainer::new(config, vocab, device)?;
        let model = dir.join("model.bpk");
        trainer.model = trainer
            .model
            .try_load_file(&model)
            .map_err(|e| fail(&model, e.to_string()))?;
        let optim = dir.join("optimizer.bpk");
        trainer.optim = trainer
            .optim
            .load(&optim)
            .map_err(|e| fail(&optim, e.to_string()))?;
        trainer.step = step;
        Ok(trainer)
    }
}
