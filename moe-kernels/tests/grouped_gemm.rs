//! The grouped expert GEMM kernels of moe-kernels (`grouped_matmul`, `grouped_swiglu`,
//! `segment_outer`) against a deliberately dumb f64 host oracle that loops over rows, experts
//! and columns; their gradients against a per-expert matmul twin built from tensor ops; their
//! typed errors.
//!
//! Shapes cover one row, one expert, E = 128 with most experts empty, every row to one expert,
//! rows after the last segment (unused slots), no rows at all, and sizes that are not tile
//! multiples. The average segment length picks the kernel (GEMV-like tiles of 4 or 16 rows up to
//! 16 rows per expert, shared-memory tiles of 16, 32 or 64 rows × 64 columns above, and for
//! transposed weights), and the cases cover each. The kernels run wherever a CubeCL device is in
//! `common::devices()` (wgpu on lavapipe in CI).

#[path = "../../tests/common/mod.rs"]
mod common;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use moe_kernels::{self, KernelError};

fn kernel_devices() -> Vec<(&'static str, Device)> {
    common::devices()
        .into_iter()
        .filter(|(_, d)| moe_kernels::available(d))
        .collect()
}

/// One grouped case: `rows` rows, the first `Σ counts` in expert segments, the rest unused.
struct Case {
    rows: usize,
    counts: Vec<usize>,
    k: usize,
    n: usize,
}

/// Segment counts of `used` rows over `experts` experts from seeded routing, leaving a few
/// experts empty.
fn routed_counts(used: usize, experts: usize, seed: u64) -> Vec<usize> {
    let mut counts = vec![0; experts];
    let ids = common::normal(used, 1.0, seed);
    for (i, v) in ids.iter().enumerate() {
        // Skewed: low experts get more; every third expert stays empty when experts > 2.
        let mut e = ((v.abs() * experts as f32 * 0.4) as usize + i) % experts;
        if experts > 2 && e % 3 == 2 {
            e -= 1;
        }
        counts[e] += 1;
    }
    counts
}

fn cases() -> Vec<Case> {
    let mut out = vec![
        Case {
            rows: 1,
            counts: vec![0, 0, 0, 1, 0, 0, 0, 0],
            k: 5,
            n: 7,
        },
        Case {
            rows: 3,
            counts: vec![3],
            k: 17,
            n: 3,
        },
        Case {
            rows: 0,
            counts: vec![0; 4],
            k: 8,
            n: 8,
        },
        // Every row to one expert, crossing several row tiles.
        Case {
            rows: 200,
            counts: vec![0, 0, 200, 0, 0, 0, 0, 0],
            k: 33,
            n: 20,
        },
        // Unused rows at the end (slots without an expert) must come out as zeros.
        Case {
            rows: 90,
            counts: vec![10, 0, 25, 40],
            k: 16,
            n: 64,
        },
    ];
    for (rows, used, experts, k, n, seed) in [
        (64, 64, 64, 70, 33, 1),
        (1000, 1000, 8, 130, 65, 2),
        (300, 280, 128, 24, 129, 3),
        (100, 100, 8, 40, 36, 4),
    ] {
        out.push(Case {
            rows,
            counts: routed_counts(used, experts, seed),
            k,
            n,
        });
    }
    out
}

fn counts_tensor(counts: &[usize], device: &Device) -> Tensor<1, Int> {
    let values: Vec<i64> = counts.iter().map(|&c| c as i64).collect();
    Tensor::from_data(TensorData::new(values, [counts.len()]), device)
}

/// The expert of each row (`None` after the last segment).
fn row_experts(case: &Case) -> Vec<Option<usize>> {
    let mut out: Vec<Option<usize>> = case
        .counts
        .iter()
        .enumerate()
        .flat_map(|(e, &c)| std::iter::repeat_n(Some(e), c))
        .collect();
    out.resize(case.rows, None);
    out
}

