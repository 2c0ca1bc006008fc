#!/usr/bin/env python3
"""Time `moe generate` against llama.cpp's `llama-bench` on the same random-weight model.

Writes one OLMoE-shaped model with random bf16 weights twice, as sharded safetensors (for
moe) and as GGUF (for llama.cpp, through the `gguf` package), then times both engines
alternately with the same threads: prefill tokens/s at the given prompt lengths and decode
ms per token (moe: its `prefill:` / `decode:` stderr line; llama.cpp: `llama-bench -p / -n`),
and the load to first token of moe. Prints min / median / max per engine and the ratios.

Routing stays diverse: token embeddings of std 1, attention output projections of a small
std, so that the residual stream keeps the embedding's variety.

    pip install numpy gguf
    cargo build --release --bin moe
    python3 scripts/bench/compare_llamacpp.py --moe target/release/moe \
        --llama-bench PATH/llama-bench --layers 4 --threads 2 --rounds 3

`--llama-src DIR` builds llama-bench from a llama.cpp source tree (the one vendored in the
llama-cpp-python source package on PyPI) with CMake into DIR/build when --llama-bench is not
given.
"""

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = dict(hidden=2048, ffn=1024, experts=64, top_k=8, vocab=50304, heads=16)


def bf16_bits(a):
    """float32 -> bf16 bit patterns (round to nearest even), as uint16."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def tensors(layers, seed):
    """(hf_name, gguf_name, bf16 bits) of every tensor, one at a time."""
    h, f, e, v = SHAPE["hidden"], SHAPE["ffn"], SHAPE["experts"], SHAPE["vocab"]
    rng = np.random.default_rng(seed)

    def rand(shape, std):
        return bf16_bits(rng.standard_normal(shape, dtype=np.float32) * std)

    ones = bf16_bits(np.ones(h, dtype=np.float32))
    yield "model.embed_tokens.weight", "token_embd.weight", rand((v, h), 1.0)
    for layer in range(layers):
        p, g = f"model.layers.{layer}.", f"blk.{layer}."
        yield p + "input_layernorm.weight", g + "attn_norm.weight", ones
        for hf, gg in [("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v")]:
            yield p + f"self_attn.{hf}_proj.weight", g + f"{gg}.weight", rand((h, h), 0.02)
        yield p + "self_attn.o_proj.weight", g + "attn_output.weight", rand((h, h), 0.002)
        yield p + "self_attn.q_norm.weight", g + "attn_q_norm.weight", ones
        yield p + "self_attn.k_norm.weight", g + "attn_k_norm.weight", ones
        yield p + "post_attention_layernorm.weight", g + "ffn_norm.weight", ones
        yield p + "mlp.gate.weight", g + "ffn_gate_inp.weight", rand((e, h), 0.02)
        # experts: (E, out, in) stacked for GGUF, one tensor per expert for safetensors
        for part, gg, shape in [
            ("gate_proj", "ffn_gate_exps", (e, f, h)),
            ("up_proj", "ffn_up_exps", (e, f, h)),
            ("down_proj", "ffn_down_exps", (e, h, f)),
        ]:
            yield p + f"mlp.experts.*.{part}.weight", g + f"{gg}.weight", rand(shape, 0.02)
    yield "model.norm.weight", "output_norm.weight", ones
    yield "lm_head.weight", "output.weight", rand((v, h), 0.02)


def write_safetensors_shard(path, named):
    header, offset = {}, 0
    for name, bits in named:
        n = bits.nbytes
        header[name] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for _, bits in named:
            out.write(bits.tobytes())


def write_models(folder, layers, seed):
    """Sharded safetensors (one shard per layer) and one GGUF file, the same values."""
    import gguf

    folder.mkdir(parents=True, exist_ok=True)
    h, e = SHAPE["hidden"], SHAPE["experts"]
    config = {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_act": "silu",
        "hidden_size": h, "intermediate_size": SHAPE["ffn"], "num_experts": e,
        "num_experts_per_tok": SHAPE["top_k"], "num_hidden_layers": layers,
        "num_attention_heads": SHAPE["heads"], "num_key_value_heads": SHAPE["heads"],
        "vocab_size": SHAPE["vocab"], "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "norm_topk_prob": False, "clip_qkv": None, "attention_bias": False,
        "tie_word_embeddings": False, "dtype": "bfloat16", "eos_token_id": 1, "pad_token_id": 1,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))

    writer = gguf.GGUFWriter(str(folder / "model.gguf"), "olmoe")
    writer.add_context_length(4096)
    writer.add_embedding_length(h)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(SHAPE["ffn"])
    writer.add_expert_feed_forward_length(SHAPE["ffn"])
    writer.add_head_count(SHAPE["heads"])
    writer.add_head_count_kv(SHAPE["heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_count(e)
    writer.add_expert_used_count(SHAPE["top_k"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>".encode() for i in range(SHAPE["vocab"])])
    writer.add_token_scores([0.0] * SHAPE["vocab"])
    writer.add_token_types([gguf.TokenType.NORMAL] * SHAPE["vocab"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)

    index, shard, shard_no = {}, [], 0

    def flush():
        nonlocal shard, shard_no
        if shard:
            name = f"model-{shard_no:05d}.safetensors"
            write_safetensors_shard(folder / name, shard)
            for tensor, _ in shard:
                index[tensor] = name
            shard, shard_no = [], shard_no + 1

    for hf, gg, bits in tensors(layers, seed):
        if bits.ndim == 1 or gg.endswith("ffn_gate_inp.weight"):
            # llama.cpp keeps norms and the router in f32 (the same values, widened)
            writer.add_tensor(gg, (bits.astype(np.uint32) << 16).view(np.float32))
        else:
            writer.add_tensor(gg, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
        if "experts.*" in hf:
            for j in range(bits.shape[0]):
                shard.append((hf.replace("*", str(j)), np.ascontiguousarray(bits[j])))
            if hf.endswith("down_proj.weight"):
                flush()
        else:
            shard.append((hf, bits))
    flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index}, indent=1)
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_llama_bench(src):
    build = Path(src) / "build"
    subprocess.run(["cmake", "-B", str(build), "-S", str(src), "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count()), "--target", "llama-bench"],
                   check=True)
    return build / "bin" / "llama-bench"


def moe_run(moe, folder, prompt, new, threads, top_k=None):
    ids = ",".join(str(2 + (i * 7919) % (SHAPE["vocab"] - 2)) for i in range(prompt))
    cmd = [moe, "generate", "--model", str(folder), "--dtype", "bf16", "--json", "--ids", ids,
           "--max-new-tokens", str(new)]
    if top_k:
        cmd += ["--top-k", str(top_k)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - start
    line = next(l for l in out.stderr.splitlines() if l.startswith("prefill:"))
    prefill = float(re.search(r"in ([0-9.]+) s", line).group(1))
    decode = re.search(r"decode: \d+ tokens in [0-9.]+ s \(([0-9.]+) ms per token", line)
    return dict(prefill_tps=prompt / prefill, decode_ms=float(decode.group(1)) if decode else None,
                load_s=wall - float(re.search(r"new tokens in ([0-9.]+) s", out.stderr).group(1)),
                tokens=json.loads(out.stdout)["new_tokens"])


def llama_run(bench, folder, prompt, new, threads):
    out = subprocess.run([str(bench), "-m", str(folder / "model.gguf"), "-t", str(threads),
                          "-p", str(prompt), "-n", str(new), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    result = {}
    for row in rows:
        if row["n_prompt"] > 0:
            result["prefill_tps"] = row["avg_ts"]
        if row["n_gen"] > 0:
            result["decode_ms"] = 1000.0 / row["avg_ts"]
    return result


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", required=True)
    ap.add_argument("--llama-bench")
    ap.add_argument("--llama-src")
    ap.add_argument("--folder", default=str(Path.home() / ".cache" / "moe-bench"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", default="128,512")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--top-k", default="8", help="moe decode at these k too (comma-separated)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    folder = Path(args.folder) / f"olmoe-shape-{args.layers}l-seed{args.seed}"
    if not (folder / "model.gguf").exists():
        print(f"writing {folder}", file=sys.stderr)
        write_models(folder, args.layers, args.seed)
    bench = args.llama_bench or build_llama_bench(args.llama_src)
    prompts = [int(p) for p in args.prompts.split(",")]
    ks = [int(k) for k in args.top_k.split(",")]

    results = {"moe": {}, "llama.cpp": {}}
    for r in range(args.rounds):
        for engine in ["moe", "llama.cpp"]:
            for p in prompts:
                run = (moe_run(args.moe, folder, p, 1, args.threads) if engine == "moe"
                       else llama_run(bench, folder, p, 0, args.threads))
                results[engine].setdefault(f"prefill {p}", []).append(run["prefill_tps"])
                if engine == "moe":
                    results[engine].setdefault("load to first token s", []).append(run["load_s"])
            for k in (ks if engine == "moe" else [SHAPE["top_k"]]):
                run = (moe_run(args.moe, folder, 8, args.gen + 1, args.threads, k) if engine == "moe"
                       else llama_run(bench, folder, 0, args.gen, args.threads))
                results[engine].setdefault(f"decode ms, k={k}", []).append(run["decode_ms"])
        print(f"round {r + 1} done", file=sys.stderr)

    print(f"{args.layers} layers of the OLMoE-1B-7B shape, bf16, {args.threads} threads, "
          f"{args.rounds} alternated rounds (min / median / max)")
    keys = sorted({k for e in results.values() for k in e})
    for key in keys:
        ours, theirs = results["moe"].get(key, []), results["llama.cpp"].get(key, [])
        ratio = ""
        if ours and theirs:
            a, b = statistics.median(ours), statistics.median(theirs)
            better = b / a if key.startswith("decode") else a / b
            ratio = f"  moe {better:.2f}x llama.cpp"
        print(f"{key:24} moe {summary(ours):24} llama.cpp {summary(theirs):24}{ratio}")


if __name__ == "__main__":
    main()
