//! Training features against the f64 oracle and hand-worked cases, on every backend: the
//! routers (expert choice, hash, random, temperature), capacity dropping, the balance losses,
//! auxiliary-loss-free bias balancing, and gradients of every router type against finite
//! differences.

use crate::common;

use burn::module::Param;
use burn::tensor::{Device, Int, Tensor, TensorData};
use moe_core::reference::{NaiveMoe, NaiveOptions};
use moe_core::{
    AuxFreeBalancer, Capacity, DispatchStrategy, ForwardOptions, GroupLimit, MoeError, MoeLayer,
    MoeLayerConfig, RouterKind, Routing, TopK, expert_load, load_balancing_loss,
    load_balancing_loss_layers, load_cv, router_z_loss,
};

/// Output tolerance against the f64 oracle (values are O(1)).
const TOLERANCE: f64 = 5e-5;

fn ids(values: Vec<i64>, shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn token_ids(values: &[u64], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = values.iter().map(|&v| v as i64).collect();
    Tensor::from_data(TensorData::new(v, [values.len()]), device)
}

/// The layers every router test runs: one per router kind (and the DeepSeek-V3 rules).
fn router_cases(d: usize, e: usize) -> Vec<(&'static str, MoeLayerConfig)> {
    vec![
        (
            "token choice (gated shared)",
            MoeLayerConfig::qwen2_moe(d, 5, e, 2, 4),
        ),
        (
            "token choice (deepseek)",
            MoeLayerConfig::deepseek_v3(d, 5, e, 2, GroupLimit::new(2, 1), 2.5, 3),
        ),
        (
            "expert choice",
            MoeLayerConfig::olmoe(d, 5, e, 2).with_router_kind(RouterKind::ExpertChoice {
                capacity_factor: 1.5,
            }),
        ),
        (
            "hash",
            MoeLayerConfig::olmoe(d, 5, e, 2).with_router_kind(RouterKind::Hash { seed: 11 }),
        ),
        (
            "random",
            MoeLayerConfig::olmoe(d, 5, e, 2).with_router_kind(RouterKind::Random { seed: 5 }),
        ),
    ]
}

/// Runs the layer and the oracle with the same per-call options; compares every token's kept
/// experts (as a set: expert choice orders by score), dropped counts and the output.
fn compare(
    layer: &MoeLayer,
    x: &[f32],
    options: &ForwardOptions,
    naive: &NaiveOptions,
    label: &str,
) {
    let device = layer.router.weight.device();
    let (t, d, e) = (naive.top_k.len(), layer.d_model(), layer.num_experts());
    let out = layer
        .try_forward_with(common::upload(x.to_vec(), [t, d], &device), options)
        .unwrap();
    let oracle = NaiveMoe::from_layer(layer);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let (want, routes) = oracle.forward_options(&x64, naive);
    assert!(
        routes.iter().all(|r| r.margin > 1e-5),
        "{label}: the case has a near-tie; pick another seed"
    );
    let slots = out.routing.top_k();
    let got_ids = common::host_int(out.routing.expert_ids.clone());
    let got_w = common::host(out.routing.weights.clone());
    for (token, route) in routes.iter().enumerate() {
        let mut got: Vec<(i64, f32)> = (0..slots)
            .map(|s| (got_ids[token * slots + s], got_w[token * slots + s]))
            .filter(|(id, _)| *id < e as i64)
            .collect();
        let mut want: Vec<(i64, f64)> = route
            .experts
            .iter()
            .zip(&route.weights)
            .map(|(&j, &w)| (j as i64, w))
            .collect();
        got.sort_by_key(|p| p.0);
        want.sort_by_key(|p| p.0);
        assert_eq!(
            got.iter().map(|p| p.0).collect::<Vec<_>>(),
            want.iter().map(|p| p.0).collect::<Vec<_>>(),
            "{label}: token {token} experts"
        );
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g.1 as f64 - w.1).abs() < 1e-5,
                "{label}: token {token} weight {} vs {}",
                g.1,
                w.1
            );
        }
    }
    if naive.capacity.is_some() {
        let dropped = common::host_int(out.routing.dropped.clone().expect("dropped counts"));
        let mut want_dropped = vec![0i64; e];
        for r in &routes {
            for &j in &r.dropped {
                want_dropped[j] += 1;
            }
        }
        assert_eq!(dropped, want_dropped, "{label}: dropped per expert");
    }
    let got = common::host(out.hidden);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(worst < TOLERANCE, "{label}: output differs by {worst}");
}

