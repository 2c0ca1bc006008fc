//! One sparse-MoE block in Hugging Face layout → a [`MoeLayer`].
//!
//! Names are relative to the block (prefix them with e.g. `model.layers.3.mlp.`):
//!
//! | part | OLMoE / Qwen | Mixtral |
//! |---|---|---|
//! | router | `gate.weight` `[E, H]` | `gate.weight` |
//! | expert gate | `experts.{j}.gate_proj.weight` `[I, H]` | `experts.{j}.w1.weight` |
//! | expert up | `experts.{j}.up_proj.weight` `[I, H]` | `experts.{j}.w3.weight` |
//! | expert down | `experts.{j}.down_proj.weight` `[H, I]` | `experts.{j}.w2.weight` |
//! | packed gate+up | `experts.gate_up_proj` `[E, 2I, H]`, gate rows first | — |
//! | packed down | `experts.down_proj` `[E, H, I]` | — |
//! | shared expert (Qwen2-MoE) | `shared_expert.{gate,up,down}_proj.weight` | — |
//! | shared experts (DeepSeek-V3) | `shared_experts.{gate,up,down}_proj.weight` | — |
//! | shared gate (Qwen2-MoE) | `shared_expert_gate.weight` `[1, H]` | — |
//! | selection bias (DeepSeek-V3) | `gate.e_score_correction_bias` `[E]` | — |
//!
//! Every matrix is transposed once, at load, into the layer's `[in, out]` layout — except
//! bf16 routed experts on the host kernels, which keep the checkpoint's `[out, in]` order as
//! an `[in, out]` view (see `Experts::with_host_layout`).

use burn::module::Param;
use burn::tensor::{DType, Device, Tensor, TensorData};
use moe_core::{Experts, MoeLayer, MoeLayerConfig, Router, SharedExpert};

use crate::error::LoadError;
use crate::tensors::ReadTensors;

/// Expert tensor names of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertNaming {
    /// `gate_proj` / `up_proj` / `down_proj` (OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek).
    Proj,
    /// `w1` / `w3` / `w2` (Mixtral).
    Mixtral,
}

impl ExpertNaming {
    pub(crate) fn names(self) -> [&'static str; 3] {
        match self {
            ExpertNaming::Proj => ["gate_proj", "up_proj", "down_proj"],
            ExpertNaming::Mixtral => ["w1", "w3", "w2"],
        }
    }
}

/// Checks that every tensor of `names` is stored with `shape` before anything of that size is
/// allocated: sizes come from config.json, and only a tensor that exists in a file proves them.
fn check_shapes(
    source: &dyn ReadTensors,
    names: &[String],
    shape: &[usize],
) -> Result<(), LoadError> {
    for name in names {
        if source.shape(name)? != shape {
            // the read checks the shape first and fails with the error that names the file,
            // before reading anything
            source.read_f32(name, shape)?;
        }
    }
    Ok(())
}

/// Reads `[out, in]` matrices and returns them stacked as they are: `[n, out, in]`.
fn stacked(
    source: &dyn ReadTensors,
    names: &[String],
    out_dim: usize,
    in_dim: usize,
) -> Result<TensorData, LoadError> {
    check_shapes(source, names, &[out_dim, in_dim])?;
    let mut stacked = Vec::with_capacity(names.len() * in_dim * out_dim);
    for name in names {
        stacked.extend(source.read_f32(name, &[out_dim, in_dim])?);
    }
    Ok(TensorData::new(stacked, [names.len(), out_dim, in_dim]))
}

/// Reads `[out, in]` matrices and returns them transposed and stacked: `[n, in, out]`.
fn stacked_transposed(
    source: &dyn ReadTensors,
    names: &[String],
    out_dim: usize,
    in_dim: usize,
) -> Result<TensorData, LoadError> {
    check_shapes(source, names, &[out_dim, in_dim])?;
    let mut stacked = vec![0f32; names.len() * in_dim * out_dim];
    for (n, name) in names.iter().enumerate() {
        let m = source.read_f32(name, &[out_dim, in_dim])?;
        let dst = &mut stacked[n * in_dim * out_dim..(n + 1) * in_dim * out_dim];
        for o in 0..out_dim {
            for i in 0..in_dim {
                dst[i * out_dim + o] = m[o * in_dim + i];
            }
        }
    }
    Ok(TensorData::new(stacked, [names.len(), in_dim, out_dim]))
}

