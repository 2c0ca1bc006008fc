//! [`panel`], the product of a short expert segment (decoding):
//! `out[r, c] = Σ_k x_r[k] · W[k, c]` streamed straight from the stored row-major `[K, N]`
//! weights, eight weight rows at a time (out-major bf16 weights go to `super::dots`). The eight
//! rows are one contiguous block of memory, read once per row group from DRAM and from L1/L2
//! for the other rows of the segment, so a single row runs at the memory's streaming speed. The
//! input rows are read where they are (the gather is fused: no copy of `x`). f32 accumulation;
//! bf16 weights are widened exactly (a bf16 is the top half of an f32).
//!
//! This file picks the variant (`avx2.rs`, `avx512.rs`, or the portable loop here); its tests
//! also check the tiles and the `gemm`-crate fallback (`super::gemm`) against the same oracle.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
use avx2::panel_avx2;
#[cfg(target_arch = "x86_64")]
use avx512::{panel_bf16_avx512, panel_f32_avx512};

use half::bf16;

use super::matrix::{Matrix, OutBlock, Weight};

/// Weight rows streamed together by [`panel`] (8 pieces in flight per row of output: tried
/// against 1 and 16 with `moe bench`, 8 was fastest).
const K_BLOCK: usize = 8;

/// Columns [`panel`] runs every row over before moving on (a multiple of 8): 8 weight row
/// pieces of this width (8 KiB in f32) stay in L1 for the whole segment.
const COL_CHUNK: usize = 256;

/// [`COL_CHUNK`] of the AVX-512 bf16 panel: a bf16 weight row of the OLMoE gate and up
/// projections (2 KiB) read whole. Measured with `moe bench --stream` (OLMoE, 2 threads, four
/// alternations) against 256: T = 1 76–78% of the stream rate against 74–77%, T = 16 78–80%
/// against 77% (a C copy of the loop: 38–42 GB/s against 33–39).
const BF16_COL_CHUNK: usize = 1024;

/// `out[r, c] = Σ_k rows[r][k] · w[k, c0 + c]` for `c < out.cols`, with `w` `[K, n]`
/// (row-major; out-major [`Matrix::Bf16T`] goes to `super::dots`) and `K = rows[r].len()`.
/// Overwrites the block. Panics (a bug in the caller) when
/// the rows differ in length or columns `c0..c0 + out.cols` of `K` rows do not fit in `w`.
///
/// # Safety
/// `out` must point to `rows.len()` rows of `out.cols` writable values no one else touches.
pub(crate) unsafe fn panel(rows: &[&[f32]], w: Matrix<'_>, n: usize, c0: usize, out: OutBlock) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected; the block contract is the caller's.
        unsafe {
            match w {
                Matrix::F32(w) if std::arch::is_x86_feature_detected!("avx512f") => {
                    panel_f32_avx512(rows, w, n, c0, out)
                }
                Matrix::F32(w) => panel_avx2(rows, w, n, c0, out),
                Matrix::Bf16(w) if std::arch::is_x86_feature_detected!("avx512f") => {
                    panel_bf16_avx512(rows, w, n, c0, out)
                }
                Matrix::Bf16(w) => panel_avx2(rows, w, n, c0, out),
                Matrix::Bf16T(w) => bf16_t(rows, w, n, c0, out),
            }
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        match w {
            Matrix::F32(w) => panel_portable(rows, w, n, c0, out),
            Matrix::Bf16(w) => panel_portable(rows, w, n, c0, out),
            Matrix::Bf16T(w) => bf16_t(rows, w, n, c0, out),
        }
    }
}

/// Out-major weights in [`panel`]: the `dots` product on rows taken as f32 (what the
/// expert phases call directly, knowing whether the rows are bf16).
///
/// # Safety
/// As [`panel`].
unsafe fn bf16_t(rows: &[&[f32]], w: &[bf16], n: usize, c0: usize, out: OutBlock) {
    assert!(c0 + out.cols <= n);
    // SAFETY: the caller's contract.
    unsafe { super::dots::dots(rows, w, c0, out, false) }
}

/// The start of every panel: checks that the rows are all `K` long and that columns
/// `c0..c0 + out.cols` of `K` weight rows (`n` apart) fit in `w_len` values (panics, a bug in
/// the caller, when not), zeroes the output block, and returns `K`.
///
/// # Safety
/// `out` must point to `rows.len()` rows of `out.cols` writable values no one else touches.
unsafe fn begin(rows: &[&[f32]], w_len: usize, n: usize, c0: usize, out: OutBlock) -> usize {
    let k_len = rows.first().map_or(0, |x| x.len());
    assert!(rows.iter().all(|x| x.len() == k_len));
    assert!(k_len == 0 || (k_len - 1) * n + c0 + out.cols <= w_len);
    // SAFETY: the caller's contract.
    unsafe { out.zero(rows.len()) };
    k_len
}

