"""Activation checkpointing: peak activation memory and step time without, selective and full checkpointing.

Command (from the repository root; no argument runs in under 5 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/bench_checkpointing.py                  # CPU, batch 2 x 512 tokens
    .venv/bin/python benchmarks/bench_checkpointing.py --device cuda    # same sizes on a GPU

Variants, all of `DeepseekV3MultimodalForConditionalGeneration` at hidden 256, 4 layers (1 dense + 3 MoE), 16 routed
experts (4 per token), vocabulary 8192, the dynamic head gate on, sdpa attention, fp32, the same weights
(`torch.manual_seed(0)`) and batch (labels = input_ids), checkpointing switched on through
`model.activation_checkpointing_enable(...)`, the method `TrainingArguments(activation_checkpointing=True,
activation_checkpointing_kwargs=...)` calls:

1. `none`: no checkpointing.
2. `attention_only`: `{"checkpoint_scope": "attention"}`: every layer recomputes its attention (MLA projections,
   scores, head gate) in the backward pass and keeps its MoE activations.
3. `every_2nd_layer`: `every_n_layers=2`: layers 0 and 2 are recomputed whole, layers 1 and 3 keep everything.
4. `full`: every decoder layer is recomputed whole.

A step is forward + backward + `AdamW(lr=1e-4).step()` + `zero_grad(set_to_none=True)`. Time: one process holds the
four models; after one warm-up step each (whose losses must agree: checkpointing recomputes the same numbers), the
variants run round-robin with the starting variant rotating, until `--repeats` rounds are clean (every step kept the
torch threads at least 80% busy) or `--budget-s` has passed (never fewer than 5 rounds); medians, interquartile range
and the ratio of medians against `none` (`benchmarks/_harness.py`).

Memory, per variant in a fresh subprocess (`_harness.two_step_memory`): `step_peak_mb` is what one training step adds
on top of the weights, gradients and AdamW state held before it, i.e. the activations and transient buffers that
checkpointing targets (the "peak activation memory" of the issue); `peak_mb` adds the rest. CPU: RSS high-water mark
with `MALLOC_MMAP_THRESHOLD_=65536`; CUDA: `max_memory_allocated`.

Headline: full checkpointing's activation-memory reduction (target >= 40%) and step-time increase (target <= 35%),
and the same two figures for the selective variants (no target).

Writes `benchmarks/results/bench_checkpointing.json` (machine, versions, sizes, every round, `headline`).
"""

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _harness import (
    TRAINING_STEP_MODEL_KWARGS,
    memory_baseline,
    report_step_benchmark,
    time_variants,
    training_step_batch,
    two_step_memory,
)

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration

VARIANTS = ("none", "attention_only", "every_2nd_layer", "full")
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_checkpointing.json"
CHECKPOINTING = {
    "attention_only": {"activation_checkpointing_kwargs": {"checkpoint_scope": "attention"}},
    "every_2nd_layer": {"every_n_layers": 2},
    "full": {},
}
# the warm-up losses must agree: checkpointing recomputes the same fp32 numbers
LOSS_TOLERANCE = 1e-5
MEMORY_TARGET = 0.40  # full checkpointing: at least 40% less activation memory
TIME_TARGET = 0.35  # ... for at most 35% more step time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=8, help="clean timed rounds after the warm-up (at least 5)")
    parser.add_argument(
        "--budget-s", type=float, default=120.0, help="start no timed round after this many seconds (5 rounds run)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    parser.add_argument("--memory-worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def build_model(name: str, device: str) -> DeepseekV3MultimodalForConditionalGeneration:
    """Variant `name`'s model, with the weights of `torch.manual_seed(0)`."""
    torch.manual_seed(0)
    config = DeepseekV3MultimodalConfig(**TRAINING_STEP_MODEL_KWARGS)
    model = DeepseekV3MultimodalForConditionalGeneration(config).to(device)
    if name != "none":
        model.activation_checkpointing_enable(**CHECKPOINTING[name])
    return model.train()


def make_step(model: torch.nn.Module, batch: dict) -> Callable[[], float]:
    """A closure running one training step; returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def check_losses(first_losses: dict[str, float]) -> None:
    """The variants train the same weights on the same batch: their first losses must agree."""
    for name in VARIANTS:
        gap = abs(first_losses[name] - first_losses["none"])
        if gap > LOSS_TOLERANCE:
            raise RuntimeError(f"{name}'s first loss differs from none's by {gap:.2e} (> {LOSS_TOLERANCE})")


def memory_worker(args: argparse.Namespace) -> None:
    """Runs in a fresh process: builds one variant, two steps, prints its memory figures as one JSON line."""
    name = args.memory_worker
    batch = training_step_batch(args.batch_size, args.seq_len, args.device)
    base = memory_baseline(args.device)
    step = make_step(build_model(name, args.device), batch)
    print(json.dumps(two_step_memory(step, args.device, base)))


def headline(summary: dict) -> list[dict]:
    figures = []
    for name in ("full", "every_2nd_layer", "attention_only"):
        is_full = name == "full"
        figures.append(
            {
                "name": f"{name}_activation_memory_reduction",
                "value": round(1 - summary[name]["step_memory_ratio"], 4),
                "target": MEMORY_TARGET if is_full else None,
                "higher_is_better": True,
            }
        )
        figures.append(
            {
                "name": f"{name}_step_time_increase",
                "value": round(summary[name]["time_ratio"] - 1, 4),
                "target": TIME_TARGET if is_full else None,
                "higher_is_better": False,
            }
        )
    return figures


def main() -> None:
    args = parse_args()
    if args.memory_worker:
        memory_worker(args)
        return
    started = time.perf_counter()
    print(f"Building the variants (batch {args.batch_size} x {args.seq_len}, {args.device})")
    batch = training_step_batch(args.batch_size, args.seq_len, args.device)
    steps = {name: make_step(build_model(name, args.device), batch) for name in VARIANTS}
    rounds, first_losses = time_variants(steps, VARIANTS, args.repeats, args.budget_s, args.device, started)
    check_losses(first_losses)
    del steps
    gc.collect()
    report_step_benchmark(
        __file__,
        args,
        rounds,
        first_losses,
        VARIANTS,
        reference="none",
        reference_label="no checkpointing",
        model_kwargs=TRAINING_STEP_MODEL_KWARGS,
        headline=headline,
        targets_note="full checkpointing: >= 40% less activation memory (step_peak_mb) at <= 35% more step time",
        started=started,
    )


if __name__ == "__main__":
    main()
