"""The head gate's cost per decoding step against context length: a fixed-size state in the cache, not a pass over it.

Command (from the repository root):

    .venv/bin/python benchmarks/bench_gate_state.py               # CPU, random weights: nothing to train
    .venv/bin/python benchmarks/bench_gate_state.py --threads 1   # when another job holds one of 2 cores

One decoding step (batch 1, one new token, greedy, no grad) of `_harness.TRAINING_STEP_MODEL_KWARGS`'s model (MLA,
MoE, head gates; 4 layers, `kv_lora_rank` 64) on a static cache already holding 512, 8k or 32k positions (random
latents and keys written into the cache: a 32k prefill would take longer than the whole benchmark), three variants
interleaved (`_harness` rounds, contended rounds rerun):

- `gate_off`: the same model and attention code with the head gates removed;
- `gate_state`: the gate reads and updates the running sum and count its cache layer keeps
  (`DeepseekV3MultimodalGateStateMixin`);
- `gate_recompute`: the gate sums the cached latent again at every step (a cache layer class without the state: the
  fallback, one weighted pass over `T x kv_lora_rank` per layer and step);
- `gate_previous`: the gate as it was before the state (commit 14b97e4): its running mean by `cat` and `cumsum` over
  the whole cached latent at every step (`causal_running_sums` on the cache).

Figures: the median step time of each variant, and the gate's own time inside the step (`_gate`, every layer, timed
around the call): its growth from 512 to 32k and its share of the step. MLA's attention itself re-expands the whole
cached latent at every step (`kv_b_proj`, `T x kv_lora_rank x heads x 64`), so even an O(T) gate is a small share of
a long-context step; the gate's own time is what shows whether its cost depends on T.

Writes `benchmarks/results/bench_gate_state.json` (machine, versions, git commit, every figure, `headline`).
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from _harness import (
    TRAINING_STEP_MODEL_KWARGS,
    benchmark_record,
    headline_entries,
    kept_rounds,
    synchronize,
    time_variants,
    write_results,
)
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.attention_deepseekv3 import DeepseekV3MultimodalAttention

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "benchmarks" / "results" / "bench_gate_state.json"
VARIANTS = ("gate_off", "gate_state", "gate_recompute", "gate_previous")
# the gate's own time at the longest context over the shortest: a constant cost stays near 1 (timing noise aside)
GATE_GROWTH_TARGET = 1.5


class _PlainStaticLayer(StaticLayer):
    """A static cache layer the gate does not adopt: no state, the cached latent is summed again at every step."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="512,8192,32768", help="cached positions before the timed step")
    parser.add_argument("--repeats", type=int, default=15, help="clean timed rounds per context")
    parser.add_argument("--budget-s", type=float, default=60.0, help="time budget of one context's rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's); 1 on a CPU another job shares"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    return parser.parse_args()


def build_models(max_position: int, device: str) -> dict[str, torch.nn.Module]:
    """The gated model and a copy of it whose attention layers have no head gate (same weights otherwise)."""
    torch.manual_seed(0)
    config = DeepseekV3MultimodalConfig(**{**TRAINING_STEP_MODEL_KWARGS, "max_position_embeddings": max_position})
    gated = DeepseekV3MultimodalForConditionalGeneration(config).to(device).eval()
    for name, param in gated.named_parameters():
        if "head_gate.up_proj" in name:
            torch.nn.init.normal_(param, std=2.0)  # gates that depend on the input, as after training
    ungated = copy.deepcopy(gated)
    for module in ungated.modules():
        if isinstance(module, DeepseekV3MultimodalAttention):
            module.head_gate = None
    return {"gate_off": ungated, "gate_state": gated, "gate_recompute": gated, "gate_previous": gated}


def filled_cache(model, variant: str, context: int, max_cache_len: int, device: str) -> StaticCache:
    """A static cache holding `context` positions of random (unit-scale) latents and rotary keys."""
    cache = StaticCache(model.config, max_cache_len)
    if variant in ("gate_recompute", "gate_previous"):
        cache.layers = [_PlainStaticLayer(max_cache_len) for _ in cache.layers]
    config = model.config
    generator = torch.Generator(device=device).manual_seed(context)
    for layer in cache.layers:
        layer.lazy_initialization(
            torch.zeros(1, 1, 0, config.kv_lora_rank, device=device),
            torch.zeros(1, 1, 0, config.qk_rope_head_dim, device=device),
        )
        for tensor in (layer.keys, layer.values):
            tensor[:, :, :context] = torch.randn(tensor[:, :, :context].shape, generator=generator, device=device)
        layer.cumulative_length.fill_(context)
    return cache


def previous_gate(attention, latent, cached_latent, cache, positions, padding_mask, segment_ids, key_mask):
    """`DeepseekV3MultimodalAttention._gate` as the gate ran before its state (commit 14b97e4, `forward`): the head
    gate on the whole cached latent, its running mean by `cumsum` over every cached position at every step."""
    return attention.head_gate(cached_latent[:, 0], padding_mask, latent.shape[1], segment_ids, key_mask)


def measure_context(models: dict, context: int, args, timing: dict, max_steps: int) -> dict:
    """Interleaved rounds of one decoding step per variant on caches holding `context` positions; the medians of
    the step time and of the gate's time inside it (`timing`: the variant running, and the timed `_gate` calls)."""
    caches = {name: filled_cache(models[name], name, context, context + max_steps, args.device) for name in VARIANTS}
    gate_times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    token = torch.tensor([[100]], device=args.device)

    def step(name: str) -> float:
        timing["variant"], timing["seconds"] = name, []
        with torch.no_grad():
            logits = models[name](input_ids=token, cache=caches[name], use_cache=True).logits
        gate_times[name].append(sum(timing["seconds"]))
        return float(logits[0, -1].float().norm())

    steps = {name: (lambda name=name: step(name)) for name in VARIANTS}
    rounds, _ = time_variants(steps, VARIANTS, args.repeats, args.budget_s, args.device, time.perf_counter())
    kept = kept_rounds(rounds)
    kept_index = [index for index, r in enumerate(rounds) if r in kept]
    figures = {}
    for name in VARIANTS:
        step_s = statistics.median(r["times"][name] for r in kept)
        # gate_times[name][0] is the warm-up step (gate_state computes its state there, once)
        gate_s = statistics.median(gate_times[name][1 + index] for index in kept_index)
        figures[name] = {
            "step_median_ms": step_s * 1000,
            "step_ratio_to_gate_off": step_s / statistics.median(r["times"]["gate_off"] for r in kept),
            "gate_median_ms": gate_s * 1000,
            "gate_share_of_step": gate_s / step_s,
            "step_samples_ms": [r["times"][name] * 1000 for r in kept],
        }
    layer = caches["gate_state"].layers[0]
    figures["gate_state_bytes_per_layer"] = sum(
        t.numel() * t.element_size() for t in (layer.gate_sum, layer.gate_count)
    )
    figures["latent_cache_bytes_per_layer"] = context * layer.keys.shape[-1] * layer.keys.element_size()
    figures["rounds_run"], figures["rounds_kept"] = len(rounds), len(kept)
    figures["only_clean_rounds_kept"] = all(r["clean"] for r in kept)
    return figures


def print_table(results: dict, device: str) -> None:
    print(f"\nDecoding step, batch 1, {device}; medians of interleaved rounds (gate ms: `_gate`, all layers)")
    print(f"{'context':>8} {'variant':<15} {'step ms':>9} {'x off':>6} {'gate ms':>8} {'gate share':>10}")
    for context, figures in results.items():
        for name in VARIANTS:
            row = figures[name]
            print(
                f"{context:>8} {name:<15} {row['step_median_ms']:>9.1f} {row['step_ratio_to_gate_off']:>6.3f} "
                f"{row['gate_median_ms']:>8.3f} {row['gate_share_of_step']:>10.4f}"
            )


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    contexts = [int(length) for length in args.contexts.split(",")]
    max_steps = 3 * args.repeats + 2  # the warm-up and every round `time_variants` may run
    models = build_models(max(contexts) + max_steps + 8, args.device)

    timing = {"variant": None, "seconds": []}
    gate = DeepseekV3MultimodalAttention._gate

    def timed_gate(self, *gate_args):
        synchronize(args.device)
        start = time.perf_counter()
        out = (previous_gate if timing["variant"] == "gate_previous" else gate)(self, *gate_args)
        synchronize(args.device)
        timing["seconds"].append(time.perf_counter() - start)
        return out

    DeepseekV3MultimodalAttention._gate = timed_gate
    results = {}
    for context in contexts:
        print(f"Context {context}: one decoding step per variant and round")
        results[str(context)] = measure_context(models, context, args, timing, max_steps)
    DeepseekV3MultimodalAttention._gate = gate

    print_table(results, args.device)
    short, long = str(min(contexts)), str(max(contexts))
    growth = {
        name: results[long][name]["gate_median_ms"] / results[short][name]["gate_median_ms"] for name in VARIANTS[1:]
    }
    shares = [results[context]["gate_state"]["gate_share_of_step"] for context in (long, short)]
    share_growth = shares[0] / shares[1]
    print(f"gate time {long} / {short}: " + ", ".join(f"{name} {value:.2f}" for name, value in growth.items()))
    print(f"gate share of the step {long} / {short} (state): {share_growth:.3f}")
    if not all(figures["only_clean_rounds_kept"] for figures in results.values()):
        print("WARNING: some contexts kept contended rounds (fewer than 5 clean ones)")

    result = benchmark_record(__file__, args.device)
    result.update(
        {
            "note": (
                "CPU shared with other jobs (2 cores): contended rounds (CPU utilisation < 80%) are rerun; absolute "
                "times are noisy, compare variants within a context. The cache is filled with random latents."
            ),
            "model": TRAINING_STEP_MODEL_KWARGS,
            "contexts": results,
            "gate_time_growth": growth,
            "gate_state_share_growth": share_growth,
            "headline": headline_entries(
                [
                    (f"gate_state_gate_time_{long}_over_{short}", growth["gate_state"], GATE_GROWTH_TARGET, False),
                    (f"gate_state_share_of_step_{long}_over_{short}", share_growth, 1.0, False),
                    (
                        f"gate_state_step_time_over_gate_off_at_{long}",
                        results[long]["gate_state"]["step_ratio_to_gate_off"],
                        None,
                        False,
                    ),
                    (f"gate_previous_gate_time_{long}_over_{short}", growth["gate_previous"], None, False),
                    (
                        f"gate_previous_gate_time_over_gate_state_at_{long}",
                        results[long]["gate_previous"]["gate_median_ms"]
                        / results[long]["gate_state"]["gate_median_ms"],
                        None,
                        True,
                    ),
                ]
            ),
        }
    )
    write_results(result, args.output, started)


if __name__ == "__main__":
    main()
