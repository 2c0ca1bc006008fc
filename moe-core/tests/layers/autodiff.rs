//! The layer is differentiable: gradients with respect to the input and the router match
//! central finite differences of the f64 oracle.

use crate::common;

use moe_core::reference::NaiveMoe;
use moe_core::{MoeLayerConfig, TopK};

#[test]
fn input_gradient_matches_finite_differences_of_the_oracle() {
    let (t, d) = (6, 8);
    for (name, device) in common::devices() {
        let device = device.autodiff();
        let config = MoeLayerConfig::qwen2_moe(d, 12, 4, 2, 6).with_normalize_top_k(true);
        let layer = common::seeded_layer(&config, 5, &device);
        let x_host = common::normal(t * d, 1.0, 6);
        let probe = common::normal(t * d, 1.0, 7);

        let x = common::upload(x_host.clone(), [t, d], &device).require_grad();
        let r = common::upload(probe.clone(), [t, d], &device);
        let out = layer.try_forward(x.clone(), &TopK::Configured).unwrap();
        let grads = (out.hidden * r).sum().backward();
        let grad = common::host(x.grad(&grads).unwrap());
        let router_grad = layer.router.weight.grad(&grads);
        assert!(
            router_grad.is_some(),
            "{name}: no gradient reached the router"
        );

        // loss(x) = Σ out(x) ⊙ probe, differentiated numerically with the oracle.
        let naive = NaiveMoe::from_layer(&layer);
        let loss = |x: &[f32]| -> f64 {
            let (out, _) = naive.forward(x, &[2; 6]);
            out.iter()
                .zip(&probe)
                .map(|(o, p)| *o as f64 * *p as f64)
                .sum()
        };
        let eps = 1e-2f32;
        for index in [0, 5, 13, 27, 40, 47] {
            let (mut plus, mut minus) = (x_host.clone(), x_host.clone());
            plus[index] += eps;
            minus[index] -= eps;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * eps as f64);
            let analytic = grad[index] as f64;
            assert!(
                (numeric - analytic).abs() <= 2e-3 * (1.0 + numeric.abs()),
                "{name}: d loss / d x[{index}] = {analytic}, finite differences say {numeric}"
            );
        }
    }
}