/// `a[r] · w[e]` in f64, `w` stored `[E, K, N]` (or `[E, N, K]` when `transposed`).
fn oracle_matmul(case: &Case, a: &[f32], w: &[f32], transposed: bool) -> Vec<f64> {
    let (k, n) = (case.k, case.n);
    let mut out = vec![0.0f64; case.rows * n];
    for (r, expert) in row_experts(case).into_iter().enumerate() {
        let Some(e) = expert else { continue };
        for c in 0..n {
            let mut sum = 0.0f64;
            for i in 0..k {
                let wv = match transposed {
                    false => w[e * k * n + i * n + c],
                    true => w[e * n * k + c * k + i],
                };
                sum += a[r * k + i] as f64 * wv as f64;
            }
            out[r * n + c] = sum;
        }
    }
    out
}

/// Largest |got − want| over (1 + |want|).
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / (1.0 + w.abs()))
        .fold(0.0, f64::max)
}

fn upload_as<const D: usize>(
    values: &[f32],
    shape: [usize; D],
    dtype: DType,
    device: &Device,
) -> Tensor<D> {
    common::upload(values.to_vec(), shape, device).cast(dtype)
}

/// Host values as the dtype sees them (rounded through it), so the oracle gets the same inputs.
fn rounded(values: &[f32], dtype: DType, device: &Device) -> Vec<f32> {
    let n = values.len();
    common::host(upload_as(values, [n], dtype, device).cast(DType::F32))
}

fn dtypes(device: &Device) -> Vec<(DType, f64)> {
    let mut out = vec![(DType::F32, 2e-6)];
    if device.supports_dtype(DType::F16) {
        out.push((DType::F16, 2e-3));
    }
    out
}

#[test]
fn grouped_matmul_matches_the_host_oracle() {
    for (name, device) in kernel_devices() {
        for (dtype, tol) in dtypes(&device) {
            let mut worst = 0.0f64;
            for (i, case) in cases().iter().enumerate() {
                let e = case.counts.len();
                let (k, n) = (case.k, case.n);
                let a = rounded(
                    &common::normal(case.rows * k, 1.0, 10 + i as u64),
                    dtype,
                    &device,
                );
                let w = rounded(
                    &common::normal(e * k * n, 0.3, 20 + i as u64),
                    dtype,
                    &device,
                );
                for transposed in [false, true] {
                    let shape = if transposed { [e, n, k] } else { [e, k, n] };
                    let out = moe_kernels::grouped_matmul(
                        upload_as(&a, [case.rows, k], dtype, &device),
                        upload_as(&w, shape, dtype, &device),
                        counts_tensor(&case.counts, &device),
                        transposed,
                    )
                    .unwrap();
                    assert_eq!(out.dims(), [case.rows, n]);
                    assert_eq!(out.dtype(), dtype);
                    let got = common::host(out.cast(DType::F32));
                    let want = oracle_matmul(case, &a, &w, transposed);
                    let err = rel_err(&got, &want);
                    assert!(
                        err <= tol * (k as f64).sqrt(),
                        "{name} {dtype:?} case {i} (rows {}, E {e}, K {k}, N {n}) transposed {transposed}: {err:e}",
                        case.rows
                    );
                    // Rows after the last segment are exact zeros.
                    let used: usize = case.counts.iter().sum();
                    assert!(got[used * n..].iter().all(|&v| v == 0.0), "{name} case {i}");
                    worst = worst.max(err);
                }
            }
            eprintln!("{name} {dtype:?}: grouped_matmul worst relative error {worst:e}");
        }
    }
}

#[test]
fn grouped_swiglu_matches_the_host_oracle() {
    for (name, device) in kernel_devices() {
        for (dtype, tol) in dtypes(&device) {
            for (i, case) in cases().iter().enumerate() {
                let e = case.counts.len();
                let (k, n) = (case.k, case.n);
                let a = rounded(
                    &common::normal(case.rows * k, 1.0, 30 + i as u64),
                    dtype,
                    &device,
                );
                let gate = rounded(
                    &common::normal(e * k * n, 0.4, 40 + i as u64),
                    dtype,
                    &device,
                );
                let up = rounded(
                    &common::normal(e * k * n, 0.4, 50 + i as u64),
                    dtype,
                    &device,
                );
                let out = moe_kernels::grouped_swiglu(
                    upload_as(&a, [case.rows, k], dtype, &device),
                    upload_as(&gate, [e, k, n], dtype, &device),
                    upload_as(&up, [e, k, n], dtype, &device),
                    counts_tensor(&case.counts, &device),
                )
                .unwrap();
                let got = common::host(out.cast(DType::F32));
                let g = oracle_matmul(case, &a, &gate, false);
                let u = oracle_matmul(case, &a, &up, false);
                let want: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let err = rel_err(&got, &want);
                assert!(
                    err <= 2.0 * tol * (k as f64).sqrt(),
                    "{name} {dtype:?} case {i}: {err:e}"
                );
            }
        }
    }
}

