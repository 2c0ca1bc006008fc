//! The matrix types every host product shares: an expert's weights ([`Matrix`]: f32, bf16, or
//! bf16 stored out-major) and how they lie ([`Order`]), a destination block ([`OutBlock`]), and
//! the weight dtypes the panels and tiles read ([`Weight`]).

use half::bf16;

/// One expert matrix `[K, N]` (the product is `x · W`), in its stored dtype and layout.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Matrix<'a> {
    /// f32 weights, row-major `[K, N]`.
    F32(&'a [f32]),
    /// bf16 weights, row-major `[K, N]`, widened to f32 as they are read.
    Bf16(&'a [bf16]),
    /// bf16 weights stored **out-major**: row-major `[N, K]`, each output's `K` weights
    /// contiguous (Hugging Face's `[out, in]`; a Burn tensor `[E, K, N]` that is the
    /// `swap_dims(1, 2)` view of a contiguous `[E, N, K]` one). Decoding reads it fastest on
    /// AVX-512 (see `dots`).
    Bf16T(&'a [bf16]),
}

impl Matrix<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Matrix::F32(w) => w.len(),
            Matrix::Bf16(w) | Matrix::Bf16T(w) => w.len(),
        }
    }

    /// Bytes per element.
    pub(crate) fn elem_bytes(&self) -> usize {
        match self {
            Matrix::F32(_) => 4,
            Matrix::Bf16(_) | Matrix::Bf16T(_) => 2,
        }
    }

    /// Whether the matrix has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Block `i` of a stack of blocks of `len` values each (one expert of `[E, …]`), in the
    /// same dtype and layout.
    pub(crate) fn block(&self, i: usize, len: usize) -> Self {
        let range = i * len..(i + 1) * len;
        match self {
            Matrix::F32(w) => Matrix::F32(&w[range]),
            Matrix::Bf16(w) => Matrix::Bf16(&w[range]),
            Matrix::Bf16T(w) => Matrix::Bf16T(&w[range]),
        }
    }
}

/// How the weights of a `[K, n]` product lie in memory: where element `(k, c)` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Row-major `[K, n]`: `k · n + c`.
    KMajor { n: usize },
    /// Out-major `[n, K]` ([`Matrix::Bf16T`]): `c · k + k_index`.
    OutMajor { k: usize },
}

impl Order {
    /// The order of `w` in a product with `n` columns and `k` weight rows.
    pub(crate) fn of(w: Matrix<'_>, n: usize, k: usize) -> Self {
        match w {
            Matrix::Bf16T(_) => Order::OutMajor { k },
            _ => Order::KMajor { n },
        }
    }

    /// The index of element `(k, c)`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) fn at(self, k: usize, c: usize) -> usize {
        match self {
            Order::KMajor { n } => k * n + c,
            Order::OutMajor { k: len } => c * len + k,
        }
    }

    /// Whether columns `..end` of `k` weight rows lie inside `len` values (and inside the
    /// `n` columns of a row-major matrix). Out-major, the rows are the order's own `K`.
    pub(crate) fn fits(self, len: usize, k: usize, end: usize) -> bool {
        match self {
            Order::KMajor { n } => k == 0 || ((k - 1) * n + end <= len && end <= n),
            Order::OutMajor { k: rows } => end.checked_mul(rows).is_some_and(|v| v <= len),
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
    pub(crate) unsafe fn row(&self, r: usize) -> &mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.stride), self.cols) }
    }

    /// Zeroes the block's first `rows` rows.
    ///
    /// # Safety
    /// The block must have `rows` rows no one else touches.
    pub(crate) unsafe fn zero(&self, rows: usize) {
        for r in 0..rows {
            // SAFETY: the caller's contract.
            unsafe { self.row(r) }.fill(0.0);
        }
    }
}

/// A weight dtype the panels read: f32, or bf16 widened exactly.
pub(crate) trait Weight: Copy {
    /// Whether the panels prefetch the next block of these weights.
    const PREFETCH: bool;
    /// The value as f32.
    fn widen(self) -> f32;
    /// 8 values at `p` as f32.
    ///
    /// # Safety
    /// 8 readable values at `p`; AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Weight for f32 {
    /// No (the AVX-512 panel's passes of several rows prefetch all the same: see
    /// `panel_f32_avx512`). Measured with `moe bench --stream` (OLMoE, 2 threads, two sets of
    /// three alternations), against the memory's read rate at the same time: T = 1 f32 80–96%
    /// without, 76–82% with (an f32 weight row is a whole 4 KiB page and the hardware
    /// prefetchers follow it); T = 16 level.
    const PREFETCH: bool = false;

    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable values at `p` and AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Weight for bf16 {
    /// Yes: bf16 rows are half as long as f32 ones; T = 16 bf16 77–81% of the stream rate
    /// with, 59–61% without (and T = 1 level).
    const PREFETCH: bool = true;

    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable values at `p` and AVX2.
        unsafe {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
}
