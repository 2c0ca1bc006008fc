//! The short-segment product on bf16 weights stored **out-major** ([`Matrix::Bf16T`]: each
//! expert `[N, K]` row-major, every output's K weights contiguous, as Hugging Face stores a
//! linear layer): `out[r, c] = Σ_k x_r[k] · W[c0 + c, k]`, each output a dot product.
//!
//! Why a second layout: decoding streams every selected expert's weights once and is bound by
//! how fast one core keeps memory reads in flight. The `[K, N]` panel must widen each bf16
//! line into two f32 vectors (a shift and a mask) and spend two FMAs on it; out-major weights
//! hold consecutive k in one 32-bit lane, so with bf16 rows ([`super::Compute::Bf16`]) one
//! `vdpbf16ps` consumes a whole 64-byte line — the same one instruction per line as the f32
//! panel, which streams at the memory's rate. Measured on one thread of this 2-core Zen 5
//! (64 cold 4 MiB bf16 matrices, a C copy of each loop, medians of 21 alternations): the
//! `[K, N]` panel 34 GB/s, this product 41, the f32 panel over the same bytes 43.
//!
//! - **bf16 rows, AVX-512 BF16**: each row is packed once per call into k-pairs (`u32`: bf16
//!   of `k = 2p` low, `2p + 1` high, zero-padded to a whole line); four outputs at a time,
//!   two sums each (even and odd lines, so the adds overlap), one `vdpbf16ps` per weight line,
//!   the sums reduced at the end. The rows after the first read the four outputs' weights
//!   (4 × K bf16, 16 KiB at K = 2048) from L1.
//! - **f32 rows, AVX-512 F**: the rows split once into even-k and odd-k halves; a weight line
//!   widens into its even and odd k (a shift and a mask) and meets each half with one FMA.
//! - **Elsewhere**: the same sums in plain Rust, one output at a time.
//!
//! Sums are f32 in an order fixed by the shapes (so results do not depend on the thread count,
//! and a row gives the same bits alone or in a segment), but another order than the `[K, N]`
//! panel's: out-major weights give the row-major results up to the order of the sums. bf16
//! rows meet bf16 weights in exact products; f32 rows meet the widened weights in FMAs.
//! `vdpbf16ps` treats subnormal inputs as zero and flushes subnormal results (below 1.2e-38,
//! far from any weight or activation), and the vendors define the rounding of each pair's sum
//! slightly differently.

use half::bf16;

use super::matrix::OutBlock;

/// Outputs per pass (their weights stay in L1 while the segment's rows go by).
#[cfg(target_arch = "x86_64")]
const OUTS: usize = 4;

/// bf16 values per 64-byte line.
#[cfg(target_arch = "x86_64")]
const LINE: usize = 32;

/// `out[r, c] = Σ_k rows[r][k] · w[(c0 + c) · K + k]` for `c < out.cols`, with
/// `K = rows[r].len()` and `w` out-major `[n, K]`. Overwrites the block. `bf16_rows`: every
/// value of the rows is a bf16 (a bf16 computation), which lets AVX-512 BF16 multiply them
/// as they are. Panics (a bug in the caller) when the rows differ in length or outputs
/// `c0..c0 + out.cols` do not fit in `w`.
///
/// # Safety
/// `out` must point to `rows.len()` rows of `out.cols` writable values no one else touches.
pub(crate) unsafe fn dots(rows: &[&[f32]], w: &[bf16], c0: usize, out: OutBlock, bf16_rows: bool) {
    // SAFETY: the caller's contract.
    unsafe { Prepared::new(rows, bf16_rows).product(rows, w, c0, out) }
}

/// A segment's rows in the form [`dots`] reads them, made once per work item (SwiGLU's gate
/// and up products share it): k-pairs for `vdpbf16ps`, even-k and odd-k halves per line for
/// the widening, or nothing (the portable product reads the rows where they are).
pub(crate) struct Prepared {
    form: Form,
    m: usize,
    k: usize,
}