#[test]
fn every_router_kind_matches_the_oracle_with_temperature_and_capacity() {
    let (t, d, e) = (12, 8, 4);
    let x = common::normal(t * d, 1.0, 21);
    let ids_host: Vec<u64> = (0..t as u64).map(|i| (i * 7919) % 50).collect();
    for (name, device) in common::devices() {
        for (kind, config) in router_cases(d, e) {
            let layer = common::seeded_layer(&config, 31, &device);
            for (temperature, capacity) in [
                (1.0, None),
                (0.5, None),
                (3.0, Some(Capacity::Factor(0.75))),
                (1.0, Some(Capacity::Tokens(2))),
            ] {
                let mut options = ForwardOptions::new()
                    .with_temperature(temperature)
                    .with_token_ids(token_ids(&ids_host, &device))
                    .with_seed(9);
                let mut naive = NaiveOptions::new(vec![2; t]);
                naive.temperature = temperature;
                naive.token_ids = Some(ids_host.clone());
                naive.seed = 9;
                if let Some(c) = capacity {
                    options = options.with_capacity(c);
                    naive.capacity = Some(c);
                }
                let label = format!("{name} {kind} T={temperature} {capacity:?}");
                compare(&layer, &x, &options, &naive, &label);
            }
        }
    }
}

#[test]
fn capacity_drops_pairs_in_gshard_order_on_a_hand_built_routing() {
    // T = 4, k = 2, E = 3, capacity 2. Slot-major order: first slots 0,0,0,1 then second
    // slots 1,2,1,0. Expert 0 is full after tokens 0 and 1, so token 2's first slot and token
    // 3's second slot drop; expert 1 is full after token 3's first and token 0's second slot,
    // so token 2's second slot drops. Dropped: expert 0 twice, expert 1 once.
    for (name, device) in common::devices() {
        let routing = Routing::new(
            ids(vec![0, 1, 0, 2, 0, 1, 1, 0], [4, 2], &device),
            common::upload(
                vec![0.6, 0.4, 0.7, 0.3, 0.5, 0.5, 0.9, 0.1],
                [4, 2],
                &device,
            ),
            3,
        )
        .unwrap();
        for capacity in [Capacity::Tokens(2), Capacity::Factor(0.7)] {
            let kept = routing.clone().with_capacity(capacity).unwrap();
            assert_eq!(
                common::host_int(kept.expert_ids.clone()),
                vec![0, 1, 0, 2, 3, 3, 1, 3],
                "{name} {capacity:?}: kept ids"
            );
            assert_eq!(
                common::host(kept.weights.clone()),
                vec![0.6, 0.4, 0.7, 0.3, 0.0, 0.0, 0.9, 0.0],
                "{name} {capacity:?}: kept weights"
            );
            assert_eq!(
                common::host_int(kept.dropped.clone().unwrap()),
                vec![2, 1, 0],
                "{name} {capacity:?}: dropped per expert"
            );
            assert_eq!(
                common::host_int(kept.expert_counts()),
                vec![2, 2, 1],
                "{name}: load after dropping"
            );
        }
        // A large capacity drops nothing; a second limit adds to the first count.
        let all = routing.clone().with_capacity(Capacity::Tokens(8)).unwrap();
        assert_eq!(
            common::host_int(all.dropped.clone().unwrap()),
            vec![0, 0, 0]
        );
        let twice = routing
            .with_capacity(Capacity::Tokens(3))
            .unwrap()
            .with_capacity(Capacity::Tokens(1))
            .unwrap();
        assert_eq!(
            common::host_int(twice.expert_ids),
            vec![0, 3, 3, 2, 3, 3, 1, 3]
        );
        assert_eq!(common::host_int(twice.dropped.unwrap()), vec![3, 2, 0]);
    }
}

