//! The loop nest both tile families run (the f32 tiles of `tiles.rs`, the bf16 pair tiles of
//! `pairs.rs`): column blocks of `nc`, then weight-row blocks of `kc` packed by the family,
//! then `nr`-column strips × `mr`-row strips through its microkernel, prefetching the next
//! weight block an even share at a time ([`NextBlock`]); the blocks of the right and bottom
//! edges go through a scratch tile ([`store_corner`]).

use super::matrix::{Order, OutBlock};

/// The blocking of one tile family.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocking {
    /// Rows and columns of the register tile.
    pub(crate) mr: usize,
    pub(crate) nr: usize,
    /// Weight rows and columns per packed block.
    pub(crate) kc: usize,
    pub(crate) nc: usize,
    /// Row strips multiplied with every column strip of a block before the next ones.
    pub(crate) mc_strips: usize,
    /// Weight rows per packed element (1: an f32; 2: a pair of bf16).
    pub(crate) per_elem: usize,
}

impl Blocking {
    /// Packed elements of `rows` weight rows.
    #[inline(always)]
    fn depth(self, rows: usize) -> usize {
        rows.div_ceil(self.per_elem)
    }
}

/// `out = rows · w[:, c0..c0 + out.cols]` over the rows packed in `a` (strips of `mr` rows by
/// `depth(k)` elements), `pack(b, pc, kc, jb, nc)` packing the weight block of rows
/// `pc..pc + kc`, columns `jb..jb + nc` (of the item's) into `b` (sized for it:
/// `[strip][depth(kc)][nr]`), and `tile(depth(kc), a, b, c, ldc, first)` the microkernel.
///
/// # Safety
/// `out` must point to `m` rows of `out.cols` writable values no one else touches; `w`, `a`
/// and what `pack` and `tile` read must be in bounds (checked by the families' `product`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn blocked<E: Copy + Default, W>(
    bl: Blocking,
    (a, b): (&[E], &mut Vec<E>),
    (m, k): (usize, usize),
    (w, order, c0): (&[W], Order, usize),
    out: OutBlock,
    mut pack: impl FnMut(&mut [E], usize, usize, usize, usize),
    mut tile: impl FnMut(usize, &[E], &[E], *mut f32, usize, bool),
) {
    let (mr, nr) = (bl.mr, bl.nr);
    // one register tile of the largest family (the pair tiles' 6 × 64)
    let mut tile_buf = [0.0f32; 6 * 64];
    assert!(mr * nr <= tile_buf.len());
    let cols = out.cols;
    let kp = bl.depth(k);
    let row_strips = m.div_ceil(mr);
    let mut jb = 0;
    while jb < cols {
        let nc = bl.nc.min(cols - jb);
        let col_strips = nc.div_ceil(nr);
        let mut pc = 0;
        while pc < k {
            let kc = bl.kc.min(k - pc);
            let (kcp, pcp) = (bl.depth(kc), bl.depth(pc));
            // no zeroing pass: `pack` writes every column of the block, and the last strip's
            // padding columns (whatever they hold) only feed tile columns that are never stored
            b.resize(col_strips * kcp * nr, E::default());
            pack(b, pc, kc, jb, nc);
            let mut next = NextBlock::new(
                (pc, kc, k, bl.kc),
                (jb, nc, cols, bl.nc),
                std::mem::size_of::<W>(),
                col_strips * row_strips,
                order,
            );
            for s0 in (0..row_strips).step_by(bl.mc_strips) {
                for st in 0..col_strips {
                    let strip_cols = nr.min(nc - st * nr);
                    let b = &b[st * kcp * nr..(st + 1) * kcp * nr];
                    for s in s0..(s0 + bl.mc_strips).min(row_strips) {
                        next.share(w, c0);
                        let strip_rows = mr.min(m - s * mr);
                        let a = &a[(s * kp + pcp) * mr..(s * kp + pcp + kcp) * mr];
                        let first = pc == 0;
                        // SAFETY: rows s·mr.., columns jb + st·nr.. of the block are the caller's;
                        // a full tile is written in place, a partial one through `tile_buf`.
                        unsafe {
                            let dst = out.ptr.add(s * mr * out.stride + jb + st * nr);
                            if strip_rows == mr && strip_cols == nr {
                                tile(kcp, a, b, dst, out.stride, first);
                            } else {
                                tile(kcp, a, b, tile_buf.as_mut_ptr(), nr, true);
                                let corner = (strip_rows, strip_cols);
                                store_corner(&tile_buf, nr, dst, out.stride, corner, first);
                            }
                        }
                    }
                }
            }
            pc += kc;
        }
        jb += nc;
    }
}

