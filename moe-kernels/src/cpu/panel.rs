//! The two products an expert segment is made of, on host memory:
//!
//! - [`panel`] for a few rows (decoding): `out[r, c] = Σ_k x_r[k] · W[k, c]` streamed straight
//!   from the stored `[K, N]` weights, eight weight rows at a time. The eight rows are one
//!   contiguous block of memory, read once per row group from DRAM and from L1/L2 for the
//!   other rows of the segment, so a single row runs at the memory's streaming speed. The
//!   input rows are read where they are (the gather is fused: no copy of `x`).
//! - [`gemm`] for longer segments where our own tiles (`super::tiles`, x86-64 with AVX2 and
//!   FMA) do not run: the `gemm` crate's packed, blocked kernels on one thread (the threads are
//!   spread over experts and column blocks by the caller), bf16 weights widened to f32 in a
//!   scratch block first.
//!
//! Both accumulate in f32; bf16 weights are widened exactly (a bf16 is the top half of an f32).

use half::bf16;

/// One expert matrix, row-major `[K, N]`, in its stored dtype.
#[derive(Debug, Clone, Copy)]
pub enum Matrix<'a> {
    /// f32 weights.
    F32(&'a [f32]),
    /// bf16 weights, widened to f32 as they are read.
    Bf16(&'a [bf16]),
}

impl Matrix<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Matrix::F32(w) => w.len(),
            Matrix::Bf16(w) => w.len(),
        }
    }

    /// Bytes per element.
    pub(crate) fn elem_bytes(&self) -> usize {
        match self {
            Matrix::F32(_) => 4,
            Matrix::Bf16(_) => 2,
        }
    }

    /// Whether the matrix has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `k0..k0 + k` of the matrix (each `n` wide).
    pub(crate) fn rows(&self, k0: usize, k: usize, n: usize) -> Self {
        match self {
            Matrix::F32(w) => Matrix::F32(&w[k0 * n..(k0 + k) * n]),
            Matrix::Bf16(w) => Matrix::Bf16(&w[k0 * n..(k0 + k) * n]),
        }
    }
}

/// A destination block: `rows` rows of `cols` values, `stride` apart.
///
/// A raw pointer, because the threads of one phase write disjoint column blocks of the same
/// rows; [`super`] hands every block to exactly one work item.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutBlock {
    pub ptr: *mut f32,
    pub stride: usize,
    pub cols: usize,
}

// SAFETY: an `OutBlock` is only written through by the one work item it was made for, and the
// buffer it points into outlives the parallel phase (see `super::run_phase`).
unsafe impl Send for OutBlock {}
unsafe impl Sync for OutBlock {}

impl OutBlock {
    /// The sub-block starting at row `row`, column `c0`, `cols` wide.
    ///
    /// # Safety
    /// The sub-block must lie inside the block.
    pub(crate) unsafe fn sub(&self, row: usize, c0: usize, cols: usize) -> OutBlock {
        OutBlock {
            // SAFETY: the caller's contract.
            ptr: unsafe { self.ptr.add(row * self.stride + c0) },
            stride: self.stride,
            cols,
        }
    }

    /// Row `r` of the block.
    ///
    /// # Safety
    /// `r` must be one of the block's rows, and no other reference to that row may be alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize) -> &mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.stride), self.cols) }
    }
}

/// Weight rows streamed together by [`panel`] (8 pieces in flight per row of output: tried
/// against 1 and 16 with `moe bench`, 8 was fastest).
const K_BLOCK: usize = 8;

/// Columns [`panel`] runs every row over before moving on (a multiple of 8): 8 weight row
/// pieces of this width (8 KiB in f32) stay in L1 for the whole segment.
const COL_CHUNK: usize = 256;