#[test]
fn dropped_tokens_keep_only_the_shared_expert() {
    // Capacity 1 with every token on the same expert: only token 0 reaches it; the others
    // get the shared expert alone.
    let (t, d) = (5, 6);
    for (name, device) in common::devices() {
        let config = MoeLayerConfig::qwen2_moe(d, 4, 3, 1, 4);
        let mut layer = common::seeded_layer(&config, 3, &device);
        // Positive inputs and a router that only scores expert 2: every token picks it.
        let mut w = vec![0.0f32; d * 3];
        for i in 0..d {
            w[i * 3 + 2] = 1.0;
        }
        layer.router.weight = Param::from_tensor(common::upload(w, [d, 3], &device));
        let x: Vec<f32> = common::normal(t * d, 1.0, 4)
            .iter()
            .map(|v| v.abs() + 0.1)
            .collect();
        let out = layer
            .try_forward_with(
                common::upload(x.clone(), [t, d], &device),
                &ForwardOptions::new().with_capacity(Capacity::Tokens(1)),
            )
            .unwrap();
        let ids = common::host_int(out.routing.expert_ids.clone());
        assert_eq!(ids, vec![2, 3, 3, 3, 3], "{name}: only token 0 kept");
        assert_eq!(
            common::host_int(out.routing.dropped.clone().unwrap()),
            vec![0, 0, 4]
        );
        let shared_only = layer.shared.as_ref().unwrap().forward(common::upload(
            x[d..].to_vec(),
            [t - 1, d],
            &device,
        ));
        let got = common::host(out.hidden);
        let diff = common::max_abs_diff(&got[d..], &common::host(shared_only));
        assert!(
            diff < 1e-5,
            "{name}: dropped tokens differ from the shared expert by {diff}"
        );
    }
}

#[test]
fn empty_inputs_and_bad_capacities_are_handled_without_panics() {
    let (d, e) = (8, 4);
    for (name, device) in common::devices() {
        for (kind, config) in router_cases(d, e) {
            let layer = common::seeded_layer(&config, 1, &device);
            let options = ForwardOptions::new()
                .with_capacity(Capacity::Factor(1.0))
                .with_token_ids(token_ids(&[], &device));
            let empty = Tensor::<2>::zeros([0, d], &device);
            let out = layer.try_forward_with(empty.clone(), &options).unwrap();
            assert_eq!(out.hidden.dims(), [0, d], "{name} {kind}");
            assert_eq!(out.routing.num_tokens(), 0, "{name} {kind}");
            let batched = Tensor::<3>::zeros([2, 0, d], &device);
            let out = layer.try_forward_with(batched, &options).unwrap();
            assert_eq!(out.hidden.dims(), [2, 0, d], "{name} {kind}");
            let err = layer
                .try_forward_with(
                    empty,
                    &ForwardOptions::new().with_capacity(Capacity::Tokens(0)),
                )
                .unwrap_err();
            assert!(
                matches!(err, MoeError::InvalidSetting { .. }),
                "{name} {kind}: {err}"
            );
        }
        // A hand-made routing with an id above E is refused up front.
        let err = Routing::new(
            ids(vec![0, 9, 1, 0], [2, 2], &device),
            common::upload(vec![0.5; 4], [2, 2], &device),
            2,
        )
        .unwrap_err();
        assert_eq!(
            err,
            MoeError::ExpertIdOutOfRange {
                position: 1,
                id: 9,
                num_experts: 2
            },
            "{name}"
        );
    }
}

