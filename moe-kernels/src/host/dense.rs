//! Dense products on the host kernels: one weight matrix for every row (a decoder's
//! projections and lm_head, a dense MLP), run as a phase of one expert that holds every row:
//! the same panels, `dots`, tiles and work items as the experts, so a decoding step streams
//! each weight once over all threads, in the layout it is stored in.

use super::experts::{Compute, Paths, sorted_rows_phase};
use super::{HostPlan, Matrix};
use crate::KernelError;

/// `x · w`: `x` `[t, k]` row-major f32, `w` `[k, n]` (row-major f32 or bf16, or bf16 stored
/// out-major `[n, k]`, [`Matrix::Bf16T`]), giving `[t, n]` row-major f32. In a bf16
/// computation ([`Compute::Bf16`]) the rows are rounded to bf16 before the products read
/// them; sums are f32 either way, and every result bit is the same whatever the number of
/// threads.
///
/// # Errors
/// [`KernelError::Shape`] when `k` or `n` is zero, `x` is not a whole number of rows of `k`,
/// or `w` does not hold `k × n` values.
pub fn dense(
    x: &[f32],
    w: Matrix<'_>,
    k: usize,
    n: usize,
    compute: Compute,
) -> Result<Vec<f32>, KernelError> {
    let shape = |reason: String| KernelError::Shape {
        op: "dense",
        reason,
    };
    if k == 0 || n == 0 || !x.len().is_multiple_of(k) {
        return Err(shape(format!(
            "x holds {} values: not rows of k = {k} (k and n = {n} must be non-zero)",
            x.len()
        )));
    }
    if k.checked_mul(n) != Some(w.len()) {
        return Err(shape(format!(
            "w holds {} values, expected k {k} × n {n}",
            w.len()
        )));
    }
    let t = x.len() / k;
    if t == 0 {
        return Ok(Vec::new());
    }
    // one expert, every row in order: the sorted rows are x's rows
    let plan = HostPlan::new(&vec![0i64; t], t, 1, 1)?;
    let x = compute.rows(x);
    let paths = Paths::available().for_phase(compute, &[Some(w)]);
    let mut out = sorted_rows_phase(&x, k, &plan, |_| w, n, paths);
    // the buffer may come from the pool, sized for a longer call: the result keeps only its own
    out.shrink_to_fit();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::panel::tests::lcg;
    use half::bf16;

    /// Every layout and precision against a dumb f64 loop, on row counts that take the panel
    /// (1, 8), the tiles (9, 130) and widths that are not multiples of any block (n = 1, 37,
    /// 2100: more than one column block).
    #[test]
    fn dense_matches_a_f64_oracle() {
        let mut seed = 3;
        for (t, k, n) in [
            (1, 33, 2100),
            (8, 17, 37),
            (9, 64, 1),
            (130, 41, 70),
            (3, 1, 5),
        ] {
            let x: Vec<f32> = (0..t * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wt: Vec<bf16> = (0..n * k).map(|i| wb[(i % k) * n + i / k]).collect();
            let widened: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            for compute in [Compute::F32, Compute::Bf16] {
                let xr: Vec<f64> = x.iter().map(|&v| compute.round(v) as f64).collect();
                for (name, m, wv) in [
                    ("f32", Matrix::F32(&w), &w),
                    ("bf16", Matrix::Bf16(&wb), &widened),
                    ("bf16 out-major", Matrix::Bf16T(&wt), &widened),
                ] {
                    let got = dense(&x, m, k, n, compute).unwrap();
                    assert_eq!(got.len(), t * n);
                    for r in 0..t {
                        for c in 0..n {
                            let want: f64 =
                                (0..k).map(|i| xr[r * k + i] * wv[i * n + c] as f64).sum();
                            let g = got[r * n + c] as f64;
                            assert!(
                                (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                                "{name} {compute:?} t{t} k{k} n{n} [{r}, {c}]: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let w = vec![0.0f32; 12];
        for (x_len, k, n) in [(7, 3, 4), (6, 0, 4), (6, 3, 0), (6, 3, 5)] {
            let x = vec![0.0f32; x_len];
            let err = dense(&x, Matrix::F32(&w), k, n, Compute::F32).unwrap_err();
            assert!(
                matches!(err, KernelError::Shape { op: "dense", .. }),
                "{err}"
            );
        }
        assert!(
            dense(&[], Matrix::F32(&w), 3, 4, Compute::F32)
                .unwrap()
                .is_empty()
        );
    }
}
