//! Decode attention on the host kernels: each new position's query (one row per batch row and
//! head) against every cached key and value, read where the cache stores them (f32 or bf16,
//! row-major `[B, kv_heads, P, d]`), in one pass over the cache with all threads. The
//! generic ops this replaces widen the whole cache to f32 on every call, on one thread.

use rayon::prelude::*;

use super::Matrix;
use super::experts::Compute;
use crate::KernelError;

/// The sizes of one decode attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch rows `B`.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (each serves `heads / kv_heads` query heads).
    pub kv_heads: usize,
    /// Cached positions `P` (the new one included).
    pub positions: usize,
    /// Positions the cache holds room for (`≥ P`): the stride of a head's rows.
    pub capacity: usize,
    /// Query/key size per head.
    pub key_dim: usize,
    /// Value size per head.
    pub value_dim: usize,
}

/// `softmax(q · kᵀ · scale, masked) · v` for one query per batch row and head: `q`
/// `[B, heads, key_dim]` f32, `k` `[B, kv_heads, capacity, key_dim]` and `v`
/// `[B, kv_heads, capacity, value_dim]` whose first `P` positions are read, `visible` `[B, P]` (which positions each row's query sees), giving `[B, heads, value_dim]`.
/// The softmax is f32; in a bf16 computation ([`Compute::Bf16`]) the scores are rounded to bf16
/// before and after the scale and the probabilities after the softmax, as a bf16 model's
/// matmuls round them. A row that sees no position averages the values of all `P` positions
/// (what an additive mask of `f32::MIN` gives a softmax); a NaN score gives NaN outputs.
///
/// # Errors
/// [`KernelError::Shape`] when a size is zero where it cannot be, `heads` is not a multiple of
/// `kv_heads`, or a slice does not hold its shape's values.
pub fn decode_attention(
    q: &[f32],
    k: Matrix<'_>,
    v: Matrix<'_>,
    visible: &[bool],
    shape: AttentionShape,
    scale: f32,
    compute: Compute,
) -> Result<Vec<f32>, KernelError> {
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        positions,
        capacity,
        key_dim,
        value_dim,
    } = shape;
    let bad = |reason: String| KernelError::Shape {
        op: "decode_attention",
        reason,
    };
    if kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || key_dim == 0
        || value_dim == 0
        || capacity < positions
    {
        return Err(bad(format!("unusable sizes {shape:?}")));
    }
    let size = |dims: &[usize]| dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let expected = [
        ("q", q.len(), size(&[batch, heads, key_dim])),
        ("k", k.len(), size(&[batch, kv_heads, capacity, key_dim])),
        ("v", v.len(), size(&[batch, kv_heads, capacity, value_dim])),
        ("visible", visible.len(), size(&[batch, positions])),
    ];
    for (name, got, want) in expected {
        if Some(got) != want {
            return Err(bad(format!(
                "{name} holds {got} values, expected {want:?} for {shape:?}"
            )));
        }
    }
    if matches!(k, Matrix::Bf16T(_)) || matches!(v, Matrix::Bf16T(_)) {
        return Err(bad("the cache must be row-major".into()));
    }
    let group = heads / kv_heads;
    let mut out = vec![0.0f32; batch * heads * value_dim];
    out.par_chunks_mut(value_dim)
        .enumerate()
        .for_each_init(Vec::new, |scores, (row, out)| {
            let (b, h) = (row / heads, row % heads);
            let kv = b * kv_heads + h / group;
            let query = &q[row * key_dim..(row + 1) * key_dim];
            let seen = &visible[b * positions..(b + 1) * positions];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for (p, &sees) in seen.iter().enumerate() {
                let s = match sees {
                    true => {
                        let at = (kv * capacity + p) * key_dim;
                        let dot = compute.round(dot(query, k, at));
                        compute.round(dot * scale)
                    }
                    false => f32::NEG_INFINITY,
                };
                max = max.max(s);
                scores.push(s);
            }
            if scores.iter().any(|s| s.is_nan()) {
                out.fill(f32::NAN);
                return;
            }
            if max == f32::NEG_INFINITY {
                // nothing visible: every position weighs the same
                scores.fill(0.0);
                max = 0.0;
            }
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (p, s) in scores.iter().enumerate() {
                let prob = compute.round(s / sum);
                if prob != 0.0 {
                    axpy(out, prob, v, (kv * capacity + p) * value_dim);
                }
            }
        });
    Ok(out)
}

/// `Σ_i a[i] · m[at + i]`.
fn dot(a: &[f32], m: Matrix<'_>, at: usize) -> f32 {
    match m {
        Matrix::F32(w) => a.iter().zip(&w[at..at + a.len()]).map(|(x, y)| x * y).sum(),
        Matrix::Bf16(w) | Matrix::Bf16T(w) => a
            .iter()
            .zip(&w[at..at + a.len()])
            .map(|(x, y)| x * y.to_f32())
            .sum(),
    }
}

