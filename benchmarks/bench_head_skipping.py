"""Gated head skipping on the trained demo model: attention compute and time saved, and how close the output stays.

Command (from the repository root):

    .venv/bin/python benchmarks/bench_head_skipping.py            # CPU; trains and caches the demo model on first run
    .venv/bin/python benchmarks/bench_head_skipping.py --retrain  # train the cached models again

The model is the demo model trained with the gate-sparsity penalty (`_efficiency_models`, shared with
`bench_int8.py`: the first run of either trains it, 15 minutes on 2 busy CPU cores; later runs take a few minutes).

At `--skip-lengths` tokens (4k and 16k): one row made of test conversations (text, images and audio) back to back,
sdpa attention. A reference pass records every head's largest gate over the row; the thresholds sit between
consecutive sorted maxima so that 3, 5 and 6 of the 12 heads (25%, 41.7% >= 37%, 50%) are skipped. For each:
attention FLOPs (`FlopCounterMode`, the `self_attn` modules), interleaved forward times (the `_harness` rounds;
attention time from hooks around the `self_attn` modules), and the cosine similarity of the final hidden states to
the unskipped model (per token; mean and minimum).

Writes `benchmarks/results/bench_head_skipping.json` (machine, versions, every figure, `headline`).
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _efficiency_models import add_training_arguments, check_training_arguments, encoded_test_split, load_models
from _harness import benchmark_record, headline_entries, median_times, write_results
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_head_skipping.json"
SKIP_FRACTIONS = {"skip_25": 3, "skip_37": 5, "skip_50": 6}  # heads skipped of 12

# torch's FLOP counter knows the CUDA sdpa kernels but not the CPU flash kernel that sdpa runs here; count it the way
# torch counts every sdpa kernel (the whole query x key rectangle: the causal half is not subtracted)
register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(sdpa_flop)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_arguments(parser)
    parser.add_argument("--skip-lengths", default="4096,16384")
    parser.add_argument("--repeats", type=int, default=5, help="clean timed rounds per comparison")
    parser.add_argument("--budget-s", type=float, default=60.0, help="time budget of one comparison's rounds")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()
    check_training_arguments(parser, args)
    return args


def long_row(examples: list[dict], length: int) -> dict[str, torch.Tensor]:
    """Test conversations back to back in one row of at most `length` tokens, with their images and clips."""
    chosen, total = [], 0
    for example in examples * (1 + length // sum(len(e["input_ids"]) for e in examples)):
        if total + len(example["input_ids"]) > length:
            break
        chosen.append(example)
        total += len(example["input_ids"])
    batch = {
        "input_ids": torch.cat([e["input_ids"] for e in chosen])[None],
        "mm_token_type_ids": torch.cat([e["mm_token_type_ids"] for e in chosen])[None],
        "pixel_values": torch.cat([e["pixel_values"] for e in chosen if "pixel_values" in e]),
    }
    clips = [e for e in chosen if "input_features" in e]
    frames = max(e["input_features"].shape[-1] for e in clips)
    batch["input_features"] = torch.cat(
        [F.pad(e["input_features"], (0, frames - e["input_features"].shape[-1])) for e in clips]
    )
    batch["input_features_mask"] = torch.cat(
        [F.pad(e["input_features_mask"], (0, frames - e["input_features_mask"].shape[-1])) for e in clips]
    )
    return batch


def attention_flops(model, batch) -> tuple[int, torch.Tensor, list[torch.Tensor] | None]:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        outputs = model.model(**batch, use_cache=False, output_gate_values=True)
    per_module = counter.get_flop_counts()
    flops = sum(sum(ops.values()) for name, ops in per_module.items() if name.endswith("self_attn"))
    return flops, outputs.last_hidden_state[0], outputs.gate_values


def skip_thresholds(gate_values: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Thresholds between consecutive sorted per-head gate maxima: each skips exactly its number of heads."""
    maxima = torch.stack([layer[0].amax(dim=0) for layer in gate_values]).flatten().sort().values
    return {name: float((maxima[count - 1] + maxima[count]) / 2) for name, count in SKIP_FRACTIONS.items()}


