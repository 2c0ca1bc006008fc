//! How the expert products are shared out over the threads: each phase is cut into work
//! items (an expert's rows × a block of output columns) by sizes alone, never by the thread
//! count, so every result bit is the same whatever the number of threads.

use std::ops::Range;

use super::HostPlan;

/// Segments of at most this many rows run through the streaming `panel`
/// product, longer ones through the packed tiles (the `gemm` crate where those do not run).
/// Measured with `moe bench` at the OLMoE shape on 2 cores, three alternations at T = 128
/// (segments of about 16 rows): 32 gave 227–243 ms, 16 203–214, 8 197–208, 4 206–216. (Against
/// the `gemm` crate, before the tiles, 32 had been best: the crate lost below about 40 rows.)
pub const PANEL_MAX_ROWS: usize = 8;

/// Row chunks of a long segment cut for the threads hold at least this many rows.
const MIN_CHUNK_ROWS: usize = 128;

/// Column blocks aim at this many bytes of one weight row when a phase is cut by columns
/// (1024 f32 or 2048 bf16 columns): `n` is cut into at most `⌈n / that⌉` even blocks (a
/// multiple of 16 wide, the last one taking what is left), so a block is a whole 4 KiB page
/// per weight row when `n` is a multiple of it (the OLMoE shapes), a little less otherwise, and
/// the prefetchers stream it. Measured with `moe bench`
/// at T = 1 (OLMoE, 2 threads), against blocks of 128 columns: f32 8.8–11.3 ms against
/// 12.9–14.9, bf16 4.9–8.8 against 6.9–8.8.
const MIN_BLOCK_BYTES: usize = 4096;

/// Work items the columns are split to reach when few experts are active (decoding): enough
/// to share out over the threads. A constant, not the thread count: the column blocks, and so
/// every result bit, are the same whatever the number of threads.
const MIN_ITEMS: usize = 16;

/// One piece of a phase: expert `expert`'s sorted rows `rows`, output columns `cols`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Item {
    pub(super) expert: usize,
    pub(super) rows: Range<usize>,
    pub(super) cols: Range<usize>,
}

/// The items of one phase with `n` output columns: one per non-empty expert, cut further when
/// there are fewer than [`MIN_ITEMS`] experts — long segments first into row chunks of at
/// least [`MIN_CHUNK_ROWS`], then, like short ones, into column blocks if more items are
/// still wanted.
/// Largest first.
pub(super) fn items(plan: &HostPlan, n: usize, elem_bytes: usize) -> Vec<Item> {
    let active: Vec<usize> = (0..plan.num_experts)
        .filter(|&e| !plan.segment(e).is_empty())
        .collect();
    if active.is_empty() {
        return Vec::new();
    }
    let wanted = MIN_ITEMS.div_ceil(active.len()).max(1);
    let min_cols = (MIN_BLOCK_BYTES / elem_bytes.max(1)).max(16);
    let widest_split = n.div_ceil(min_cols).max(1);
    let mut out = Vec::new();
    for &e in &active {
        let seg = plan.segment(e);
        let row_parts = match seg.len() > PANEL_MAX_ROWS {
            true => wanted.min(seg.len() / MIN_CHUNK_ROWS).max(1),
            false => 1,
        };
        let col_parts = wanted.div_ceil(row_parts).min(widest_split);
        let block = n.div_ceil(col_parts).div_ceil(16) * 16;
        let chunk = seg.len().div_ceil(row_parts);
        let mut r = seg.start;
        while r < seg.end {
            let r_end = (r + chunk).min(seg.end);
            let mut c = 0;
            while c < n {
                let end = (c + block).min(n);
                out.push(Item {
                    expert: e,
                    rows: r..r_end,
                    cols: c..end,
                });
                c = end;
            }
            r = r_end;
        }
    }
    out.sort_by_key(|item| std::cmp::Reverse(item.rows.len() * item.cols.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_cover_every_output_once() {
        // a short segment, a long one (cut into row chunks) and empty experts
        let mut ids: Vec<i64> = vec![1, 1, 1, 4];
        ids.extend(std::iter::repeat_n(2, 700));
        let plan = HostPlan::new(&ids, ids.len(), 1, 5).unwrap();
        for (n, elem_bytes) in [(1, 4), (17, 4), (128, 2), (1000, 4), (2048, 2), (4000, 4)] {
            {
                let items = items(&plan, n, elem_bytes);
                assert!(items.iter().any(|i| i.expert == 2 && i.rows.len() < 700));
                let mut seen = vec![0u8; plan.active_rows() * n];
                for item in &items {
                    assert!(item.cols.len() % 16 == 0 || item.cols.end == n);
                    for r in item.rows.clone() {
                        for c in item.cols.clone() {
                            seen[r * n + c] += 1;
                        }
                    }
                }
                assert!(seen.iter().all(|&s| s == 1), "n {n}");
            }
        }
        let empty = HostPlan::new(&[2, 2], 2, 1, 2).unwrap();
        assert!(items(&empty, 64, 4).is_empty());
    }
}
