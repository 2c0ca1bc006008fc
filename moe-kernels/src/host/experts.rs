//! Steps 3–4, **permute + experts**: every expert on its segment of rows, the gather fused
//! into the products; the two phases (gate/up with the activation, then down) run their work
//! items over the rayon pool, each item's rows prepared once for the product that suits them
//! (`panel`, `dots`, `tiles`, `pairs` or the `gemm` crate).

use rayon::prelude::*;

use super::matrix::{Matrix, Order, OutBlock};
use super::pairs::PackedPairs;
use super::pool::{recycle, take_buffer};
use super::schedule::{Item, PANEL_MAX_ROWS, items};
use super::tiles::PackedRows;
use super::{HostPlan, dots, pairs, tiles};
use super::{gemm, panel};
use crate::KernelError;

/// The precision the expert products read their rows in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compute {
    /// f32 rows (bf16 weights are widened exactly): an f32 computation, whatever the weights
    /// are stored in.
    #[default]
    F32,
    /// bf16 rows, as a bf16 model holds its activations: `x` and the hidden rows (after the
    /// activation) are rounded to bf16 (nearest even) before the products read them. With
    /// bf16 weights the products of bf16 values are exact in f32 and every path sums them in
    /// f32, so all paths compute the same values up to the order of the sums; on a CPU with
    /// AVX-512 BF16 the long segments then run on `vdpbf16ps` (`pairs`), and so do the short
    /// ones on out-major weights (`dots`). (With f32 weights the products are rounded as in
    /// an f32 computation.)
    Bf16,
}

impl Compute {
    /// The precision a computation in `dtype` reads its rows in: bf16 for bf16, f32 otherwise.
    pub fn for_dtype(dtype: burn::tensor::DType) -> Self {
        match dtype {
            burn::tensor::DType::BF16 => Compute::Bf16,
            _ => Compute::F32,
        }
    }

    /// `x` as this precision holds it: bf16 rows rounded once (a copy only where some value
    /// is not a bf16 already).
    pub(super) fn rows(self, x: &[f32]) -> std::borrow::Cow<'_, [f32]> {
        match self == Compute::Bf16 && x.iter().any(|&v| self.round(v) != v) {
            true => x.iter().map(|&v| self.round(v)).collect(),
            false => x.into(),
        }
    }

    /// `v` as this precision holds it.
    #[inline]
    pub(super) fn round(self, v: f32) -> f32 {
        match self {
            Compute::F32 => v,
            Compute::Bf16 => half::bf16::from_f32(v).to_f32(),
        }
    }
}

/// The routed experts' stacked weights, as [`grouped_ffn`] reads them.
#[derive(Debug, Clone, Copy)]
pub struct ExpertMatrices<'a> {
    /// Gate projections `[E, d_model, d_ff]`: SwiGLU experts. `None`: GELU MLP experts.
    /// (A [`Matrix::Bf16T`] stores each expert `[d_ff, d_model]`, and so on below.)
    pub gate: Option<Matrix<'a>>,
    /// Up projections `[E, d_model, d_ff]`.
    pub up: Matrix<'a>,
    /// Down projections `[E, d_ff, d_model]`.
    pub down: Matrix<'a>,
    /// Number of experts `E`.
    pub num_experts: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Intermediate size.
    pub d_ff: usize,
}

impl<'a> ExpertMatrices<'a> {
    /// Checks that every matrix holds `E × d_model × d_ff` values.
    ///
    /// # Errors
    /// [`KernelError::Shape`] naming the matrix and both sizes.
    pub fn new(
        gate: Option<Matrix<'a>>,
        up: Matrix<'a>,
        down: Matrix<'a>,
        num_experts: usize,
        d_model: usize,
        d_ff: usize,
    ) -> Result<Self, KernelError> {
        let expected = num_experts
            .checked_mul(d_model)
            .and_then(|v| v.checked_mul(d_ff))
            .filter(|&v| v > 0)
            .ok_or_else(|| KernelError::Shape {
                op: "grouped_ffn",
                reason: format!(
                    "{num_experts} experts × {d_model} × {d_ff} is not a usable size (zero or overflowing)"
                ),
            })?;
        let named = [("gate", gate), ("up", Some(up)), ("down", Some(down))];
        for (name, m) in named {
            if let Some(m) = m
                && m.len() != expected
            {
                return Err(KernelError::Shape {
                    op: "grouped_ffn",
                    reason: format!(
                        "{name} holds {} values, expected {num_experts} experts × {d_model} × {d_ff} = {expected}",
                        m.len()
                    ),
                });
            }
        }
        Ok(Self {
            gate,
            up,
            down,
            num_experts,
            d_model,
            d_ff,
        })
    }

