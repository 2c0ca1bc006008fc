//! The decoder's steps on the host kernels where they run (the flex backend without autodiff,
//! tensors stored f32 or bf16 in a layout they read in place), with Burn's ops elsewhere: the
//! dense products (attention projections, the lm_head) and the decode attention over the KV
//! cache. The host kernels stream each weight (and the cache) once over all threads in its
//! stored dtype; flex's bf16 matmul widens the whole matrix to f32 on every call, on one
//! thread.

use burn::nn::Linear;
use burn::tensor::Tensor;

use super::model::{AttentionMask, CachedKv};

/// `linear(x)`: `x · weight + bias`.
///
/// # Shapes
/// - `x`: `[B, L, in]` → `[B, L, out]`, in `x`'s dtype
pub(crate) fn linear(layer: &Linear, x: Tensor<3>) -> Tensor<3> {
    let out = product(x, &layer.weight.val());
    match &layer.bias {
        Some(bias) => out + bias.val().unsqueeze_dims(&[0, 1]),
        None => out,
    }
}

/// `x · w`.
///
/// # Shapes
/// - `x`: `[B, L, K]`, `w`: `[K, N]` → `[B, L, N]`, in `x`'s dtype
pub(crate) fn product(x: Tensor<3>, w: &Tensor<2>) -> Tensor<3> {
    #[cfg(feature = "flex")]
    if let Some(out) = flex::product(&x, w) {
        return out;
    }
    x.matmul(w.clone().unsqueeze_dim(0))
}

/// `softmax(q·kᵀ·scale + mask)·v` for one new position on the host kernels, reading the
/// cache where it is, or `None` where they do not run (more than one new position, another
/// backend, autodiff, a cache in another dtype or view).
///
/// # Shapes
/// - `q`: `[B, heads, 1, dk]`; the cache `[B, kv_heads, capacity, dk | dv]` holding `P`
///   positions → `[B, 1, heads, dv]`
pub(crate) fn decode_attention(
    q: &Tensor<4>,
    cache: &CachedKv,
    mask: &AttentionMask,
    scale: f64,
) -> Option<Tensor<4>> {
    #[cfg(feature = "flex")]
    return flex::decode_attention(q, cache, mask, scale);
    #[cfg(not(feature = "flex"))]
    {
        let _ = (q, cache, mask, scale);
        None
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::tensor::{DType, Tensor, TensorData};
    use moe_kernels::host::{self, AttentionShape, Compute, HostTensor};

    use super::{AttentionMask, CachedKv};

    /// See [`super::decode_attention`].
    pub(super) fn decode_attention(
        q: &Tensor<4>,
        cache: &CachedKv,
        mask: &AttentionMask,
        scale: f64,
    ) -> Option<Tensor<4>> {
        let device = q.device();
        let (k, v, positions) = (&cache.keys, &cache.values, cache.len);
        let [batch, heads, len, key_dim] = q.dims();
        let [_, kv_heads, capacity, _] = k.dims();
        let value_dim = v.dims()[3];
        if len != 1 || !host::host_available(&device) {
            return None;
        }
        let visible = mask.visible_to_last()?;
        let (keys, values) = (
            HostTensor::new(k.clone()).ok()?,
            HostTensor::new(v.clone()).ok()?,
        );
        let query = HostTensor::new(q.clone()).ok()?;
        let query = query.f32_values().ok()?;
        let shape = AttentionShape {
            batch,
            heads,
            kv_heads,
            positions,
            capacity,
            key_dim,
            value_dim,
        };
        let out = host::decode_attention(
            &query,
            keys.matrix()?,
            values.matrix()?,
            visible,
            shape,
            scale as f32,
            Compute::for_dtype(q.dtype()),
        )
        .ok()?;
        let out = Tensor::<4>::from_data(
            TensorData::new(out, [batch, 1, heads, value_dim]),
            (&device, DType::F32),
        );
        Some(out.cast(q.dtype()))
    }

    /// `x · w` on the host kernels, or `None` where they do not run: another backend,
    /// autodiff, a weight stored in another dtype or view.
    pub(super) fn product(x: &Tensor<3>, w: &Tensor<2>) -> Option<Tensor<3>> {
        let device = x.device();
        if !host::host_available(&device) || !matches!(x.dtype(), DType::F32 | DType::BF16) {
            return None;
        }
        let [b, l, k] = x.dims();
        let [w_in, n] = w.dims();
        // the shapes agree by construction; a mismatch takes the matmul, which reports it
        if k != w_in {
            return None;
        }
        let weight = HostTensor::new(w.clone()).ok()?;
        let rows = HostTensor::new(x.clone()).ok()?;
        let values = rows.f32_values().ok()?;
        let compute = Compute::for_dtype(x.dtype());
        let out = host::dense(&values, weight.matrix()?, k, n, compute).ok()?;
        let out = Tensor::<3>::from_data(TensorData::new(out, [b, l, n]), (&device, DType::F32));
        Some(out.cast(x.dtype()))
    }
}