def capture_attention_inputs(model, batch) -> list[tuple]:
    """Each `self_attn` module with the arguments it got in one forward pass (to time attention alone)."""
    captured, handles = [], []
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            hook = module.register_forward_pre_hook(
                lambda m, args, kwargs: captured.append((m, args, kwargs)), with_kwargs=True
            )
            handles.append(hook)
    with torch.no_grad():
        model.model(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


def bench_head_skipping(model, examples, length: int, args) -> dict:
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, length)
    batch = long_row(examples, length)
    tokens = batch["input_ids"].shape[1]
    num_heads = model.config.num_attention_heads
    model.set_head_skip_threshold(0.0)
    full_flops, reference, gate_values = attention_flops(model, batch)
    thresholds = skip_thresholds(gate_values)
    figures = {"tokens": tokens, "all_heads": {"attention_flops": full_flops, "threshold": 0.0}}
    for name, threshold in thresholds.items():
        model.set_head_skip_threshold(threshold)
        flops, hidden, _ = attention_flops(model, batch)
        cosine = F.cosine_similarity(hidden.float(), reference.float(), dim=-1)
        skipped = model.get_skipped_heads()
        figures[name] = {
            "threshold": threshold,
            "skipped_heads": skipped,
            "heads_skipped_fraction": sum(map(len, skipped.values())) / (len(skipped) * num_heads),
            "attention_flops": flops,
            "attention_compute_saved": 1 - flops / full_flops,
            "cosine_mean": float(cosine.mean()),
            "cosine_min": float(cosine.min()),
        }

    # attention time: every layer's attention on the inputs it got in the unskipped forward pass
    model.set_head_skip_threshold(0.0)
    attention_calls = capture_attention_inputs(model, batch)

    def make_step(name):
        def step() -> float:
            model.set_head_skip_threshold(figures[name]["threshold"])
            with torch.no_grad():
                for module, call_args, call_kwargs in attention_calls:
                    module(*call_args, **call_kwargs)
            return 0.0

        return step

    variants = ("all_heads", *thresholds)
    repeats = args.repeats if tokens <= 8192 else min(args.repeats, 2)
    print(f"  head skipping at {tokens} tokens: timing the attention of {', '.join(variants)} ({repeats} rounds)")
    steps = {name: make_step(name) for name in variants}
    medians, kept = median_times(steps, variants, repeats, args.budget_s, "cpu")
    for name in variants:
        figures[name]["attention_ms"] = medians[name] * 1000
    for name in thresholds:
        figures[name]["attention_time_ratio"] = figures[name]["attention_ms"] / figures["all_heads"]["attention_ms"]
    figures["rounds_kept"] = len(kept)
    figures["only_clean_rounds_kept"] = all(r["clean"] for r in kept)
    model.set_head_skip_threshold(0.0)
    return figures


def print_table(head_skipping: dict) -> None:
    for figures in head_skipping.values():
        print(f"\nHead skipping, {figures['tokens']} tokens (sdpa, CPU; medians of {figures['rounds_kept']} rounds)")
        print(
            f"{'variant':<10} {'skipped':>7} {'attn GFLOP':>10} {'saved':>6} {'attn ms':>8} {'time x':>6} "
            f"{'cos mean':>8} {'cos min':>8}"
        )
        for name in ("all_heads", *SKIP_FRACTIONS):
            row = figures[name]
            print(
                f"{name:<10} {row.get('heads_skipped_fraction', 0):>7.1%} {row['attention_flops'] / 1e9:>10.2f} "
                f"{row.get('attention_compute_saved', 0):>6.1%} {row['attention_ms']:>8.0f} "
                f"{row.get('attention_time_ratio', 1):>6.3f} "
                f"{row.get('cosine_mean', 1):>8.4f} {row.get('cosine_min', 1):>8.4f}"
            )


def headline(head_skipping: dict) -> list[dict]:
    longest = head_skipping[max(head_skipping, key=int)]["skip_37"]
    return headline_entries(
        [
            ("attention_compute_saved_skip_37_longest", longest["attention_compute_saved"], 0.37, True),
            ("final_hidden_cosine_skip_37_longest", longest["cosine_mean"], 0.98, True),
        ]
    )


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    result = benchmark_record(__file__, "cpu")
    models, processor, training = load_models(args, ("fp32",))
    model = models["fp32"]
    result.update(training)
    examples = encoded_test_split(processor, args, model.config.patch_size)
    result["head_skipping"] = {
        str(length): bench_head_skipping(model, examples, length, args)
        for length in (int(length) for length in args.skip_lengths.split(","))
    }
    result["headline"] = headline(result["head_skipping"])
    print_table(result["head_skipping"])
    write_results(result, args.output, started)


if __name__ == "__main__":
    main()
