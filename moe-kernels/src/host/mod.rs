//! Host kernels: the MoE hot path on the CPU, on plain slices, for the CPU backends (Burn
//! flex). The same steps as the CubeCL kernels, in the order of a forward pass:
//!
//! - [`HostPlan::new`] — **plan**: a stable counting sort of the (token, slot) pairs by expert,
//!   with the inverse (the sorted row of every slot).
//! - [`grouped_ffn`] — **permute + experts**: every expert on its segment of rows, the gather
//!   fused into the products (rows are read from `x` where they are). Work is cut into
//!   (expert, row chunk, column block) items spread over the rayon pool: the threads share out
//!   experts and columns, not the inside of tiny GEMMs (a weight block is read by one item,
//!   or by each row chunk of a long segment cut for the threads).
//!   Short segments (decoding) stream the stored weights straight through a panel: row-major
//!   `[K, N]` ones eight weight rows at a time (`panel`: AVX-512 or AVX2 + FMA where the CPU
//!   has them), bf16 ones stored out-major (`[N, K]`, [`Matrix::Bf16T`]; see
//!   [`bf16_out_major_preferred`]) one output's dot product at a time (`dots`: one
//!   `vdpbf16ps` per weight line in a bf16 computation). Long segments are packed once per
//!   item and run through our register-tiled GEMM (`tiles`: AVX2 + FMA; the `gemm` crate
//!   elsewhere), or, in a bf16 computation with bf16 weights on a CPU with AVX-512 BF16,
//!   through `vdpbf16ps` tiles on weights packed as k-pairs (`pairs`); both pack from
//!   either layout.
//!   SwiGLU's gate and up products share the item and the activation is applied in place;
//!   f32 accumulation throughout, f32 or bf16 weights, f32 or bf16 rows ([`Compute`]).
//! - [`combine`] — **unpermute + combine**: each token sums its k expert rows weighted, in
//!   slot order: deterministic, whatever the number of threads.
//!
//! The weights are read where the backend stores them: the stacked `[E, K, N]` expert
//! tensors (or their out-major `[E, N, K]` storage) are the only copy. The panel streams them as they are; the tiles pack one
//! L2-sized block at a time as they go (each weight block is read from DRAM once per item).
//!
//! One file per step: `plan.rs`, `experts.rs` (permute + experts: the two phases, and how an
//! item's rows meet a product), `combine.rs`; with `schedule.rs` (work items), `pool.rs`
//! (buffers kept between calls), `matrix.rs` (the matrix types the products share), the
//! products (`panel/`: the streaming panel, one file per ISA; `dots.rs`; `tiles.rs` and
//! `pairs.rs`, the two tile families, over the one loop nest of `blocked.rs`; `gemm.rs`, the
//! `gemm`-crate fallback), `flex.rs`
//! (flex tensors as slices) and `stream.rs` (the memory-rate probe of `moe bench --stream`).
//! The same steps on the GPU are `crate::gpu`'s files of the same names; their tensor-op twins
//! are in `moe_core::dispatch`.

mod attention;
#[cfg(target_arch = "x86_64")]
mod blocked;
mod combine;
mod dense;
mod dots;
mod experts;
#[cfg(feature = "flex")]
mod flex;
mod gemm;
mod matrix;
mod pairs;
mod panel;
mod plan;
mod pool;
mod schedule;
mod stream;
mod tiles;

pub use attention::{AttentionShape, decode_attention};
pub use combine::combine;
pub use dense::dense;
pub use experts::{Compute, ExpertMatrices, grouped_ffn, grouped_ffn_in};
#[cfg(feature = "flex")]
pub use flex::{HostTensor, host_available, host_under_autodiff};
pub use matrix::Matrix;
pub use plan::HostPlan;
pub use pool::recycle;
pub use schedule::PANEL_MAX_ROWS;
pub use stream::stream_sum;

/// Whether bf16 expert weights are best stored **out-major** ([`Matrix::Bf16T`]) for these
/// kernels: on x86-64 with AVX-512 F, BW and BF16, where decoding in a bf16 computation reads
/// each weight line with one `vdpbf16ps` instead of a widening and two FMAs (see `dots`).
/// Measured on a 2-core Zen 5 (OLMoE layer, bf16, `moe bench --stream`): T = 1 87–90% of the
/// memory's read rate against 72–73% row-major, T = 16 73–76% against 69–76%, T = 128 and
/// above level or faster. Elsewhere the row-major layout keeps the faster paths.
pub fn bf16_out_major_preferred() -> bool {
    dots::preferred()
}

/// Whether the host kernels run on `device` (never, in a build without the `flex` feature).
#[cfg(not(feature = "flex"))]
pub fn host_available(_device: &burn::tensor::Device) -> bool {
    false
}

/// Whether `device` is a flex device behind autodiff (never, in a build without `flex`).
#[cfg(not(feature = "flex"))]
pub fn host_under_autodiff(_device: &burn::tensor::Device) -> bool {
    false
}
