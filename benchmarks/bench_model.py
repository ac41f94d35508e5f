"""Training-step time and peak memory: transformers' DeepSeek-V3 against ours (gate off, gate on, gate on + media).

Command (from the repository root; no argument runs in under 5 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/bench_model.py                 # CPU, batch 2 x 512 tokens
    .venv/bin/python benchmarks/bench_model.py --full          # the issue's size, batch 8 x 512 tokens (slow on CPU)
    .venv/bin/python benchmarks/bench_model.py --full --device cuda

Variants, all at hidden 512, 4 layers (1 dense + 3 MoE), 16 routed experts (4 per token), vocabulary 8192, the
same attention backend (`--attn sdpa` by default), float32, `torch.manual_seed(0)`:

1. `transformers`: transformers' `DeepseekV3ForCausalLM`.
2. `gate_off`: ours with every new feature off, loaded from (1)'s state dict with `strict=True`, which proves the
   state-dict keys are the same; the first-step losses must match (1) within 1e-4.
3. `gate_on`: ours with the dynamic head gate, (1)'s weights loaded (`strict=False`, only `head_gate.*` missing).
4. `gate_on_media`: (3) plus an image (`--image-size`, 16-pixel patches: 64 tokens) and an audio clip
   (`--audio-frames`, 4 frames a token: 64 tokens) in every row, with modality-type embeddings.

The MoE experts run as each class resolves them (`--experts auto`, the `experts` column: what a user gets), or as
the per-expert loop in all four (`--experts eager`), which isolates our code from that choice.

A step is forward + backward (labels = input_ids, the causal-LM loss) + `AdamW.step()` + `zero_grad`. Time: one
process holds the four models; after one warm-up step each (which also allocates the AdamW state), the variants run
round-robin, the starting variant rotating every round, until `--repeats` rounds are clean or `--budget-s` seconds
have passed (never fewer than 5 rounds). On CPU a round is clean when every step kept the torch threads at least
80% busy (process CPU time / wall time / threads): when another process takes a core, an OpenMP thread waits at each
barrier for its descheduled peer and a step runs up to 10x slower at about 1/threads utilization. The figures use
the clean rounds if there are 5, else every round (with a warning). The table gives the median, the interquartile
range, min-max, the ratio of medians against (1) (the headline) and the median of the per-round ratios (`paired`);
the JSON keeps every round, contended ones included.

Peak memory is measured per variant in a fresh subprocess that builds only that variant (the transformers source
model is deleted before measuring), so the models never share an address space; the four workers run at once, with
one torch thread each (the figures are per process, and this bounds the wall time on a busy machine):

- CPU: `tracemalloc` cannot see torch's allocations, and the process max RSS is polluted by freed memory that glibc
  keeps. The worker therefore runs with `MALLOC_MMAP_THRESHOLD_=65536` (fixed, which also turns off glibc's dynamic
  threshold), so every tensor over 64 KiB is its own mmap and returns to the OS when freed: RSS then follows live
  tensor memory. It runs one step (allocating the AdamW state), frees the gradients, resets the kernel's RSS
  high-water mark (`/proc/self/clear_refs` = 5), runs a second step and reads `VmHWM` from `/proc/self/status`.
  `peak_mb` = high-water mark minus the RSS before the model existed (weights, gradients, AdamW state,
  activations); `step_peak_mb` = high-water mark minus the RSS just before the second step (what one step adds).
- CUDA: the same two steps with `torch.cuda.reset_peak_memory_stats()` and `torch.cuda.max_memory_allocated()`.

Targets (the issue): gate off <= 1.05x transformers' step time, gate on <= 1.15x. `--profile` also prints, over
three steps each of (1) and (3) under `torch.profiler`, the operators whose self time grows most from (1) to (3).

Writes `benchmarks/results/bench_model.json` (machine, versions, sizes, every figure, `headline`).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _harness import (
    MEMORY_WORKER_ENV,
    MIN_CPU_UTILIZATION,
    benchmark_record,
    kept_rounds,
    memory_baseline,
    synchronize,
    time_variants,
    two_step_memory,
)
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration

VARIANTS = ("transformers", "gate_off", "gate_on", "gate_on_media")
TARGETS = {"gate_off": 1.05, "gate_on": 1.15}
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_model.json"

TEXT_KWARGS = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 4,
    "q_lora_rank": 256,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "max_position_embeddings": 4096,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
IMAGE_TOKEN_ID = 3
AUDIO_TOKEN_ID = 4
FIRST_TEXT_TOKEN_ID = 5
# Gate-on models differ from transformers only by the gates, gate-on-media also by these modules.
GATE_KEY = ".head_gate."
MEDIA_KEYS = (
    "image_patch_embedding.",
    "image_position_embedding.",
    "audio_frame_embedding.",
    "modality_type_embedding.",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the issue's size: batch 8 x 512 tokens")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention backend (all variants)")
    parser.add_argument("--batch-size", type=int, help="default: 2, or 8 with --full")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds after the warm-up (at least 5)")
    parser.add_argument(
        "--budget-s", type=float, default=120.0, help="start no timed round after this many seconds (5 rounds run)"
    )
    parser.add_argument(
        "--experts",
        default="auto",
        choices=["auto", "eager"],
        help="MoE experts implementation: each class's own default (auto), or the per-expert loop for all",
    )
    parser.add_argument("--image-size", type=int, default=128, help="pixels; 16-pixel patches")
    parser.add_argument("--audio-frames", type=int, default=256, help="log-mel frames; 4 frames per token")
    parser.add_argument("--profile", action="store_true", help="also profile one step of transformers vs gate on")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    parser.add_argument("--memory-worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 8 if args.full else 2
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    return args


def build_configs(args: argparse.Namespace) -> dict[str, DeepseekV3Config]:
    """The four variants' configs: same text fields, same attention backend."""
    backends = {"attn_implementation": args.attn}
    if args.experts != "auto":
        backends["experts_implementation"] = args.experts
    text = DeepseekV3Config(**TEXT_KWARGS, **backends)
    gate = {"use_attention_gate": True}
    media = {
        "use_image_input": True,
        "image_size": args.image_size,
        "patch_size": 16,
        "num_channels": 3,
        "image_token_id": IMAGE_TOKEN_ID,
        "use_audio_input": True,
        "num_mel_bins": 80,
        "audio_conv_stride": 4,
        "audio_max_frames": args.audio_frames,
        "audio_token_id": AUDIO_TOKEN_ID,
        "num_modality_types": 3,
    }
    ours = {
        "gate_off": {},
        "gate_on": gate,
        "gate_on_media": {**gate, **media},
    }
    configs = {"transformers": text}
    for name, extra in ours.items():
        configs[name] = DeepseekV3MultimodalConfig(**TEXT_KWARGS, **extra, **backends)
    return configs


