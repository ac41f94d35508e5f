"""Measurement helpers shared by the benchmark scripts: interleaved timing and peak-memory readings.

Timing: one warm-up step per variant, then rounds that run every variant once, the starting variant rotating each
round. On CPU a round is clean when every step kept the torch threads at least `MIN_CPU_UTILIZATION` busy (process
CPU time / wall time / threads): when another process takes a core, an OpenMP thread waits at each barrier for its
descheduled peer and a step runs up to 10x slower at about 1/threads utilisation. Contended rounds are rerun.

Peak memory: measured in a fresh process per variant. On CPU `tracemalloc` cannot see torch's allocations and the
max RSS is polluted by freed memory glibc keeps, so workers run with `MALLOC_MMAP_THRESHOLD_=65536` (every tensor
over 64 KiB is its own mmap, returned to the OS when freed) and read the kernel's RSS high-water mark after resetting
it (`/proc/self/clear_refs` = 5). On CUDA: `torch.cuda.max_memory_allocated`.
"""

import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

MIN_CPU_UTILIZATION = 0.8
# two-sided 95% quantiles of Student's t by degrees of freedom (paired differences over seeds)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
MAX_ROUNDS_FACTOR = 3
# environment of a memory worker process (see the module docstring)
MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# The model both training-step benchmarks (bench_precision, bench_checkpointing) time: DeepSeek-V3's parts (MLA,
# shared and routed experts, group-limited routing, a dense first layer) at a size a CPU steps through in seconds.
TRAINING_STEP_MODEL_KWARGS = {
    "vocab_size": 8192,
    "hidden_size": 256,
    "intermediate_size": 704,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "max_position_embeddings": 4096,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "use_attention_gate": True,
    "attn_implementation": "sdpa",
}
_FIRST_TEXT_TOKEN_ID = 5


def training_step_batch(batch_size: int, seq_len: int, device: str) -> dict:
    """A fixed random text batch (BOS first, labels = inputs) for `TRAINING_STEP_MODEL_KWARGS`'s model."""
    generator = torch.Generator().manual_seed(1)
    vocab_size = TRAINING_STEP_MODEL_KWARGS["vocab_size"]
    input_ids = torch.randint(_FIRST_TEXT_TOKEN_ID, vocab_size, (batch_size, seq_len), generator=generator)
    input_ids[:, 0] = TRAINING_STEP_MODEL_KWARGS["bos_token_id"]
    return {"input_ids": input_ids.to(device), "labels": input_ids.clone().to(device)}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(
    steps: dict[str, Callable[[], float]],
    variants: tuple[str, ...],
    repeats: int,
    budget_s: float,
    device: str,
    started: float,
) -> tuple[list[dict], dict[str, float]]:
    """Warm-up step per variant (the first losses are returned), then interleaved rounds of timed steps.

    Runs until `repeats` rounds are clean, stopping early (after at least 5 rounds) once `budget_s` seconds have
    passed since `started`. Returns every round: `{"times": {variant: s}, "cpu_utilization": {variant: fraction},
    "clean": bool}`, and the warm-up losses.
    """
    first_losses = {name: steps[name]() for name in variants}
    threads = torch.get_num_threads()
    rounds = []
    while sum(r["clean"] for r in rounds) < repeats and len(rounds) < MAX_ROUNDS_FACTOR * repeats:
        if len(rounds) >= 5 and time.perf_counter() - started > budget_s:
            print(f"  time budget ({budget_s:.0f} s) spent after {len(rounds)} rounds")
            break
        shift = len(rounds) % len(variants)
        times, utilization = {}, {}
        for name in variants[shift:] + variants[:shift]:
            gc.collect()
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            synchronize(device)
            times[name] = time.perf_counter() - start
            utilization[name] = (time.process_time() - cpu_start) / times[name] / threads
        clean = device != "cpu" or min(utilization.values()) >= MIN_CPU_UTILIZATION
        rounds.append({"times": times, "cpu_utilization": utilization, "clean": clean})
        line = ", ".join(f"{n} {times[n]:.2f}s ({utilization[n]:.0%} CPU)" for n in variants)
        print(f"  round {len(rounds)}: {line}" + ("" if clean else "  [contended]"))
    return rounds, first_losses


def kept_rounds(rounds: list[dict]) -> list[dict]:
    """The clean rounds when there are at least 5, else every round (a busy machine; the JSON says so)."""
    clean = [r for r in rounds if r["clean"]]
    return clean if len(clean) >= 5 else rounds


