"""Time to first token with and without a warm 512-token prefix (a long system prompt) in the engine's prefix cache.

One model (hidden 1024: 4 layers, 16 heads, MLA ranks 384/256, 8 routed experts of 512, attention gate, random
weights, 1024 positions, 56M parameters), one 512-token prefix, and requests made of that prefix plus 16 new tokens
(a different suffix each round). At hidden 128 a 16-token forward is mostly per-operator overhead and the reduction
measured ~65 %; a wider model is closer to what a prefix cache is for. Variants, interleaved by the harness:

- cold: an engine whose prefix cache holds nothing (a 1-byte budget) prefills all 528 tokens;
- warm: an engine whose `warm_up([prefix])` ran once before the rounds prefills only the 16 new tokens on top of the
  cached latent states.

Time to first token is the request's `first_token_s` (submission to first token; nothing else is queued). The
headline is the warm TTFT's reduction, `1 - warm / cold` (medians), target >= 0.80. The first 8 generated tokens of
every request are checked to be the same in both variants.

Then a shared-system-prompt trace, for throughput: `--trace-requests` requests submitted together, of which
`--shared-fraction` are a 512-token system prompt plus 16 tokens of their own and the rest 528 tokens of their own,
shuffled, each generating `--new-tokens` tokens, with the engine's defaults (16 rows, a 4,096-token budget, chunked
prefill). Automatic prefix caching (the default engine: no warm-up; the first requests with the system prompt fill
the cache as they are prefilled) against the same engine with no prefix cache (a 1-byte budget). Each repetition
builds the engines afresh, the variant that goes first rotating; generated tokens per second (medians over
`--trace-repeats`), target >= 2x. Both engines decode absorbed (the default, `EngineConfig.absorbed_decoding`); a
third variant, the prefix-cached engine decoding on the expanded latent (`absorbed_decoding=False`), shows what
absorbed decoding adds. Every request's tokens are checked to be the same in every variant.

    python benchmarks/bench_prefix_cache.py              # a few minutes on 2 CPU cores (one torch thread)
    python benchmarks/bench_prefix_cache.py --device cuda
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from _harness import MIN_CPU_UTILIZATION, kept_rounds, machine_info, source_info, time_variants

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.serving import Engine, EngineConfig

VARIANTS = ("cold", "warm")
PREFIX_TOKENS, SUFFIX_TOKENS, CHECKED_TOKENS = 512, 16, 8
TARGET_REDUCTION = 0.80
TARGET_TRACE_SPEEDUP = 2.0
MODEL_KWARGS = {
    "vocab_size": 512,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 256,
    "q_lora_rank": 384,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "max_position_embeddings": 1024,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "use_attention_gate": True,
}
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_prefix_cache.json"


def trace_prompts(prefix: list[int], args, vocab_size: int) -> list[list[int]]:
    """The trace's prompts: `--shared-fraction` of them the system prompt plus 16 tokens, the rest their own 528."""
    rng = random.Random(2)
    shared = round(args.trace_requests * args.shared_fraction)
    kinds = [True] * shared + [False] * (args.trace_requests - shared)
    rng.shuffle(kinds)
    prompts = []
    for is_shared in kinds:
        head = prefix if is_shared else [1] + [rng.randrange(5, vocab_size) for _ in range(PREFIX_TOKENS - 1)]
        prompts.append(head + [rng.randrange(5, vocab_size) for _ in range(SUFFIX_TOKENS)])
    return prompts