enum Form {
    #[cfg(target_arch = "x86_64")]
    Pairs(Vec<u32>),
    #[cfg(target_arch = "x86_64")]
    Split(Vec<f32>),
    Rows,
}

impl Prepared {
    /// `rows` (each `K` long; panics, a bug in the caller, when they differ) for the products
    /// this CPU runs; `bf16_rows` as in [`dots`].
    pub(crate) fn new(rows: &[&[f32]], bf16_rows: bool) -> Self {
        let k = rows.first().map_or(0, |x| x.len());
        assert!(rows.iter().all(|x| x.len() == k));
        #[cfg(target_arch = "x86_64")]
        let form = match (
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw"),
            bf16_rows && std::arch::is_x86_feature_detected!("avx512bf16"),
        ) {
            (true, true) => Form::Pairs(pairs_of(rows, k)),
            (true, false) => Form::Split(split_of(rows, k)),
            (false, _) => Form::Rows,
        };
        #[cfg(not(target_arch = "x86_64"))]
        let form = Form::Rows;
        Self {
            form,
            m: rows.len(),
            k,
        }
    }

    /// [`dots`] on these prepared `rows` (the same ones [`Prepared::new`] was given). Panics
    /// (a bug in the caller) when they are other rows or outputs `c0..c0 + out.cols` do not
    /// fit in `w`.
    ///
    /// # Safety
    /// As [`dots`].
    pub(crate) unsafe fn product(&self, rows: &[&[f32]], w: &[bf16], c0: usize, out: OutBlock) {
        let (m, k) = (self.m, self.k);
        assert!(rows.len() == m && rows.iter().all(|x| x.len() == k));
        assert!((c0 + out.cols) * k <= w.len());
        // SAFETY: the forms are made only where their features were detected; the bounds
        // above; the block is the caller's.
        unsafe {
            match &self.form {
                #[cfg(target_arch = "x86_64")]
                Form::Pairs(pairs) => dots_bf16_avx512(pairs, m, w, k, c0, out),
                #[cfg(target_arch = "x86_64")]
                Form::Split(split) => dots_f32_avx512(split, m, w, k, c0, out),
                Form::Rows => dots_portable(rows, w, k, c0, out),
            }
        }
    }
}

/// Whether [`dots`] reads out-major weights faster than the `[K, N]` panel reads row-major
/// ones here: x86-64 with AVX-512 F, BW and BF16 (one `vdpbf16ps` per weight line for bf16
/// rows; the pair tiles for long segments). With AVX-512 F alone the widening costs what the
/// panel's does, and long segments would lose the pair tiles.
pub(crate) fn preferred() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The portable [`dots`]: one output at a time, the sum in k order.
///
/// # Safety
/// As [`dots`], with `k` the rows' length and the bounds checked.
pub(crate) unsafe fn dots_portable(
    rows: &[&[f32]],
    w: &[bf16],
    k: usize,
    c0: usize,
    out: OutBlock,
) {
    for (r, x) in rows.iter().enumerate() {
        // SAFETY: row r of the caller's block.
        let o = unsafe { std::slice::from_raw_parts_mut(out.ptr.add(r * out.stride), out.cols) };
        for (c, o) in o.iter_mut().enumerate() {
            let wc = &w[(c0 + c) * k..(c0 + c + 1) * k];
            *o = x
                .iter()
                .zip(wc)
                .fold(0.0f32, |acc, (&x, w)| acc + x * w.to_f32());
        }
    }
}

/// Rows padded to whole lines of k: `⌈K / 32⌉ · 32` values of k, so every line of weights
/// (the last one read through a mask) meets a whole line of the row.
#[cfg(target_arch = "x86_64")]
fn padded_k(k: usize) -> usize {
    k.div_ceil(LINE) * LINE
}

