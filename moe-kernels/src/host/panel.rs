//! The two products an expert segment is made of, on host memory (and the [`Matrix`] and
//! [`Order`] of the weights every product reads):
//!
//! - [`panel`] for a few rows (decoding): `out[r, c] = Σ_k x_r[k] · W[k, c]` streamed straight
//!   from the stored row-major `[K, N]` weights, eight weight rows at a time (out-major bf16
//!   weights go to `super::dots`). The eight rows are one
//!   contiguous block of memory, read once per row group from DRAM and from L1/L2 for the
//!   other rows of the segment, so a single row runs at the memory's streaming speed. The
//!   input rows are read where they are (the gather is fused: no copy of `x`).
//! - [`gemm`] for longer segments where our own tiles (`super::tiles`, x86-64 with AVX2 and
//!   FMA) do not run: the `gemm` crate's packed, blocked kernels on one thread (the threads are
//!   spread over experts and column blocks by the caller), bf16 weights widened to f32 in a
//!   scratch block first.
//!
//! Both accumulate in f32; bf16 weights are widened exactly (a bf16 is the top half of an f32).

use std::ops::Range;

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
    unsafe fn row(&self, r: usize) -> &mut [f32] {
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

/// Asks for the cache line at column `c` of the next block's weight rows (`K_BLOCK` rows
/// below those of `p`, rows `n` apart) while this block's are multiplied: the panel reads 8
/// rows a piece at a time, and its streams are short (one row of a 4 KiB page each) for the
/// hardware prefetchers.
///
/// # Safety
/// The next block's rows must lie inside the matrix of `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_next<T>(p: &[*const T; K_BLOCK], n: usize, c: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    for &row in p {
        // SAFETY: the caller's contract; a prefetch reads nothing.
        unsafe { _mm_prefetch(row.add(K_BLOCK * n + c) as *const i8, _MM_HINT_T0) };
    }
}

/// Eight columns at `c` of one row over one 8-row block, the order every panel keeps: two
/// partial sums (weight rows 0, 2, 4, 6 and 1, 3, 5, 7, the first product of each not
/// fused), added together, then added to the output.
///
/// # Safety
/// AVX2 and FMA; 8 readable values at `c` of every `p`, readable and writable at `o + c`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn step8<T: Weight>(
    p: &[*const T; K_BLOCK],
    b: &[std::arch::x86_64::__m256; K_BLOCK],
    o: *mut f32,
    c: usize,
) {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_storeu_ps,
    };
    // SAFETY: the caller's contract.
    unsafe {
        let mut s0 = _mm256_mul_ps(T::load8(p[0].add(c)), b[0]);
        let mut s1 = _mm256_mul_ps(T::load8(p[1].add(c)), b[1]);
        for i in (2..K_BLOCK).step_by(2) {
            s0 = _mm256_fmadd_ps(T::load8(p[i].add(c)), b[i], s0);
            s1 = _mm256_fmadd_ps(T::load8(p[i + 1].add(c)), b[i + 1], s1);
        }
        let acc = _mm256_add_ps(_mm256_loadu_ps(o.add(c)), _mm256_add_ps(s0, s1));
        _mm256_storeu_ps(o.add(c), acc);
    }
}

/// Columns `c..end` of one row (factors `xs`) over one 8-row block, past its wide vectors:
/// [`step8`] up to `vec_end`, then one column at a time (a plain sum over the 8 rows).
///
/// # Safety
/// As [`step8`] for every column up to `end`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_tail<T: Weight>(
    p: &[*const T; K_BLOCK],
    xs: &[f32; K_BLOCK],
    o: *mut f32,
    mut c: usize,
    vec_end: usize,
    end: usize,
) {
    use std::arch::x86_64::{__m256, _mm256_set1_ps};
    // SAFETY: the caller's contract.
    unsafe {
        if c < vec_end {
            let b: [__m256; K_BLOCK] = std::array::from_fn(|i| _mm256_set1_ps(xs[i]));
            while c < vec_end {
                step8(p, &b, o, c);
                c += 8;
            }
        }
        while c < end {
            let mut sum = 0.0f32;
            for i in 0..K_BLOCK {
                sum += xs[i] * (*p[i].add(c)).widen();
            }
            *o.add(c) += sum;
            c += 1;
        }
    }
}