/// Loads routed experts: the packed layout when `{prefix}experts.gate_up_proj` exists,
/// per-expert tensors otherwise.
fn load_experts(
    source: &dyn ReadTensors,
    prefix: &str,
    naming: ExpertNaming,
    config: &MoeLayerConfig,
    device: &Device,
    dtype: DType,
) -> Result<Experts, LoadError> {
    let (e, h, i) = (config.num_experts, config.d_model, config.d_ff);
    let upload = |data: TensorData| Tensor::<3>::from_data(data, (device, dtype));
    // bf16 on the host kernels: the out-major layout (`Experts::with_host_layout`), which is
    // the checkpoint's own `[out, in]` order, as the `swap_dims` view the layer reads as
    // `[in, out]`; otherwise transposed once into `[in, out]`
    let out_major = Experts::prefers_out_major(device, dtype);
    let packed = format!("{prefix}experts.gate_up_proj");
    if source.contains(&packed) {
        let gate_up = source.read_f32(&packed, &[e, i.saturating_mul(2), h])?;
        let down_names = [format!("{prefix}experts.down_proj")];
        let down = source.read_f32(&down_names[0], &[e, h, i])?;
        if out_major {
            // gate_up is [E, 2I, H]: each expert's gate rows, then its up rows
            let half = |second: usize| -> Vec<f32> {
                gate_up
                    .chunks_exact(2 * i * h)
                    .flat_map(|x| x[second * i * h..(second + 1) * i * h].iter().copied())
                    .collect()
            };
            let view = |data: Vec<f32>, shape: [usize; 3]| {
                upload(TensorData::new(data, shape)).swap_dims(1, 2)
            };
            return Ok(Experts::from_tensors(
                Some(view(half(0), [e, i, h])),
                view(half(1), [e, i, h]),
                view(down, [e, h, i]),
            )?);
        }
        let mut gate = vec![0f32; e * h * i];
        let mut up = vec![0f32; e * h * i];
        for x in 0..e {
            for r in 0..2 * i {
                let (dst, col) = if r < i {
                    (&mut gate, r)
                } else {
                    (&mut up, r - i)
                };
                for c in 0..h {
                    dst[x * h * i + c * i + col] = gate_up[x * 2 * i * h + r * h + c];
                }
            }
        }
        let mut down_t = vec![0f32; e * i * h];
        for x in 0..e {
            for r in 0..h {
                for c in 0..i {
                    down_t[x * i * h + c * h + r] = down[x * h * i + r * i + c];
                }
            }
        }
        return Ok(Experts::from_tensors(
            Some(upload(TensorData::new(gate, [e, h, i]))),
            upload(TensorData::new(up, [e, h, i])),
            upload(TensorData::new(down_t, [e, i, h])),
        )?);
    }
    let [gate, up, down] = naming.names();
    let names = |part: &str| -> Vec<String> {
        (0..e)
            .map(|j| format!("{prefix}experts.{j}.{part}.weight"))
            .collect()
    };
    let load = |part: &str, out_dim: usize, in_dim: usize| -> Result<Tensor<3>, LoadError> {
        Ok(match out_major {
            true => upload(stacked(source, &names(part), out_dim, in_dim)?).swap_dims(1, 2),
            false => upload(stacked_transposed(source, &names(part), out_dim, in_dim)?),
        })
    };
    Ok(Experts::from_tensors(
        Some(load(gate, i, h)?),
        load(up, i, h)?,
        load(down, h, i)?,
    )?)
}

