//! The product of a long segment (prefill): our own packed, register-tiled GEMM for x86-64
//! with AVX2 and FMA, `out = rows · W[:, c0..c0 + cols]` with `W` `[K, N]`, row-major (f32 or
//! bf16) or bf16 out-major (`[N, K]`, packed one value at a time down each column: only an
//! f32 computation on out-major weights comes here, a bf16 one takes `super::pairs`).
//!
//! - **A, the segment's rows**, is packed once per item ([`PackedRows::pack`]) into strips of
//!   [`MR`] rows, k-major (`[strip][K][MR]`), straight from where the rows lie in `x` or in the
//!   hidden buffer: the gather is the packing. SwiGLU's gate and up products share one packing.
//! - **B, the weights**, is packed per block of [`KC`] weight rows × [`NC`] columns into strips
//!   of [`NR`] columns (`[strip][KC][NR]`, 256 KiB of f32 at most: it stays in L2), bf16 widened
//!   to f32 as it is packed. While one block is multiplied, the next one's cache lines are
//!   prefetched, an even share before every tile (a burst of a whole strip's share stalled on
//!   the miss buffers: with the even share, T = 512 went from 500–580 to 444–488 ms in paired
//!   runs). Packing per call, not once at load: the stored expert tensors stay the only
//!   copy of the weights, and the block is read from DRAM once per item either way.
//! - **Rows in passes** of [`MC_STRIPS`] strips per block, so the packed rows' slice of the
//!   block stays in L2 beside it (long segments of prefill, T ≥ 2048).
//! - **The microkernel** keeps a 6 × 16 tile of `out` in 12 AVX registers over the `KC` rows of
//!   a block: two weight loads and six broadcasts feed 12 FMAs per weight row.
//!
//! Measured apart (one thread, a fresh expert per call, OLMoE shapes): 21–33 GFLOP/s at 12
//! rows and 40–50 at 36 rows, where the `gemm` crate reached 12–20 and 24–31 (it packs the
//! weights with the rows we hand it, and cannot fuse the gather or the bf16 widening); the two
//! are level from about 64 rows (60–75 GFLOP/s). The microkernel alone on L1 data: 86–88.
//! In the OLMoE layer the tiles beat the crate on bf16 (T = 512: 616 against 771 ms, the
//! widening fused) and, with the prefetch share, on f32 too.
//! The summation order is fixed by the shapes (k in blocks of `KC`, each block in order), so
//! results do not depend on the thread count.

#[cfg(target_arch = "x86_64")]
use super::blocked::{Blocking, blocked};
use super::matrix::{Matrix, Order, OutBlock, Weight};

/// Rows of the register tile.
pub(crate) const MR: usize = 6;
/// Columns of the register tile (two AVX vectors).
pub(crate) const NR: usize = 16;
/// Weight rows per packed block.
const KC: usize = 256;
/// Columns per packed block (a multiple of [`NR`]).
const NC: usize = 256;
/// Row strips multiplied with every column strip of a block before the next ones: their
/// slice of the packed rows (72 rows × `KC`, 72 KiB) stays in L2 beside the weight block.
const MC_STRIPS: usize = 12;

/// The blocking above, for the loop nest of `blocked.rs`.
#[cfg(target_arch = "x86_64")]
const BLOCKING: Blocking = Blocking {
    mr: MR,
    nr: NR,
    kc: KC,
    nc: NC,
    mc_strips: MC_STRIPS,
    per_elem: 1,
};

/// Whether [`PackedRows::product`] can run here (x86-64 with AVX2 and FMA).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A segment's rows packed into strips of [`MR`] rows (the last strip padded),
/// with a worker's scratch for the weight blocks.
#[derive(Default)]
pub(crate) struct PackedRows {
    a: Vec<f32>,
    b: Vec<f32>,
    m: usize,
    k: usize,
}