/// Columns `c..end` of one row for one weight row `p` (the last rows of `K`, past the 8-row
/// blocks), fused into the output: 8 at a time up to `vec_end`, then one at a time.
///
/// # Safety
/// AVX2 and FMA; `p` readable and `o` readable and writable up to `end`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_tail<T: Weight>(
    p: *const T,
    xv: f32,
    o: *mut f32,
    mut c: usize,
    vec_end: usize,
    end: usize,
) {
    use std::arch::x86_64::{_mm256_fmadd_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_storeu_ps};
    // SAFETY: the caller's contract.
    unsafe {
        let b = _mm256_set1_ps(xv);
        while c < vec_end {
            let acc = _mm256_fmadd_ps(T::load8(p.add(c)), b, _mm256_loadu_ps(o.add(c)));
            _mm256_storeu_ps(o.add(c), acc);
            c += 8;
        }
        while c < end {
            *o.add(c) += xv * (*p.add(c)).widen();
            c += 1;
        }
    }
}

/// [`panel`] with AVX2 and FMA: 8 columns per vector ([`step8`]), `K_BLOCK` weight rows per
/// pass.
///
/// # Safety
/// AVX2 and FMA must be available; the block contract of [`panel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_avx2<T: Weight>(rows: &[&[f32]], w: &[T], n: usize, c0: usize, out: OutBlock) {
    use std::arch::x86_64::{__m256, _mm256_set1_ps};
    let cols = out.cols;
    let vec_cols = cols / 8 * 8;
    const { assert!(COL_CHUNK.is_multiple_of(8)) };
    // SAFETY: the caller's contract.
    let k_len = unsafe { begin(rows, w.len(), n, c0, out) };
    // the rows share out the prefetches of a chunk (memory is busy while every row runs)
    let m = rows.len().max(1);
    let wp = w.as_ptr();
    let line = 64 / std::mem::size_of::<T>();
    let mut k0 = 0;
    while k0 + K_BLOCK <= k_len {
        let prefetch = T::PREFETCH && k0 + 2 * K_BLOCK <= k_len;
        // SAFETY: rows k0..k0 + 8, columns c0..c0 + cols lie inside `w` (checked above), the
        // output block is the caller's.
        unsafe {
            let p: [*const T; K_BLOCK] = std::array::from_fn(|i| wp.add((k0 + i) * n + c0));
            // Column chunks keep the 8 weight row pieces in L1 while every row of the
            // segment uses them.
            let mut c_start = 0;
            while c_start < cols {
                let c_end = (c_start + COL_CHUNK).min(cols);
                let vec_end = c_start + (c_end - c_start) / 8 * 8;
                for (r, x) in rows.iter().enumerate() {
                    let xs: [f32; K_BLOCK] = std::array::from_fn(|i| *x.get_unchecked(k0 + i));
                    let b: [__m256; K_BLOCK] = std::array::from_fn(|i| _mm256_set1_ps(xs[i]));
                    let o = out.ptr.add(r * out.stride);
                    let mut c = c_start;
                    while c < vec_end {
                        if prefetch && (c - c_start) % line == 0 && ((c - c_start) / line) % m == r
                        {
                            prefetch_next(&p, n, c);
                        }
                        step8(&p, &b, o, c);
                        c += 8;
                    }
                    block_tail(&p, &xs, o, c, c, c_end);
                }
                c_start = c_end;
            }
        }
        k0 += K_BLOCK;
    }
    // the last weight rows one at a time, fused into the output
    while k0 < k_len {
        // SAFETY: as above, one weight row.
        unsafe {
            let p = wp.add(k0 * n + c0);
            for (r, x) in rows.iter().enumerate() {
                let o = out.ptr.add(r * out.stride);
                row_tail(p, *x.get_unchecked(k0), o, 0, vec_cols, cols);
            }
        }
        k0 += 1;
    }
}

