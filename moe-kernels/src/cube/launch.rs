//! Host side of the kernels on `CubeBackend`: contiguous inputs, output allocation, vector size
//! and launch geometry.

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::IntTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use super::MoeKernelOps;
use super::kernels::{
    chunk_counts_kernel, gather_rows_kernel, place_pairs_kernel, weighted_combine_kernel,
};

/// Pairs one unit of the plan kernels scans. Short loops keep the work parallel; one unit per
/// expert scanning every pair was also cut short on lavapipe past about 2^16 loop iterations
/// (measured: wrong plans from 64 000 pairs up).
const PLAN_CHUNK: usize = 1024;

/// The widest vector the device likes for `dtype` that divides `width` (1 at worst).
fn vector_size(tensor: &CubeTensor, dtype: DType, width: usize) -> usize {
    tensor
        .client
        .io_optimized_vector_sizes(dtype.size())
        .map(|v| v as usize)
        .filter(|&v| v > 0 && width % v == 0)
        .max()
        .unwrap_or(1)
}

fn address_type(tensors: &[&CubeTensor]) -> AddressType {
    tensors
        .iter()
        .map(|t| t.required_address_type())
        .max()
        .unwrap_or_default()
}

impl MoeKernelOps for CubeBackend {
    fn moe_gather_rows(x: CubeTensor, indices: CubeTensor) -> CubeTensor {
        let x = into_contiguous(x);
        let indices = into_contiguous(indices);
        let (rows, width) = (x.meta.shape()[0], x.meta.shape()[1]);
        let m = indices.meta.shape()[0];
        let out = empty_device_dtype(
            x.client.clone(),
            x.device.clone(),
            Shape::new([m, width]),
            x.dtype,
        );
        if m == 0 || width == 0 {
            return out;
        }
        let vector = vector_size(&x, x.dtype, width);
        let units = m * width / vector;
        let cube_dim = CubeDim::new(&x.client, units);
        let cube_count = calculate_cube_count_elemwise(&x.client, units, cube_dim);
        let address = address_type(&[&x, &indices, &out]);
        let dtypes = [
            dtype_to_storage_type(x.dtype),
            dtype_to_storage_type(indices.dtype),
        ];
        gather_rows_kernel::launch(
            &out.client,
            cube_count,
            cube_dim,
            address,
            vector,
            x.into_tensor_arg(),
            indices.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            width / vector,
            units,
            dtypes,
        );
        out
    }

    fn moe_weighted_combine(
        rows: CubeTensor,
        sources: CubeTensor,
        weights: CubeTensor,
    ) -> CubeTensor {
        let rows = into_contiguous(rows);
        let sources = into_contiguous(sources);
        let weights = into_contiguous(weights);
        let (num_rows, width) = (rows.meta.shape()[0], rows.meta.shape()[1]);
        let (t, k) = (sources.meta.shape()[0], sources.meta.shape()[1]);
        let out = empty_device_dtype(
            rows.client.clone(),
            rows.device.clone(),
            Shape::new([t, width]),
            rows.dtype,
        );
        if t == 0 || width == 0 {
            return out;
        }
        let vector = vector_size(&rows, rows.dtype, width);
        let units = t * width / vector;
        let cube_dim = CubeDim::new(&rows.client, units);
        let cube_count = calculate_cube_count_elemwise(&rows.client, units, cube_dim);
        let address = address_type(&[&rows, &sources, &weights, &out]);
        let dtypes = [
            dtype_to_storage_type(rows.dtype),
            dtype_to_storage_type(weights.dtype),
            dtype_to_storage_type(sources.dtype),
        ];
        weighted_combine_kernel::launch(
            &out.client,
            cube_count,
            cube_dim,
            address,
            vector,
            rows.into_tensor_arg(),
            sources.into_tensor_arg(),
            weights.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            num_rows,
            k,
            width / vector,
            units,
            dtypes,
        );
        out
    }

    fn moe_expert_plan(ids: CubeTensor, num_experts: usize) -> CubeTensor {
        let ids = into_contiguous(ids);
        let pairs = ids.meta.shape()[0];
        let out = empty_device_dtype(
            ids.client.clone(),
            ids.device.clone(),
            Shape::new([2 * num_experts + 2 * pairs]),
            ids.dtype,
        );
        // Every unit scans one chunk of pairs for one expert (short loops, many units).
        let chunks = pairs.div_ceil(PLAN_CHUNK).max(1);
        let units = (num_experts + 1) * chunks;
        let counts = empty_device_dtype(
            ids.client.clone(),
            ids.device.clone(),
            Shape::new([units]),
            ids.dtype,
        );
        let cube_dim = CubeDim::new(&ids.client, units);
        let cube_count = calculate_cube_count_elemwise(&ids.client, units, cube_dim);
        let dtype = dtype_to_storage_type(ids.dtype);
        chunk_counts_kernel::launch(
            &ids.client,
            cube_count.clone(),
            cube_dim,
            address_type(&[&ids, &counts]),
            ids.clone().into_tensor_arg(),
            counts.clone().into_tensor_arg(),
            pairs,
            num_experts,
            PLAN_CHUNK,
            chunks,
            dtype,
        );
        let inclusive = <CubeBackend as IntTensorOps<CubeBackend>>::int_cumsum(counts.clone(), 0);
        place_pairs_kernel::launch(
            &out.client,
            cube_count,
            cube_dim,
            address_type(&[&ids, &counts, &inclusive, &out]),
            ids.into_tensor_arg(),
            counts.into_tensor_arg(),
            inclusive.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            pairs,
            num_experts,
            PLAN_CHUNK,
            chunks,
            dtype,
        );
        out
    }
}
