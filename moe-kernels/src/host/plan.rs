//! Step 2, **plan**: the (token, slot) pairs sorted by expert with a stable counting sort,
//! and the inverse (the sorted row of every slot).

use std::ops::Range;

use crate::KernelError;

/// The dispatch plan on the host: pairs `(token, slot)` sorted by expert, stable. Only
/// [`HostPlan::new`] makes one, so its segments never overlap and cover every sorted row: the
/// kernels write through raw pointers by them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    /// Tokens `T`.
    pub(super) num_tokens: usize,
    /// Slots per token `k`.
    pub(super) top_k: usize,
    /// Experts `E`.
    pub(super) num_experts: usize,
    /// Segment starts, `E + 1` entries: expert `e` owns sorted rows `offsets[e]..offsets[e+1]`.
    offsets: Vec<usize>,
    /// The token of every sorted row.
    pub(super) sorted_tokens: Vec<u32>,
    /// The sorted row of every slot `t·k + j`, or `u32::MAX` for an unused slot.
    pub(super) slot_rows: Vec<u32>,
}

impl HostPlan {
    /// Sorts the pairs of `ids` (`[T, k]` row-major; the id `E` marks an unused slot).
    ///
    /// # Errors
    /// [`KernelError::Shape`] when `ids` is not `T × k` long or holds an id outside `0..=E`.
    pub fn new(
        ids: &[i64],
        num_tokens: usize,
        top_k: usize,
        num_experts: usize,
    ) -> Result<Self, KernelError> {
        if Some(ids.len()) != num_tokens.checked_mul(top_k) {
            return Err(KernelError::Shape {
                op: "HostPlan",
                reason: format!(
                    "{} expert ids for {num_tokens} tokens × {top_k} slots",
                    ids.len()
                ),
            });
        }
        if num_tokens * top_k >= u32::MAX as usize {
            return Err(KernelError::Shape {
                op: "HostPlan",
                reason: format!("{num_tokens} tokens × {top_k} slots overflow u32 row indices"),
            });
        }
        let mut counts = vec![0usize; num_experts + 1];
        for (p, &id) in ids.iter().enumerate() {
            match usize::try_from(id) {
                Ok(e) if e <= num_experts => counts[e] += 1,
                _ => {
                    return Err(KernelError::Shape {
                        op: "HostPlan",
                        reason: format!(
                            "token {} slot {} has expert id {id}, outside 0..={num_experts}",
                            p / top_k.max(1),
                            p % top_k.max(1)
                        ),
                    });
                }
            }
        }
        let mut offsets = Vec::with_capacity(num_experts + 1);
        let mut next = Vec::with_capacity(num_experts);
        let mut start = 0;
        for &c in &counts[..num_experts] {
            offsets.push(start);
            next.push(start);
            start += c;
        }
        offsets.push(start);
        let mut sorted_tokens = vec![0u32; start];
        let mut slot_rows = vec![u32::MAX; ids.len()];
        for (p, &id) in ids.iter().enumerate() {
            let e = id as usize;
            if e < num_experts {
                let row = next[e];
                next[e] += 1;
                sorted_tokens[row] = (p / top_k) as u32;
                slot_rows[p] = row as u32;
            }
        }
        Ok(Self {
            num_tokens,
            top_k,
            num_experts,
            offsets,
            sorted_tokens,
            slot_rows,
        })
    }

    /// Tokens `T`.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Slots per token `k`.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Experts `E`.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Segment starts, `E + 1` entries: expert `e` owns sorted rows `offsets[e]..offsets[e+1]`.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// The token of every sorted row.
    pub fn sorted_tokens(&self) -> &[u32] {
        &self.sorted_tokens
    }

    /// The sorted row of every slot `t·k + j`, or `u32::MAX` for an unused slot.
    pub fn slot_rows(&self) -> &[u32] {
        &self.slot_rows
    }

    /// Rows of expert `e`.
    pub fn segment(&self, e: usize) -> Range<usize> {
        self.offsets[e]..self.offsets[e + 1]
    }

    /// Rows sent to each expert.
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Sorted rows in all: the used slots.
    pub fn active_rows(&self) -> usize {
        self.sorted_tokens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_a_stable_counting_sort_with_unused_slots() {
        // T = 3, k = 2, E = 3; id 3 marks an unused slot
        let ids = [2, 0, 0, 3, 2, 2];
        let plan = HostPlan::new(&ids, 3, 2, 3).unwrap();
        assert_eq!(plan.offsets, vec![0, 2, 2, 5]);
        assert_eq!(plan.counts(), vec![2, 0, 3]);
        assert_eq!(plan.sorted_tokens, vec![0, 1, 0, 2, 2]);
        assert_eq!(plan.slot_rows, vec![2, 0, 1, u32::MAX, 3, 4]);
        let err = HostPlan::new(&[0, 4], 1, 2, 3).unwrap_err();
        assert!(
            err.to_string()
                .contains("slot 1 has expert id 4, outside 0..=3"),
            "{err}"
        );
        let err = HostPlan::new(&[0, -1], 1, 2, 3).unwrap_err();
        assert!(err.to_string().contains("expert id -1"), "{err}");
        let err = HostPlan::new(&[0], 1, 2, 3).unwrap_err();
        assert!(
            err.to_string()
                .contains("1 expert ids for 1 tokens × 2 slots"),
            "{err}"
        );
    }
}
