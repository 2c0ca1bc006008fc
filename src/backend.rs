//! The Burn backends compiled into this build, by name.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A Burn backend this crate can run on (each behind the cargo feature of the same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Burn's fast CPU backend (feature `flex`, on by default).
    Flex,
    /// The ndarray CPU backend (feature `ndarray`; deprecated by Burn 0.22).
    NdArray,
    /// wgpu: Vulkan, Metal, DirectX or WebGPU; lavapipe on a machine without a GPU.
    Wgpu,
    /// CUDA (feature `cuda`).
    Cuda,
}

/// The name given is not a backend, or its feature was not compiled in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backend `{name}` is not available in this build (compiled in: {available})")]
pub struct UnknownBackend {
    /// The name asked for.
    pub name: String,
    /// The names that would have worked.
    pub available: String,
}

impl Backend {
    /// Every backend, compiled in or not.
    pub const ALL: [Backend; 4] = [
        Backend::Flex,
        Backend::NdArray,
        Backend::Wgpu,
        Backend::Cuda,
    ];

    /// Its name on the command line and in cargo features.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            Backend::NdArray => "ndarray",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }

    /// Whether its cargo feature is on in this build.
    pub fn is_compiled(self) -> bool {
        match self {
            Backend::Flex => cfg!(feature = "flex"),
            Backend::NdArray => cfg!(feature = "ndarray"),
            Backend::Wgpu => cfg!(feature = "wgpu"),
            Backend::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The backends compiled into this build.
    pub fn compiled() -> Vec<Backend> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// Its default device. wgpu picks the best adapter (`CUBECL_WGPU_DEFAULT_DEVICE=Cpu`
    /// forces lavapipe). Only call this for a compiled-in backend.
    ///
    /// # Panics
    /// If the backend is not compiled in (see [`Backend::is_compiled`]).
    pub fn device(self) -> Device {
        match self {
            #[cfg(feature = "flex")]
            Backend::Flex => Device::flex(),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            Backend::NdArray => Device::ndarray(),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
            #[cfg(feature = "cuda")]
            Backend::Cuda => Device::cuda(0),
            #[allow(unreachable_patterns)]
            other => panic!("backend {other} is not compiled into this build"),
        }
    }
}

/// Whether a Vulkan driver is installed where the Linux loader looks for one (an ICD manifest
/// in `/usr/share/vulkan/icd.d` or `/etc/vulkan/icd.d`). On a Linux machine without one, wgpu
/// finds no adapter; Mesa's software driver (`apt-get install mesa-vulkan-drivers`) is enough.
pub fn vulkan_driver_installed() -> bool {
    ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .flatten()
        .any(|entry| entry.path().extension().is_some_and(|e| e == "json"))
}

impl Default for Backend {
    /// The first compiled-in CPU backend (flex, then ndarray), else the first compiled one.
    fn default() -> Self {
        let compiled = Self::compiled();
        compiled
            .iter()
            .copied()
            .find(|b| matches!(b, Backend::Flex | Backend::NdArray))
            .or(compiled.first().copied())
            .unwrap_or(Backend::Flex)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = UnknownBackend;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::compiled()
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| UnknownBackend {
                name: name.to_string(),
                available: Self::compiled()
                    .iter()
                    .map(|b| b.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}