/// The weight block after the current one (the next `KC` rows of this column block, else the
/// first rows of the next column block), prefetched an even share of its cache lines before
/// every tile of the current block (see the module docs). Shared by the f32 tiles and the
/// bf16 pair tiles.
#[cfg(target_arch = "x86_64")]
pub(crate) struct NextBlock {
    /// First weight row and column (within the item's columns) of the next block.
    pc: usize,
    jb: usize,
    /// How the weights lie: a row-major block is read along its rows, an out-major one down
    /// its columns.
    order: Order,
    /// Elements per cache line.
    line: usize,
    lines_per_row: usize,
    lines: usize,
    per_tile: usize,
    cursor: usize,
}

#[cfg(target_arch = "x86_64")]
impl NextBlock {
    /// The block after rows `pc..pc + kc`, columns `jb..jb + nc` of a `k × cols` product cut
    /// into blocks of `kc_max × nc_max`, spread over `tiles` tiles; `elem_bytes` per weight,
    /// laid out in `order`.
    pub(crate) fn new(
        (pc, kc, k, kc_max): (usize, usize, usize, usize),
        (jb, nc, cols, nc_max): (usize, usize, usize, usize),
        elem_bytes: usize,
        tiles: usize,
        order: Order,
    ) -> Self {
        let (next_pc, next_jb) = match pc + kc < k {
            true => (pc + kc, jb),
            false => (0, jb + nc),
        };
        let (next_kc, next_nc) = match next_jb < cols {
            true => (kc_max.min(k - next_pc), nc_max.min(cols - next_jb)),
            false => (0, 0),
        };
        let line = (64 / elem_bytes.max(1)).max(1);
        // a "row" is what lies contiguous: a weight row's columns, or a column's weight rows
        let (runs, run) = match order {
            Order::KMajor { .. } => (next_kc, next_nc),
            Order::OutMajor { .. } => (next_nc, next_kc),
        };
        let lines_per_row = run.div_ceil(line);
        let lines = runs * lines_per_row;
        Self {
            pc: next_pc,
            jb: next_jb,
            order,
            line,
            lines_per_row,
            lines,
            per_tile: lines.div_ceil(tiles.max(1)),
            cursor: 0,
        }
    }

    /// Prefetches the next share of lines of `w` (the item's columns from `c0`), before one
    /// tile.
    #[inline(always)]
    pub(crate) fn share<T>(&mut self, w: &[T], c0: usize) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let stop = (self.cursor + self.per_tile).min(self.lines);
        while self.cursor < stop {
            let (r, l) = (
                self.cursor / self.lines_per_row,
                self.cursor % self.lines_per_row,
            );
            let at = &w[match self.order {
                Order::KMajor { .. } => self.order.at(self.pc + r, c0 + self.jb + l * self.line),
                Order::OutMajor { .. } => self.order.at(self.pc + l * self.line, c0 + self.jb + r),
            }];
            // SAFETY: `at` is an element of `w`; a prefetch reads nothing.
            unsafe { _mm_prefetch(at as *const T as *const i8, _MM_HINT_T0) };
            self.cursor += 1;
        }
    }
}

/// Writes the `rows × cols` corner of a tile computed into `tile` (rows `nr` apart) to `dst`
/// (rows `ldc` apart): overwritten when `first`, else added to what is there. The tiles of a
/// block's right and bottom edges go through here.
///
/// # Safety
/// `dst` points to `rows` rows of `cols` writable values, `ldc` apart, no one else touches.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn store_corner(
    tile: &[f32],
    nr: usize,
    dst: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    first: bool,
) {
    for i in 0..rows {
        // SAFETY: the caller's contract.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.add(i * ldc), cols) };
        for (o, &t) in o.iter_mut().zip(&tile[i * nr..i * nr + cols]) {
            *o = if first { t } else { *o + t };
        }
    }
}
