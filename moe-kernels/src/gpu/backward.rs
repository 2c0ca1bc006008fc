//! Backward passes of the kernels, for `Autodiff<B, C>` over any backend that has them.
//!
//! - gather: `dx = zeros[rows, width]`, scatter-added at `indices` with `dout`.
//! - combine: `drows[s] += w[t, j] · dout[t]` for every slot with `sources[t, j] = s`
//!   (scatter-add), and `dw[t, j] = dout[t] · rows[sources[t, j]]` (gather, then a dot product
//!   in f32). Slots whose source is past the rows (unused slots) get and give nothing, as in
//!   the forward pass: they scatter into one extra row that is cut off.
//! - grouped GEMM `out = a · w[e]` per segment: `da = dout · w[e]ᵀ` (the same kernel reading
//!   `w` the other way) and `dw[e] = aᵀ · dout` over the segment (per-segment outer products).
//! - grouped SwiGLU `h = silu(a·gate) ⊙ (a·up)`: the two products are recomputed, then
//!   `dg = dh ⊙ up_out ⊙ silu'(g)`, `du = dh ⊙ silu(g)`, and the products' backward as above.
//! - per-segment outer products `out[e] = Σ aᵀ g`: `da = g · dout[e]ᵀ`, `dg = a · dout[e]`.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, Scalar, TensorMetadata};
use burn::tensor::{DType, IndexingUpdateOp, Shape, Slice};

use super::MoeKernelOps;

#[derive(Debug)]
struct GatherRowsBackward;

impl<B: Backend> Backward<B, 1> for GatherRowsBackward {
    /// Indices and the shape of `x`.
    type State = (IntTensor<B>, Shape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (indices, shape) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(parent)] = ops.parents {
            let zeros = B::float_zeros(shape, &grad.device(), grad.dtype().into());
            let dx = B::float_select_assign(zeros, 0, indices, grad, IndexingUpdateOp::Add);
            grads.register::<B>(parent.id, dx);
        }
    }
}

#[derive(Debug)]
struct WeightedCombineBackward;

impl<B: Backend + MoeKernelOps> Backward<B, 2> for WeightedCombineBackward {
    /// Rows, sources and weights of the forward call.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (rows, sources, weights) = ops.state;
        let grad = grads.consume::<B>(&ops.node); // [t, width]
        let [rows_parent, weights_parent] = ops.parents;
        let row_shape = rows.shape();
        let (m, width) = (row_shape[0], row_shape[1]);
        let weight_shape = weights.shape();
        let (t, k) = (weight_shape[0], weight_shape[1]);
        let device = grad.device();
        let (row_dtype, weight_dtype) = (rows.dtype(), weights.dtype());
        let flat_sources = B::int_reshape(sources, Shape::new([t * k]));
        // dout broadcast to every slot: [t, k, width], in f32.
        let grad_f32 = B::float_cast(grad, DType::F32.into());
        let grad_slots = B::float_expand(
            B::float_reshape(grad_f32, Shape::new([t, 1, width])),
            Shape::new([t, k, width]),
        );
        if let Some(parent) = weights_parent {
            let picked = B::moe_gather_rows(rows, flat_sources.clone());
            let picked = B::float_reshape(
                B::float_cast(picked, DType::F32.into()),
                Shape::new([t, k, width]),
            );
            let dots = B::float_sum_dim(B::float_mul(picked, grad_slots.clone()), 2);
            let dw = B::float_cast(
                B::float_reshape(dots, Shape::new([t, k])),
                weight_dtype.into(),
            );
            grads.register::<B>(parent.id, dw);
        }
        if let Some(parent) = rows_parent {
            let w = B::float_expand(
                B::float_reshape(
                    B::float_cast(weights, DType::F32.into()),
                    Shape::new([t, k, 1]),
                ),
                Shape::new([t, k, width]),
            );
            let contributions = B::float_cast(
                B::float_reshape(B::float_mul(grad_slots, w), Shape::new([t * k, width])),
                row_dtype.into(),
            );
            // Row m collects the slots without a row; it is dropped afterwards.
            let targets = B::int_clamp(flat_sources, Scalar::from(0usize), Scalar::from(m));
            let zeros = B::float_zeros(Shape::new([m + 1, width]), &device, row_dtype.into());
            let drows =
                B::float_select_assign(zeros, 0, targets, contributions, IndexingUpdateOp::Add);
            let drows = B::float_slice(drows, &[Slice::from(0..m), Slice::from(0..width)]);
            grads.register::<B>(parent.id, drows);
        }
    }
}