/// `out[r, c] = Σ_k rows[r][k] · w[k, c0 + c]` for `c < out.cols`, with `w` row-major
/// `[K, n]` and `K = rows[r].len()`. Overwrites the block. Panics (a bug in the caller) when
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
                Matrix::F32(w) => panel_f32_avx2(rows, w, n, c0, out),
                Matrix::Bf16(w) => panel_bf16_avx2(rows, w, n, c0, out),
            }
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        match w {
            Matrix::F32(w) => panel_portable(rows, w, n, c0, out, |v| v),
            Matrix::Bf16(w) => panel_portable(rows, w, n, c0, out, bf16::to_f32),
        }
    }
}

/// The portable [`panel`]: the same loop order in plain Rust (what runs off x86-64 or without
/// AVX2, and what the tests compare the vector code with).
///
/// # Safety
/// As [`panel`].
pub(crate) unsafe fn panel_portable<T: Copy>(
    rows: &[&[f32]],
    w: &[T],
    n: usize,
    c0: usize,
    out: OutBlock,
    widen: impl Fn(T) -> f32,
) {
    let cols = out.cols;
    for r in 0..rows.len() {
        // SAFETY: the caller's contract.
        unsafe { out.row(r) }.fill(0.0);
    }
    let k_len = rows.first().map_or(0, |x| x.len());
    let mut k0 = 0;
    while k0 < k_len {
        let kb = K_BLOCK.min(k_len - k0);
        for (r, x) in rows.iter().enumerate() {
            // SAFETY: the caller's contract; one row borrowed at a time.
            let o = unsafe { out.row(r) };
            for (c, o) in o.iter_mut().enumerate().take(cols) {
                let mut sum = 0.0f32;
                for i in 0..kb {
                    sum += x[k0 + i] * widen(w[(k0 + i) * n + c0 + c]);
                }
                *o += sum;
            }
        }
        k0 += kb;
    }
}

/// Widens 8 bf16 at `p` to f32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_bf16x8(p: *const bf16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees 8 readable values at `p` and AVX2.
    unsafe {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
}

/// Loads 8 f32 at `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_f32x8(p: *const f32) -> std::arch::x86_64::__m256 {
    // SAFETY: the caller guarantees 8 readable values at `p` and AVX.
    unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
}