#[test]
fn hash_routing_is_a_fixed_function_of_the_token_id() {
    let (d, e) = (6, 8);
    for (name, device) in common::devices() {
        let config =
            MoeLayerConfig::olmoe(d, 4, e, 3).with_router_kind(RouterKind::Hash { seed: 1 });
        let layer = common::seeded_layer(&config, 2, &device);
        let route = |x_seed: u64, id_list: &[u64], k: usize| {
            let t = id_list.len();
            let out = layer
                .try_forward_with(
                    common::upload(common::normal(t * d, 1.0, x_seed), [t, d], &device),
                    &ForwardOptions::new()
                        .with_top_k(TopK::Fixed(k))
                        .with_token_ids(token_ids(id_list, &device)),
                )
                .unwrap();
            let ids = common::host_int(out.routing.expert_ids);
            let w = common::host(out.routing.weights);
            (ids, w)
        };
        let (a, wa) = route(1, &[5, 17, 5, 900], 3);
        let (b, _) = route(2, &[900, 5], 3);
        // Same id, same experts, whatever the input and the position.
        assert_eq!(a[0..3], a[6..9], "{name}");
        assert_eq!(a[0..3], b[3..6], "{name}");
        assert_eq!(a[9..12], b[0..3], "{name}");
        for row in a.chunks(3) {
            let mut r = row.to_vec();
            r.sort();
            r.dedup();
            assert_eq!(
                r.len(),
                3,
                "{name}: experts of one token are distinct: {row:?}"
            );
        }
        assert!(
            wa.iter().all(|&w| (w - 1.0 / 3.0).abs() < 1e-7),
            "{name}: weights 1/k"
        );
        // A smaller k keeps a prefix of the same experts (one assignment serves every k).
        let (c, _) = route(3, &[5, 17], 1);
        assert_eq!(c, vec![a[0], a[3]], "{name}: k = 1 is the first expert");
        // Every id spreads over the experts: 400 ids cover all 8 experts at k = 1.
        let many: Vec<u64> = (0..400).collect();
        let (m, _) = route(4, &many, 1);
        let mut load = vec![0; e];
        m.iter().for_each(|&j| load[j as usize] += 1);
        assert!(load.iter().all(|&c| c > 25), "{name}: hash load {load:?}");

        // Bad ids are typed errors.
        let x = common::upload(common::normal(2 * d, 1.0, 1), [2, d], &device);
        let err = layer
            .try_forward_with(x.clone(), &ForwardOptions::new())
            .unwrap_err();
        assert_eq!(err, MoeError::MissingTokenIds { tokens: 2 });
        let err = layer
            .try_forward_with(
                x.clone(),
                &ForwardOptions::new().with_token_ids(token_ids(&[1, 2, 3], &device)),
            )
            .unwrap_err();
        assert_eq!(
            err,
            MoeError::TokenIdsLength {
                expected: 2,
                got: 3
            }
        );
        let negative = Tensor::<1, Int>::from_data(TensorData::new(vec![4i64, -2], [2]), &device);
        let err = layer
            .try_forward_with(x, &ForwardOptions::new().with_token_ids(negative))
            .unwrap_err();
        assert_eq!(
            err,
            MoeError::NegativeTokenId {
                position: 1,
                id: -2
            }
        );
    }
}

#[test]
fn random_routing_follows_its_seed() {
    let (t, d, e, k) = (300, 4, 6, 2);
    for (name, device) in common::devices() {
        let config =
            MoeLayerConfig::olmoe(d, 4, e, k).with_router_kind(RouterKind::Random { seed: 3 });
        let layer = common::seeded_layer(&config, 2, &device);
        let x = common::upload(common::normal(t * d, 1.0, 8), [t, d], &device);
        let draw = |seed: u64| {
            let out = layer
                .try_forward_with(x.clone(), &ForwardOptions::new().with_seed(seed))
                .unwrap();
            common::host_int(out.routing.expert_ids)
        };
        let (a, b, c) = (draw(1), draw(1), draw(2));
        assert_eq!(a, b, "{name}: same seed, same draw");
        assert_ne!(a, c, "{name}: another seed, another draw");
        let mut load = vec![0usize; e];
        for row in a.chunks(k) {
            assert_ne!(row[0], row[1], "{name}: distinct experts");
            row.iter().for_each(|&j| load[j as usize] += 1);
        }
        // 600 uniform draws over 6 experts: 100 each, far outside ±40 would be a broken draw.
        assert!(
            load.iter().all(|&c| (60..=140).contains(&c)),
            "{name}: {load:?}"
        );
    }
}