#[derive(Debug)]
struct GroupedMatmulBackward;

impl<B: Backend + MoeKernelOps> Backward<B, 2> for GroupedMatmulBackward {
    /// `a`, `w`, counts, transposed.
    type State = (FloatTensor<B>, FloatTensor<B>, IntTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (a, w, counts, transposed) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let [a_parent, w_parent] = ops.parents;
        if let Some(parent) = w_parent {
            let dw = match transposed {
                false => B::moe_segment_outer(a, grad.clone(), counts.clone()),
                true => B::moe_segment_outer(grad.clone(), a, counts.clone()),
            };
            grads.register::<B>(parent.id, dw);
        }
        if let Some(parent) = a_parent {
            grads.register::<B>(
                parent.id,
                B::moe_grouped_matmul(grad, w, counts, !transposed),
            );
        }
    }
}

#[derive(Debug)]
struct GroupedSwigluBackward;

impl<B: Backend + MoeKernelOps> Backward<B, 3> for GroupedSwigluBackward {
    /// `a`, gate, up, counts.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (a, gate, up, counts) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let [a_parent, gate_parent, up_parent] = ops.parents;
        let dtype = a.dtype();
        let f32 = |t: FloatTensor<B>| B::float_cast(t, DType::F32.into());
        let g = f32(B::moe_grouped_matmul(
            a.clone(),
            gate.clone(),
            counts.clone(),
            false,
        ));
        let u = f32(B::moe_grouped_matmul(
            a.clone(),
            up.clone(),
            counts.clone(),
            false,
        ));
        let dh = f32(grad);
        let s = B::sigmoid(g.clone());
        let silu = B::float_mul(g.clone(), s.clone());
        // silu'(g) = s · (1 + g · (1 − s))
        let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), Scalar::from(1.0f32));
        let dsilu = B::float_mul(
            s,
            B::float_add_scalar(B::float_mul(g, one_minus_s), Scalar::from(1.0f32)),
        );
        let back = |t: FloatTensor<B>| B::float_cast(t, dtype.into());
        let dg = back(B::float_mul(B::float_mul(dh.clone(), u), dsilu));
        let du = back(B::float_mul(dh, silu));
        if let Some(parent) = gate_parent {
            let dgate = B::moe_segment_outer(a.clone(), dg.clone(), counts.clone());
            grads.register::<B>(parent.id, dgate);
        }
        if let Some(parent) = up_parent {
            let dup = B::moe_segment_outer(a, du.clone(), counts.clone());
            grads.register::<B>(parent.id, dup);
        }
        if let Some(parent) = a_parent {
            let da = B::float_add(
                B::moe_grouped_matmul(dg, gate, counts.clone(), true),
                B::moe_grouped_matmul(du, up, counts, true),
            );
            grads.register::<B>(parent.id, da);
        }
    }
}

#[derive(Debug)]
struct SegmentOuterBackward;

impl<B: Backend + MoeKernelOps> Backward<B, 2> for SegmentOuterBackward {
    /// `a`, `g`, counts.
    type State = (FloatTensor<B>, FloatTensor<B>, IntTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (a, g, counts) = ops.state;
        let grad = grads.consume::<B>(&ops.node); // [E, K, N]
        let [a_parent, g_parent] = ops.parents;
        if let Some(parent) = a_parent {
            let da = B::moe_grouped_matmul(g, grad.clone(), counts.clone(), true);
            grads.register::<B>(parent.id, da);
        }
        if let Some(parent) = g_parent {
            grads.register::<B>(parent.id, B::moe_grouped_matmul(a, grad, counts, false));
        }
    }
}

