//! The product of a long segment in bf16 compute, on x86-64 CPUs with AVX-512 BF16 (Zen 4,
//! Sapphire Rapids and later): `out = rows · W[:, c0..c0 + cols]` with `W` bf16 `[K, N]`
//! (row-major, or out-major `[N, K]`), through `vdpbf16ps`, which multiplies 32 bf16 pairs exactly and adds them to 16
//! f32 sums in one instruction: twice the multiply-adds of an f32 FMA of the same width, and
//! half the bytes per weight in cache.
//!
//! It runs only where the rows are already bf16 values (a bf16 computation: see
//! [`super::Compute::Bf16`], which rounds the hidden rows before this product reads them), so
//! converting them to bf16 loses nothing: the product is the exact products of the same
//! values as every other path, summed in f32 in another order (and in the instruction's own
//! rounding of each pair's sum, which the vendors define slightly differently).
//!
//! - **A, the rows**, packed once per item into strips of [`MR`] rows of k-pairs
//!   (`[strip][K/2][MR]`, one `u32` holding the bf16 of `k = 2p` low and `2p + 1` high), from
//!   where they lie: the gather is the packing.
//! - **B, the weights**, packed per block of [`KC`] weight rows × [`NC`] columns into strips
//!   of [`NR`] columns of k-pairs (`[strip][KC/2][NR]`, 256 KiB: it stays in L2): row-major,
//!   two weight rows interleaved by two zero-extensions, a shift and an or per 16 columns;
//!   out-major, where a column's k-pairs already lie side by side, 16 × 16 `u32` transposes
//!   in registers ([`transpose16`]). The next block
//!   is prefetched an even share per tile, as in [`super::tiles`].
//! - **The microkernel** keeps a 6 × 64 tile of `out` in 24 zmm registers: four weight loads
//!   and six broadcasts of a row's pair feed 24 `vdpbf16ps` per k-pair.
//!
//! The summation order is fixed by the shapes (pairs in blocks of `KC / 2`, each block in
//! order), so results do not depend on the thread count. `vdpbf16ps` treats subnormal inputs
//! as zero and flushes subnormal results (below 1.2e-38, far from any weight or activation).

use half::bf16;

#[cfg(target_arch = "x86_64")]
#[cfg(target_arch = "x86_64")]
use super::blocked::{Blocking, blocked};
use super::matrix::{Order, OutBlock};

/// Rows of the register tile.
pub(crate) const MR: usize = 6;
/// Columns of the register tile (four zmm vectors of 16 f32 sums).
pub(crate) const NR: usize = 64;
/// Weight rows per packed block (an even number: blocks hold whole pairs).
const KC: usize = 512;
/// Columns per packed block (a multiple of [`NR`]): `KC × NC` bf16 are 256 KiB.
const NC: usize = 256;
/// Row strips multiplied with every column strip of a block before the next ones.
const MC_STRIPS: usize = 12;

/// The blocking above, for the loop nest of `blocked.rs`.
#[cfg(target_arch = "x86_64")]
const BLOCKING: Blocking = Blocking {
    mr: MR,
    nr: NR,
    kc: KC,
    nc: NC,
    mc_strips: MC_STRIPS,
    per_elem: 2,
};

/// Whether [`PackedPairs::product`] can run here (x86-64 with AVX-512 F and BF16).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bf16 bits of `v`, rounded to nearest even.
#[inline]
fn bits(v: f32) -> u32 {
    u32::from(bf16::from_f32(v).to_bits())
}

/// A segment's rows packed into strips of [`MR`] rows of bf16 k-pairs (the last strip
/// padded), with a worker's scratch for the weight blocks.
#[derive(Default)]
pub(crate) struct PackedPairs {
    a: Vec<u32>,
    b: Vec<u32>,
    m: usize,
    k: usize,
}

