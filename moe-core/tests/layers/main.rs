//! moe-core's integration tests, one binary: the layer against the f64 oracle and its own
//! tensor-op twin on every compiled-in backend (flex, ndarray, wgpu on lavapipe in CI), the
//! path each call reports, the kernels it dispatches to, training and gradients.

mod common;

mod autodiff;
mod call_path;
mod host_kernels;
mod kernels;
mod oracle;
mod route_epilogue;
mod training;
