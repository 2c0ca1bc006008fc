//! Step 5, **unpermute + combine**: each token sums its k expert rows weighted, in slot
//! order: deterministic, whatever the number of threads.

use rayon::prelude::*;

use super::HostPlan;
use crate::KernelError;

/// Step 5, **unpermute + combine**: `out[t] = Σ_j weights[t, j] · rows[slot_rows[t·k + j]]`,
/// in slot order (unused slots add nothing), `[T, d_model]`.
///
/// # Errors
/// [`KernelError::Shape`] when `rows` is not `active rows × d_model` or `weights` not `T × k`.
pub fn combine(
    rows: &[f32],
    plan: &HostPlan,
    weights: &[f32],
    d_model: usize,
) -> Result<Vec<f32>, KernelError> {
    let (t, k) = (plan.num_tokens, plan.top_k);
    let sizes = (
        plan.active_rows().checked_mul(d_model),
        t.checked_mul(d_model),
    );
    let (Some(rows_len), Some(_)) = sizes else {
        return Err(KernelError::Shape {
            op: "combine",
            reason: format!("{t} tokens × d_model {d_model} overflow"),
        });
    };
    if rows.len() != rows_len || weights.len() != t * k {
        return Err(KernelError::Shape {
            op: "combine",
            reason: format!(
                "rows hold {} values for {} rows × d_model {d_model}; {} weights for {t} tokens × {k} slots",
                rows.len(),
                plan.active_rows(),
                weights.len()
            ),
        });
    }
    let mut out = vec![0.0f32; t * d_model];
    if d_model == 0 {
        return Ok(out);
    }
    let tokens_per_job = (4096 / d_model).max(1);
    out.par_chunks_mut(d_model * tokens_per_job)
        .enumerate()
        .for_each(|(job, chunk)| {
            for (i, o) in chunk.chunks_exact_mut(d_model).enumerate() {
                let token = job * tokens_per_job + i;
                for j in 0..k {
                    let row = plan.slot_rows[token * k + j];
                    if row == u32::MAX {
                        continue;
                    }
                    let w = weights[token * k + j];
                    let src = &rows[row as usize * d_model..(row as usize + 1) * d_model];
                    for (o, &s) in o.iter_mut().zip(src) {
                        *o += w * s;
                    }
                }
            }
        });
    Ok(out)
}
