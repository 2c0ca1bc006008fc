//! The buffers the expert products write into, kept between calls.

use std::sync::Mutex;

/// Buffers of earlier calls ([`grouped_ffn`](super::grouped_ffn)'s hidden rows, and its outputs handed back by
/// [`recycle`]), kept so that later calls write into memory that is already mapped: a fresh
/// 192 MB buffer costs about 130 ms of page faults (measured; the T = 2048 OLMoE layer needs
/// that much), a reused one nothing. At most [`POOL_BUFFERS`] are kept, for the life of the
/// process: after a T = 2048 OLMoE layer that is about 200 MB held between calls.
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Buffers [`POOL`] keeps at most.
const POOL_BUFFERS: usize = 4;

/// A buffer of `len` values from the pool (the smallest that holds `len`, else the largest)
/// or a new one. Its values are unspecified: every caller overwrites all of them.
pub(super) fn take_buffer(len: usize) -> Vec<f32> {
    let mut pool = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let fits = (0..pool.len())
        .filter(|&i| pool[i].capacity() >= len)
        .min_by_key(|&i| pool[i].capacity());
    let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].capacity()));
    let mut buffer = pick.map(|i| pool.swap_remove(i)).unwrap_or_default();
    drop(pool);
    buffer.truncate(len);
    buffer.resize(len, 0.0);
    buffer
}

/// Hands a buffer [`grouped_ffn`](super::grouped_ffn) returned back for reuse by later calls (optional: dropping
/// it is fine too, the next call then maps fresh memory).
pub fn recycle(buffer: Vec<f32>) {
    if buffer.capacity() == 0 {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    pool.push(buffer);
    if pool.len() > POOL_BUFFERS
        && let Some(smallest) = (0..pool.len()).min_by_key(|&i| pool[i].capacity())
    {
        pool.swap_remove(smallest);
    }
}