impl PackedPairs {
    /// Packs `rows` (each `K` long; panics, a bug in the caller, when they differ), rounding
    /// every value to bf16 (exact for the bf16 values this product is meant for).
    pub(crate) fn pack(&mut self, rows: &[&[f32]]) {
        let m = rows.len();
        let k = rows.first().map_or(0, |r| r.len());
        assert!(rows.iter().all(|r| r.len() == k));
        let kp = k.div_ceil(2);
        // no zeroing pass: every pair of every row is written below (an odd K's last pair
        // gets a zero high half), and the last strip's padding rows only feed tile rows that
        // are never stored
        self.a.resize(m.div_ceil(MR) * kp * MR, 0);
        for (r, row) in rows.iter().enumerate() {
            let strip = &mut self.a[(r / MR) * kp * MR..][..kp * MR];
            let i = r % MR;
            let (pairs, tail) = row.as_chunks::<2>();
            for (p, pair) in pairs.iter().enumerate() {
                strip[p * MR + i] = bits(pair[0]) | (bits(pair[1]) << 16);
            }
            if let [last] = tail {
                strip[pairs.len() * MR + i] = bits(*last);
            }
        }
        self.m = m;
        self.k = k;
    }

    /// `out = rows · w[:, c0..c0 + out.cols]`, `w` `[K, n]` laid out in `order` (row-major,
    /// or out-major `[n, K]`). Overwrites the block. Panics (a bug in the caller) when columns
    /// `c0..c0 + out.cols` of `K` rows do not fit in `w`, or when AVX-512 BF16 is missing (see
    /// [`available`]).
    ///
    /// # Safety
    /// `out` must point to as many rows as were packed, of `out.cols` writable values no one
    /// else touches.
    pub(crate) unsafe fn product(&mut self, w: &[bf16], order: Order, c0: usize, out: OutBlock) {
        let (k, cols) = (self.k, out.cols);
        assert!(order.fits(w.len(), k, c0 + cols));
        if let (Order::OutMajor { k: len }, true) = (order, self.m > 0) {
            assert!(len == k, "out-major weights of {len} rows for rows of {k}");
        }
        assert!(self.a.len() == self.m.div_ceil(MR) * k.div_ceil(2) * MR);
        if self.m == 0 || cols == 0 || k == 0 {
            // nothing to multiply: a product over no weight rows is zero
            // SAFETY: the caller's contract.
            unsafe { out.zero(self.m) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            assert!(available(), "pairs::product needs AVX-512 F and BF16");
            // SAFETY: the features were just checked; bounds above; the block is the caller's.
            unsafe { product_avx512(self, w, order, c0, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        panic!("pairs::product needs x86-64 (AVX-512 F and BF16)");
    }
}

/// Packs weight rows `pc..pc + kc`, columns `c..c + nc` of `w` (`[K, n]`) into `b` as
/// `[strip][kc/2][NR]` pairs (low half row `pc + 2p`, high half the next row, or zero past
/// the block's last row).
///
/// # Safety
/// AVX-512 F; the rows and columns lie inside `w`; `b` holds `⌈nc / NR⌉ · ⌈kc / 2⌉ · NR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_block(
    b: &mut [u32],
    w: &[bf16],
    n: usize,
    c: usize,
    pc: usize,
    kc: usize,
    nc: usize,
) {
    use std::arch::x86_64::{
        __m256i, _mm256_loadu_si256, _mm256_setzero_si256, _mm512_cvtepu16_epi32, _mm512_or_si512,
        _mm512_slli_epi32, _mm512_storeu_epi32,
    };
    let kcp = kc.div_ceil(2);
    assert!(b.len() >= nc.div_ceil(NR) * kcp * NR);
    assert!((pc + kc - 1) * n + c + nc <= w.len());
    let vec_cols = nc / 16 * 16;
    for p in 0..kcp {
        let r0 = pc + 2 * p;
        let has_r1 = 2 * p + 1 < kc;
        let row0 = &w[r0 * n + c..][..nc];
        let row1 = match has_r1 {
            true => &w[(r0 + 1) * n + c..][..nc],
            false => row0,
        };
        let mut col = 0;
        while col < vec_cols {
            let at = ((col / NR) * kcp + p) * NR + col % NR;
            // SAFETY: 16 values at `col` of both rows (col + 16 <= nc) and of `b` (16 | NR).
            unsafe {
                let lo = _mm256_loadu_si256(row0.as_ptr().add(col) as *const __m256i);
                let hi = match has_r1 {
                    true => _mm256_loadu_si256(row1.as_ptr().add(col) as *const __m256i),
                    false => _mm256_setzero_si256(),
                };
                let pair = _mm512_or_si512(
                    _mm512_cvtepu16_epi32(lo),
                    _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
                );
                _mm512_storeu_epi32(b.as_mut_ptr().add(at) as *mut i32, pair);
            }
            col += 16;
        }
        while col < nc {
            let hi = match has_r1 {
                true => u32::from(row1[col].to_bits()) << 16,
                false => 0,
            };
            b[((col / NR) * kcp + p) * NR + col % NR] = u32::from(row0[col].to_bits()) | hi;
            col += 1;
        }
    }
}

/// [`pack_block`] from out-major weights (`[n, K]`, output `c + j`'s rows `pc..pc + kc`
/// contiguous): the pairs are already side by side, so packing is a transpose of `u32`s,
/// 16 × 16 at a time in registers.
///
/// # Safety
/// AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_block_out_major(
    b: &mut [u32],
    w: &[bf16],
    k: usize,
    c: usize,
    pc: usize,
    kc: usize,
    nc: usize,
) {
    let kcp = kc.div_ceil(2);
    assert!(b.len() >= nc.div_ceil(NR) * kcp * NR);
    assert!(kc == 0 || (c + nc - 1) * k + pc + kc <= w.len());
    // the whole pairs of whole 16-column groups in the vector loop, the rest one by one
    let (cols16, pairs16) = (nc / 16 * 16, kc / 2 / 16 * 16);
    for j0 in (0..cols16).step_by(16) {
        let strip = (j0 / NR) * kcp * NR + j0 % NR;
        for p0 in (0..pairs16).step_by(16) {
            let src: [*const u32; 16] = std::array::from_fn(|j| {
                // SAFETY: pairs p0..p0 + 16 of output c + j0 + j lie inside its rows pc..pc + kc
                unsafe { w.as_ptr().add((c + j0 + j) * k + pc + 2 * p0) as *const u32 }
            });
            // SAFETY: AVX-512 F (this function's); 16 readable u32 (unaligned) at every `src`, and
            // rows p0..p0 + 16 of the strip, 16 values from `strip`, inside `b` (asserted).
            unsafe {
                let rows = transpose16(src);
                for (pp, row) in rows.iter().enumerate() {
                    let at = strip + (p0 + pp) * NR;
                    std::arch::x86_64::_mm512_storeu_si512(
                        b[at..at + 16].as_mut_ptr().cast(),
                        *row,
                    );
                }
            }
        }
    }
    let one = |b: &mut [u32], j: usize, p: usize| {
        let src = &w[(c + j) * k + pc..][..kc];
        let hi = src
            .get(2 * p + 1)
            .map_or(0, |v| u32::from(v.to_bits()) << 16);
        b[((j / NR) * kcp + p) * NR + j % NR] = u32::from(src[2 * p].to_bits()) | hi;
    };
    for j in 0..nc {
        let first = if j < cols16 { pairs16 } else { 0 };
        for p in first..kcp {
            one(b, j, p);
        }
    }
}

/// The 16 × 16 transpose of `u32`s: `src[j]` points to 16 values of line `j`; returns the 16
/// lines `out[p] = (src[0][p], …, src[15][p])`. Interleaves 32-bit, then 64-bit values inside
/// 128-bit lanes, then transposes the 4 × 4 lanes of every fourth register.
///
/// # Safety
/// AVX-512 F; 16 readable `u32` (unaligned) at every `src[j]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(src: [*const u32; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::{
        __m512i, _mm512_loadu_si512, _mm512_shuffle_i32x4, _mm512_unpackhi_epi32,
        _mm512_unpackhi_epi64, _mm512_unpacklo_epi32, _mm512_unpacklo_epi64,
    };
    // SAFETY: the caller's contract.
    let r: [__m512i; 16] = std::array::from_fn(|j| unsafe { _mm512_loadu_si512(src[j].cast()) });
    // a[2i], a[2i + 1]: lines 2i and 2i + 1 interleaved (positions 4L, 4L + 1 and 4L + 2, 4L + 3
    // of each lane L)
    let a: [__m512i; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(x, y)
        } else {
            _mm512_unpackhi_epi32(x, y)
        }
    });
    // b[4g + q]: lines 4g..4g + 4 at position 4L + q of each lane L
    let b: [__m512i; 16] = std::array::from_fn(|i| {
        let (g, q) = (i / 4, i % 4);
        let (x, y) = (a[4 * g + q / 2], a[4 * g + q / 2 + 2]);
        if q % 2 == 0 {
            _mm512_unpacklo_epi64(x, y)
        } else {
            _mm512_unpackhi_epi64(x, y)
        }
    });
    // out[4L + q], lane g = b[4g + q], lane L: a 4 × 4 transpose of lanes per q
    let mut out = r;
    for q in 0..4 {
        let (x0, x1, x2, x3) = (b[q], b[4 + q], b[8 + q], b[12 + q]);
        let c0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(x0, x1);
        let c1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(x0, x1);
        let c2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(x2, x3);
        let c3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(x2, x3);
        out[q] = _mm512_shuffle_i32x4::<0b10_00_10_00>(c0, c2);
        out[4 + q] = _mm512_shuffle_i32x4::<0b11_01_11_01>(c0, c2);
        out[8 + q] = _mm512_shuffle_i32x4::<0b10_00_10_00>(c1, c3);
        out[12 + q] = _mm512_shuffle_i32x4::<0b11_01_11_01>(c1, c3);
    }
    out
}

