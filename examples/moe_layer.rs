//! Build a Mixture-of-Experts layer, run it at several k without rebuilding it, and check it
//! against the naive per-token oracle.
//!
//! ```text
//! cargo run --example moe_layer                     # flex (CPU)
//! cargo run --example moe_layer --features wgpu -- --backend wgpu
//! ```

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use moe::backend::Backend;
use moe::reference::NaiveMoe;
use moe::{MoeLayerConfig, TopK};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend = match args.iter().position(|a| a == "--backend") {
        Some(i) => args.get(i + 1).ok_or("--backend needs a name")?.parse()?,
        None => Backend::default(),
    };
    let device = backend.device();

    // An OLMoE-style layer: 16 experts of d_ff 256, top-4 by default, softmax routing.
    let (batch, seq, d_model) = (4, 64, 256);
    let config = MoeLayerConfig::olmoe(d_model, 256, 16, 4);
    device.seed(0);
    let layer = config.init(&device)?;
    let x = Tensor::<3>::random(
        [batch, seq, d_model],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    println!(
        "backend {backend}: MoE layer d_model {d_model}, {} experts, default k {}, input [{batch}, {seq}, {d_model}]",
        config.num_experts, config.top_k
    );

    // The same layer at every k (MoE-PHDS): nothing is rebuilt or reloaded.
    for k in [1, 2, 4, 8, 16] {
        let start = Instant::now();
        let out = layer.try_forward(x.clone(), &TopK::Fixed(k))?;
        let counts: Vec<i64> = out
            .routing
            .expert_counts()
            .into_data()
            .iter::<i64>()
            .collect();
        let rms = out
            .hidden
            .powf_scalar(2.0)
            .mean()
            .sqrt()
            .into_scalar::<f32>();
        println!(
            "k = {k:2}: {:7.1} ms, output rms {rms:.4}, tokens per expert {counts:?}",
            start.elapsed().as_secs_f64() * 1e3
        );
    }

    // One sequence gets 1 expert per token, the others 2, 4 and 8, in one call.
    let out = layer.try_forward(x.clone(), &TopK::PerSequence(vec![1, 2, 4, 8]))?;
    println!(
        "per-sequence k [1, 2, 4, 8]: {} routed rows",
        out.routing.expert_counts().sum().into_scalar::<i64>()
    );

    // Check the layer against the dumb oracle on the first sequence.
    let first: Tensor<2> = x.narrow(0, 0, 1).reshape([seq, d_model]);
    let host: Vec<f32> = first.clone().into_data().iter::<f32>().collect();
    let (want, _) = NaiveMoe::from_layer(&layer).forward(&host, &vec![config.top_k; seq]);
    let got: Vec<f32> = layer.forward(first).into_data().iter::<f32>().collect();
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("max |layer - oracle| over {seq} tokens: {err:.2e}");
    if err > 1e-4 {
        return Err(format!("layer and oracle disagree by {err:e}").into());
    }
    Ok(())
}