def median_times(
    steps: dict[str, Callable[[], float]], variants: tuple[str, ...], repeats: int, budget_s: float, device: str
) -> tuple[dict[str, float], list[dict]]:
    """`time_variants` from now, then each variant's median seconds over the `kept_rounds`; returns the medians and
    the kept rounds."""
    rounds, _ = time_variants(steps, variants, repeats, budget_s, device, time.perf_counter())
    kept = kept_rounds(rounds)
    return {name: statistics.median(r["times"][name] for r in kept) for name in variants}, kept


def memory_baseline(device: str) -> int:
    """Bytes in use before the variant exists (CUDA allocator, or the process RSS)."""
    gc.collect()
    return torch.cuda.memory_allocated() if device == "cuda" else _rss_kib("VmRSS") * 1024


def two_step_memory(step: Callable[[], float], device: str, base: int) -> dict[str, float]:
    """Runs `step` twice (the first allocates the optimizer state); returns the second step's peak, in MB, above
    `base` (`peak_mb`: weights, gradients, optimizer state, activations) and above the memory before it
    (`step_peak_mb`: what one step adds)."""
    step()
    gc.collect()
    synchronize(device)
    if device == "cuda":
        ready = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        ready = _rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
    mib = 1024 * 1024
    return {"peak_mb": (peak - base) / mib, "step_peak_mb": (peak - ready) / mib}


def cpu_peak_mib(run: Callable[[], object]) -> float:
    """MiB the process's resident set reaches while `run()` runs, above the RSS before it (the kernel's high-water
    mark, reset first: run it in a memory worker, see the module docstring)."""
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    run()
    return (_rss_kib("VmHWM") - before) / 1024


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# what `source_info` checks for uncommitted changes: the whole tree but the benchmarks' outputs
TREE_PATHSPEC = (".", ":(exclude)benchmarks/results", ":(exclude)docs/*.png")


@functools.cache
def source_info() -> dict:
    """The commit measured, and whether the tree had uncommitted changes (tracked or untracked, anywhere but the
    benchmarks' outputs: `benchmarks/results/` and the plots in `docs/`), read once, when this module is first
    imported: at the start of the run, so a commit made while a benchmark runs is not taken for the code it measured.
    `benchmarks/manifest.py` checks both."""
    root = Path(__file__).resolve().parent.parent

    def git(*command: str) -> str | None:
        done = subprocess.run(["git", *command], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", *TREE_PATHSPEC)
    return {"git_commit": git("rev-parse", "HEAD"), "tree_modified": None if status is None else bool(status)}


source_info()


def mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_interval(differences: list[float]) -> dict[str, float]:
    """Mean paired difference with its 95% t-interval (half-width 0 with one seed: no interval)."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan}
    half = _T95.get(len(differences) - 1, 1.96) * statistics.stdev(differences) / math.sqrt(len(differences))
    return {"mean": mean, "low": mean - half, "high": mean + half}


def benchmark_record(script: str, device: str) -> dict:
    """The head of a results JSON: the benchmark's name, the command that ran it, the machine and the source (the
    commit, as the run started)."""
    name = Path(script).stem
    return {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name, f"benchmarks/{name}.py", *sys.argv[1:]]),
        "machine": machine_info(device),
        "source": source_info(),
    }


def headline_entries(figures: list[tuple[str, float, float | None, bool]]) -> list[dict]:
    """`(name, value, target, higher_is_better)` tuples as the results JSON's `headline` list."""
    return [
        {"name": name, "value": round(value, 4), "target": target, "higher_is_better": higher}
        for name, value, target, higher in figures
    ]


def write_results(result: dict, output: Path, started: float) -> None:
    """Adds the wall time since `started` and writes `result` to `output` as JSON."""
    result["wall_time_s"] = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {output} ({result['wall_time_s']:.0f} s)")