/// The blocked product (the loop nest of `blocked.rs` with [`BLOCKING`]): column blocks of
/// [`NC`], then weight-row blocks of [`KC`] packed into `rows.b` here, then [`NR`]-column
/// strips × [`MR`]-row strips through [`tile`].
///
/// # Safety
/// AVX-512 F and BF16; the bounds checked by [`PackedPairs::product`]; `out` the caller's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn product_avx512(
    rows: &mut PackedPairs,
    w: &[bf16],
    order: Order,
    c0: usize,
    out: OutBlock,
) {
    let pack = |b: &mut [u32], pc: usize, kc: usize, jb: usize, nc: usize| {
        match order {
            // SAFETY: the block lies inside `w` (checked by the caller), `b` was just sized.
            Order::KMajor { n } => unsafe { pack_block(b, w, n, c0 + jb, pc, kc, nc) },
            // SAFETY: AVX-512 F (this function's); the block lies inside `w`.
            Order::OutMajor { k } => unsafe { pack_block_out_major(b, w, k, c0 + jb, pc, kc, nc) },
        }
    };
    // SAFETY: AVX-512 F and BF16 (this function's), the bounds checked by
    // `PackedPairs::product`.
    let micro = |kcp: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, first: bool| unsafe {
        tile(kcp, a, b, c, ldc, first)
    };
    // SAFETY: the caller's contract.
    unsafe {
        blocked(
            BLOCKING,
            (&rows.a, &mut rows.b),
            (rows.m, rows.k),
            (w, order, c0),
            out,
            pack,
            micro,
        )
    };
}