def run_trace(model, prefix: list[int], args) -> dict:
    """Tokens/s of the trace with automatic prefix caching and without, `--trace-repeats` times each, interleaved."""
    prompts = trace_prompts(prefix, args, model.config.vocab_size)
    configs = {
        "no_prefix_cache": EngineConfig(prefix_cache_bytes=1),
        "automatic_prefix_cache": EngineConfig(),
        "automatic_prefix_cache_expanded_decoding": EngineConfig(absorbed_decoding=False),
    }
    runs = {name: [] for name in configs}
    answers = {}
    for repeat in range(args.trace_repeats):
        order = list(configs)[repeat % len(configs) :] + list(configs)[: repeat % len(configs)]
        for name in order:
            engine = Engine(model, configs[name])
            cpu_start, start = time.process_time(), time.perf_counter()
            handles = [engine.submit(prompt, max_new_tokens=args.new_tokens) for prompt in prompts]
            engine.run_until_idle()
            seconds = time.perf_counter() - start
            results = [handle.result() for handle in handles]
            tokens = sum(len(result.token_ids) for result in results)
            answers.setdefault(name, [result.token_ids for result in results])
            runs[name].append(
                {
                    "seconds": seconds,
                    "cpu_utilization": (time.process_time() - cpu_start) / seconds / torch.get_num_threads(),
                    "generated_tokens": tokens,
                    "tokens_per_s": tokens / seconds,
                    "ttft_p50_s": statistics.median(result.first_token_s for result in results),
                    "requests_with_cached_prefix": sum(result.cached_prefix_length > 1 for result in results),
                    "cached_prompt_tokens": sum(result.cached_prefix_length for result in results),
                    "prefill_forwards": engine.stats["prefill_calls"],
                    "decode_steps": engine.stats["decode_steps"],
                    "mean_decode_rows": engine.stats["decoded_rows"] / engine.stats["decode_steps"],
                    "peak_cache_positions": engine.stats["peak_cache_positions"],
                }
            )
            print(f"  trace {repeat + 1}, {name}: {seconds:.1f} s, {tokens / seconds:.1f} tokens/s")
    if any(answers[name] != answers["no_prefix_cache"] for name in configs):
        raise RuntimeError("the trace answered differently with the prefix cache or with expanded decoding")
    median = {name: statistics.median(run["tokens_per_s"] for run in runs[name]) for name in configs}
    speedup = median["automatic_prefix_cache"] / median["no_prefix_cache"]
    absorbed = median["automatic_prefix_cache"] / median["automatic_prefix_cache_expanded_decoding"]
    print(f"shared-prompt trace: {speedup:.2f}x the tokens/s with automatic prefix caching (target 2x)")
    print(f"absorbed decoding: {absorbed:.2f}x the tokens/s of expanded decoding, both with the prefix cache")
    return {
        "requests": args.trace_requests,
        "shared_fraction": args.shared_fraction,
        "prompt_tokens": PREFIX_TOKENS + SUFFIX_TOKENS,
        "new_tokens": args.new_tokens,
        "engine_config": "defaults (no_prefix_cache: prefix_cache_bytes=1; expanded: absorbed_decoding=False)",
        "runs": runs,
        "median_tokens_per_s": median,
        "speedup": speedup,
        "absorbed_decoding_speedup": absorbed,
        "outputs_equal": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=9, help="clean rounds wanted (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop adding rounds after this many seconds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on CPU (default: %(default)s; see the docstring)"
    )
    parser.add_argument("--trace-requests", type=int, default=48, help="requests of the trace (default: %(default)s)")
    parser.add_argument(
        "--shared-fraction", type=float, default=0.8, help="share with the system prompt (default: %(default)s)"
    )
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens each trace request generates")
    parser.add_argument("--trace-repeats", type=int, default=3, help="repetitions of the trace per variant")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = DeepseekV3MultimodalConfig(**MODEL_KWARGS)
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval().to(args.device)
    rng = random.Random(0)
    prefix = [1] + [rng.randrange(5, config.vocab_size) for _ in range(PREFIX_TOKENS - 1)]
    # the cold engine keeps no prefix (a 1-byte budget holds no position): every prompt is cached automatically
    # otherwise, and its later rounds would hit the prefix of the earlier ones
    engines = {"cold": Engine(model, EngineConfig(prefix_cache_bytes=1)), "warm": Engine(model)}
    warm_up_start = time.perf_counter()
    cache_bytes = engines["warm"].warm_up([prefix])
    warm_up_seconds = time.perf_counter() - warm_up_start

    suffixes = {name: random.Random(1) for name in VARIANTS}  # the same suffix sequence for both variants
    ttft = {name: [] for name in VARIANTS}
    answers = {name: [] for name in VARIANTS}

    def make_step(name):
        def step() -> float:
            suffix = [suffixes[name].randrange(5, config.vocab_size) for _ in range(SUFFIX_TOKENS)]
            handle = engines[name].submit(prefix + suffix, max_new_tokens=CHECKED_TOKENS)
            engines[name].run_until_idle()
            result = handle.result()
            ttft[name].append(result.first_token_s)
            answers[name].append(result.token_ids)
            return result.first_token_s

        return step

    rounds, _ = time_variants(
        {name: make_step(name) for name in VARIANTS}, VARIANTS, args.repeats, args.budget_s, args.device, started
    )
    if answers["cold"] != answers["warm"]:
        raise RuntimeError("a prefix-cache hit answered differently from a miss")
    if engines["warm"].prefix_cache.hits != len(answers["warm"]):
        raise RuntimeError("not every warm request hit the prefix cache")
    kept = kept_rounds(rounds)
    kept_index = [index for index, r in enumerate(rounds) if any(r is k for k in kept)]
    medians = {name: statistics.median(ttft[name][1:][index] for index in kept_index) for name in VARIANTS}
    reduction = 1 - medians["warm"] / medians["cold"]

    print(f"\n{'variant':8} {'TTFT ms':>8}")
    for name in VARIANTS:
        print(f"{name:8} {1000 * medians[name]:>8.1f}")
    print(
        f"warm TTFT reduction: {reduction:.1%} (target {TARGET_REDUCTION:.0%}); warm-up took {warm_up_seconds:.2f} s"
    )
    trace = run_trace(model, prefix, args)
    if not all(r["clean"] for r in kept):
        print(f"WARNING: {sum(r['clean'] for r in rounds)} of {len(rounds)} rounds ran uncontended; figures use all")
    result = {
        "benchmark": "bench_prefix_cache",
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_prefix_cache.py", *sys.argv[1:]]),
        "machine": machine_info(args.device),
        "source": source_info(),
        "model": MODEL_KWARGS,
        "prefix_tokens": PREFIX_TOKENS,
        "suffix_tokens": SUFFIX_TOKENS,
        "prefix_cache_bytes": cache_bytes,
        "warm_up_seconds": warm_up_seconds,
        "rounds_run": len(rounds),
        "rounds_kept": len(kept),
        "only_clean_rounds_kept": all(r["clean"] for r in kept),
        "min_cpu_utilization": MIN_CPU_UTILIZATION,
        "rounds": rounds,
        "median_ttft_s": medians,
        "outputs_equal": True,
        "trace": trace,
        "wall_time_s": time.perf_counter() - started,
        "headline": [
            {
                "name": "warm_ttft_reduction",
                "value": round(reduction, 4),
                "target": TARGET_REDUCTION,
                "higher_is_better": True,
            },
            {
                "name": "shared_prompt_trace_speedup",
                "value": round(trace["speedup"], 4),
                "target": TARGET_TRACE_SPEEDUP,
                "higher_is_better": True,
            },
        ],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output} ({result['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