/// [`panel`] for f32 weights with AVX-512: the AVX2 panel's loop with 16 columns per vector,
/// half the instructions per weight (decoding is bound by memory, and fewer instructions
/// leave more of it overlapped). Every sum in the AVX2 panel's order: the same bits.
///
/// # Safety
/// AVX-512 F must be available; the block contract of [`panel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn panel_f32_avx512(rows: &[&[f32]], w: &[f32], n: usize, c0: usize, out: OutBlock) {
    use std::arch::x86_64::{_mm512_fmadd_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_storeu_ps};
    let cols = out.cols;
    // SAFETY: the caller's contract.
    let k_len = unsafe { begin(rows, w.len(), n, c0, out) };
    let wp = w.as_ptr();
    let mut k0 = 0;
    // One row streams best on the hardware prefetchers alone (`Weight::PREFETCH`); passes of
    // several rows take longer per weight line and prefetch the next block (one thread over 64
    // cold [2048, 1024] matrices: 1 row 31 GB/s without, 26 with; 2 rows 24 → 26, 3 rows
    // 20.5 → 24, 4 rows 20 → 25.5; `moe bench --stream` at T = 16, four alternations: 81–85%
    // of the stream rate against 79–82%).
    let several = rows.len() > 1;
    while k0 + K_BLOCK <= k_len {
        let prefetch = several && k0 + 2 * K_BLOCK <= k_len;
        // SAFETY: rows k0..k0 + 8, columns c0..c0 + cols lie inside `w` (checked above), the
        // output block is the caller's.
        unsafe {
            let p: [*const f32; K_BLOCK] = std::array::from_fn(|i| wp.add((k0 + i) * n + c0));
            let mut c_start = 0;
            while c_start < cols {
                let c_end = (c_start + COL_CHUNK).min(cols);
                // rows up to four at a time: each weight vector is loaded once for all of them
                let mut r = 0;
                while r < rows.len() {
                    // the first pass prefetches
                    let (span, pf) = (c_start..c_end, (prefetch && r == 0).then_some(n));
                    let x = |j: usize| rows[r + j];
                    r += match rows.len() - r {
                        1 => f32_rows::<1>(&p, [x(0)], out, r, k0, span, pf),
                        2 => f32_rows::<2>(&p, [x(0), x(1)], out, r, k0, span, pf),
                        3 => f32_rows::<3>(&p, [x(0), x(1), x(2)], out, r, k0, span, pf),
                        _ => f32_rows::<4>(&p, [x(0), x(1), x(2), x(3)], out, r, k0, span, pf),
                    };
                }
                c_start = c_end;
            }
        }
        k0 += K_BLOCK;
    }
    // the last weight rows one at a time, fused into the output
    while k0 < k_len {
        // SAFETY: as above, one weight row.
        unsafe {
            let p = wp.add(k0 * n + c0);
            let (wide_end, vec_end) = (cols / 16 * 16, cols / 8 * 8);
            for (r, x) in rows.iter().enumerate() {
                let xv = *x.get_unchecked(k0);
                let o = out.ptr.add(r * out.stride);
                let mut c = 0;
                while c < wide_end {
                    let acc = _mm512_fmadd_ps(
                        _mm512_loadu_ps(p.add(c)),
                        _mm512_set1_ps(xv),
                        _mm512_loadu_ps(o.add(c)),
                    );
                    _mm512_storeu_ps(o.add(c), acc);
                    c += 16;
                }
                row_tail(p, xv, o, c, vec_end, cols);
            }
        }
        k0 += 1;
    }
}