impl<B: Backend + MoeKernelOps, C: CheckpointStrategy> MoeKernelOps for Autodiff<B, C> {
    fn moe_grouped_matmul(
        a: FloatTensor<Self>,
        w: FloatTensor<Self>,
        counts: IntTensor<Self>,
        transposed: bool,
    ) -> FloatTensor<Self> {
        match GroupedMatmulBackward
            .prepare::<C>([a.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (
                    a.primitive().clone(),
                    w.primitive().clone(),
                    counts.clone(),
                    transposed,
                );
                let out = B::moe_grouped_matmul(
                    a.into_primitive(),
                    w.into_primitive(),
                    counts,
                    transposed,
                );
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::moe_grouped_matmul(
                a.into_primitive(),
                w.into_primitive(),
                counts,
                transposed,
            )),
        }
    }

    fn moe_grouped_swiglu(
        a: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        counts: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        match GroupedSwigluBackward
            .prepare::<C>([a.node(), gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (
                    a.primitive().clone(),
                    gate.primitive().clone(),
                    up.primitive().clone(),
                    counts.clone(),
                );
                let out = B::moe_grouped_swiglu(
                    a.into_primitive(),
                    gate.into_primitive(),
                    up.into_primitive(),
                    counts,
                );
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::moe_grouped_swiglu(
                a.into_primitive(),
                gate.into_primitive(),
                up.into_primitive(),
                counts,
            )),
        }
    }

    fn moe_segment_outer(
        a: FloatTensor<Self>,
        g: FloatTensor<Self>,
        counts: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        match SegmentOuterBackward
            .prepare::<C>([a.node(), g.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (a.primitive().clone(), g.primitive().clone(), counts.clone());
                let out = B::moe_segment_outer(a.into_primitive(), g.into_primitive(), counts);
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::moe_segment_outer(
                a.into_primitive(),
                g.into_primitive(),
                counts,
            )),
        }
    }

    fn moe_gather_rows(x: FloatTensor<Self>, indices: IntTensor<Self>) -> FloatTensor<Self> {
        match GatherRowsBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (indices.clone(), x.primitive().shape());
                prep.finish(state, B::moe_gather_rows(x.into_primitive(), indices))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::moe_gather_rows(x.into_primitive(), indices))
            }
        }
    }

    fn moe_weighted_combine(
        rows: FloatTensor<Self>,
        sources: IntTensor<Self>,
        weights: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match WeightedCombineBackward
            .prepare::<C>([rows.node(), weights.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (
                    rows.primitive().clone(),
                    sources.clone(),
                    weights.primitive().clone(),
                );
                let out = B::moe_weighted_combine(
                    rows.into_primitive(),
                    sources,
                    weights.into_primitive(),
                );
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::moe_weighted_combine(
                rows.into_primitive(),
                sources,
                weights.into_primitive(),
            )),
        }
    }

    fn moe_route_epilogue(
        logits: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        k: usize,
        n_group: usize,
        topk_group: usize,
        scale: f32,
        sigmoid: bool,
        biased: bool,
        normalize: bool,
    ) -> FloatTensor<Self> {
        // Not differentiable: the router takes the composed ops when it needs gradients, so
        // here the result is a constant.
        let out = B::moe_route_epilogue(
            logits.into_primitive(),
            bias.into_primitive(),
            k,
            n_group,
            topk_group,
            scale,
            sigmoid,
            biased,
            normalize,
        );
        <Self as burn::backend::AutodiffBackend>::from_inner(out)
    }

    fn moe_expert_plan(ids: IntTensor<Self>, num_experts: usize) -> IntTensor<Self> {
        // Integers carry no gradient.
        B::moe_expert_plan(ids, num_experts)
    }
}