/// The weights a pass of [`dots`] reads: outputs from the block's first, `k` values apart,
/// in `lines` lines of 32: the first `whole` read as they are, a last partial one through
/// `mask`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Lines {
    w: *const bf16,
    k: usize,
    lines: usize,
    whole: usize,
    mask: u32,
    /// Outputs in the block (the prefetches stay inside them).
    outs: usize,
}

#[cfg(target_arch = "x86_64")]
impl Lines {
    /// The weights for `k` values in lines of 32 from `w`, `outs` outputs.
    fn new(w: *const bf16, k: usize, outs: usize) -> Self {
        Lines {
            w,
            k,
            lines: k.div_ceil(LINE),
            whole: k / LINE,
            mask: match k % LINE {
                0 => u32::MAX,
                t => (1u32 << t) - 1,
            },
            outs,
        }
    }

    /// Line `l` of output `c` (relative to `w`): a whole one as it is, the last partial one
    /// through the mask (zeros past K).
    ///
    /// # Safety
    /// AVX-512 BW; output `c` lies inside the weights, `l < lines`.
    #[inline(always)]
    unsafe fn load(&self, c: usize, l: usize) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::{_mm512_loadu_si512, _mm512_maskz_loadu_epi16};
        let p = self.w.wrapping_add(c * self.k + l * LINE);
        // SAFETY: the caller's contract; the mask keeps the last read inside output c's K
        // values.
        unsafe {
            match l < self.whole {
                true => _mm512_loadu_si512(p.cast()),
                false => _mm512_maskz_loadu_epi16(self.mask, p.cast()),
            }
        }
    }

    /// Asks for line `l` of output `c` when that output is in the block.
    #[inline(always)]
    fn prefetch(&self, c: usize, l: usize) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        if c < self.outs {
            // SAFETY: a prefetch reads nothing and faults on no address (the pointer is
            // formed with wrapping arithmetic).
            unsafe {
                _mm_prefetch(
                    self.w.wrapping_add(c * self.k + l * LINE) as *const i8,
                    _MM_HINT_T0,
                )
            };
        }
    }
}

/// Rows per pass: each weight line loaded once meets both (the second row no longer re-reads
/// the outputs' weights from L1). Every (row, output) sum runs the same instructions in the
/// same order in a pass of one or two rows, so a row's results do not depend on its segment.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 2;

/// How the rows meet a weight line in a pass of [`dots`]: the form the rows are prepared in
/// (once per call) and the step that adds one weight line to a (row, output) pair of sums.
#[cfg(target_arch = "x86_64")]
trait Meet {
    /// The prepared rows' values.
    type Elem: Copy;
    /// Prepared values per line of 32 k.
    const PER_LINE: usize;
    /// One row's part of a line, in registers.
    type X: Copy;

    /// Line `l` of a prepared row (not bounds-checked: [`pass`] asserts the rows' length once).
    ///
    /// # Safety
    /// AVX-512 F; the row holds `PER_LINE` values from line `l`.
    unsafe fn x(row: &[Self::Elem], l: usize) -> Self::X;

    /// Adds weight line `w` met with `x` to `sums` (two partial sums of one row and output);
    /// `second`: the line is the second of a pair of lines.
    ///
    /// # Safety
    /// The instructions of the kernel this runs in.
    unsafe fn add(
        sums: &mut [std::arch::x86_64::__m512; 2],
        w: std::arch::x86_64::__m512i,
        x: Self::X,
        second: bool,
    );
}

/// bf16 rows as k-pairs: one `vdpbf16ps` per weight line, even lines into the first sum and
/// odd ones into the second.
#[cfg(target_arch = "x86_64")]
struct Pairs;

#[cfg(target_arch = "x86_64")]
impl Meet for Pairs {
    type Elem = u32;
    const PER_LINE: usize = LINE / 2;
    type X = std::arch::x86_64::__m512bh;