impl PackedRows {
    /// Packs `rows` (each `K` long; panics, a bug in the caller, when they differ).
    pub(crate) fn pack(&mut self, rows: &[&[f32]]) {
        let m = rows.len();
        let k = rows.first().map_or(0, |r| r.len());
        assert!(rows.iter().all(|r| r.len() == k));
        let strips = m.div_ceil(MR);
        // no zeroing pass: the rows are written below, and the last strip's padding rows
        // (whatever they hold) only feed tile rows that are never stored
        self.a.resize(strips * k * MR, 0.0);
        for (r, row) in rows.iter().enumerate() {
            let strip = &mut self.a[(r / MR) * k * MR..(r / MR + 1) * k * MR];
            let i = r % MR;
            for (kk, &v) in row.iter().enumerate() {
                strip[kk * MR + i] = v;
            }
        }
        self.m = m;
        self.k = k;
    }

    /// `out = rows · w[:, c0..c0 + out.cols]`, `w` `[K, n]` (row-major, or out-major `[n, K]`
    /// for [`Matrix::Bf16T`]). Overwrites the block. Panics (a bug in the caller) when columns
    /// `c0..c0 + out.cols` of `K` rows do not fit in `w`, or when AVX2 and FMA are missing
    /// (see [`available`]).
    ///
    /// # Safety
    /// `out` must point to as many rows as were packed, of `out.cols` writable values no one
    /// else touches.
    pub(crate) unsafe fn product(&mut self, w: Matrix<'_>, n: usize, c0: usize, out: OutBlock) {
        let (k, cols) = (self.k, out.cols);
        let order = Order::of(w, n, k);
        assert!(order.fits(w.len(), k, c0 + cols) && c0 + cols <= n);
        assert!(self.a.len() == self.m.div_ceil(MR) * k * MR);
        if self.m == 0 || cols == 0 || k == 0 {
            // nothing to multiply: a product over no weight rows is zero
            // SAFETY: the caller's contract.
            unsafe { out.zero(self.m) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            assert!(available(), "tiles::product needs AVX2 and FMA");
            // SAFETY: the features were just checked; bounds above; the block is the caller's.
            unsafe {
                match w {
                    Matrix::F32(w) => product_avx2(self, w, order, c0, out),
                    Matrix::Bf16(w) | Matrix::Bf16T(w) => product_avx2(self, w, order, c0, out),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        panic!("tiles::product needs x86-64 (AVX2 and FMA)");
    }
}

/// The blocked product (the loop nest of `blocked.rs` with [`BLOCKING`]): column blocks of
/// [`NC`], then weight-row blocks of [`KC`] packed into `rows.b` here, then [`NR`]-column
/// strips × [`MR`]-row strips through [`tile`].
///
/// # Safety
/// AVX2 and FMA; the bounds checked by [`PackedRows::product`]; `out` the caller's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn product_avx2<T: Weight>(
    rows: &mut PackedRows,
    w: &[T],
    order: Order,
    c0: usize,
    out: OutBlock,
) {
    // pack a block: [strip][kk][NR]
    let pack = |b: &mut [f32], pc: usize, kc: usize, jb: usize, nc: usize| {
        match order {
            Order::KMajor { n } => {
                for kk in 0..kc {
                    let src = &w[(pc + kk) * n + c0 + jb..][..nc];
                    let (full, tail) = src.as_chunks::<NR>();
                    for (st, piece) in full.iter().enumerate() {
                        // fixed-size pieces: vector moves inline, not a memcpy call each
                        let dst: &mut [f32; NR] = (&mut b[(st * kc + kk) * NR..][..NR])
                            .try_into()
                            .expect("NR values");
                        for (d, &s) in dst.iter_mut().zip(piece) {
                            *d = s.widen();
                        }
                    }
                    if !tail.is_empty() {
                        let dst = &mut b[(full.len() * kc + kk) * NR..][..tail.len()];
                        for (d, &s) in dst.iter_mut().zip(tail) {
                            *d = s.widen();
                        }
                    }
                }
            }
            Order::OutMajor { k } => {
                // each column's weights are contiguous: read down them, write across
                for j in 0..nc {
                    let src = &w[(c0 + jb + j) * k + pc..][..kc];
                    let strip = &mut b[(j / NR) * kc * NR..][..kc * NR];
                    for (kk, &s) in src.iter().enumerate() {
                        strip[kk * NR + j % NR] = s.widen();
                    }
                }
            }
        }
    };
    // SAFETY: AVX2 and FMA (this function's), the bounds checked by `PackedRows::product`.
    let micro = |kc: usize, a: &[f32], b: &[f32], c: *mut f32, ldc: usize, first: bool| unsafe {
        tile(kc, a, b, c, ldc, first)
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

/// The microkernel: `c[i, j] (=|+=) Σ_kk a[kk·MR + i] · b[kk·NR + j]` for an MR × NR tile, `c`
/// rows `ldc` apart; `first` overwrites, else adds to what is there.
///
/// # Safety
/// AVX2 and FMA; `a` holds `kc·MR` and `b` `kc·NR` values (asserted); `c` points to MR rows
/// of NR writable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile(kc: usize, a: &[f32], b: &[f32], c: *mut f32, ldc: usize, first: bool) {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
        _mm256_storeu_ps,
    };
    assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    // SAFETY: the asserts above and the caller's contract for `c`.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(bp.add(kk * NR));
            let b1 = _mm256_loadu_ps(bp.add(kk * NR + 8));
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(kk * MR + i));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let p = c.add(i * ldc);
            if first {
                _mm256_storeu_ps(p, acc[0]);
                _mm256_storeu_ps(p.add(8), acc[1]);
            } else {
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), acc[0]));
                _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), acc[1]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::host::panel::tests::lcg;

    /// The tiles on f32 and bf16 weights, row-major and out-major, against an f64 oracle on
    /// shapes over several blocks of [`KC`] rows and [`NC`] columns (the next-block prefetch
    /// moving down and across), partial strips of rows and columns, a column offset, and one
    /// row; nothing written past the block.
    #[test]
    fn tiles_match_a_f64_oracle_in_both_layouts() {
        if !available() {
            return;
        }
        let mut packed = PackedRows::default();
        for (m, k, n, c0, cols) in [
            (1, 1, 16, 0, 16),
            (7, 513, 300, 16, 270),
            (13, 300, 600, 0, 600),
            (80, 64, 70, 3, 64),
            (6, 257, 257, 0, 257),
        ] {
            let mut seed = (m * 131 + k * 7 + n) as u64;
            let x: Vec<Vec<f32>> = (0..m)
                .map(|_| (0..k).map(|_| lcg(&mut seed)).collect())
                .collect();
            let wf: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
            let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
            // the bf16 weights out-major: [n, k]
            let wt: Vec<bf16> = (0..n * k).map(|i| wb[(i % k) * n + i / k]).collect();
            let rows: Vec<&[f32]> = x.iter().map(|r| r.as_slice()).collect();
            packed.pack(&rows);
            for (name, w) in [
                ("f32", Matrix::F32(&wf)),
                ("bf16", Matrix::Bf16(&wb)),
                ("bf16 out-major", Matrix::Bf16T(&wt)),
            ] {
                let stride = cols + 3;
                let mut out = vec![7.0f32; m * stride];
                let block = OutBlock {
                    ptr: out.as_mut_ptr(),
                    stride,
                    cols,
                };
                // SAFETY: the block is `out`, m rows of `cols` values `stride` apart.
                unsafe { packed.product(w, n, c0, block) };
                for r in 0..m {
                    for c in 0..cols {
                        let weight = |i: usize| match name {
                            "f32" => wf[i * n + c0 + c] as f64,
                            _ => wb[i * n + c0 + c].to_f64(),
                        };
                        let terms = (0..k).map(|i| x[r][i] as f64 * weight(i));
                        let want: f64 = terms.clone().sum();
                        let scale: f64 = terms.map(f64::abs).sum::<f64>() + 1e-30;
                        let got = out[r * stride + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * (k as f64).sqrt() * scale,
                            "{name} m={m} k={k} n={n} c0={c0}: [{r},{c}] {got} vs {want}"
                        );
                    }
                    for pad in cols..stride {
                        assert_eq!(out[r * stride + pad], 7.0, "{name}: write past the block");
                    }
                }
            }
        }
    }
}
