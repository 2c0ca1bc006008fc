//! # moe-kernels
//!
//! CubeCL kernels for the MoE hot path (histogram, permute, unpermute + combine, grouped GEMM),
//! written once for Burn's `CubeBackend`. Not written yet: every backend currently runs
//! `moe-core`'s tensor-op dispatch, which these kernels will mirror.