    #[inline(always)]
    unsafe fn x(row: &[u32], l: usize) -> Self::X {
        // SAFETY: the row holds 16 values from line l (the caller's); AVX-512 F.
        unsafe {
            let line = row.as_ptr().add(l * Self::PER_LINE);
            std::mem::transmute(std::arch::x86_64::_mm512_loadu_epi32(line.cast()))
        }
    }

    #[inline(always)]
    unsafe fn add(
        sums: &mut [std::arch::x86_64::__m512; 2],
        w: std::arch::x86_64::__m512i,
        x: Self::X,
        second: bool,
    ) {
        use std::arch::x86_64::{__m512bh, __m512i, _mm512_dpbf16_ps};
        // SAFETY: AVX-512 BF16 (the caller's); a line of bf16 is 16 pairs.
        unsafe {
            let w = std::mem::transmute::<__m512i, __m512bh>(w);
            match second {
                false => sums[0] = _mm512_dpbf16_ps(sums[0], w, x),
                true => sums[1] = _mm512_dpbf16_ps(sums[1], w, x),
            }
        }
    }
}

/// f32 rows split per line into even-k and odd-k halves: a weight line widened to its even and
/// odd k (a shift and a mask), each meeting its half in one FMA, into the first and second sum.
#[cfg(target_arch = "x86_64")]
struct Widen;

#[cfg(target_arch = "x86_64")]
impl Meet for Widen {
    type Elem = f32;
    const PER_LINE: usize = LINE;
    type X = (std::arch::x86_64::__m512, std::arch::x86_64::__m512);

    #[inline(always)]
    unsafe fn x(row: &[f32], l: usize) -> Self::X {
        use std::arch::x86_64::_mm512_loadu_ps;
        // SAFETY: the row holds 32 values from line l (the caller's); AVX-512 F.
        unsafe {
            let line = row.as_ptr().add(l * LINE);
            (_mm512_loadu_ps(line), _mm512_loadu_ps(line.add(16)))
        }
    }

    #[inline(always)]
    unsafe fn add(
        sums: &mut [std::arch::x86_64::__m512; 2],
        w: std::arch::x86_64::__m512i,
        x: Self::X,
        _: bool,
    ) {
        use std::arch::x86_64::{
            _mm512_and_si512, _mm512_castsi512_ps, _mm512_fmadd_ps, _mm512_set1_epi32,
            _mm512_slli_epi32,
        };
        // SAFETY: AVX-512 F (the caller's).
        unsafe {
            let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w));
            let odd = _mm512_castsi512_ps(_mm512_and_si512(
                w,
                _mm512_set1_epi32(0xFFFF_0000u32 as i32),
            ));
            sums[0] = _mm512_fmadd_ps(even, x.0, sums[0]);
            sums[1] = _mm512_fmadd_ps(odd, x.1, sums[1]);
        }
    }
}

