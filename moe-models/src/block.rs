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

use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::LoadError;
use crate::tensors::{FloatValue, ReadTensors, append_float};

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

/// `[out, in]` matrices read straight into the dtype they are stored in on the device (no f32
/// copy): `[n, out, in]` as stored when `out_major` (the caller views it `[n, in, out]`), else
/// transposed once into `[n, in, out]` over all threads.
fn read_matrices(
    source: &dyn ReadTensors,
    names: &[String],
    out_dim: usize,
    in_dim: usize,
    dtype: DType,
    out_major: bool,
) -> Result<TensorData, LoadError> {
    check_shapes(source, names, &[out_dim, in_dim])?;
    match dtype {
        DType::BF16 => read_matrices_as::<bf16>(source, names, out_dim, in_dim, out_major),
        DType::F16 => read_matrices_as::<f16>(source, names, out_dim, in_dim, out_major),
        _ => read_matrices_as::<f32>(source, names, out_dim, in_dim, out_major),
    }
}

fn read_matrices_as<T: FloatValue + Default>(
    source: &dyn ReadTensors,
    names: &[String],
    out_dim: usize,
    in_dim: usize,
    out_major: bool,
) -> Result<TensorData, LoadError> {
    let (n, size) = (names.len(), out_dim * in_dim);
    let mut stored = Vec::with_capacity(n * size);
    for name in names {
        append_float(source, name, &[out_dim, in_dim], &mut stored)?;
    }
    if out_major {
        return Ok(TensorData::new(stored, [n, out_dim, in_dim]));
    }
    // row r of the result is column r % in_dim of matrix r / in_dim; 64 rows per task read
    // 64 neighbouring values of each stored row
    const ROWS: usize = 64;
    let mut transposed = vec![T::default(); n * size];
    transposed
        .par_chunks_mut(ROWS * out_dim)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let first = chunk * ROWS;
            for o in 0..out_dim {
                for (j, row) in dst.chunks_exact_mut(out_dim).enumerate() {
                    let r = first + j;
                    let (m, i) = (r / in_dim, r % in_dim);
                    row[o] = stored[m * size + o * in_dim + i];
                }
            }
        });
    Ok(TensorData::new(transposed, [n, in_dim, out_dim]))
}

/// `[out, in]` matrices `names` as one `[n, in, out]` tensor of `dtype`: the checkpoint's own
/// order viewed `[in, out]` when `out_major`, else transposed once.
fn stacked_matrices(
    source: &dyn ReadTensors,
    names: &[String],
    out_dim: usize,
    in_dim: usize,
    (device, dtype): (&Device, DType),
    out_major: bool,
) -> Result<Tensor<3>, LoadError> {
    let data = read_matrices(source, names, out_dim, in_dim, dtype, out_major)?;
    let t = Tensor::<3>::from_data(data, (device, dtype));
    Ok(match out_major {
        true => t.swap_dims(1, 2),
        false => t,
    })
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
    let load = |part: &str, out_dim: usize, in_dim: usize| {
        stacked_matrices(
            source,
            &names(part),
            out_dim,
            in_dim,
            (device, dtype),
            out_major,
        )
    };
    Ok(Experts::from_tensors(
        Some(load(gate, i, h)?),
        load(up, i, h)?,
        load(down, h, i)?,
    )?)
}

/// Reads `[out, in]` matrix `name` as a `[in, out]` tensor of `dtype`: the checkpoint's own
/// order viewed `[in, out]` when `out_major`, else transposed once.
pub(crate) fn matrix(
    source: &dyn ReadTensors,
    name: String,
    (out_dim, in_dim): (usize, usize),
    (device, dtype): (&Device, DType),
    out_major: bool,
) -> Result<Tensor<2>, LoadError> {
    let data = read_matrices(source, &[name], out_dim, in_dim, dtype, out_major)?;
    // one matrix: [1, a, b] read as [a, b] (the same bytes)
    let (read, shape) = (data.dtype(), data.shape()[1..].to_vec());
    let data = TensorData::from_bytes(data.into_bytes(), shape, read);
    let t = Tensor::<2>::from_data(data, (device, dtype));
    Ok(match out_major {
        true => t.transpose(),
        false => t,
    })
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
    let load = |part: &str, out_dim: usize, in_dim: usize| {
        let names = [format!("{prefix}{part}.weight")];
        stacked_matrices(source, &names, out_dim, in_dim, (device, dtype), false)
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
    router.weight = Param::from_tensor(matrix(
        source,
        format!("{prefix}gate.weight"),
        (e, h),
        (device, dtype),
        false,
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
                true => Some(matrix(
                    source,
                    format!("{prefix}shared_expert_gate.weight"),
                    (1, h),
                    (device, dtype),
                    false,
                )?),
                false => None,
            };
            Some(SharedExpert::from_parts(ffn, gate)?)
        }
    };
    Ok(MoeLayer::from_parts(router, experts, shared)?)
}