def measure_memory_in_worker(script: str, name: str, device: str, batch_size: int, seq_len: int) -> dict:
    """Runs `script --memory-worker NAME` in a fresh process (its allocator untouched by the other variants) and
    returns the memory figures it prints as its last line of JSON (`two_step_memory`)."""
    command = [sys.executable, str(Path(script).resolve()), "--memory-worker", name, "--device", device]
    command += ["--batch-size", str(batch_size), "--seq-len", str(seq_len)]
    done = subprocess.run(command, env={**os.environ, **MEMORY_WORKER_ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize_steps(rounds: list[dict], memory: dict, variants: tuple[str, ...], reference: str) -> dict:
    """Per variant: median, quartiles and paired ratio of the step times, with its memory figures and ratios, all
    against `reference`."""
    times = {name: [r["times"][name] for r in rounds] for name in variants}
    reference_time = statistics.median(times[reference])
    summary = {}
    for name in variants:
        samples = times[name]
        q1, _, q3 = statistics.quantiles(samples, n=4)
        summary[name] = {
            "median_ms": statistics.median(samples) * 1000,
            "q1_ms": q1 * 1000,
            "q3_ms": q3 * 1000,
            "time_ratio": statistics.median(samples) / reference_time,
            "paired_time_ratio": statistics.median(t / r for t, r in zip(samples, times[reference])),
            "samples_ms": [t * 1000 for t in samples],
            **memory[name],
            "peak_memory_ratio": memory[name]["peak_mb"] / memory[reference]["peak_mb"],
            "step_memory_ratio": memory[name]["step_peak_mb"] / memory[reference]["step_peak_mb"],
        }
    return summary


def print_step_table(summary: dict, title: str) -> None:
    """The `summarize_steps` figures as a text table under `title`."""
    print(f"\n{title}; peak MB = weights + grads + AdamW + activations, step MB = what one step adds")
    header = f"{'variant':<19} {'median ms':>9} {'IQR ms':>11} {'time x':>6} {'paired':>6}"
    print(header + f" {'peak MB':>7} {'peak x':>6} {'step MB':>7} {'step x':>6}")
    for name, row in summary.items():
        iqr = f"{row['q1_ms']:.0f}-{row['q3_ms']:.0f}"
        print(
            f"{name:<19} {row['median_ms']:>9.0f} {iqr:>11} {row['time_ratio']:>6.3f} "
            f"{row['paired_time_ratio']:>6.3f} {row['peak_mb']:>7.0f} {row['peak_memory_ratio']:>6.3f} "
            f"{row['step_peak_mb']:>7.0f} {row['step_memory_ratio']:>6.3f}"
        )


def report_step_benchmark(
    script: str,
    args,
    rounds: list[dict],
    first_losses: dict,
    variants: tuple[str, ...],
    reference: str,
    reference_label: str,
    model_kwargs: dict,
    headline: Callable[[dict], list],
    targets_note: str,
    started: float,
) -> None:
    """After the timed rounds of a training-step benchmark (`--device`, `--batch-size`, `--seq-len`, `--output`):
    memory per variant in fresh processes, the table, and the results JSON."""
    import accelerate

    kept = kept_rounds(rounds)
    print("Measuring peak memory, one fresh process per variant")
    memory = {
        name: measure_memory_in_worker(script, name, args.device, args.batch_size, args.seq_len) for name in variants
    }
    summary = summarize_steps(kept, memory, variants, reference=reference)
    print_step_table(
        summary,
        f"Training step (forward + backward + AdamW), batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.device}, median of {len(kept)} interleaved rounds; ratios against {reference_label}",
    )
    if not all(r["clean"] for r in kept):
        print(f"WARNING: fewer than 5 of {len(rounds)} rounds ran uncontended; the figures include contended rounds")
    result = {
        **benchmark_record(script, args.device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        "size": {"batch_size": args.batch_size, "seq_len": args.seq_len, "model": model_kwargs},
        "step": "forward + backward (labels = input_ids) + AdamW(lr=1e-4).step() + zero_grad(set_to_none=True)",
        "memory_method": (
            "fresh subprocess per variant; cuda: max_memory_allocated; cpu: VmHWM with MALLOC_MMAP_THRESHOLD_=65536 "
            "and the high-water mark reset before the second step; peak_mb over the pre-model baseline, "
            "step_peak_mb over the RSS before the step"
        ),
        "rounds_run": len(rounds),
        "rounds_kept": len(kept),
        "only_clean_rounds_kept": all(r["clean"] for r in kept),
        "rounds": rounds,
        "first_step_loss": first_losses,
        "variants": summary,
        "wall_time_s": time.perf_counter() - started,
        "headline": headline(summary),
        "targets_note": targets_note,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output} ({result['wall_time_s']:.0f} s)")
