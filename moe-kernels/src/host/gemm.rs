//! The fallback product of a long segment where our own tiles do not run: the `gemm` crate's
//! packed, blocked kernels on one thread, bf16 weights widened to f32 in a scratch block first.

use super::matrix::{Matrix, Order, OutBlock};

/// `out = a · w[:, c0..c0 + out.cols]` with `a` row-major `[m, K]` and `w` row-major `[K, n]`,
/// by the `gemm` crate on this thread. bf16 weights are widened into `scratch` first.
///
/// # Safety
/// `out` must point to `m` rows of `out.cols` writable values no one else touches.
pub(crate) unsafe fn gemm(
    a: &[f32],
    m: usize,
    w: Matrix<'_>,
    n: usize,
    c0: usize,
    out: OutBlock,
    scratch: &mut Vec<f32>,
) {
    let k = a.len() / m.max(1);
    let cols = out.cols;
    assert!(m > 0 && a.len() == m * k);
    assert!(Order::of(w, n, k).fits(w.len(), k, c0 + cols));
    // the weights as f32, (pointer, row stride, column stride)
    let (rhs, rhs_rs, rhs_cs) = match w {
        Matrix::F32(w) => (w[c0..].as_ptr(), n, 1),
        Matrix::Bf16(w) => {
            scratch.clear();
            scratch.reserve(k * cols);
            for row in 0..k {
                let src = &w[row * n + c0..row * n + c0 + cols];
                scratch.extend(src.iter().map(|v| v.to_f32()));
            }
            (scratch.as_ptr(), cols, 1)
        }
        // widened as they lie, each column's k contiguous
        Matrix::Bf16T(w) => {
            scratch.clear();
            scratch.extend(w[c0 * k..(c0 + cols) * k].iter().map(|v| v.to_f32()));
            (scratch.as_ptr(), 1, k)
        }
    };
    // SAFETY: `a` holds m × k values, the weights k × cols values at `rhs` with strides
    // `rhs_rs` (rows) and `rhs_cs` (columns), and the output block is the caller's.
    unsafe {
        gemm::gemm(
            m,
            cols,
            k,
            out.ptr,
            1,
            out.stride as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
