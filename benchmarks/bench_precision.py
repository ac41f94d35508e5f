"""Training-step time and peak memory: fp32 vs bf16 autocast vs fp32 with activation checkpointing (and bf16 weights).

Command (from the repository root; no argument runs in under 5 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/bench_precision.py                  # CPU, batch 2 x 512 tokens
    .venv/bin/python benchmarks/bench_precision.py --device cuda    # same sizes on a GPU

Variants, all of `DeepseekV3MultimodalForConditionalGeneration` at hidden 256, 4 layers (1 dense + 3 MoE), 16 routed
experts (4 per token), vocabulary 8192, the dynamic head gate on, sdpa attention, the same weights
(`torch.manual_seed(0)`), the same batch (labels = input_ids):

1. `fp32`: float32 weights, no autocast.
2. `bf16_autocast`: float32 weights under `torch.autocast(dtype=torch.bfloat16)`: what `TrainingArguments(bf16=True)`
   does through Accelerate.
3. `fp32_checkpointing`: (1) with `model.activation_checkpointing_enable()` (each decoder layer's activations are
   recomputed in the backward pass instead of kept).
4. `bf16_weights`: `apply_precision_policy(model, torch.bfloat16)` (bf16 weights, AdamW state and gradients; norms,
   router, head gates fp32) under bf16 autocast. Pure-bf16 AdamW loses updates smaller than a bf16 ulp of the
   weight; it is here for its memory, not as a recommendation.

A step is forward + backward + `AdamW(lr=1e-4).step()` + `zero_grad(set_to_none=True)`. Time: one process holds the
four models; after one warm-up step each, the variants run round-robin, the starting variant rotating every round,
until `--repeats` rounds are clean or `--budget-s` seconds have passed (never fewer than 5 rounds). On CPU a round
is clean when every step kept the torch threads at least 80% busy (process CPU time / wall time / threads); the
figures use the clean rounds when there are 5, else every round (with a warning). The table gives medians, the
interquartile range and the ratio of medians against `fp32`.

Peak memory, per variant in a fresh subprocess that builds only that variant (the approach and code of
`benchmarks/bench_model.py`, copied because `benchmarks/` is not a package):

- CPU: the worker runs with `MALLOC_MMAP_THRESHOLD_=65536`, so every tensor over 64 KiB is its own mmap and returns
  to the OS when freed (RSS follows live tensor memory). It runs one step (allocating the AdamW state), frees the
  gradients, resets the kernel's RSS high-water mark (`/proc/self/clear_refs` = 5), runs a second step and reads
  `VmHWM`. `peak_mb` = high-water mark minus the RSS before the model existed (weights, gradients, AdamW state,
  activations); `step_peak_mb` = high-water mark minus the RSS just before the second step (what one step adds:
  activations and transient buffers, which checkpointing targets).
- CUDA: the same two steps with `torch.cuda.reset_peak_memory_stats()` and `torch.cuda.max_memory_allocated()`.

On CPU the bf16 variants' RSS is not their tensors alone: after a bf16 step the process keeps memory that is not
returned when the tensors are freed (a probe: ~95 MB stay resident after deleting the bf16-weights model and its
optimizer, against ~0 for fp32; a bf16 matmul loop alone leaves ~19 MB), most likely oneDNN's bf16 scratch and
packed-weight buffers. `bf16_weights` therefore shows more peak RSS than `fp32` on CPU although its weights,
gradients and AdamW state are half the size; on CUDA the figure counts allocated tensors only.

Headline (ratios against `fp32`; the issue sets no targets for this benchmark, so every `target` is null): bf16
autocast step time and peak memory, checkpointing step memory and step time, bf16 weights peak memory.

Writes `benchmarks/results/bench_precision.json` (machine, versions, sizes, every round, `headline`).
"""

import argparse
import contextlib
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
from deepseekv3.training.precision import apply_precision_policy

VARIANTS = ("fp32", "bf16_autocast", "fp32_checkpointing", "bf16_weights")
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_precision.json"
# Sanity bounds on the warm-up losses (same weights, same batch): checkpointing recomputes the same fp32 numbers,
# bf16 rounds them.
CHECKPOINTING_LOSS_TOLERANCE = 1e-4
BF16_LOSS_TOLERANCE = 0.05


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
    if name == "fp32_checkpointing":
        model.activation_checkpointing_enable()
    elif name == "bf16_weights":
        apply_precision_policy(model, torch.bfloat16)
    return model.train()


def make_step(name: str, model: torch.nn.Module, batch: dict, device: str) -> Callable[[], float]:
    """A closure running one training step of variant `name`; returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    uses_autocast = name in ("bf16_autocast", "bf16_weights")

    def step() -> float:
        context = torch.autocast(device, dtype=torch.bfloat16) if uses_autocast else contextlib.nullcontext()
        with context:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def check_losses(first_losses: dict[str, float]) -> None:
    """The variants train the same weights on the same batch: their first losses must agree."""
    gaps = {
        "fp32_checkpointing": (
            CHECKPOINTING_LOSS_TOLERANCE,
            abs(first_losses["fp32_checkpointing"] - first_losses["fp32"]),
        ),
        "bf16_autocast": (BF16_LOSS_TOLERANCE, abs(first_losses["bf16_autocast"] - first_losses["fp32"])),
        "bf16_weights": (BF16_LOSS_TOLERANCE, abs(first_losses["bf16_weights"] - first_losses["fp32"])),
    }
    for name, (tolerance, gap) in gaps.items():
        if gap > tolerance:
            raise RuntimeError(f"{name}'s first loss differs from fp32's by {gap:.2e} (> {tolerance}): not comparable")


def memory_worker(args: argparse.Namespace) -> None:
    """Runs in a fresh process: builds one variant, two steps, prints its memory figures as one JSON line."""
    name = args.memory_worker
    batch = training_step_batch(args.batch_size, args.seq_len, args.device)
    base = memory_baseline(args.device)
    step = make_step(name, build_model(name, args.device), batch, args.device)
    print(json.dumps(two_step_memory(step, args.device, base)))


def headline(summary: dict) -> list[dict]:
    figures = [
        ("bf16_autocast_time_ratio", summary["bf16_autocast"]["time_ratio"]),
        ("bf16_autocast_peak_memory_ratio", summary["bf16_autocast"]["peak_memory_ratio"]),
        ("checkpointing_step_memory_ratio", summary["fp32_checkpointing"]["step_memory_ratio"]),
        ("checkpointing_time_ratio", summary["fp32_checkpointing"]["time_ratio"]),
        ("bf16_weights_peak_memory_ratio", summary["bf16_weights"]["peak_memory_ratio"]),
    ]
    return [
        {"name": name, "value": round(value, 4), "target": None, "higher_is_better": False} for name, value in figures
    ]


def main() -> None:
    args = parse_args()
    if args.memory_worker:
        memory_worker(args)
        return
    started = time.perf_counter()
    print(f"Building the variants (batch {args.batch_size} x {args.seq_len}, {args.device})")
    batch = training_step_batch(args.batch_size, args.seq_len, args.device)
    steps = {name: make_step(name, build_model(name, args.device), batch, args.device) for name in VARIANTS}
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
        reference="fp32",
        reference_label="fp32",
        model_kwargs=TRAINING_STEP_MODEL_KWARGS,
        headline=headline,
        targets_note="the issue gives no targets for this benchmark: every target is null",
        started=started,
    )


if __name__ == "__main__":
    main()
