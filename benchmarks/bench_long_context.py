"""Long context: peak memory of one forward against context length (blockwise vs dense attention), MLA cache size.

Command (from the repository root):

    .venv/bin/python benchmarks/bench_long_context.py     # CPU, random weights: nothing to train

Peak memory of one forward (no grad) against context length, one fresh process per variant
(`MALLOC_MMAP_THRESHOLD_=65536`, the kernel's RSS high-water mark reset before each length, as `_harness` does):
dense causal sdpa, blockwise (block 512, 4 sink tokens) through flex attention and through sdpa, and dense eager, on
a 1-layer model of the demo's attention sizes. Also the MLA cache per token against a multi-head cache of the same
heads, measured from the cache tensors of the demo model (`deepseekv3.training.demo.demo_config`; untrained, as the
cache's size depends on the configuration alone) and computed for DeepSeek-V3's config, and the DeepSeek-V2 paper's
93.3% (against DeepSeek 67B) recomputed.

Writes `benchmarks/results/bench_long_context.json` (machine, versions, every figure, `headline`).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from _harness import MEMORY_WORKER_ENV, benchmark_record, cpu_peak_mib, headline_entries, write_results

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.tokenization import load_default_tokenizer
from deepseekv3.training.demo import DemoSettings, demo_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "benchmarks" / "results" / "bench_long_context.json"
OFFICIAL_CONFIG = ROOT / "tests" / "fixtures" / "deepseek-v3-config.json"
MEMORY_VARIANTS = {  # variant: (attention implementation, blockwise, longest context it runs)
    "dense_sdpa": ("sdpa", False, None),
    "blockwise_flex": ("flex_attention", True, None),
    "blockwise_sdpa": ("sdpa", True, 8192),  # its (seq, seq) boolean mask is quadratic
    "dense_eager": ("eager", False, 4096),  # materialises (heads, seq, seq) fp32 scores
}
BLOCK_SIZE, NUM_SINK_TOKENS = 512, 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory-lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    parser.add_argument("--memory-worker", choices=list(MEMORY_VARIANTS), help=argparse.SUPPRESS)
    return parser.parse_args()


def memory_model_config(variant: str, max_length: int) -> DeepseekV3MultimodalConfig:
    _, blockwise, _ = MEMORY_VARIANTS[variant]
    return DeepseekV3MultimodalConfig(
        vocab_size=384, hidden_size=96, intermediate_size=192, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=8, n_group=2, topk_group=2, num_experts_per_tok=2, moe_intermediate_size=48,
        use_attention_gate=True, attention_gate_ratio=4, max_position_embeddings=max_length,
        attention_block_size=BLOCK_SIZE if blockwise else None,
        attention_num_sink_tokens=NUM_SINK_TOKENS if blockwise else 0,
    )  # fmt: skip


def memory_worker(variant: str, lengths: list[int]) -> None:
    """Runs in a fresh process: one forward per length (a warm-up first for flex, which compiles per shape);
    prints `{length: {"forward_peak_mb", "seconds"}}` as one JSON line."""
    implementation, _, longest = MEMORY_VARIANTS[variant]
    torch.manual_seed(0)
    model = DeepseekV3MultimodalForConditionalGeneration(memory_model_config(variant, max(lengths))).eval()
    model.set_attn_implementation(implementation)
    figures = {}
    for length in lengths:
        if longest is not None and length > longest:
            continue
        input_ids = torch.randint(5, 384, (1, length))
        with torch.no_grad():
            if implementation == "flex_attention":
                model.model(input_ids=input_ids, use_cache=False)
            start = time.perf_counter()
            peak_mib = cpu_peak_mib(partial(model.model, input_ids=input_ids, use_cache=False))
            seconds = time.perf_counter() - start
        figures[length] = {"forward_peak_mb": peak_mib, "seconds": seconds}
    print(json.dumps(figures))


def bench_memory(args) -> dict:
    figures = {}
    for variant in MEMORY_VARIANTS:
        print(f"  peak memory: {variant}")
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", variant]
        command += ["--memory-lengths", args.memory_lengths]
        done = subprocess.run(
            command, env={**os.environ, **MEMORY_WORKER_ENV}, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {variant} failed:\n{done.stderr[-3000:]}")
        figures[variant] = {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    return figures


def cache_bytes_per_token(config, bytes_per_element: float = 4) -> dict:
    """MLA caches one latent (`kv_lora_rank`) and one rotary key (`qk_rope_head_dim`) per layer and token, plus the
    patch row and column with `use_image_position_values`; the equivalent multi-head cache holds every head's key
    (`qk_head_dim`) and value (`v_head_dim`)."""
    layers = config["num_hidden_layers"]
    coordinates = 2 if config.get("use_image_position_values") else 0
    mla = layers * (config["kv_lora_rank"] + config["qk_rope_head_dim"] + coordinates) * bytes_per_element
    qk_head_dim = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    mha = layers * config["num_attention_heads"] * (qk_head_dim + config["v_head_dim"]) * bytes_per_element
    return {"mla_bytes": mla, "mha_bytes": mha, "reduction": 1 - mla / mha}


def bench_cache() -> dict:
    torch.manual_seed(0)
    config = demo_config(load_default_tokenizer(), DemoSettings())
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    input_ids = torch.randint(5, config.vocab_size, (1, 64))
    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).cache
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / input_ids.shape[1]
    demo = cache_bytes_per_token(config.to_dict())
    official = json.loads(OFFICIAL_CONFIG.read_text())
    # DeepSeek-V2 paper (Table 1, section 3.2.3) against DeepSeek 67B: V2 has 60 layers of MLA with a 512 latent
    # and a 64-wide rotary key; 67B has 95 layers of GQA with 8 KV heads of 128 (DeepSeek LLM paper), cached in
    # bf16; deployed V2 quantizes its KV cache to about 6 bits per element
    v2_elements, llm67b_elements = 60 * (512 + 64), 95 * 2 * 8 * 128
    return {
        "demo_measured_bytes_per_token": measured,
        "demo": demo,
        "deepseek_v3_bf16": cache_bytes_per_token(official, bytes_per_element=2),
        "deepseek_v2_vs_67b": {
            "v2_elements": v2_elements,
            "67b_elements": llm67b_elements,
            "reduction_elements": 1 - v2_elements / llm67b_elements,
            "reduction_v2_6bit_vs_67b_bf16": 1 - (v2_elements * 6 / 8) / (llm67b_elements * 2),
            "paper": 0.933,
        },
    }


def print_table(result: dict) -> None:
    print("\nForward peak memory (MB) / time (s) against context length")
    lengths = sorted({length for figures in result["memory"].values() for length in figures})
    print(f"{'variant':<15}" + "".join(f"{length:>14}" for length in lengths))
    for variant, figures in result["memory"].items():
        cells = [
            f"{figures[length]['forward_peak_mb']:>7.0f}/{figures[length]['seconds']:>5.1f}"
            if length in figures
            else "-"
            for length in lengths
        ]
        print(f"{variant:<15}" + "".join(f"{cell:>14}" for cell in cells))
    cache = result["mla_cache"]
    demo, v3, v2 = cache["demo"], cache["deepseek_v3_bf16"], cache["deepseek_v2_vs_67b"]
    print(
        f"\nMLA cache/token: demo {demo['mla_bytes']:.0f} B (measured {cache['demo_measured_bytes_per_token']:.0f})"
        f" vs MHA {demo['mha_bytes']:.0f} B ({demo['reduction']:.1%} less); DeepSeek-V3 bf16 {v3['mla_bytes']:.0f} vs "
        f"{v3['mha_bytes']:.0f} B ({v3['reduction']:.1%} less); V2 vs 67B: {v2['reduction_elements']:.1%} in "
        f"elements, {v2['reduction_v2_6bit_vs_67b_bf16']:.1%} with the 6-bit V2 cache (paper: 93.3%)"
    )


def headline(result: dict) -> list[dict]:
    memory = result["memory"]["blockwise_flex"]
    lengths = sorted(memory)
    return headline_entries(
        [
            (
                "blockwise_flex_memory_growth_per_doubling",
                (memory[lengths[-1]]["forward_peak_mb"] / memory[lengths[-2]]["forward_peak_mb"]),
                2.0,
                False,
            ),
            ("mla_cache_reduction_deepseek_v3", result["mla_cache"]["deepseek_v3_bf16"]["reduction"], None, True),
            (
                "mla_cache_reduction_v2_vs_67b_6bit",
                result["mla_cache"]["deepseek_v2_vs_67b"]["reduction_v2_6bit_vs_67b_bf16"],
                0.933,
                True,
            ),
        ]
    )


def main() -> None:
    args = parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, [int(length) for length in args.memory_lengths.split(",")])
        return
    started = time.perf_counter()
    result = benchmark_record(__file__, "cpu")
    result["memory"] = bench_memory(args)
    result["mla_cache"] = bench_cache()
    result["headline"] = headline(result)
    print_table(result)
    write_results(result, args.output, started)


if __name__ == "__main__":
    main()