/// Columns `span` of one 8-row block of the f32 AVX-512 panel for the `R` rows `x` (rows
/// `r..r + R` of `out`): each weight vector is loaded once for all `R` rows, and every row's
/// sums run in the panel's order (16 columns per vector, then 8, then one at a time). Returns
/// `R`.
///
/// Up to four rows per pass: measured one thread streaming 64 cold 8 MiB matrices
/// (`[2048, 1024]`, Zen 5), rows two at a time gave 21.6 GB/s for 2 rows, 18 for 3 and 15 for
/// 4; three and four at a time 21 and 20 (the weights come from L1 once instead of twice,
/// fewer instructions per weight line leave more misses in flight); six or eight at a time
/// were no faster than 4 + 2 and 4 + 4 (their broadcasts no longer fit in registers).
///
/// With `prefetch: Some(n)` (weight rows `n` apart) it prefetches the next block's line of
/// every weight row at each step.
///
/// # Safety
/// AVX-512 F; the 8 weight rows of `p` readable at `span`, and the next block's rows too when
/// prefetching; rows `r..r + R` of `out` the caller's.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f32_rows<const R: usize>(
    p: &[*const f32; K_BLOCK],
    x: [&[f32]; R],
    out: OutBlock,
    r: usize,
    k0: usize,
    span: Range<usize>,
    prefetch: Option<usize>,
) -> usize {
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mul_ps, _mm512_set1_ps,
        _mm512_storeu_ps,
    };
    let (c_start, c_end) = (span.start, span.end);
    let wide_end = c_start + (c_end - c_start) / 16 * 16;
    let vec_end = c_start + (c_end - c_start) / 8 * 8;
    // SAFETY: the caller's contract.
    unsafe {
        let xs: [[f32; K_BLOCK]; R] =
            std::array::from_fn(|j| std::array::from_fn(|i| *x[j].get_unchecked(k0 + i)));
        let b: [[__m512; K_BLOCK]; R] =
            std::array::from_fn(|j| std::array::from_fn(|i| _mm512_set1_ps(xs[j][i])));
        let o: [*mut f32; R] = std::array::from_fn(|j| out.ptr.add((r + j) * out.stride));
        let mut c = c_start;
        while c < wide_end {
            // one 64-byte line of each weight row per step
            if let Some(n) = prefetch {
                prefetch_next(p, n, c);
            }
            let w: [__m512; K_BLOCK] = std::array::from_fn(|i| _mm512_loadu_ps(p[i].add(c)));
            let mut s0: [__m512; R] = std::array::from_fn(|j| _mm512_mul_ps(w[0], b[j][0]));
            let mut s1: [__m512; R] = std::array::from_fn(|j| _mm512_mul_ps(w[1], b[j][1]));
            for i in (2..K_BLOCK).step_by(2) {
                for j in 0..R {
                    s0[j] = _mm512_fmadd_ps(w[i], b[j][i], s0[j]);
                    s1[j] = _mm512_fmadd_ps(w[i + 1], b[j][i + 1], s1[j]);
                }
            }
            for j in 0..R {
                let at = o[j].add(c);
                let sum = _mm512_add_ps(s0[j], s1[j]);
                _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), sum));
            }
            c += 16;
        }
        for j in 0..R {
            block_tail(p, &xs[j], o[j], wide_end, vec_end, c_end);
        }
    }
    R
}