/// The portable [`panel`]: the same loop order in plain Rust (what runs off x86-64 or without
/// AVX2, and what the tests compare the vector code with).
///
/// # Safety
/// As [`panel`].
pub(crate) unsafe fn panel_portable<T: Weight>(
    rows: &[&[f32]],
    w: &[T],
    n: usize,
    c0: usize,
    out: OutBlock,
) {
    let cols = out.cols;
    // SAFETY: the caller's contract.
    let k_len = unsafe { begin(rows, w.len(), n, c0, out) };
    let mut k0 = 0;
    while k0 < k_len {
        let kb = K_BLOCK.min(k_len - k0);
        for (r, x) in rows.iter().enumerate() {
            // SAFETY: the caller's contract; one row borrowed at a time.
            let o = unsafe { out.row(r) };
            for (c, o) in o.iter_mut().enumerate().take(cols) {
                let mut sum = 0.0f32;
                for i in 0..kb {
                    sum += x[k0 + i] * w[(k0 + i) * n + c0 + c].widen();
                }
                *o += sum;
            }
        }
        k0 += kb;
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::host::gemm::gemm;
    use crate::host::tiles::PackedRows;

    /// A small deterministic generator of values in [-1, 1) for the tests of this module and
    /// its parent.
    pub(in crate::host) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Dumb oracle: f64 triple loop.
    fn oracle(x: &[Vec<f32>], w: &[f32], n: usize, c0: usize, cols: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for row in x {
            for c in 0..cols {
                let s: f64 = row
                    .iter()
                    .enumerate()
                    .map(|(k, &v)| v as f64 * w[k * n + c0 + c] as f64)
                    .sum();
                out.push(s as f32);
            }
        }
        out
    }

    fn run_all(m: usize, k: usize, n: usize, c0: usize, cols: usize, packed: &mut PackedRows) {
        let mut seed = (m * 1000 + k * 10 + n) as u64;
        let x: Vec<Vec<f32>> = (0..m)
            .map(|_| (0..k).map(|_| lcg(&mut seed)).collect())
            .collect();
        let w: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let w_rounded: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let rows: Vec<&[f32]> = x.iter().map(|r| r.as_slice()).collect();
        let flat: Vec<f32> = x.concat();
        let tol = 1e-5 * (k as f32).sqrt().max(1.0);
        for (matrix, reference) in [
            (Matrix::F32(&w), oracle(&x, &w, n, c0, cols)),
            (Matrix::Bf16(&wb), oracle(&x, &w_rounded, n, c0, cols)),
        ] {
            // output rows padded to catch writes past the block
            let stride = cols + 3;
            for method in 0..4 {
                if method == 3 && !crate::host::tiles::available() {
                    continue;
                }
                let mut out = vec![7.0f32; m * stride];
                let block = OutBlock {
                    ptr: out.as_mut_ptr(),
                    stride,
                    cols,
                };
                let mut scratch = Vec::new();
                // SAFETY: the block is `out`, m rows of `cols` values `stride` apart.
                unsafe {
                    match (method, matrix) {
                        (0, _) => panel(&rows, matrix, n, c0, block),
                        (1, Matrix::F32(w)) => panel_portable(&rows, w, n, c0, block),
                        (1, Matrix::Bf16(w)) => panel_portable(&rows, w, n, c0, block),
                        (2, _) => gemm(&flat, m, matrix, n, c0, block, &mut scratch),
                        _ => {
                            packed.pack(&rows);
                            packed.product(matrix, n, c0, block);
                            // a second product reuses the packing (SwiGLU's gate and up)
                            packed.product(matrix, n, c0, block);
                        }
                    }
                }
                for r in 0..m {
                    for c in 0..cols {
                        let (got, want) = (out[r * stride + c], reference[r * cols + c]);
                        assert!(
                            (got - want).abs() <= tol,
                            "method {method} {matrix:?} m={m} k={k} n={n} c0={c0}: [{r},{c}] {got} vs {want}",
                            matrix = matches!(matrix, Matrix::Bf16(_)),
                        );
                    }
                    for pad in cols..stride {
                        assert_eq!(out[r * stride + pad], 7.0, "write past the block");
                    }
                }
            }
        }
    }

    /// The bf16 panel gives the same bits as the f32 panel on the widened weights, and so does
    /// every vector variant this CPU runs (AVX2, AVX-512): the same sums in the same order.
    fn bf16_panel_is_its_widening(m: usize, k: usize, n: usize, c0: usize, cols: usize) {
        let mut seed = (m * 7 + k * 3 + n) as u64;
        let x: Vec<Vec<f32>> = (0..m)
            .map(|_| (0..k).map(|_| lcg(&mut seed)).collect())
            .collect();
        let wb: Vec<bf16> = (0..k * n).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
        let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let rows: Vec<&[f32]> = x.iter().map(|r| r.as_slice()).collect();
        // output rows padded with a sentinel to catch writes past the block
        let stride = cols + 3;
        let inside = |out: Vec<f32>| -> Vec<f32> {
            for r in 0..m {
                assert!(
                    out[r * stride + cols..(r + 1) * stride]
                        .iter()
                        .all(|&v| v == 7.0)
                );
            }
            (0..m * cols)
                .map(|i| out[i / cols * stride + i % cols])
                .collect()
        };
        let run = |w: Matrix<'_>| {
            let mut out = vec![7.0f32; m * stride];
            let block = OutBlock {
                ptr: out.as_mut_ptr(),
                stride,
                cols,
            };
            // SAFETY: the block is `out`, m rows of `cols` values `stride` apart.
            unsafe { panel(&rows, w, n, c0, block) };
            inside(out)
        };
        let (a, b) = (run(Matrix::Bf16(&wb)), run(Matrix::F32(&wf)));
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same(&a, &b), "m={m} k={k} n={n} c0={c0} cols={cols}");
        // and every vector variant the CPU runs gives those bits
        #[cfg(target_arch = "x86_64")]
        {
            type Variant<'v> = unsafe fn(&[&[f32]], Matrix<'v>, usize, usize, OutBlock);
            let mut variants: Vec<(&str, Variant<'_>)> = Vec::new();
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                variants.push(("avx2", |rows, w, n, c0, out| unsafe {
                    match w {
                        Matrix::F32(w) => panel_avx2(rows, w, n, c0, out),
                        Matrix::Bf16(w) => panel_avx2(rows, w, n, c0, out),
                        Matrix::Bf16T(_) => unreachable!("row-major weights only"),
                    }
                }));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                variants.push(("avx512", |rows, w, n, c0, out| unsafe {
                    match w {
                        Matrix::F32(w) => panel_f32_avx512(rows, w, n, c0, out),
                        Matrix::Bf16(w) => panel_bf16_avx512(rows, w, n, c0, out),
                        Matrix::Bf16T(_) => unreachable!("row-major weights only"),
                    }
                }));
            }
            for (name, variant) in variants {
                for w in [Matrix::Bf16(&wb), Matrix::F32(&wf)] {
                    let mut out = vec![7.0f32; m * stride];
                    let block = OutBlock {
                        ptr: out.as_mut_ptr(),
                        stride,
                        cols,
                    };
                    // SAFETY: the features were detected; the block is `out`.
                    unsafe { variant(&rows, w, n, c0, block) };
                    let out = inside(out);
                    assert!(
                        same(&out, &a),
                        "{name} m={m} k={k} n={n} c0={c0} cols={cols}"
                    );
                }
            }
        }
    }

    #[test]
    fn products_match_a_f64_oracle_on_edge_shapes() {
        // k below, at and past the 8-row block with a tail; columns below, at and past one
        // vector with a tail; blocks starting inside the matrix. One packing buffer for all
        // shapes, growing and shrinking, as a worker's: nothing stale may leak into a product.
        let mut packed = PackedRows::default();
        for &(m, k, n, c0, cols) in &[
            (1, 1, 1, 0, 1),
            (1, 7, 5, 0, 5),
            (1, 8, 8, 0, 8),
            (2, 9, 17, 0, 17),
            (3, 64, 40, 8, 24),
            (4, 24, 40, 0, 40),
            (5, 33, 64, 13, 51),
            (16, 100, 96, 32, 64),
            (1, 2048, 256, 128, 128),
            // the tiles' edges: rows not a multiple of 6, k past one 256-row block with a
            // tail, columns past one 256-column block with a tail not a multiple of 16
            (7, 300, 600, 16, 520),
            (13, 513, 300, 0, 300),
            (6, 256, 32, 0, 32),
            (12, 17, 16, 0, 16),
            // more rows than one 72-row pass of the tiles
            (80, 300, 48, 0, 40),
        ] {
            run_all(m, k, n, c0, cols, &mut packed);
            bf16_panel_is_its_widening(m, k, n, c0, cols);
        }
    }
}