#[test]
fn segment_outer_matches_the_host_oracle() {
    for (name, device) in kernel_devices() {
        for (i, case) in cases().iter().enumerate() {
            let e = case.counts.len();
            let (k, n) = (case.k, case.n);
            let a = common::normal(case.rows * k, 1.0, 60 + i as u64);
            let g = common::normal(case.rows * n, 1.0, 70 + i as u64);
            let out = moe_kernels::segment_outer(
                common::upload(a.clone(), [case.rows, k], &device),
                common::upload(g.clone(), [case.rows, n], &device),
                counts_tensor(&case.counts, &device),
            )
            .unwrap();
            assert_eq!(out.dims(), [e, k, n]);
            let got = common::host(out);
            let mut want = vec![0.0f64; e * k * n];
            for (r, expert) in row_experts(case).into_iter().enumerate() {
                let Some(x) = expert else { continue };
                for p in 0..k {
                    for c in 0..n {
                        want[x * k * n + p * n + c] += a[r * k + p] as f64 * g[r * n + c] as f64;
                    }
                }
            }
            let longest = case.counts.iter().copied().max().unwrap_or(0).max(1);
            let err = rel_err(&got, &want);
            assert!(
                err <= 2e-6 * (longest as f64).sqrt(),
                "{name} case {i} (rows {}, E {e}): {err:e}",
                case.rows
            );
        }
    }
}

/// The per-expert twin of a grouped matmul with tensor ops (host counts, one matmul each).
fn matmul_twin(a: Tensor<2>, w: Tensor<3>, counts: &[usize], transposed: bool) -> Tensor<2> {
    let [rows, _] = a.dims();
    let [_, w1, w2] = w.dims();
    let n = if transposed { w1 } else { w2 };
    let mut parts = Vec::new();
    let mut start = 0;
    for (e, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let m = w.clone().narrow(0, e, 1).reshape([w1, w2]);
        let m = if transposed { m.transpose() } else { m };
        parts.push(a.clone().narrow(0, start, c).matmul(m));
        start += c;
    }
    if start < rows {
        parts.push(Tensor::zeros([rows - start, n], &a.device()));
    }
    Tensor::cat(parts, 0)
}