/// Reads `[out, in]` matrix `name` as a `[in, out]` tensor of `dtype`.
pub(crate) fn matrix_transposed(
    source: &dyn ReadTensors,
    name: String,
    out_dim: usize,
    in_dim: usize,
    device: &Device,
    dtype: DType,
) -> Result<Tensor<2>, LoadError> {
    let data = stacked_transposed(source, &[name], out_dim, in_dim)?;
    Ok(Tensor::<3>::from_data(data, (device, dtype)).reshape([in_dim, out_dim]))
}

/// Loads a dense SwiGLU FFN (`{prefix}gate_proj.weight`, …) as a one-expert [`Experts`].
pub(crate) fn load_dense(
    source: &dyn ReadTensors,
    prefix: &str,
    d_model: usize,
    d_ff: usize,
    device: &Device,
    dtype: DType,
) -> Result<Experts, LoadError> {
    let load = |part: &str, out_dim: usize, in_dim: usize| -> Result<Tensor<3>, LoadError> {
        let data =
            stacked_transposed(source, &[format!("{prefix}{part}.weight")], out_dim, in_dim)?;
        Ok(Tensor::<3>::from_data(data, (device, dtype)))
    };
    Ok(Experts::from_tensors(
        Some(load("gate_proj", d_ff, d_model)?),
        load("up_proj", d_ff, d_model)?,
        load("down_proj", d_model, d_ff)?,
    )?)
}

/// Loads one MoE block whose weights are named `{prefix}…` in `source`, for `config`, in f32.
///
/// The router reads `gate.weight` (and `gate.e_score_correction_bias` when the config asks for
/// a selection bias); a shared expert reads `shared_experts.*` where the checkpoint has them
/// (DeepSeek-V3), else `shared_expert.*` and, when gated, `shared_expert_gate.weight`.
pub fn load_block(
    source: &dyn ReadTensors,
    prefix: &str,
    naming: ExpertNaming,
    config: &MoeLayerConfig,
    device: &Device,
) -> Result<MoeLayer, LoadError> {
    load_block_as(source, prefix, naming, config, device, DType::F32)
}

/// [`load_block`] with every parameter stored as `dtype` (converted on the host, one tensor at
/// a time). The caller checks that the device computes in `dtype`
/// ([`Device::supports_dtype`]).
pub fn load_block_as(
    source: &dyn ReadTensors,
    prefix: &str,
    naming: ExpertNaming,
    config: &MoeLayerConfig,
    device: &Device,
    dtype: DType,
) -> Result<MoeLayer, LoadError> {
    config.validate()?;
    let (e, h) = (config.num_experts, config.d_model);
    // the router's shape proves E and H before a layer of that size is built
    check_shapes(source, &[format!("{prefix}gate.weight")], &[e, h])?;
    let mut router: Router = config.router().init(device)?;
    router.weight = Param::from_tensor(matrix_transposed(
        source,
        format!("{prefix}gate.weight"),
        e,
        h,
        device,
        dtype,
    )?);
    if let Some(bias) = &mut router.selection_bias {
        let data = source.read_f32(&format!("{prefix}gate.e_score_correction_bias"), &[e])?;
        *bias = Param::from_tensor(Tensor::<1>::from_data(
            TensorData::new(data, [e]),
            (device, dtype),
        ));
    }
    let experts = load_experts(source, prefix, naming, config, device, dtype)?;
    let shared = match &config.shared_expert {
        None => None,
        Some(s) => {
            let shared = match source.contains(&format!("{prefix}shared_experts.gate_proj.weight"))
            {
                true => "shared_experts.",
                false => "shared_expert.",
            };
            let ffn = load_dense(
                source,
                &format!("{prefix}{shared}"),
                h,
                s.d_ff,
                device,
                dtype,
            )?;
            let gate = match s.gated {
                true => Some(matrix_transposed(
                    source,
                    format!("{prefix}shared_expert_gate.weight"),
                    1,
                    h,
                    device,
                    dtype,
                )?),
                false => None,
            };
            Some(SharedExpert::from_parts(ffn, gate)?)
        }
    };
    Ok(MoeLayer::from_parts(router, experts, shared)?)
}