def build_model(name: str, configs: dict[str, DeepseekV3Config], reference: DeepseekV3ForCausalLM) -> torch.nn.Module:
    """Variant `name` holding `reference`'s weights; checks that only the new modules' keys are missing."""
    if name == "transformers":
        return reference
    model = DeepseekV3MultimodalForConditionalGeneration(configs[name])
    if name == "gate_off":
        model.load_state_dict(reference.state_dict(), strict=True)
        return model
    result = model.load_state_dict(reference.state_dict(), strict=False)
    new_keys = (GATE_KEY,) + (MEDIA_KEYS if name == "gate_on_media" else ())
    unexplained = [key for key in result.missing_keys if not any(part in key for part in new_keys)]
    if result.unexpected_keys or unexplained:
        raise RuntimeError(f"{name}: unexpected keys {result.unexpected_keys}, missing keys {unexplained}")
    return model


def make_batch(config: DeepseekV3Config, args: argparse.Namespace, media: bool, device: str) -> dict:
    """Random text; with `media`, one image span and one audio span per row (labels = input_ids)."""
    generator = torch.Generator().manual_seed(1)
    shape = (args.batch_size, args.seq_len)
    input_ids = torch.randint(FIRST_TEXT_TOKEN_ID, config.vocab_size, shape, generator=generator)
    input_ids[:, 0] = config.bos_token_id
    batch = {}
    if media:
        image_tokens = config.num_image_tokens
        audio_tokens = config.get_num_audio_tokens(args.audio_frames)
        if 1 + image_tokens + 1 + audio_tokens + 1 > args.seq_len:
            raise ValueError(f"--seq-len {args.seq_len} is too short for {image_tokens} + {audio_tokens} media tokens")
        audio_start = args.seq_len // 2
        input_ids[:, 1 : 1 + image_tokens] = IMAGE_TOKEN_ID
        input_ids[:, audio_start : audio_start + audio_tokens] = AUDIO_TOKEN_ID
        image_shape = (args.batch_size, config.num_channels, config.image_size, config.image_size)
        batch["pixel_values"] = torch.randn(image_shape, generator=generator)
        audio_shape = (args.batch_size, config.num_mel_bins, args.audio_frames)
        batch["input_features"] = torch.randn(audio_shape, generator=generator)
    batch["input_ids"] = input_ids
    batch["labels"] = input_ids.clone()
    return {key: value.to(device) for key, value in batch.items()}