/// The block through passes of `ROWS` rows (then one) over groups of `OUTS` outputs (then
/// one): outputs outer, so every row meets a group's weights while they are in L1 (read from
/// memory once per segment). `prepared` holds each row as `M::PER_LINE` values per line.
///
/// # Safety
/// The instructions `M` uses; `lines` lie inside the weights for `out.cols` outputs;
/// `prepared` holds `m` rows of `stride` values (`lines.lines` lines each); `out` is the
/// caller's block of `m` rows.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn drive<M: Meet>(
    prepared: &[M::Elem],
    stride: usize,
    m: usize,
    lines: Lines,
    out: OutBlock,
) {
    let x = |r: usize| &prepared[r * stride..(r + 1) * stride];
    let o = |r: usize, c: usize| {
        // SAFETY: row r, output c of the caller's block.
        unsafe { out.ptr.add(r * out.stride + c) }
    };
    let (whole_rows, whole_cols) = (m / ROWS * ROWS, out.cols / OUTS * OUTS);
    let mut c = 0;
    while c < out.cols {
        let outs = if c < whole_cols { OUTS } else { 1 };
        for r in (0..m).step_by(ROWS) {
            let two = r < whole_rows;
            // SAFETY: rows r..r + 2 (or 1) and outputs c..c + outs of the block; the rest is
            // the caller's. A segment of several rows asks for the next outputs' lines on its
            // first pass (one row streams on the hardware prefetchers alone).
            unsafe {
                match (two, outs == OUTS, r == 0) {
                    (false, false, _) => pass::<M, 1, 1, false>(lines, [x(r)], c, [o(r, c)]),
                    (false, true, _) => pass::<M, OUTS, 1, false>(lines, [x(r)], c, [o(r, c)]),
                    (true, false, _) => pass::<M, 1, ROWS, false>(
                        lines,
                        [x(r), x(r + 1)],
                        c,
                        [o(r, c), o(r + 1, c)],
                    ),
                    (true, true, first) => match first {
                        true => pass::<M, OUTS, ROWS, true>(
                            lines,
                            [x(r), x(r + 1)],
                            c,
                            [o(r, c), o(r + 1, c)],
                        ),
                        false => pass::<M, OUTS, ROWS, false>(
                            lines,
                            [x(r), x(r + 1)],
                            c,
                            [o(r, c), o(r + 1, c)],
                        ),
                    },
                }
            }
        }
        c += outs;
    }
}

/// `o[j][i] = Σ_k x[j][k] · w[c + i, k]` for `i < O`, `j < R`: every weight line loaded once
/// and met with each row ([`Meet::add`], two partial sums per row and output), whole lines two
/// at a time, the sums reduced at the end. With `PREFETCH` it asks for the next `O` outputs'
/// lines as it goes.
///
/// # Safety
/// As [`drive`]; outputs `c..c + O` lie inside the weights; every `o` points to `O` writable
/// values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // (row, output) indices, as in the sums they name
unsafe fn pass<M: Meet, const O: usize, const R: usize, const PREFETCH: bool>(
    lines: Lines,
    x: [&[M::Elem]; R],
    c: usize,
    o: [*mut f32; R],
) {
    use std::arch::x86_64::{_mm512_add_ps, _mm512_reduce_add_ps, _mm512_setzero_ps};
    assert!(x.iter().all(|x| x.len() >= M::PER_LINE * lines.lines));
    // SAFETY: the caller's contract and the assert.
    unsafe {
        let mut sums = [[[_mm512_setzero_ps(); 2]; O]; R];
        // whole lines two at a time (no mask to pick per line), then what is left
        let mut l = 0;
        while l + 1 < lines.whole {
            let x0: [M::X; R] = std::array::from_fn(|j| M::x(x[j], l));
            let x1: [M::X; R] = std::array::from_fn(|j| M::x(x[j], l + 1));
            for i in 0..O {
                if PREFETCH {
                    lines.prefetch(c + O + i, l);
                    lines.prefetch(c + O + i, l + 1);
                }
                let (w0, w1) = (lines.load(c + i, l), lines.load(c + i, l + 1));
                for j in 0..R {
                    M::add(&mut sums[j][i], w0, x0[j], false);
                    M::add(&mut sums[j][i], w1, x1[j], true);
                }
            }
            l += 2;
        }
        while l < lines.lines {
            let x0: [M::X; R] = std::array::from_fn(|j| M::x(x[j], l));
            for i in 0..O {
                let w0 = lines.load(c + i, l);
                for j in 0..R {
                    M::add(&mut sums[j][i], w0, x0[j], l % 2 == 1);
                }
            }
            l += 1;
        }
        for j in 0..R {
            for i in 0..O {
                *o[j].add(i) = _mm512_reduce_add_ps(_mm512_add_ps(sums[j][i][0], sums[j][i][1]));
            }
        }
    }
}