/// The microkernel: `c[i, j] (=|+=) Σ_p dot(a[p·MR + i], b[p·NR + j])` over `kcp` k-pairs for
/// an MR × NR tile, `c` rows `ldc` apart; `first` overwrites, else adds to what is there.
///
/// # Safety
/// AVX-512 F and BF16; `a` holds `kcp·MR` and `b` `kcp·NR` pairs (asserted); `c` points to MR
/// rows of NR writable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile(kcp: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, first: bool) {
    use std::arch::x86_64::{
        __m512bh, __m512i, _mm512_add_ps, _mm512_dpbf16_ps, _mm512_loadu_epi32, _mm512_loadu_ps,
        _mm512_set1_epi32, _mm512_setzero_ps, _mm512_storeu_ps,
    };
    const V: usize = NR / 16;
    assert!(a.len() >= kcp * MR && b.len() >= kcp * NR);
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let as_pairs = |v: __m512i| -> __m512bh {
        // SAFETY: both are 64 bytes of plain vector data; a pair of bf16 per 32-bit lane.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    };
    // SAFETY: the asserts above and the caller's contract for `c`.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        for p in 0..kcp {
            let bv: [__m512bh; V] = std::array::from_fn(|q| {
                as_pairs(_mm512_loadu_epi32(bp.add(p * NR + 16 * q) as *const i32))
            });
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = as_pairs(_mm512_set1_epi32(*ap.add(p * MR + i) as i32));
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_dpbf16_ps(*acc, av, bv);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let row = c.add(i * ldc);
            for (q, &v) in acc.iter().enumerate() {
                let p = row.add(16 * q);
                match first {
                    true => _mm512_storeu_ps(p, v),
                    false => _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), v)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::panel::tests::lcg;

    /// The packed product against a dumb f64 oracle of the bf16-rounded rows and weights, on
    /// edge shapes: odd K, K past one block with a tail, columns past one block and not a
    /// multiple of 16, rows not a multiple of MR and past one pass of strips.
    #[test]
    fn pairs_match_a_f64_oracle_on_edge_shapes() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        let mut packed = PackedPairs::default();
        for &(m, k, n, c0, cols) in &[
            (1, 1, 1, 0, 1),
            // no rows, and rows of no values (the product then writes zeros)
            (0, 5, 16, 0, 16),
            (3, 0, 16, 0, 16),
            (9, 7, 33, 0, 33),
            (6, 2, 64, 0, 64),
            (7, 513, 300, 16, 270),
            (13, 1030, 600, 0, 600),
            (80, 300, 70, 3, 64),
            (12, 64, 16, 0, 16),
        ] {
            let mut seed = (m * 131 + k * 7 + n) as u64;
            let x: Vec<Vec<f32>> = (0..m)
                .map(|_| {
                    (0..k)
                        .map(|_| bf16::from_f32(lcg(&mut seed)).to_f32())
                        .collect()
                })
                .collect();
            let w: Vec<bf16> = (0..k * n).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
            // the same weights out-major: [n, k]
            let w_t: Vec<bf16> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            let rows: Vec<&[f32]> = x.iter().map(|r| r.as_slice()).collect();
            let stride = cols + 3;
            packed.pack(&rows);
            for (weights, order) in [(&w, Order::KMajor { n }), (&w_t, Order::OutMajor { k })] {
                let mut out = vec![7.0f32; m * stride];
                let block = OutBlock {
                    ptr: out.as_mut_ptr(),
                    stride,
                    cols,
                };
                // SAFETY: the block is `out`, m rows of `cols` values `stride` apart.
                unsafe {
                    packed.product(weights, order, c0, block);
                    // a second product reuses the packing (SwiGLU's gate and up)
                    packed.product(weights, order, c0, block);
                }
                let tol = 1e-5 * (k as f32).sqrt().max(1.0);
                for r in 0..m {
                    for c in 0..cols {
                        let want: f64 = (0..k)
                            .map(|i| x[r][i] as f64 * w[i * n + c0 + c].to_f64())
                            .sum();
                        let got = out[r * stride + c];
                        assert!(
                            (got as f64 - want).abs() <= tol as f64,
                            "m={m} k={k} n={n} c0={c0} {order:?}: [{r},{c}] {got} vs {want}"
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
    #[cfg(target_arch = "x86_64")]
    fn transpose16_is_a_transpose() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        // 16 lines of 16 values, 17 apart (unaligned, not contiguous)
        let src: Vec<u32> = (0..16 * 17)
            .map(|i: u32| i.wrapping_mul(2654435761))
            .collect();
        let lines: [*const u32; 16] = std::array::from_fn(|j| src[j * 17..].as_ptr());
        // SAFETY: AVX-512 F (checked); 16 values at every line.
        let out = unsafe { transpose16(lines) };
        for (p, row) in out.iter().enumerate() {
            let mut got = [0u32; 16];
            // SAFETY: 16 writable values.
            unsafe { std::arch::x86_64::_mm512_storeu_si512(got.as_mut_ptr().cast(), *row) };
            let want: [u32; 16] = std::array::from_fn(|j| src[j * 17 + p]);
            assert_eq!(got, want, "line {p}");
        }
    }
}