#[test]
fn temperature_flattens_or_sharpens_the_weights() {
    let (t, d, e) = (6, 8, 4);
    for (name, device) in common::devices() {
        let config = MoeLayerConfig::olmoe(d, 4, e, e);
        let layer = common::seeded_layer(&config, 1, &device);
        let x = common::upload(common::normal(t * d, 1.0, 2), [t, d], &device);
        let spread = |temperature: f64| {
            let out = layer
                .try_forward_with(
                    x.clone(),
                    &ForwardOptions::new().with_temperature(temperature),
                )
                .unwrap();
            let w = common::host(out.routing.weights);
            w.chunks(e).map(|r| r[0] - r[e - 1]).fold(0.0f32, f32::max)
        };
        let (hot, normal, cold) = (spread(1e4), spread(1.0), spread(0.05));
        assert!(
            hot < 1e-3,
            "{name}: at a high temperature the weights are uniform ({hot})"
        );
        assert!(
            hot < normal && normal < cold,
            "{name}: {hot} < {normal} < {cold}"
        );
        assert!(
            cold > 0.9,
            "{name}: at a low temperature one expert takes all ({cold})"
        );
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = layer
                .try_forward_with(x.clone(), &ForwardOptions::new().with_temperature(bad))
                .unwrap_err();
            assert!(
                matches!(err, MoeError::InvalidTemperature { .. }),
                "{name}: {err}"
            );
        }
        let err = layer
            .try_forward_with(
                x.clone(),
                &ForwardOptions::new().with_capacity(Capacity::Factor(0.0)),
            )
            .unwrap_err();
        assert_eq!(err, MoeError::InvalidCapacityFactor { value: 0.0 });
    }
}

/// `(E Σ_e f_e P_e, mean_t lse(logits_t)²)` on the host from the oracle's routes.
fn host_losses(routes: &[moe_core::reference::NaiveRoute], e: usize) -> (f64, f64) {
    let t = routes.len() as f64;
    let mut count = vec![0.0; e];
    let mut prob = vec![0.0; e];
    let mut z = 0.0;
    for r in routes {
        r.experts.iter().for_each(|&j| count[j] += 1.0);
        let max = r.logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = r.logits.iter().map(|l| (l - max).exp()).sum();
        r.logits
            .iter()
            .enumerate()
            .for_each(|(j, l)| prob[j] += (l - max).exp() / total);
        z += (max + total.ln()).powi(2);
    }
    let balance = (0..e).map(|j| count[j] / t * prob[j] / t).sum::<f64>() * e as f64;
    (balance, z / t)
}

#[test]
fn balance_losses_match_their_formulas_and_gradients() {
    let (t, d, e, k) = (10, 6, 4, 2);
    let x_host = common::normal(t * d, 1.0, 12);
    for (name, device) in common::devices() {
        // Uniform scores and a perfectly even load give exactly k.
        let even = Routing {
            logits: Some(common::upload(vec![0.0; 4 * 2], [4, 2], &device)),
            scores: Some(common::upload(vec![0.5; 4 * 2], [4, 2], &device)),
            ..Routing::new(
                ids(vec![0, 1, 1, 0, 0, 1, 1, 0], [4, 2], &device),
                common::upload(vec![0.5; 8], [4, 2], &device),
                2,
            )
            .unwrap()
        };
        let lb = common::host(load_balancing_loss(&even).unwrap())[0];
        assert!(
            (lb - 2.0).abs() < 1e-6,
            "{name}: balanced loss is k, got {lb}"
        );
        // Dropping pairs does not hide load: the loss counts what the router selected.
        let capped = even.clone().with_capacity(Capacity::Tokens(1)).unwrap();
        assert_eq!(
            common::host_int(capped.expert_counts()),
            vec![1, 1],
            "{name}"
        );
        let lb_capped = common::host(load_balancing_loss(&capped).unwrap())[0];
        assert!((lb_capped - lb).abs() < 1e-6, "{name}: {lb_capped} vs {lb}");
        let z = common::host(router_z_loss(&even).unwrap())[0];
        let want = (2.0f32.ln()).powi(2);
        assert!((z - want).abs() < 1e-6, "{name}: z-loss {z} vs {want}");
        let hand = Routing::new(
            ids(vec![0, 1], [2, 1], &device),
            common::upload(vec![1.0, 1.0], [2, 1], &device),
            2,
        )
        .unwrap();
        assert!(matches!(
            load_balancing_loss(&hand),
            Err(MoeError::MissingRoutingPart {
                field: "scores",
                ..
            })
        ));
        assert!(matches!(
            router_z_loss(&hand),
            Err(MoeError::MissingRoutingPart {
                field: "logits",
                ..
            })
        ));

        // On a real layer: values against the oracle's routes, gradients against finite
        // differences of the host formulas.
        let device = device.autodiff();
        let config = MoeLayerConfig::olmoe(d, 4, e, k);
        let layer = common::seeded_layer(&config, 13, &device);
        let out = layer
            .try_forward(
                common::upload(x_host.clone(), [t, d], &device),
                &TopK::Configured,
            )
            .unwrap();
        let lb = load_balancing_loss(&out.routing).unwrap();
        let z = router_z_loss(&out.routing).unwrap();
        let (lb_v, z_v) = (
            common::host(lb.clone())[0] as f64,
            common::host(z.clone())[0] as f64,
        );
        let naive_loss = |layer: &MoeLayer| {
            let oracle = NaiveMoe::from_layer(layer);
            let (_, routes) = oracle.forward(&x_host, &vec![k; t]);
            assert!(routes.iter().all(|r| r.margin > 1e-3), "{name}: near-tie");
            host_losses(&routes, e)
        };
        let (lb_want, z_want) = naive_loss(&layer);
        assert!(
            (lb_v - lb_want).abs() < 1e-5,
            "{name}: balance {lb_v} vs {lb_want}"
        );
        assert!((z_v - z_want).abs() < 1e-5, "{name}: z {z_v} vs {z_want}");

        let grads = (lb + z.mul_scalar(0.1)).backward();
        let grad = common::host(layer.router.weight.grad(&grads).expect("router gradient"));
        let w = common::host(layer.router.weight.val());
        for index in [0, 3, 7, 13, 22] {
            let eps = 1e-3f32;
            let at = |delta: f32| {
                let mut moved = w.clone();
                moved[index] += delta;
                let mut l = common::seeded_layer(&config, 13, &device);
                l.router.weight = Param::from_tensor(common::upload(moved, [d, e], &device));
                let (a, b) = naive_loss(&l);
                a + 0.1 * b
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            let analytic = grad[index] as f64;
            assert!(
                (numeric - analytic).abs() <= 2e-3 * (1.0 + numeric.abs()),
                "{name}: d loss / d router[{index}] = {analytic}, finite differences {numeric}"
            );
        }
    }
}

/// A transformers reference file: named tensors checked against the shape the test expects.
struct Reference<'a>(safetensors::SafeTensors<'a>);