def make_step(model: torch.nn.Module, batch: dict) -> Callable[[], float]:
    """A closure running one training step; returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build_all(args: argparse.Namespace) -> tuple[dict[str, Callable[[], float]], dict[str, dict]]:
    """One training-step closure per variant, and what each model resolved to (backends, parameter count)."""
    configs = build_configs(args)
    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM(configs["transformers"])
    steps, info = {}, {}
    for name in VARIANTS:
        model = build_model(name, configs, reference).to(args.device)
        info[name] = {
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "attn_implementation": model.config._attn_implementation,
            "experts_implementation": model.config._experts_implementation,
        }
        batch = make_batch(configs[name], args, name == "gate_on_media", args.device)
        steps[name] = make_step(model, batch)
    return steps, info


def memory_worker(args: argparse.Namespace) -> None:
    """Runs in a fresh process: builds one variant, two steps, prints its memory figures as one JSON line."""
    name = args.memory_worker
    configs = build_configs(args)
    batch = make_batch(configs[name], args, name == "gate_on_media", args.device)
    base = memory_baseline(args.device)
    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM(configs["transformers"])
    model = build_model(name, configs, reference).to(args.device)
    del reference
    step = make_step(model, batch)
    print(json.dumps(two_step_memory(step, args.device, base)))


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    """One worker process per variant, all at once: each measures its own address space (or CUDA allocator), and
    one torch thread each keeps four workers on two cores clear of OpenMP barrier stalls."""
    workers = {}
    for name in VARIANTS:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", name, "--device", args.device]
        command += ["--attn", args.attn, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        command += ["--image-size", str(args.image_size), "--audio-frames", str(args.audio_frames)]
        command += ["--experts", args.experts]
        env = {**os.environ, **MEMORY_WORKER_ENV, "OMP_NUM_THREADS": "1"}
        workers[name] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = {}
    for name, worker in workers.items():
        stdout, stderr = worker.communicate()
        if worker.returncode != 0:
            raise RuntimeError(f"memory worker for {name} failed:\n{stderr}")
        memory[name] = json.loads(stdout.strip().splitlines()[-1])
    return memory


def profile_gate(
    steps: dict[str, Callable[[], float]], args: argparse.Namespace, num_steps: int = 3, top: int = 15
) -> list[dict]:
    """Self time and calls per operator and step, over `num_steps` steps of transformers and of gate_on; the
    operators whose time grows most first. Counts are exact; times are as noisy as the machine."""
    use_cuda = args.device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if use_cuda else [])
    per_step = {}
    for name in ("transformers", "gate_on"):
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(num_steps):
                steps[name]()
            synchronize(args.device)
        per_step[name] = {
            event.key: (
                (event.self_device_time_total if use_cuda else event.self_cpu_time_total) / 1000 / num_steps,
                event.count / num_steps,
            )
            for event in profiler.key_averages()
        }
    rows = []
    for op in set(per_step["transformers"]) | set(per_step["gate_on"]):
        (base_ms, base_calls), (gated_ms, gated_calls) = (per_step[n].get(op, (0.0, 0)) for n in per_step)
        rows.append(
            {
                "op": op,
                "transformers_ms": base_ms,
                "gate_on_ms": gated_ms,
                "delta_ms": gated_ms - base_ms,
                "transformers_calls": base_calls,
                "gate_on_calls": gated_calls,
            }
        )
    rows.sort(key=lambda row: row["delta_ms"], reverse=True)
    kind = "device" if use_cuda else "CPU"
    print(f"\nProfile: self {kind} time and calls per operator and step (mean of {num_steps} steps)")
    print(f"{'operator':<44} {'transformers ms':>15} {'gate on ms':>10} {'delta ms':>8} {'calls':>11}")
    for row in rows[:top]:
        calls = f"{row['transformers_calls']:.0f}->{row['gate_on_calls']:.0f}"
        print(
            f"{row['op'][:44]:<44} {row['transformers_ms']:>15.1f} {row['gate_on_ms']:>10.1f} "
            f"{row['delta_ms']:>8.1f} {calls:>11}"
        )
    return rows[:top]


def summarize(rounds: list[dict], memory: dict, info: dict) -> dict:
    times = {name: [r["times"][name] for r in rounds] for name in VARIANTS}
    reference = statistics.median(times["transformers"])
    summary = {}
    for name in VARIANTS:
        samples = times[name]
        q1, _, q3 = statistics.quantiles(samples, n=4)
        paired = [t / r for t, r in zip(samples, times["transformers"])]
        summary[name] = {
            "median_ms": statistics.median(samples) * 1000,
            "q1_ms": q1 * 1000,
            "q3_ms": q3 * 1000,
            "min_ms": min(samples) * 1000,
            "max_ms": max(samples) * 1000,
            "time_ratio": statistics.median(samples) / reference,
            "paired_time_ratio": statistics.median(paired),
            "samples_ms": [t * 1000 for t in samples],
            **info[name],
            **memory[name],
        }
    return summary


def print_table(summary: dict, args: argparse.Namespace) -> None:
    kept = len(summary["transformers"]["samples_ms"])
    size = f"batch {args.batch_size} x {args.seq_len} tokens" + ("" if args.full else " (issue size: 8 x 512, --full)")
    print(
        f"\nTraining step (forward + backward + AdamW), {size}, {args.device}, {args.attn} attention, float32, "
        f"median of {kept} interleaved rounds; ratio = median / transformers' median, paired = median of "
        "per-round ratios; peak MB = weights + grads + AdamW + activations, step MB = what one step adds"
    )
    header = f"{'variant':<14} {'experts':<11} {'median ms':>9} {'IQR ms':>11} {'min-max ms':>11} {'ratio':>6}"
    print(header + f" {'paired':>6} {'peak MB':>7} {'step MB':>7}")
    for name in VARIANTS:
        row = summary[name]
        iqr = f"{row['q1_ms']:.0f}-{row['q3_ms']:.0f}"
        span = f"{row['min_ms']:.0f}-{row['max_ms']:.0f}"
        print(
            f"{name:<14} {row['experts_implementation']:<11} {row['median_ms']:>9.0f} {iqr:>11} {span:>11} "
            f"{row['time_ratio']:>6.3f} {row['paired_time_ratio']:>6.3f} {row['peak_mb']:>7.0f} "
            f"{row['step_peak_mb']:>7.0f}"
        )
    for name, target in TARGETS.items():
        ratio = summary[name]["time_ratio"]
        print(f"{name} time ratio {ratio:.3f} (target <= {target}): {'met' if ratio <= target else 'MISSED'}")


def main() -> None:
    args = parse_args()
    if args.memory_worker:
        memory_worker(args)
        return
    started = time.perf_counter()
    print(f"Building the four variants (batch {args.batch_size} x {args.seq_len}, {args.device}, {args.attn})")
    steps, info = build_all(args)
    rounds, first_losses = time_variants(steps, VARIANTS, args.repeats, args.budget_s, args.device, started)
    kept = kept_rounds(rounds)
    loss_gap = abs(first_losses["gate_off"] - first_losses["transformers"])
    if loss_gap > 1e-4:
        raise RuntimeError(f"gate_off's first loss differs from transformers' by {loss_gap}: not the same weights")
    profile = profile_gate(steps, args) if args.profile else None
    del steps
    gc.collect()
    print("Measuring peak memory, one fresh process per variant")
    memory = measure_memory(args)
    summary = summarize(kept, memory, info)
    print_table(summary, args)
    if not all(r["clean"] for r in kept):
        clean = sum(r["clean"] for r in rounds)
        print(f"WARNING: {clean} of {len(rounds)} rounds ran uncontended (5 needed); the figures use every round")
    result = {
        **benchmark_record(__file__, args.device),
        "size": {
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "full": args.full,
            "note": "the issue's size is batch 8 x 512 (--full); the default batch 2 fits 5 minutes on 2 CPU cores",
            "image_size": args.image_size,
            "patch_size": 16,
            "audio_frames": args.audio_frames,
            "audio_conv_stride": 4,
            "model": TEXT_KWARGS,
        },
        "attn_implementation": args.attn,
        "dtype": "float32",
        "rounds_run": len(rounds),
        "rounds_kept": len(kept),
        "only_clean_rounds_kept": all(r["clean"] for r in kept),
        "min_cpu_utilization": MIN_CPU_UTILIZATION,
        "rounds": rounds,
        "experts_option": args.experts,
        "warmup_steps": 1,
        "step": "forward + backward (labels = input_ids) + AdamW(lr=1e-4).step() + zero_grad(set_to_none=True)",
        "memory_method": (
            "fresh subprocess per variant; cuda: max_memory_allocated; cpu: VmHWM with MALLOC_MMAP_THRESHOLD_=65536 "
            "and the high-water mark reset before the second step; peak_mb over the pre-model baseline, "
            "step_peak_mb over the RSS before the step"
        ),
        "first_step_loss": first_losses,
        "variants": summary,
        "profile_top_ops": profile,
        "wall_time_s": time.perf_counter() - started,
        "headline": [
            {
                "name": f"{name}_time_ratio",
                "value": round(summary[name]["time_ratio"], 4),
                "target": target,
                "higher_is_better": False,
            }
            for name, target in TARGETS.items()
        ],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output} ({result['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
