//! Test helpers shared by every crate's integration tests (each includes this file with
//! `#[path]`): the devices a generic test runs on, host copies, seeded values, the repository's
//! test data. Burn and rand only, so that moe-kernels can use it too.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};

/// Every backend compiled into the crate under test (its `flex`, `ndarray` and `wgpu`
/// features), with its name.
///
/// wgpu is included when a Vulkan driver is installed; without one it is skipped with a
/// message, unless `MOE_REQUIRE_WGPU=1` (set by CI), which turns the absence into a failure.
/// CUDA is never part of the suite (it cannot be built on the project's machines).
pub fn devices() -> Vec<(&'static str, Device)> {
    #[allow(unused_mut)]
    let mut out: Vec<(&'static str, Device)> = Vec::new();
    #[cfg(feature = "flex")]
    out.push(("flex", Device::flex()));
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)]
    out.push(("ndarray", Device::ndarray()));
    #[cfg(feature = "wgpu")]
    if vulkan_driver_installed() {
        out.push((
            "wgpu",
            Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        ));
    } else if std::env::var("MOE_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
        panic!(
            "MOE_REQUIRE_WGPU=1 but no Vulkan driver is installed (apt-get install mesa-vulkan-drivers)"
        );
    } else {
        eprintln!("skipping wgpu: no Vulkan driver (apt-get install mesa-vulkan-drivers)");
    }
    out
}

/// The first CPU device compiled in (flex, then ndarray).
pub fn cpu() -> Device {
    devices()
        .into_iter()
        .find(|(name, _)| matches!(*name, "flex" | "ndarray"))
        .map(|(_, device)| device)
        .expect("no CPU backend compiled in: enable the flex or ndarray feature")
}

/// Whether the Linux Vulkan loader would find a driver (an ICD manifest).
fn vulkan_driver_installed() -> bool {
    ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .any(|entry| entry.path().extension().is_some_and(|e| e == "json"))
}

/// A file or folder of the repository's test data (`tests/data` at the workspace root, which
/// is this crate's folder for the facade and its parent for a member crate).
pub fn data(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("tests/data"))
        .find(|dir| dir.is_dir())
        .expect("tests/data not found above the crate")
        .join(relative)
}

/// Host copy of a float tensor.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Host copy of an int tensor.
pub fn host_int<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

/// Uploads row-major f32 values.
pub fn upload<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Largest absolute difference; panics on a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Deterministic standard-normal values (a seeded generator, the same on every backend).
pub fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dist = rand_distr::Normal::new(0.0f32, std).unwrap();
    (0..n).map(|_| dist.sample(&mut rng)).collect()
}
