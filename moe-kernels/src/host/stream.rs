//! The memory's read rate at the moment, measured with the kernels' threads (for
//! `moe bench --stream`).

use rayon::prelude::*;

/// The sum of `values`, read once by the thread pool the kernels run on, in 4 MiB shares the
/// threads take as they go (16 running sums per share, so the loads are not serialised on one
/// add): what the memory streams at the moment, for `moe bench --stream` to put the experts'
/// weight bandwidth beside.
pub fn stream_sum(values: &[f32]) -> f32 {
    const SHARE: usize = 1 << 20;
    values
        .par_chunks(SHARE)
        .map(|share| {
            let mut sums = [0.0f32; 16];
            let (blocks, tail) = share.as_chunks::<16>();
            for block in blocks {
                for (s, &v) in sums.iter_mut().zip(block) {
                    *s += v;
                }
            }
            sums.iter().sum::<f32>() + tail.iter().sum::<f32>()
        })
        .sum()
}