    fn expert(&self, m: Matrix<'a>, e: usize) -> Matrix<'a> {
        m.block(e, self.d_model * self.d_ff)
    }
}

/// Scratch buffers of one worker.
#[derive(Default)]
struct Scratch {
    gathered: Vec<f32>,
    second: Vec<f32>,
    packs: Packs,
}

/// A worker's packing buffers, which the products of an item write as they go.
#[derive(Default)]
struct Packs {
    /// The rows for [`tiles`], and its weight blocks.
    tiles: PackedRows,
    /// The rows for [`pairs`], and its weight blocks.
    pairs: PackedPairs,
    /// bf16 weights widened for the `gemm` crate.
    widened: Vec<f32>,
}

/// The products a call may use for its long segments (the panel always takes the short ones).
#[derive(Debug, Clone, Copy)]
pub(super) struct Paths {
    /// Our f32 tiles (needs [`tiles::available`]); else the `gemm` crate.
    tiles: bool,
    /// The bf16 pair tiles (needs [`pairs::available`], bf16 rows and bf16 weights).
    pairs: bool,
    /// The rows are bf16 values ([`Compute::Bf16`]): out-major bf16 weights then meet them
    /// in `vdpbf16ps` where the CPU has it (see `dots`).
    bf16_rows: bool,
}

/// How an item's rows reach the products.
enum Long<'a> {
    /// A short segment: the panel reads the rows where they are.
    No,
    /// A long segment packed for [`tiles`] (in the worker's [`PackedRows`]).
    Tiles,
    /// A long segment packed for [`pairs`] (in the worker's [`PackedPairs`]).
    Pairs,
    /// A long segment as one contiguous `[m, K]` block for the `gemm` crate (where [`tiles`]
    /// does not run): the rows themselves when they are contiguous, else a copy.
    Gemm(&'a [f32]),
}

/// One item's rows, in the form its products read, prepared once per item (SwiGLU's gate and
/// up products share it).
struct ItemRows<'a> {
    rows: Vec<&'a [f32]>,
    long: Long<'a>,
    /// The rows are bf16 values (see [`Paths::bf16_rows`]).
    bf16_rows: bool,
    /// A short segment's rows as `dots` reads them, made by the first product on out-major
    /// weights and kept for the item's others.
    dots: std::cell::OnceCell<dots::Prepared>,
}

impl<'a> ItemRows<'a> {
    /// `rows` (`contiguous`: the same rows as one block, when they lie back to back), packed
    /// into `pairs` or `packed` (as `paths` allows) or gathered into `gathered` when the
    /// segment is long.
    fn new(
        rows: Vec<&'a [f32]>,
        contiguous: Option<&'a [f32]>,
        gathered: &'a mut Vec<f32>,
        packs: &mut Packs,
        paths: Paths,
    ) -> Self {
        let long = match (rows.len() > PANEL_MAX_ROWS, paths, contiguous) {
            (false, _, _) => Long::No,
            (true, Paths { pairs: true, .. }, _) => {
                packs.pairs.pack(&rows);
                Long::Pairs
            }
            (true, Paths { tiles: true, .. }, _) => {
                packs.tiles.pack(&rows);
                Long::Tiles
            }
            (true, _, Some(block)) => Long::Gemm(block),
            (true, _, None) => {
                gathered.clear();
                for r in &rows {
                    gathered.extend_from_slice(r);
                }
                Long::Gemm(gathered.as_slice())
            }
        };
        Self {
            rows,
            long,
            bf16_rows: paths.bf16_rows,
            dots: std::cell::OnceCell::new(),
        }
    }