#[test]
fn gradients_match_the_per_expert_twin() {
    for (name, device) in kernel_devices() {
        let device = device.autodiff();
        let case = Case {
            rows: 150,
            counts: vec![40, 0, 70, 1, 30],
            k: 20,
            n: 70,
        };
        let e = case.counts.len();
        let (k, n, rows) = (case.k, case.n, case.rows);
        let a_host = common::normal(rows * k, 1.0, 80);
        let gate_host = common::normal(e * k * n, 0.3, 81);
        let up_host = common::normal(e * k * n, 0.3, 82);
        let down_host = common::normal(e * n * k, 0.3, 83);
        let probe = common::normal(rows * k, 1.0, 84);
        let run = |kernel: bool| {
            let a = common::upload(a_host.clone(), [rows, k], &device).require_grad();
            let gate = common::upload(gate_host.clone(), [e, k, n], &device).require_grad();
            let up = common::upload(up_host.clone(), [e, k, n], &device).require_grad();
            // Stored [E, K, N] and read transposed: [N → K].
            let down = common::upload(down_host.clone(), [e, k, n], &device).require_grad();
            let counts = counts_tensor(&case.counts, &device);
            let out = match kernel {
                true => {
                    let h = moe_kernels::grouped_swiglu(
                        a.clone(),
                        gate.clone(),
                        up.clone(),
                        counts.clone(),
                    )
                    .unwrap();
                    let y =
                        moe_kernels::grouped_matmul(h, down.clone(), counts.clone(), true).unwrap();
                    // The outer products are differentiable too.
                    let o = moe_kernels::segment_outer(a.clone(), y.clone(), counts).unwrap();
                    (y, o)
                }
                false => {
                    let g = matmul_twin(a.clone(), gate.clone(), &case.counts, false);
                    let u = matmul_twin(a.clone(), up.clone(), &case.counts, false);
                    let h = burn::tensor::activation::silu(g) * u;
                    let y = matmul_twin(h, down.clone(), &case.counts, true);
                    // Σ_e a_eᵀ y_e with tensor ops, one expert at a time.
                    let mut blocks = Vec::new();
                    let mut start = 0;
                    for &c in &case.counts {
                        let block = match c {
                            0 => Tensor::zeros([1, k, k], &device),
                            _ => a
                                .clone()
                                .narrow(0, start, c)
                                .transpose()
                                .matmul(y.clone().narrow(0, start, c))
                                .unsqueeze_dim(0),
                        };
                        blocks.push(block);
                        start += c;
                    }
                    (y, Tensor::cat(blocks, 0))
                }
            };
            let (y, o) = out;
            let r = common::upload(probe.clone(), [rows, k], &device);
            let loss = (y * r).sum() + o.powi_scalar(2).sum() * 0.01;
            let grads = loss.backward();
            [
                common::host(a.grad(&grads).unwrap()),
                common::host(gate.grad(&grads).unwrap()),
                common::host(up.grad(&grads).unwrap()),
                common::host(down.grad(&grads).unwrap()),
            ]
        };
        let kernels = run(true);
        let twin = run(false);
        for (what, (got, want)) in ["a", "gate", "up", "down"]
            .iter()
            .zip(kernels.iter().zip(&twin))
        {
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = common::max_abs_diff(got, want);
            assert!(scale > 0.0, "{name} {what}: zero gradient");
            assert!(
                err <= 1e-5 * (1.0 + scale),
                "{name} d{what}: {err:e} (scale {scale:e})"
            );
        }
        // Unused rows get no gradient.
        let used: usize = case.counts.iter().sum();
        assert!(kernels[0][used * k..].iter().all(|&v| v == 0.0), "{name}");
    }
}

#[test]
fn bad_calls_are_typed_errors() {
    for (name, device) in common::devices() {
        let a = Tensor::<2>::zeros([6, 4], &device);
        let w = Tensor::<3>::zeros([3, 4, 5], &device);
        let counts = counts_tensor(&[2, 2, 2], &device);
        if !moe_kernels::available(&device) {
            let err = moe_kernels::grouped_matmul(a, w, counts, false).unwrap_err();
            assert!(
                matches!(
                    err,
                    KernelError::Unsupported {
                        op: "grouped_matmul",
                        ..
                    }
                ),
                "{name}: {err}"
            );
            continue;
        }
        let err =
            moe_kernels::grouped_matmul(a.clone(), w.clone(), counts.clone(), true).unwrap_err();
        assert!(
            matches!(err, KernelError::Shape { .. }) && err.to_string().contains("has 5 rows"),
            "{name}: {err}"
        );
        let err = moe_kernels::grouped_matmul(
            a.clone(),
            w.clone(),
            counts_tensor(&[6, 0], &device),
            false,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("2 entries for 3 experts"),
            "{name}: {err}"
        );
        if device.supports_dtype(DType::F16) {
            let err = moe_kernels::grouped_matmul(
                a.clone().cast(DType::F16),
                w.clone(),
                counts.clone(),
                false,
            )
            .unwrap_err();
            assert!(matches!(err, KernelError::DTypes { .. }), "{name}: {err}");
        }
        let err = moe_kernels::grouped_swiglu(
            a.clone(),
            w.clone(),
            Tensor::zeros([3, 4, 6], &device),
            counts.clone(),
        )
        .unwrap_err();
        assert!(matches!(err, KernelError::Shape { .. }), "{name}: {err}");
        let err =
            moe_kernels::segment_outer(a, Tensor::zeros([5, 2], &device), counts).unwrap_err();
        assert!(err.to_string().contains("different rows"), "{name}: {err}");
    }
}
