//! The x86-64 panels with AVX-512: f32 weights (16 columns per vector, several rows at once)
//! and bf16 weights (32 weights per load, widened by a shift and a mask).

use std::ops::Range;

use half::bf16;

use super::super::matrix::OutBlock;
use super::avx2::{block_tail, prefetch_next, row_tail};
use super::{BF16_COL_CHUNK, COL_CHUNK, K_BLOCK, begin};

/// [`panel`] for f32 weights with AVX-512: the AVX2 panel's loop with 16 columns per vector,
/// half the instructions per weight (decoding is bound by memory, and fewer instructions
/// leave more of it overlapped). Every sum in the AVX2 panel's order: the same bits.
///
/// # Safety
/// AVX-512 F must be available; the block contract of [`panel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn panel_f32_avx512(
    rows: &[&[f32]],
    w: &[f32],
    n: usize,
    c0: usize,
    out: OutBlock,
) {
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
pub(super) unsafe fn panel_bf16_avx512(
    rows: &[&[f32]],
    w: &[bf16],
    n: usize,
    c0: usize,
    out: OutBlock,
) {
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
