//! Schedules a training loop asks each step for the router's per-call choices: a dense-to-sparse
//! anneal of k and temperature (EvoMoE, SMoE-Dropout) and MoE-PHDS's mixed-k fine-tuning.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::error::MoeError;

/// Anneals k and the router temperature over `steps` training steps: k moves linearly (rounded)
/// from `start_k` to `end_k`, the temperature geometrically from `start_temperature` to
/// `end_temperature`; both hold their end values afterwards.
///
/// Dense-to-sparse (EvoMoE): start with all experts and a high temperature, end with few
/// experts and a sharp router. SMoE-Dropout grows k instead: give `start_k < end_k`.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseToSparse {
    /// k at step 0.
    pub start_k: usize,
    /// k from step `steps` on.
    pub end_k: usize,
    /// Temperature at step 0.
    pub start_temperature: f64,
    /// Temperature from step `steps` on.
    pub end_temperature: f64,
    /// Length of the anneal.
    pub steps: usize,
}

impl DenseToSparse {
    /// A checked schedule.
    ///
    /// # Errors
    /// [`MoeError::InvalidSetting`] for a k of 0 or a temperature that is not finite and
    /// positive.
    pub fn new(
        start_k: usize,
        end_k: usize,
        start_temperature: f64,
        end_temperature: f64,
        steps: usize,
    ) -> Result<Self, MoeError> {
        for (name, k) in [("start_k", start_k), ("end_k", end_k)] {
            if k == 0 {
                return Err(MoeError::InvalidSetting {
                    name,
                    expected: "at least 1",
                    value: 0.0,
                });
            }
        }
        for (name, t) in [
            ("start_temperature", start_temperature),
            ("end_temperature", end_temperature),
        ] {
            if !t.is_finite() || t <= 0.0 {
                return Err(MoeError::InvalidSetting {
                    name,
                    expected: "finite and > 0",
                    value: t,
                });
            }
        }
        Ok(DenseToSparse {
            start_k,
            end_k,
            start_temperature,
            end_temperature,
            steps,
        })
    }

    /// `(k, temperature)` at `step`.
    pub fn at(&self, step: usize) -> (usize, f64) {
        let progress = match self.steps {
            0 => 1.0,
            n => (step as f64 / n as f64).min(1.0),
        };
        let (k0, k1) = (self.start_k as f64, self.end_k as f64);
        let k = (k0 + (k1 - k0) * progress).round() as usize;
        let ratio = self.end_temperature / self.start_temperature;
        (k.max(1), self.start_temperature * ratio.powf(progress))
    }
}

/// MoE-PHDS mixed-k fine-tuning: each step before the curriculum draws k uniformly from
/// `choices` (fixed by `seed` and the step), and the last `curriculum_steps` steps of
/// `total_steps` run at the smallest k (the highest sparsity), so one checkpoint serves every
/// k in `choices`.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedTopK {
    /// The ks to serve, each at least 1.
    pub choices: Vec<usize>,
    /// Length of the fine-tuning.
    pub total_steps: usize,
    /// Final steps at the smallest k.
    pub curriculum_steps: usize,
    /// Seed of the draws.
    pub seed: u64,
}

impl MixedTopK {
    /// A checked schedule.
    ///
    /// # Errors
    /// [`MoeError::InvalidSetting`] for no choices, a choice of 0, or a curriculum longer than
    /// the fine-tuning.
    pub fn new(
        choices: Vec<usize>,
        total_steps: usize,
        curriculum_steps: usize,
        seed: u64,
    ) -> Result<Self, MoeError> {
        if choices.is_empty() || choices.contains(&0) {
            return Err(MoeError::InvalidSetting {
                name: "choices",
                expected: "non-empty, every k at least 1",
                value: 0.0,
            });
        }
        if curriculum_steps > total_steps {
            return Err(MoeError::InvalidSetting {
                name: "curriculum_steps",
                expected: "at most total_steps",
                value: curriculum_steps as f64,
            });
        }
        Ok(MixedTopK {
            choices,
            total_steps,
            curriculum_steps,
            seed,
        })
    }

    /// The k of `step`.
    pub fn k_at(&self, step: usize) -> usize {
        let smallest = self.choices.iter().copied().min().unwrap_or(1);
        if step + self.curriculum_steps >= self.total_steps {
            return smallest;
        }
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (step as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
        self.choices[rng.random_range(0..self.choices.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_to_sparse_hits_both_ends_and_holds() {
        let s = DenseToSparse::new(8, 2, 2.0, 0.5, 100).unwrap();
        assert_eq!(s.at(0), (8, 2.0));
        let (k, t) = s.at(50);
        assert_eq!(k, 5);
        assert!(
            (t - 1.0).abs() < 1e-12,
            "geometric midpoint of 2 and 0.5 is 1, got {t}"
        );
        assert_eq!(s.at(100), (2, 0.5));
        assert_eq!(s.at(1000), (2, 0.5));
        assert!(DenseToSparse::new(0, 2, 1.0, 1.0, 5).is_err());
        assert!(DenseToSparse::new(2, 2, 1.0, 0.0, 5).is_err());
    }

    #[test]
    fn mixed_top_k_draws_every_choice_then_ends_at_the_smallest() {
        let s = MixedTopK::new(vec![4, 1, 2], 200, 20, 7).unwrap();
        let drawn: Vec<usize> = (0..180).map(|step| s.k_at(step)).collect();
        for k in [1, 2, 4] {
            let n = drawn.iter().filter(|&&d| d == k).count();
            assert!((30..=90).contains(&n), "k={k} drawn {n} times of 180");
        }
        assert!((180..200).all(|step| s.k_at(step) == 1));
        assert_eq!(drawn, (0..180).map(|step| s.k_at(step)).collect::<Vec<_>>());
        assert!(MixedTopK::new(vec![], 10, 0, 0).is_err());
        assert!(MixedTopK::new(vec![1], 10, 11, 0).is_err());
    }
}