/// The rows as k-pairs (bf16 of `k = 2p` low, `2p + 1` high), each padded with zeros to
/// whole lines.
#[cfg(target_arch = "x86_64")]
fn pairs_of(rows: &[&[f32]], k: usize) -> Vec<u32> {
    let kp = padded_k(k) / 2;
    let mut pairs = vec![0u32; rows.len() * kp];
    for (x, p) in rows.iter().zip(pairs.chunks_exact_mut(kp.max(1))) {
        for (i, v) in x.iter().enumerate() {
            p[i / 2] |= u32::from(bf16::from_f32(*v).to_bits()) << (16 * (i % 2));
        }
    }
    pairs
}

/// Each row per line of 32 k: its 16 even-k values, then its 16 odd-k ones (zero past K).
#[cfg(target_arch = "x86_64")]
fn split_of(rows: &[&[f32]], k: usize) -> Vec<f32> {
    let len = padded_k(k);
    let mut split = vec![0f32; rows.len() * len];
    for (x, s) in rows.iter().zip(split.chunks_exact_mut(len.max(1))) {
        for (i, &v) in x.iter().enumerate() {
            s[i / LINE * LINE + (i % 2) * 16 + (i % LINE) / 2] = v;
        }
    }
    split
}

/// [`dots`] on `m` bf16 rows packed by [`pairs_of`], with `vdpbf16ps`.
///
/// # Safety
/// AVX-512 F, BW and BF16; as [`dots`], with `k` the rows' length and the bounds checked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dots_bf16_avx512(
    pairs: &[u32],
    m: usize,
    w: &[bf16],
    k: usize,
    c0: usize,
    out: OutBlock,
) {
    // SAFETY: output c0 lies inside `w` (the caller's bounds; at its end when no output is
    // asked for); the features are this function's, the block the caller's.
    unsafe {
        let lines = Lines::new(w.as_ptr().add(c0 * k), k, out.cols);
        drive::<Pairs>(pairs, padded_k(k) / 2, m, lines, out);
    }
}