/// [`panel`] for bf16 weights with AVX-512: one 64-byte load holds 32 weights of a row, and
/// as 16 `u32` lanes its even columns are the lanes shifted left by 16 bits and its odd ones
/// the lanes with the low 16 bits cleared: two integer operations widen 32 weights exactly
/// (AVX2's widening takes a zero-extension and a shift per 8). The sums of a 32-column group
/// are kept in the output as 16 even then 16 odd columns while the weight rows stream by, and
/// put back in order at the end (the columns past the last whole group stay in order).
///
/// # Safety
/// AVX-512 F must be available; the block contract of [`panel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn panel_bf16_avx512(rows: &[&[f32]], w: &[bf16], n: usize, c0: usize, out: OutBlock) {
    use std::arch::x86_64::{
        __m512, __m512i, _mm512_add_ps, _mm512_and_si512, _mm512_castsi512_ps, _mm512_fmadd_ps,
        _mm512_loadu_epi32, _mm512_loadu_ps, _mm512_mul_ps, _mm512_permutex2var_ps,
        _mm512_set1_epi32, _mm512_set1_ps, _mm512_setr_epi32, _mm512_slli_epi32, _mm512_storeu_ps,
    };
    const GROUP: usize = 32;
    const { assert!(BF16_COL_CHUNK.is_multiple_of(GROUP)) };
    let cols = out.cols;
    // the whole groups: column-permuted while the sums run
    let grouped = cols / GROUP * GROUP;
    // SAFETY: the caller's contract.
    let k_len = unsafe { begin(rows, w.len(), n, c0, out) };
    // the rows share out the prefetches of a chunk (memory is busy while every row runs)
    let m = rows.len().max(1);
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let even = |v: __m512i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
    let odd = |v: __m512i| _mm512_castsi512_ps(_mm512_and_si512(v, high));
    let wp = w.as_ptr();
    let mut k0 = 0;
    // Every sum in the order of the AVX2 panel on the f32 widening (the same bits): per block
    // of 8 weight rows two partial sums (rows 0, 2, 4, 6 and 1, 3, 5, 7), added to the output.
    while k0 + K_BLOCK <= k_len {
        let prefetch = k0 + 2 * K_BLOCK <= k_len;
        // SAFETY: rows k0..k0 + 8, columns c0..c0 + cols lie inside `w` (checked above), the
        // output block is the caller's.
        unsafe {
            let p: [*const bf16; K_BLOCK] = std::array::from_fn(|i| wp.add((k0 + i) * n + c0));
            let mut c_start = 0;
            while c_start < cols {
                let c_end = (c_start + BF16_COL_CHUNK).min(cols);
                let group_end = c_end.min(grouped);
                let vec_end = c_end - (c_end - group_end) % 8;
                for (r, x) in rows.iter().enumerate() {
                    let xs: [f32; K_BLOCK] = std::array::from_fn(|i| *x.get_unchecked(k0 + i));
                    let b: [__m512; K_BLOCK] = std::array::from_fn(|i| _mm512_set1_ps(xs[i]));
                    let o = out.ptr.add(r * out.stride);
                    let mut c = c_start;
                    while c < group_end {
                        if prefetch && ((c - c_start) / GROUP) % m == r {
                            prefetch_next(&p, n, c);
                        }
                        let v: [__m512i; K_BLOCK] =
                            std::array::from_fn(|i| _mm512_loadu_epi32(p[i].add(c) as *const i32));
                        let mut e0 = _mm512_mul_ps(even(v[0]), b[0]);
                        let mut o0 = _mm512_mul_ps(odd(v[0]), b[0]);
                        let mut e1 = _mm512_mul_ps(even(v[1]), b[1]);
                        let mut o1 = _mm512_mul_ps(odd(v[1]), b[1]);
                        for i in (2..K_BLOCK).step_by(2) {
                            e0 = _mm512_fmadd_ps(even(v[i]), b[i], e0);
                            o0 = _mm512_fmadd_ps(odd(v[i]), b[i], o0);
                            e1 = _mm512_fmadd_ps(even(v[i + 1]), b[i + 1], e1);
                            o1 = _mm512_fmadd_ps(odd(v[i + 1]), b[i + 1], o1);
                        }
                        let (oe, oo) = (o.add(c), o.add(c + 16));
                        _mm512_storeu_ps(
                            oe,
                            _mm512_add_ps(_mm512_loadu_ps(oe), _mm512_add_ps(e0, e1)),
                        );
                        _mm512_storeu_ps(
                            oo,
                            _mm512_add_ps(_mm512_loadu_ps(oo), _mm512_add_ps(o0, o1)),
                        );
                        c += GROUP;
                    }
                    block_tail(&p, &xs, o, c, vec_end, c_end);
                }
                c_start = c_end;
            }
        }
        k0 += K_BLOCK;
    }
    // the last weight rows one at a time, fused into the output
    while k0 < k_len {
        // SAFETY: as above, one weight row.
        unsafe {
            let p = wp.add(k0 * n + c0);
            let vec_end = cols - (cols - grouped) % 8;
            for (r, x) in rows.iter().enumerate() {
                let xv = *x.get_unchecked(k0);
                let b = _mm512_set1_ps(xv);
                let o = out.ptr.add(r * out.stride);
                let mut c = 0;
                while c < grouped {
                    let v = _mm512_loadu_epi32(p.add(c) as *const i32);
                    let (oe, oo) = (o.add(c), o.add(c + 16));
                    _mm512_storeu_ps(oe, _mm512_fmadd_ps(even(v), b, _mm512_loadu_ps(oe)));
                    _mm512_storeu_ps(oo, _mm512_fmadd_ps(odd(v), b, _mm512_loadu_ps(oo)));
                    c += GROUP;
                }
                row_tail(p, xv, o, c, vec_end, cols);
            }
        }
        k0 += 1;
    }
    // the groups back in column order: (e0, o0, e1, o1, …)
    let low_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let high_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for r in 0..rows.len() {
        // SAFETY: row r of the caller's block, `grouped <= cols` values.
        unsafe {
            let o = out.ptr.add(r * out.stride);
            let mut c = 0;
            while c < grouped {
                let (e, od) = (_mm512_loadu_ps(o.add(c)), _mm512_loadu_ps(o.add(c + 16)));
                _mm512_storeu_ps(o.add(c), _mm512_permutex2var_ps(e, low_idx, od));
                _mm512_storeu_ps(o.add(c + 16), _mm512_permutex2var_ps(e, high_idx, od));
                c += GROUP;
            }
        }
    }
}

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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
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