/// The AVX2 + FMA [`panel`], for one weight dtype.
macro_rules! avx2_panel {
    ($name:ident, $elem:ty, $load:ident, $widen:expr) => {
        /// [`panel`] with AVX2 and FMA: 8 columns per vector, `K_BLOCK` weight rows per pass
        /// (two partial sums, then one read-modify-write of the output).
        ///
        /// # Safety
        /// AVX2 and FMA must be available; the block contract of [`panel`].
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $name(rows: &[&[f32]], w: &[$elem], n: usize, c0: usize, out: OutBlock) {
            use std::arch::x86_64::{
                __m256, _mm256_add_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_mul_ps,
                _mm256_set1_ps, _mm256_storeu_ps,
            };
            let widen = $widen;
            let cols = out.cols;
            let vec_cols = cols / 8 * 8;
            debug_assert!(COL_CHUNK % 8 == 0);
            let k_len = rows.first().map_or(0, |x| x.len());
            assert!(rows.iter().all(|x| x.len() == k_len));
            assert!(k_len == 0 || (k_len - 1) * n + c0 + cols <= w.len());
            for r in 0..rows.len() {
                // SAFETY: the caller's contract.
                unsafe { out.row(r) }.fill(0.0);
            }
            let wp = w.as_ptr();
            let mut k0 = 0;
            while k0 + K_BLOCK <= k_len {
                // SAFETY: rows k0..k0 + 8, columns c0..c0 + cols lie inside `w` (checked
                // above), the output block is the caller's.
                unsafe {
                    let p: [*const $elem; K_BLOCK] =
                        std::array::from_fn(|i| wp.add((k0 + i) * n + c0));
                    // Column chunks keep the 8 weight row pieces in L1 while every row of
                    // the segment uses them.
                    let mut c_start = 0;
                    while c_start < cols {
                        let c_end = (c_start + COL_CHUNK).min(cols);
                        let vec_end = c_start + (c_end - c_start) / 8 * 8;
                        for (r, x) in rows.iter().enumerate() {
                            let b: [__m256; K_BLOCK] =
                                std::array::from_fn(|i| _mm256_set1_ps(*x.get_unchecked(k0 + i)));
                            let o = out.ptr.add(r * out.stride);
                            let mut c = c_start;
                            while c < vec_end {
                                let mut s0 = _mm256_mul_ps($load(p[0].add(c)), b[0]);
                                let mut s1 = _mm256_mul_ps($load(p[1].add(c)), b[1]);
                                s0 = _mm256_fmadd_ps($load(p[2].add(c)), b[2], s0);
                                s1 = _mm256_fmadd_ps($load(p[3].add(c)), b[3], s1);
                                s0 = _mm256_fmadd_ps($load(p[4].add(c)), b[4], s0);
                                s1 = _mm256_fmadd_ps($load(p[5].add(c)), b[5], s1);
                                s0 = _mm256_fmadd_ps($load(p[6].add(c)), b[6], s0);
                                s1 = _mm256_fmadd_ps($load(p[7].add(c)), b[7], s1);
                                let acc =
                                    _mm256_add_ps(_mm256_loadu_ps(o.add(c)), _mm256_add_ps(s0, s1));
                                _mm256_storeu_ps(o.add(c), acc);
                                c += 8;
                            }
                            while c < c_end {
                                let mut sum = 0.0f32;
                                for i in 0..K_BLOCK {
                                    sum += *x.get_unchecked(k0 + i) * widen(*p[i].add(c));
                                }
                                *o.add(c) += sum;
                                c += 1;
                            }
                        }
                        c_start = c_end;
                    }
                }
                k0 += K_BLOCK;
            }
            while k0 < k_len {
                // SAFETY: as above, one weight row.
                unsafe {
                    let p = wp.add(k0 * n + c0);
                    for (r, x) in rows.iter().enumerate() {
                        let xv = *x.get_unchecked(k0);
                        let b = _mm256_set1_ps(xv);
                        let o = out.ptr.add(r * out.stride);
                        let mut c = 0;
                        while c < vec_cols {
                            let acc =
                                _mm256_fmadd_ps($load(p.add(c)), b, _mm256_loadu_ps(o.add(c)));
                            _mm256_storeu_ps(o.add(c), acc);
                            c += 8;
                        }
                        while c < cols {
                            *o.add(c) += xv * widen(*p.add(c));
                            c += 1;
                        }
                    }
                }
                k0 += 1;
            }
        }
    };
}

avx2_panel!(panel_f32_avx2, f32, load_f32x8, |v: f32| v);
avx2_panel!(panel_bf16_avx2, bf16, load_bf16x8, bf16::to_f32);

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
    let (rhs, rhs_rs) = match w {
        Matrix::F32(w) => (w[c0..].as_ptr(), n),
        Matrix::Bf16(w) => {
            scratch.clear();
            scratch.reserve(k * cols);
            for row in 0..k {
                let src = &w[row * n + c0..row * n + c0 + cols];
                scratch.extend(src.iter().map(|v| v.to_f32()));
            }
            (scratch.as_ptr(), cols)
        }
    };
    assert!(m > 0 && a.len() == m * k);
    assert!(k == 0 || (k - 1) * n + c0 + cols <= w.len());
    // SAFETY: `a` holds m × k values, the weights k rows of `rhs_rs` from `rhs` with `cols`
    // readable columns each, and the output block is the caller's.
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
            1,
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::cpu::tiles::PackedRows;

    /// A small deterministic generator of values in [-1, 1) for the tests of this module and
    /// its parent.
    pub(in crate::cpu) fn lcg(seed: &mut u64) -> f32 {
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
                if method == 3 && !crate::cpu::tiles::available() {
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
                        (1, Matrix::F32(w)) => panel_portable(&rows, w, n, c0, block, |v| v),
                        (1, Matrix::Bf16(w)) => {
                            panel_portable(&rows, w, n, c0, block, bf16::to_f32)
                        }
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
        }
    }
}
