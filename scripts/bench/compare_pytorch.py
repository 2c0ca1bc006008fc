#!/usr/bin/env python3
"""Times one MoE layer in transformers' PyTorch block and in `moe bench`, side by side.

For each preset and token count, this script builds the transformers sparse-MoE block of the
same shape (random weights), times it on the CPU with `--threads` threads (fresh random inputs
per call, one warm-up call, median of `--runs` calls), then runs `moe bench --json` on the same
case in the same process run, and prints both medians and the ratio PyTorch / moe (above 1:
moe is faster).

Setup (its own virtualenv, not the fixture one):

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch transformers==4.57.6
    cargo build --release --bin moe
    .venv-bench/bin/python scripts/bench/compare_pytorch.py --moe target/release/moe

Options: --presets olmoe-1b-7b,mixtral-8x7b-scaled,qwen3-30b-a3b --tokens 1,16,128,512,2048
--threads 2 --runs 7 --dtype f32|bf16 (both sides) --torch-dtype f32|bf16 (PyTorch's side only)
--json (one JSON line per case). Per-stage figures come from `cargo bench --bench dispatch`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Layer shapes of `moe bench`'s presets: (architecture, hidden, intermediate, experts, k).
PRESETS = {
    "olmoe-1b-7b": ("olmoe", 2048, 1024, 64, 8),
    "mixtral-8x7b-scaled": ("mixtral", 1024, 3584, 8, 2),
    "qwen3-30b-a3b": ("qwen3_moe", 2048, 768, 128, 8),
}


def torch_block(arch, hidden, inter, experts, k):
    """The transformers block of this shape with its default (random) initialisation."""
    if arch == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

        cfg = OlmoeConfig(hidden_size=hidden, intermediate_size=inter, num_experts=experts,
                          num_experts_per_tok=k, norm_topk_prob=False)
        return OlmoeSparseMoeBlock(cfg)
    if arch == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter,
                            num_local_experts=experts, num_experts_per_tok=k)
        return MixtralSparseMoeBlock(cfg)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter,
                             num_experts=experts, num_experts_per_tok=k, norm_topk_prob=True)
        return Qwen3MoeSparseMoeBlock(cfg)
    raise ValueError(arch)


def time_torch(preset, tokens, runs, dtype):
    import torch

    arch, hidden, inter, experts, k = PRESETS[preset]
    torch.manual_seed(0)
    block = torch_block(arch, hidden, inter, experts, k).eval().to(dtype)
    # Weights of a trained scale (the default init of some blocks is all zeros for the router).
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    times = []
    with torch.inference_mode():
        for call in range(runs + 1):
            x = torch.randn(1, tokens, hidden, dtype=dtype)
            start = time.perf_counter()
            out = block(x)
            out = out[0] if isinstance(out, tuple) else out
            float(out.float().sum())
            if call > 0:  # the first call warms up
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_moe(moe, preset, tokens, runs, dtype, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [moe, "--dtype", dtype, "bench", "--preset", preset, "--tokens", str(tokens),
           "--runs", str(runs), "--json"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", default="target/release/moe", help="the moe binary")
    parser.add_argument("--presets", default="olmoe-1b-7b")
    parser.add_argument("--tokens", default="1,16,128,512,2048")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--torch-dtype", choices=["f32", "bf16"],
                        help="PyTorch's dtype (default: --dtype), e.g. moe bf16 against PyTorch f32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch_name = args.torch_dtype or args.dtype
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[torch_name]
    if not args.json:
        print(f"threads {args.threads}, {args.runs} timed calls per case, medians in ms, "
              f"pytorch {torch_name}, moe {args.dtype}")
        print(f"{'preset':<22}{'T':>6}{'pytorch':>12}{'moe':>12}{'pytorch/moe':>14}")
    for preset in args.presets.split(","):
        if preset not in PRESETS:
            sys.exit(f"unknown preset {preset}; known: {', '.join(PRESETS)}")
        for tokens in (int(t) for t in args.tokens.split(",")):
            torch_ms = time_torch(preset, tokens, args.runs, torch_dtype)
            ours = time_moe(args.moe, preset, tokens, args.runs, args.dtype, args.threads)
            ratio = torch_ms / ours["median_ms"]
            if args.json:
                print(json.dumps({"preset": preset, "tokens": tokens, "threads": args.threads,
                                  "dtype": args.dtype, "torch_dtype": torch_name,
                                  "pytorch_ms": round(torch_ms, 3),
                                  "moe_ms": ours["median_ms"], "pytorch_over_moe": round(ratio, 3),
                                  "moe_backend": ours["backend"]}), flush=True)
            else:
                print(f"{preset:<22}{tokens:>6}{torch_ms:>12.2f}{ours['median_ms']:>12.2f}"
                      f"{ratio:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