impl Reference<'_> {
    fn bytes(&self, name: &str, shape: &[usize], dtype: safetensors::Dtype) -> Vec<u8> {
        let view = self.0.tensor(name).unwrap();
        assert_eq!((view.shape(), view.dtype()), (shape, dtype), "{name}");
        view.data().to_vec()
    }

    fn read_f32(&self, name: &str, shape: &[usize]) -> Option<Vec<f32>> {
        let bytes = self.bytes(name, shape, safetensors::Dtype::F32);
        Some(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }

    fn read_i64(&self, name: &str, shape: &[usize]) -> Option<Vec<i64>> {
        let bytes = self.bytes(name, shape, safetensors::Dtype::I64);
        Some(
            bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }
}

#[test]
fn balance_losses_match_transformers() {
    use burn::tensor::activation::softmax;
    // name, layers, tokens, experts, k (scripts/fixtures/make_aux_losses.py)
    let cases = [
        ("one_layer_e8_k2", 1, 37, 8, 2),
        ("two_layers_e16_k4", 2, 50, 16, 4),
        ("one_layer_e4_k1", 1, 9, 4, 1),
    ];
    for (file, layers, t, e, k) in cases {
        let bytes = std::fs::read(common::data(&format!("aux-losses/{file}.safetensors"))).unwrap();
        let source = Reference(safetensors::SafeTensors::deserialize(&bytes).unwrap());
        for (name, device) in common::devices() {
            let mut routings = Vec::new();
            for layer in 0..layers {
                let logits = common::upload(
                    source
                        .read_f32(&format!("logits_{layer}"), &[t, e])
                        .unwrap(),
                    [t, e],
                    &device,
                );
                let top = source
                    .read_i64(&format!("topk_idx_{layer}"), &[t, k])
                    .unwrap();
                let ids = ids(top, [t, k], &device);
                let scores = softmax(logits.clone(), 1);
                let weights = scores.clone().gather(1, ids.clone());
                let routing = Routing {
                    logits: Some(logits),
                    scores: Some(scores),
                    ..Routing::new(ids, weights, e).unwrap()
                };
                let z = common::host(router_z_loss(&routing).unwrap())[0];
                let want = source.read_f32(&format!("z_loss_{layer}"), &[]).unwrap()[0];
                assert!(
                    (z - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{name} {file} layer {layer}: z-loss {z} vs transformers {want}"
                );
                routings.push(routing);
            }
            let balance = common::host(load_balancing_loss_layers(&routings).unwrap())[0];
            let want = source.read_f32("balance", &[]).unwrap()[0];
            assert!(
                (balance - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{name} {file}: balance loss {balance} vs transformers {want}"
            );
        }
    }
}

#[test]
fn aux_free_balancing_moves_the_bias_by_the_load() {
    let (t, d, e) = (64, 8, 4);
    for (name, device) in common::devices() {
        // One step on a hand-built load [4, 1, 1, 2] (mean 2): down, up, up, unchanged.
        let config = MoeLayerConfig::olmoe(d, 4, e, 1).with_selection_bias(true);
        let mut layer = config.init(&device).unwrap();
        let routing = Routing::new(
            ids(vec![0, 0, 0, 0, 1, 2, 3, 3], [8, 1], &device),
            common::upload(vec![1.0; 8], [8, 1], &device),
            e,
        )
        .unwrap();
        let balancer = AuxFreeBalancer::new(0.25).unwrap();
        balancer.update(&mut layer.router, &routing).unwrap();
        let bias = common::host(layer.router.selection_bias.as_ref().unwrap().val());
        assert_eq!(bias, vec![-0.25, 0.25, 0.25, 0.0], "{name}");

        // A router skewed towards expert 0: repeated updates alone even out the load.
        let mut layer = common::seeded_layer(&config, 4, &device);
        let mut w = common::host(layer.router.weight.val());
        for i in 0..d {
            w[i * e] += 0.8;
        }
        layer.router.weight = Param::from_tensor(common::upload(w, [d, e], &device));
        layer.router.selection_bias = Some(Param::from_tensor(common::upload(
            vec![0.0; e],
            [e],
            &device,
        )));
        // A fresh batch every step, as in training (a fixed batch makes the sign updates
        // oscillate between two routings).
        let balancer = AuxFreeBalancer::new(0.005).unwrap();
        let mut cvs = Vec::new();
        for step in 0..300 {
            let x: Vec<f32> = common::normal(t * d, 1.0, 100 + step)
                .iter()
                .map(|v| v.abs())
                .collect();
            let out = layer
                .try_forward(common::upload(x, [t, d], &device), &TopK::Configured)
                .unwrap();
            cvs.push(load_cv(&expert_load(&out.routing)));
            balancer.update(&mut layer.router, &out.routing).unwrap();
        }
        let start = cvs[0];
        let end = cvs[cvs.len() - 50..].iter().sum::<f64>() / 50.0;
        assert!(
            start > 0.8,
            "{name}: the skewed router starts imbalanced (CV {start})"
        );
        assert!(
            end < 0.3 * start,
            "{name}: load CV {start} → {end} (mean of the last 50 steps)"
        );

        // A router without a selection bias is refused.
        let mut plain = MoeLayerConfig::olmoe(d, 4, e, 1).init(&device).unwrap();
        assert_eq!(
            balancer.update(&mut plain.router, &routing).unwrap_err(),
            MoeError::NoSelectionBias
        );
        assert!(AuxFreeBalancer::new(0.0).is_err());
    }
}

#[test]
fn gradients_of_every_router_kind_match_finite_differences() {
    let (t, d, e) = (10, 8, 4);
    let x_host = common::normal(t * d, 1.0, 41);
    let probe = common::normal(t * d, 1.0, 42);
    let ids_host: Vec<u64> = (0..t as u64).map(|i| i * 3 + 1).collect();
    for (name, device) in common::devices() {
        let device = device.autodiff();
        for strategy in [DispatchStrategy::Auto, DispatchStrategy::TensorOps] {
            for (kind, config) in router_cases(d, e) {
                let label = format!("{name} {strategy:?} {kind}");
                let layer = common::seeded_layer(&config, 43, &device).with_dispatch(strategy);
                let capacity = Capacity::Factor(1.0);
                let options = ForwardOptions::new()
                    .with_temperature(0.8)
                    .with_capacity(capacity)
                    .with_token_ids(token_ids(&ids_host, &device))
                    .with_seed(2);
                let mut naive = NaiveOptions::new(vec![2; t]);
                naive.temperature = 0.8;
                naive.capacity = Some(capacity);
                naive.token_ids = Some(ids_host.clone());
                naive.seed = 2;

                let x = common::upload(x_host.clone(), [t, d], &device).require_grad();
                let out = layer.try_forward_with(x.clone(), &options).unwrap();
                let grads = (out.hidden * common::upload(probe.clone(), [t, d], &device))
                    .sum()
                    .backward();
                let dx = common::host(x.grad(&grads).unwrap());
                let dw = layer.router.weight.grad(&grads).map(common::host);
                let dgate = layer
                    .shared
                    .as_ref()
                    .and_then(|s| s.gate.as_ref())
                    .and_then(|g| g.grad(&grads))
                    .map(common::host);

                let loss = |layer: &MoeLayer, x: &[f64]| -> f64 {
                    let (out, routes) = NaiveMoe::from_layer(layer).forward_options(x, &naive);
                    assert!(routes.iter().all(|r| r.margin > 1e-3), "{label}: near-tie");
                    out.iter().zip(&probe).map(|(o, p)| o * *p as f64).sum()
                };
                let check = |what: &str, analytic: f64, numeric: f64| {
                    assert!(
                        (numeric - analytic).abs() <= 2e-3 * (1.0 + numeric.abs()),
                        "{label}: d loss / d {what} = {analytic}, finite differences {numeric}"
                    );
                };
                let eps = 1e-4;
                let x64: Vec<f64> = x_host.iter().map(|&v| v as f64).collect();
                for index in [0, 9, 30, 47, 63, 79] {
                    let (mut plus, mut minus) = (x64.clone(), x64.clone());
                    plus[index] += eps;
                    minus[index] -= eps;
                    let numeric = (loss(&layer, &plus) - loss(&layer, &minus)) / (2.0 * eps);
                    check(&format!("x[{index}]"), dx[index] as f64, numeric);
                }
                // The router weight (through the routing weights; hash and random weights are
                // constants, so their router gets no gradient).
                let w = common::host(layer.router.weight.val());
                let trained_router = matches!(
                    config.router_kind,
                    RouterKind::TokenChoice | RouterKind::ExpertChoice { .. }
                );
                match (&dw, trained_router) {
                    (Some(dw), true) => {
                        for index in [1, 6, 17, 30] {
                            let moved = |delta: f32| {
                                let mut w = w.clone();
                                w[index] += delta;
                                let mut l = common::seeded_layer(&config, 43, &device);
                                l.router.weight =
                                    Param::from_tensor(common::upload(w, [d, e], &device));
                                loss(&l, &x64)
                            };
                            let h = 1e-3f32;
                            let numeric = (moved(h) - moved(-h)) / (2.0 * h as f64);
                            check(&format!("router[{index}]"), dw[index] as f64, numeric);
                        }
                    }
                    (Some(dw), false) => assert!(
                        dw.iter().all(|&g| g == 0.0),
                        "{label}: constant weights give the router no gradient"
                    ),
                    (None, true) => panic!("{label}: no gradient reached the router"),
                    (None, false) => {}
                }
                if let Some(dgate) = dgate {
                    let gate =
                        common::host(layer.shared.as_ref().unwrap().gate.as_ref().unwrap().val());
                    for index in [0, 5] {
                        let moved = |delta: f32| {
                            let mut g = gate.clone();
                            g[index] += delta;
                            let mut l = common::seeded_layer(&config, 43, &device);
                            let shared = l.shared.take().unwrap();
                            l.shared = Some(
                                moe_core::SharedExpert::from_parts(
                                    shared.ffn,
                                    Some(common::upload(g, [d, 1], &device)),
                                )
                                .unwrap(),
                            );
                            loss(&l, &x64)
                        };
                        let h = 1e-3f32;
                        let numeric = (moved(h) - moved(-h)) / (2.0 * h as f64);
                        check(
                            &format!("shared gate[{index}]"),
                            dgate[index] as f64,
                            numeric,
                        );
                    }
                }
            }
        }
    }
}