    /// `out = rows · w[:, c0..c0 + out.cols]`: the streaming panel for short segments, the
    /// packed pair or f32 tiles (or the `gemm` crate, bf16 weights widened) for long ones.
    ///
    /// # Safety
    /// `out` must be this item's own block, and `packs` what [`Self::new`] was given.
    unsafe fn product(&self, w: Matrix<'_>, n: usize, c0: usize, out: OutBlock, packs: &mut Packs) {
        let order = Order::of(w, n, self.rows.first().map_or(0, |r| r.len()));
        match (&self.long, w) {
            // SAFETY: the caller's contract.
            (Long::No, Matrix::Bf16T(w)) => unsafe {
                let prepared = self
                    .dots
                    .get_or_init(|| dots::Prepared::new(&self.rows, self.bf16_rows));
                prepared.product(&self.rows, w, c0, out)
            },
            // SAFETY: the caller's contract.
            (Long::No, _) => unsafe { panel::panel(&self.rows, w, n, c0, out) },
            // SAFETY: the caller's contract.
            (Long::Pairs, Matrix::Bf16(w) | Matrix::Bf16T(w)) => unsafe {
                packs.pairs.product(w, order, c0, out)
            },
            // f32 weights never come with `Paths::pairs` (see `Paths::for_phase`); the panel computes
            // the same values on any number of rows
            // SAFETY: the caller's contract.
            (Long::Pairs, Matrix::F32(_)) => unsafe { panel::panel(&self.rows, w, n, c0, out) },
            // SAFETY: the caller's contract.
            (Long::Tiles, _) => unsafe { packs.tiles.product(w, n, c0, out) },
            // SAFETY: the caller's contract.
            (Long::Gemm(a), _) => unsafe {
                gemm::gemm(a, self.rows.len(), w, n, c0, out, &mut packs.widened)
            },
        }
    }
}

#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

#[inline]
fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + libm::erff(v * std::f32::consts::FRAC_1_SQRT_2))
}

/// Runs `work` on every item over the rayon pool, each with its own scratch.
fn run_phase(items: &[Item], work: impl Fn(&Item, &mut Scratch) + Sync + Send) {
    items
        .par_iter()
        .with_max_len(1)
        .for_each_init(Scratch::default, |scratch, item| work(item, scratch));
}

/// Steps 3–4, **permute + experts**: every expert on its segment of rows of `x`
/// (`[T, d_model]` row-major f32), gathered through `plan`, giving `[active rows, d_model]`
/// in sorted order. SwiGLU `down(silu(x·gate) ⊙ (x·up))` or GELU `down(gelu(x·up))`.
/// An f32 computation ([`Compute::F32`]; see [`grouped_ffn_in`]).
///
/// # Errors
/// [`KernelError::Shape`] when `x` is not `T × d_model` or `plan` has another `E`.
pub fn grouped_ffn(
    x: &[f32],
    plan: &HostPlan,
    experts: &ExpertMatrices<'_>,
) -> Result<Vec<f32>, KernelError> {
    grouped_ffn_in(x, plan, experts, Compute::F32)
}

/// [`grouped_ffn`] in the precision `compute`: with [`Compute::Bf16`] the rows of `x` and the
/// hidden rows enter the products rounded to bf16.
///
/// # Errors
/// As [`grouped_ffn`].
pub fn grouped_ffn_in(
    x: &[f32],
    plan: &HostPlan,
    experts: &ExpertMatrices<'_>,
    compute: Compute,
) -> Result<Vec<f32>, KernelError> {
    grouped_ffn_on(x, plan, experts, compute, Paths::available())
}

impl Paths {
    /// Every product this CPU runs.
    pub(super) fn available() -> Self {
        Self {
            tiles: tiles::available(),
            pairs: pairs::available(),
            bf16_rows: false,
        }
    }