/// `out[i] += s · m[at + i]`.
fn axpy(out: &mut [f32], s: f32, m: Matrix<'_>, at: usize) {
    let len = out.len();
    match m {
        Matrix::F32(w) => out
            .iter_mut()
            .zip(&w[at..at + len])
            .for_each(|(o, y)| *o += s * y),
        Matrix::Bf16(w) | Matrix::Bf16T(w) => out
            .iter_mut()
            .zip(&w[at..at + len])
            .for_each(|(o, y)| *o += s * y.to_f32()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::panel::tests::lcg;
    use half::bf16;

    /// Against a dumb f64 loop: grouped heads, a masked position, a row that sees nothing (the
    /// mean of the values), one position, f32 and bf16 caches.
    #[test]
    fn decode_attention_matches_a_f64_oracle() {
        let mut seed = 11;
        // the cache holds room for `capacity` positions, of which `positions` are read
        for (batch, heads, kv_heads, positions, capacity, key_dim, value_dim) in [
            (2, 4, 2, 7, 9, 8, 5),
            (1, 3, 3, 1, 1, 4, 4),
            (1, 8, 1, 33, 64, 16, 16),
        ] {
            let shape = AttentionShape {
                batch,
                heads,
                kv_heads,
                positions,
                capacity,
                key_dim,
                value_dim,
            };
            let mut next = || lcg(&mut seed) * 4.0;
            let q: Vec<f32> = (0..batch * heads * key_dim).map(|_| next()).collect();
            let k: Vec<f32> = (0..batch * kv_heads * capacity * key_dim)
                .map(|_| next())
                .collect();
            let v: Vec<f32> = (0..batch * kv_heads * capacity * value_dim)
                .map(|_| next())
                .collect();
            // row 0 hides position 1; a second row, if any, sees nothing
            let visible: Vec<bool> = (0..batch * positions)
                .map(|i| i / positions == 0 && (positions == 1 || i % positions != 1))
                .collect();
            let kb: Vec<bf16> = k.iter().map(|&x| bf16::from_f32(x)).collect();
            let vb: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            let kw: Vec<f32> = kb.iter().map(|x| x.to_f32()).collect();
            let vw: Vec<f32> = vb.iter().map(|x| x.to_f32()).collect();
            let scale = 0.35f32;
            for (name, km, vm, kr, vr) in [
                ("f32", Matrix::F32(&k), Matrix::F32(&v), &k, &v),
                ("bf16", Matrix::Bf16(&kb), Matrix::Bf16(&vb), &kw, &vw),
            ] {
                let got =
                    decode_attention(&q, km, vm, &visible, shape, scale, Compute::F32).unwrap();
                for b in 0..batch {
                    for h in 0..heads {
                        let kv = b * kv_heads + h / (heads / kv_heads);
                        let qr = &q[(b * heads + h) * key_dim..][..key_dim];
                        let scores: Vec<Option<f64>> = (0..positions)
                            .map(|p| {
                                visible[b * positions + p].then(|| {
                                    let kr = &kr[(kv * capacity + p) * key_dim..][..key_dim];
                                    qr.iter()
                                        .zip(kr)
                                        .map(|(x, y)| *x as f64 * *y as f64)
                                        .sum::<f64>()
                                        * scale as f64
                                })
                            })
                            .collect();
                        // a row that sees nothing weighs every position the same
                        let scores: Vec<Option<f64>> = match scores.iter().all(Option::is_none) {
                            true => vec![Some(0.0); positions],
                            false => scores,
                        };
                        let max = scores
                            .iter()
                            .flatten()
                            .fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                        let sum: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                        for c in 0..value_dim {
                            let want: f64 = scores
                                .iter()
                                .enumerate()
                                .filter_map(|(p, s)| {
                                    s.map(|s| {
                                        (s - max).exp() / sum
                                            * vr[(kv * capacity + p) * value_dim + c] as f64
                                    })
                                })
                                .sum();
                            let g = got[(b * heads + h) * value_dim + c] as f64;
                            assert!(
                                (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                                "{name} {shape:?} [{b}, {h}, {c}]: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_nan_score_gives_nan() {
        let shape = AttentionShape {
            batch: 1,
            heads: 1,
            kv_heads: 1,
            positions: 2,
            capacity: 2,
            key_dim: 2,
            value_dim: 2,
        };
        let k = [1.0, 0.0, f32::NAN, 0.0];
        let v = [1.0, 2.0, 3.0, 4.0];
        let out = decode_attention(
            &[1.0, 1.0],
            Matrix::F32(&k),
            Matrix::F32(&v),
            &[true, true],
            shape,
            1.0,
            Compute::F32,
        )
        .unwrap();
        assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let shape = AttentionShape {
            batch: 1,
            heads: 4,
            kv_heads: 2,
            positions: 3,
            capacity: 3,
            key_dim: 2,
            value_dim: 2,
        };
        let (q, kv, seen) = (vec![0.0; 8], vec![0.0; 12], vec![true; 3]);
        let run = |shape, q: &[f32], seen: &[bool]| {
            decode_attention(
                q,
                Matrix::F32(&kv),
                Matrix::F32(&kv),
                seen,
                shape,
                1.0,
                Compute::F32,
            )
        };
        assert!(run(shape, &q, &seen).is_ok());
        for (s, q_len, seen_len) in [
            (
                AttentionShape {
                    kv_heads: 3,
                    ..shape
                },
                8,
                3,
            ),
            (
                AttentionShape {
                    kv_heads: 0,
                    ..shape
                },
                8,
                3,
            ),
            (shape, 7, 3),
            (shape, 8, 2),
            (
                AttentionShape {
                    positions: 4,
                    capacity: 4,
                    ..shape
                },
                8,
                4,
            ),
            (
                AttentionShape {
                    capacity: 2,
                    ..shape
                },
                8,
                3,
            ),
        ] {
            let err = run(s, &q[..q_len.min(8)], &vec![true; seen_len]).unwrap_err();
            assert!(
                matches!(
                    err,
                    KernelError::Shape {
                        op: "decode_attention",
                        ..
                    }
                ),
                "{err}"
            );
        }
    }
}