/// [`dots`] on `m` f32 rows split by [`split_of`]: each weight line widened to its even and
/// odd k.
///
/// # Safety
/// AVX-512 F and BW; as [`dots`], with `k` the rows' length and the bounds checked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dots_f32_avx512(split: &[f32], m: usize, w: &[bf16], k: usize, c0: usize, out: OutBlock) {
    // SAFETY: as in `dots_bf16_avx512`.
    unsafe {
        let lines = Lines::new(w.as_ptr().add(c0 * k), k, out.cols);
        drive::<Widen>(split, padded_k(k), m, lines, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::panel::tests::lcg;

    type Variant = unsafe fn(&[&[f32]], &[bf16], usize, usize, OutBlock);

    /// Every variant this CPU runs (and the portable one), on bf16 and on f32 rows, against
    /// an f64 oracle on edge shapes: K from 0 to past two lines (the masked last line, odd K,
    /// an odd number of lines), outputs not a multiple of 4, an offset first output, 1 to 8
    /// rows, an empty block; nothing written past the block.
    #[test]
    fn dots_match_a_f64_oracle_on_edge_shapes() {
        #[allow(unused_mut)] // off x86-64 the portable product is the only one
        let mut variants: Vec<(&str, bool, Variant)> = vec![("portable", false, dots_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &str| match f {
                "bw" => std::arch::is_x86_feature_detected!("avx512bw"),
                "bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
                _ => std::arch::is_x86_feature_detected!("avx512f"),
            };
            if has("f") && has("bw") {
                variants.push(("f32 avx512", false, |r, w, k, c0, o| unsafe {
                    dots_f32_avx512(&split_of(r, k), r.len(), w, k, c0, o)
                }));
                if has("bf16") {
                    variants.push(("bf16 avx512", true, |r, w, k, c0, o| unsafe {
                        dots_bf16_avx512(&pairs_of(r, k), r.len(), w, k, c0, o)
                    }));
                }
            }
        }
        for (m, k, n, c0, cols) in [
            (1, 0, 4, 0, 4),
            (1, 1, 1, 0, 1),
            (1, 31, 5, 0, 5),
            (2, 32, 9, 1, 7),
            (3, 33, 8, 0, 8),
            (1, 64, 4, 0, 4),
            (8, 65, 13, 2, 11),
            (5, 100, 6, 3, 3),
            (2, 2048, 9, 0, 9),
            (4, 63, 4, 0, 0),
            (0, 40, 4, 0, 4),
            // several rows: the prefetching first pass, with a masked last line
            (4, 97, 12, 0, 12),
            (3, 96, 13, 0, 9),
        ] {
            let mut seed = (m * 31 + k * 7 + n) as u64;
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
            let x: Vec<Vec<f32>> = (0..m)
                .map(|_| (0..k).map(|_| lcg(&mut seed)).collect())
                .collect();
            let x_b: Vec<Vec<f32>> = x
                .iter()
                .map(|r| r.iter().map(|&v| bf16::from_f32(v).to_f32()).collect())
                .collect();
            for (name, bf16_only, variant) in &variants {
                for bf16_rows in [false, true] {
                    if *bf16_only && !bf16_rows {
                        continue;
                    }
                    let x = if bf16_rows { &x_b } else { &x };
                    let rows: Vec<&[f32]> = x.iter().map(|r| r.as_slice()).collect();
                    let stride = cols + 3;
                    let mut out = vec![7.0f32; m * stride];
                    let block = OutBlock {
                        ptr: out.as_mut_ptr(),
                        stride,
                        cols,
                    };
                    // SAFETY: the block is `out`, m rows of `cols` values `stride` apart;
                    // outputs c0..c0 + cols of K weights lie inside `w`.
                    unsafe { variant(&rows, &w, k, c0, block) };
                    let mut dispatched = vec![7.0f32; m * stride];
                    let block = OutBlock {
                        ptr: dispatched.as_mut_ptr(),
                        ..block
                    };
                    // SAFETY: as above.
                    unsafe { dots(&rows, &w, c0, block, bf16_rows) };
                    // each row alone gives the same bits as in the segment
                    for (r, row) in rows.iter().enumerate() {
                        let mut alone = vec![0f32; cols];
                        let block = OutBlock {
                            ptr: alone.as_mut_ptr(),
                            stride: cols,
                            cols,
                        };
                        // SAFETY: `alone` is one row of `cols` values.
                        unsafe { variant(&[row], &w, k, c0, block) };
                        let within = &out[r * stride..r * stride + cols];
                        assert!(
                            alone
                                .iter()
                                .zip(within)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{name} m={m} k={k} n={n}: row {r} alone differs"
                        );
                    }
                    for r in 0..m {
                        for c in 0..cols {
                            let terms =
                                (0..k).map(|i| x[r][i] as f64 * w[(c0 + c) * k + i].to_f64());
                            let want: f64 = terms.clone().sum();
                            let scale: f64 = terms.map(f64::abs).sum::<f64>() + 1e-30;
                            let tol = 1e-6 * (k as f64).sqrt().max(1.0) * scale;
                            for (what, got) in [
                                (*name, out[r * stride + c]),
                                ("dots", dispatched[r * stride + c]),
                            ] {
                                assert!(
                                    (got as f64 - want).abs() <= tol,
                                    "{what} bf16 rows {bf16_rows} m={m} k={k} n={n} c0={c0}: [{r},{c}] {got} vs {want}"
                                );
                            }
                        }
                        for pad in cols..stride {
                            assert_eq!(out[r * stride + pad], 7.0, "{name}: write past the block");
                            assert_eq!(
                                dispatched[r * stride + pad],
                                7.0,
                                "dots: write past the block"
                            );
                        }
                    }
                }
            }
        }
    }
}