    /// `self` for one phase: the pair tiles only for bf16 rows and weights that are all bf16.
    pub(super) fn for_phase(self, compute: Compute, weights: &[Option<Matrix<'_>>]) -> Self {
        let bf16 = weights
            .iter()
            .flatten()
            .all(|w| matches!(w, Matrix::Bf16(_) | Matrix::Bf16T(_)));
        Self {
            tiles: self.tiles,
            pairs: self.pairs && compute == Compute::Bf16 && bf16,
            bf16_rows: compute == Compute::Bf16,
        }
    }
}

/// [`grouped_ffn_in`] on the long-segment products `paths` allows (the tests run every one).
fn grouped_ffn_on(
    x: &[f32],
    plan: &HostPlan,
    experts: &ExpertMatrices<'_>,
    compute: Compute,
    paths: Paths,
) -> Result<Vec<f32>, KernelError> {
    let (h, f) = (experts.d_model, experts.d_ff);
    let p = plan.active_rows();
    let sizes = (
        plan.num_tokens.checked_mul(h),
        p.checked_mul(f),
        p.checked_mul(h),
    );
    let (Some(x_len), Some(_), Some(_)) = sizes else {
        return Err(KernelError::Shape {
            op: "grouped_ffn",
            reason: format!("{p} rows × d_model {h} × d_ff {f} overflow"),
        });
    };
    if x.len() != x_len || plan.num_experts != experts.num_experts {
        return Err(KernelError::Shape {
            op: "grouped_ffn",
            reason: format!(
                "x holds {} values for {} tokens × d_model {h}; plan has {} experts, weights {}",
                x.len(),
                plan.num_tokens,
                plan.num_experts,
                experts.num_experts
            ),
        });
    }
    let x = &*compute.rows(x);

    // phase 1: hidden = act(rows · gate, rows · up), [p, d_ff]
    let mut hidden = take_buffer(p * f);
    let hidden_ptr = OutBlock {
        ptr: hidden.as_mut_ptr(),
        stride: f,
        cols: f,
    };
    let phase1 = paths.for_phase(compute, &[experts.gate, Some(experts.up)]);
    run_phase(&items(plan, f, experts.up.elem_bytes()), |item, s| {
        let rows: Vec<&[f32]> = plan.sorted_tokens[item.rows.clone()]
            .iter()
            .map(|&t| &x[t as usize * h..(t as usize + 1) * h])
            .collect();
        let (m, c0, cols) = (rows.len(), item.cols.start, item.cols.len());
        let Scratch {
            gathered,
            second,
            packs,
        } = s;
        let rows = ItemRows::new(rows, None, gathered, packs, phase1);
        // SAFETY: rows `item.rows`, columns `item.cols` of `hidden` belong to this item only.
        let out = unsafe { hidden_ptr.sub(item.rows.start, c0, cols) };
        let up = experts.expert(experts.up, item.expert);
        match experts.gate {
            Some(gate) => {
                let gate = experts.expert(gate, item.expert);
                // the up product overwrites all of it
                second.resize(m * cols, 0.0);
                let up_block = OutBlock {
                    ptr: second.as_mut_ptr(),
                    stride: cols,
                    cols,
                };
                // SAFETY: `out` is this item's block, `up_block` this worker's scratch.
                unsafe {
                    rows.product(gate, f, c0, out, packs);
                    rows.product(up, f, c0, up_block, packs);
                }
                for r in 0..m {
                    // SAFETY: row r of this item's block, the only live reference to it.
                    let g = unsafe { std::slice::from_raw_parts_mut(out.ptr.add(r * f), cols) };
                    let u = &second[r * cols..(r + 1) * cols];
                    for (g, &u) in g.iter_mut().zip(u) {
                        *g = compute.round(silu(*g) * u);
                    }
                }
            }
            None => {
                // SAFETY: `out` is this item's block.
                unsafe { rows.product(up, f, c0, out, packs) };
                for r in 0..m {
                    // SAFETY: as above.
                    let g = unsafe { std::slice::from_raw_parts_mut(out.ptr.add(r * f), cols) };
                    g.iter_mut().for_each(|v| *v = compute.round(gelu(*v)));
                }
            }
        }
    });

    // phase 2: out = hidden · down, [p, d_model]
    let phase2 = paths.for_phase(compute, &[Some(experts.down)]);
    let down = |e| experts.expert(experts.down, e);
    let out = sorted_rows_phase(&hidden, f, plan, down, h, phase2);
    recycle(hidden);
    Ok(out)
}

/// A phase whose rows already lie in sorted order as one `[p, k]` block: `out[r] = rows[r] ·
/// weight(e)` for the rows `r` of expert `e`'s segment, `[p, n]` (the second phase of the
/// experts, and a dense product: one expert holding every row).
pub(super) fn sorted_rows_phase<'w>(
    rows: &[f32],
    k: usize,
    plan: &HostPlan,
    weight: impl Fn(usize) -> Matrix<'w> + Sync,
    n: usize,
    paths: Paths,
) -> Vec<f32> {
    let p = plan.active_rows();
    let mut out = take_buffer(p * n);
    let out_ptr = OutBlock {
        ptr: out.as_mut_ptr(),
        stride: n,
        cols: n,
    };
    let elem_bytes = match plan.num_experts {
        0 => 4,
        _ => weight(0).elem_bytes(),
    };
    run_phase(&items(plan, n, elem_bytes), |item, s| {
        let seg = &rows[item.rows.start * k..item.rows.end * k];
        let item_rows = ItemRows::new(
            seg.chunks_exact(k).collect(),
            Some(seg),
            &mut s.gathered,
            &mut s.packs,
            paths,
        );
        let c0 = item.cols.start;
        // SAFETY: rows `item.rows`, columns `item.cols` of `out` belong to this item only.
        let block = unsafe { out_ptr.sub(item.rows.start, c0, item.cols.len()) };
        // SAFETY: `block` is this item's.
        unsafe { item_rows.product(weight(item.expert), n, c0, block, &mut s.packs) };
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_sizes_are_typed_errors() {
        let w = vec![0.0f32; 3 * 4 * 5];
        assert!(ExpertMatrices::new(None, Matrix::F32(&w), Matrix::F32(&w), 3, 4, 5).is_ok());
        // sizes that are zero or overflow
        for (e, d, f) in [(3, 0, 5), (1, 16, 1 << 62)] {
            let err =
                ExpertMatrices::new(None, Matrix::F32(&w), Matrix::F32(&w), e, d, f).unwrap_err();
            assert!(err.to_string().contains("not a usable size"), "{err}");
        }
    }

    /// Every long-segment product (the f32 tiles, the bf16 pair tiles and the `gemm` crate)
    /// and the panel, through the whole `grouped_ffn`, against a dumb f64 oracle: SwiGLU and
    /// GELU, f32 and bf16 weights, f32 and bf16 compute (the oracle rounds `x` and the hidden
    /// rows as [`Compute::Bf16`] says), segments of 1 row to 150 (panel, tiles and the crate's
    /// row chunks), an empty expert.
    #[test]
    fn every_long_segment_path_matches_a_f64_oracle() {
        use half::bf16;
        // odd widths: both products have an odd K (the pair tiles' last half pair)
        let (e, h, f, k) = (4usize, 41usize, 57usize, 2usize);
        let mut seed = 7u64;
        let mut next = || panel::tests::lcg(&mut seed);
        let t = 150;
        let x: Vec<f32> = (0..t * h).map(|_| next()).collect();
        // expert 0: every token (150 rows); 1: one token; 2: none; 3: tokens 1..=20
        let ids: Vec<i64> = (0..t)
            .flat_map(|i| {
                [
                    0,
                    if i == 0 {
                        1
                    } else if i <= 20 {
                        3
                    } else {
                        4
                    },
                ]
            })
            .collect();
        let plan = HostPlan::new(&ids, t, k, e).unwrap();
        let gate: Vec<f32> = (0..e * h * f).map(|_| next() * 0.3).collect();
        let up: Vec<f32> = (0..e * h * f).map(|_| next() * 0.3).collect();
        let down: Vec<f32> = (0..e * f * h).map(|_| next() * 0.3).collect();
        let round = |w: &[f32]| -> Vec<bf16> { w.iter().map(|&v| bf16::from_f32(v)).collect() };
        let (gate_b, up_b, down_b) = (round(&gate), round(&up), round(&down));
        let widen = |w: &[bf16]| -> Vec<f32> { w.iter().map(|v| v.to_f32()).collect() };
        let (gate_r, up_r, down_r) = (widen(&gate_b), widen(&up_b), widen(&down_b));
        let all_paths = [
            Paths {
                tiles: false,
                pairs: false,
                bf16_rows: false,
            },
            Paths {
                tiles: tiles::available(),
                pairs: false,
                bf16_rows: false,
            },
            Paths {
                tiles: tiles::available(),
                pairs: pairs::available(),
                bf16_rows: false,
            },
        ];
        // out-major copies: each expert's [K, N] stored [N, K]
        let out_major = |w: &[bf16], k: usize, n: usize| -> Vec<bf16> {
            (0..e * n * k)
                .map(|i| {
                    let (ex, c, kk) = (i / (n * k), (i / k) % n, i % k);
                    w[ex * k * n + kk * n + c]
                })
                .collect()
        };
        let (gate_t, up_t, down_t) = (
            out_major(&gate_b, h, f),
            out_major(&up_b, h, f),
            out_major(&down_b, f, h),
        );
        for compute in [Compute::F32, Compute::Bf16] {
            for swiglu in [true, false] {
                // f32, bf16 row-major, bf16 out-major
                for layout in 0..3 {
                    let bf = layout > 0;
                    let (g, u, d) = match bf {
                        false => (&gate, &up, &down),
                        true => (&gate_r, &up_r, &down_r),
                    };
                    let rnd = |v: f64| compute.round(v as f32) as f64;
                    // oracle rows in sorted order
                    let mut want = Vec::new();
                    for (row, &token) in plan.sorted_tokens().iter().enumerate() {
                        let ex = (0..e).find(|&ex| plan.segment(ex).contains(&row)).unwrap();
                        let xr = &x[token as usize * h..(token as usize + 1) * h];
                        let proj = |w: &[f32], j: usize| -> f64 {
                            (0..h)
                                .map(|i| rnd(xr[i] as f64) * w[ex * h * f + i * f + j] as f64)
                                .sum()
                        };
                        let hidden: Vec<f64> = (0..f)
                            .map(|j| match swiglu {
                                true => {
                                    let a = proj(g, j);
                                    rnd(a / (1.0 + (-a).exp()) * proj(u, j))
                                }
                                false => {
                                    let a = proj(u, j) as f32;
                                    rnd(gelu(a) as f64)
                                }
                            })
                            .collect();
                        for c in 0..h {
                            want.push(
                                (0..f)
                                    .map(|j| hidden[j] * d[ex * f * h + j * h + c] as f64)
                                    .sum::<f64>(),
                            );
                        }
                    }
                    let matrices = |gm, um, dm| {
                        ExpertMatrices::new(swiglu.then_some(gm), um, dm, e, h, f).unwrap()
                    };
                    let m = match layout {
                        0 => matrices(Matrix::F32(&gate), Matrix::F32(&up), Matrix::F32(&down)),
                        1 => matrices(
                            Matrix::Bf16(&gate_b),
                            Matrix::Bf16(&up_b),
                            Matrix::Bf16(&down_b),
                        ),
                        _ => matrices(
                            Matrix::Bf16T(&gate_t),
                            Matrix::Bf16T(&up_t),
                            Matrix::Bf16T(&down_t),
                        ),
                    };
                    // bf16 rows: a hidden value the oracle rounds the other way (its f64
                    // value and our f32 one straddling a bf16 boundary) moves an output by
                    // about 2^-8 of one term
                    let tol = match compute {
                        Compute::F32 => 1e-4,
                        Compute::Bf16 => 1e-3,
                    };
                    for paths in all_paths {
                        let got = grouped_ffn_on(&x, &plan, &m, compute, paths).unwrap();
                        assert_eq!(got.len(), want.len());
                        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g as f64 - w).abs() <= tol * w.abs().max(1.0),
                                "{compute:?} swiglu {swiglu} layout {layout} {paths:?}: [{i}] {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
