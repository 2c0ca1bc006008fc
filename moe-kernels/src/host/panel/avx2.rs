//! The x86-64 panel with AVX2 and FMA, and the steps every x86-64 panel shares (prefetching
//! the next block, eight columns over one 8-row block, the tails).

use super::super::matrix::{OutBlock, Weight};
use super::{COL_CHUNK, K_BLOCK, begin};

/// Asks for the cache line at column `c` of the next block's weight rows (`K_BLOCK` rows
/// below those of `p`, rows `n` apart) while this block's are multiplied: the panel reads 8
/// rows a piece at a time, and its streams are short (one row of a 4 KiB page each) for the
/// hardware prefetchers.
///
/// # Safety
/// The next block's rows must lie inside the matrix of `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn prefetch_next<T>(p: &[*const T; K_BLOCK], n: usize, c: usize) {
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
pub(super) unsafe fn step8<T: Weight>(
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
pub(super) unsafe fn block_tail<T: Weight>(
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
pub(super) unsafe fn row_tail<T: Weight>(
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
pub(super) unsafe fn panel_avx2<T: Weight>(
    rows: &[&[f32]],
    w: &[T],
    n: usize,
    c0: usize,
    out: OutBlock,
) {
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
