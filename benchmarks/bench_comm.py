"""Gradient all-reduce: bytes and time per bucket for fp32, torch's bf16 and PowerSGD hooks, and our 4-bit hook.

Command (from the repository root; no argument runs in under 5 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/bench_comm.py                       # 2 processes, gloo on 127.0.0.1
    .venv/bin/python benchmarks/bench_comm.py --sizes-mb 1 25 100 --rounds 7

Two processes (`torch.multiprocessing`, gloo over the loopback interface, one torch thread each) hold, per bucket size,
one `DistributedDataParallel` model per variant: a single fp32 matrix of `size` MB (1024 columns) with
`bucket_cap_mb` above it, so each backward produces exactly one gradient bucket of that size. The gradient is a
fixed random tensor per rank (`loss = (weight * noise).sum()`). Variants, each registered with
`register_comm_hook`:

1. `fp32`: no hook (DDP's all-reduce).
2. `bf16`: `torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook` (called through a
   one-line wrapper: DDP refuses to register that function itself without CUDA/NCCL).
3. `powersgd`: `powerSGD_hook` with `PowerSGDState(matrix_approximation_rank=4, start_powerSGD_iter=2)`, error
   feedback and warm start (torch's defaults).
4. `fourbit`: `deepseekv3.distributed.fourbit_hook` (4-bit codes, one fp32 scale per 256 values, error feedback).

Time: after two warm-up backwards per variant (PowerSGD compresses from its second), `--rounds` rounds run every
variant once, the starting variant rotating; a barrier precedes each backward and rank 0 times it. `allreduce_ms` is
the median backward minus the median backward of the same model under `no_sync()` (the same gradient, no exchange).
Bytes per rank per all-reduce: `model_bytes` counts what each scheme sends through a ring all-reduce, `2 (N-1)/N`
of the exchanged tensors (fp32 bucket, bf16 bucket, PowerSGD's P and Q factors in fp32), and, for the 4-bit hook,
the bytes it counted itself; `loopback_bytes` is the growth of the machine's `lo` tx counter during the timed
rounds per backward and rank (every process on the machine shares that counter: a sanity check, not a measure).

Toy run: the same two processes train a small MLP regression (32 -> 128 -> 8, SGD with momentum, 300 steps of 32
rows per rank) once per variant from the same initial weights; `final_loss` is the mean of the last 20 steps.

Headline (targets from the issue): the 4-bit hook's bytes against fp32 (>= 7.5x fewer), its all-reduce time
against fp32 at each bucket of at least 25 MB (< 1.0, "faster"), and its toy final loss against fp32's (within 2%).

Writes `benchmarks/results/bench_comm.json` (machine, versions, every sample, `headline`).
"""

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from _harness import machine_info
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from deepseekv3.distributed import FourBitCompressionState, fourbit_hook

VARIANTS = ("fp32", "bf16", "powersgd", "fourbit")
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_comm.json"
WORLD_SIZE = 2
COLUMNS = 1024
POWERSGD_RANK = 4
CHUNK_SIZE = 256
WARMUP_STEPS = 2
LOOPBACK_TX = Path("/sys/class/net/lo/statistics/tx_bytes")
BYTES_TARGET = 7.5
TIME_TARGET_MIN_MB = 25
LOSS_TARGET = 0.02
TOY_STEPS, TOY_BATCH = 300, 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 5, 25, 100], help="bucket sizes in MB")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per bucket size (at least 3)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    if min(args.sizes_mb) < 1:
        parser.error("--sizes-mb must be at least 1")
    return args


def _bf16_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's `bf16_compress_hook`, unchanged. DDP refuses that function itself on anything but CUDA/NCCL or
    XPU/XCCL ("BF16 all reduce communication hook required CUDA 11+ and NCCL 2.10+"); gloo reduces bf16 fine."""
    return bf16_compress_hook(state, bucket)


def register(model: DistributedDataParallel, variant: str):
    """Registers variant's hook; returns its state (None for plain DDP)."""
    if variant == "fp32":
        return None
    if variant == "bf16":
        model.register_comm_hook(None, _bf16_hook)
        return None
    if variant == "powersgd":
        state = PowerSGDState(process_group=None, matrix_approximation_rank=POWERSGD_RANK, start_powerSGD_iter=2)
        model.register_comm_hook(state, powerSGD_hook)
        return state
    state = FourBitCompressionState(chunk_size=CHUNK_SIZE)
    model.register_comm_hook(state, fourbit_hook)
    return state


def model_bytes(variant: str, rows: int, state) -> float:
    """Bytes one rank sends per all-reduce of a `(rows, COLUMNS)` fp32 bucket (ring all-reduce model)."""
    ring = 2 * (WORLD_SIZE - 1) / WORLD_SIZE
    if variant == "fp32":
        return ring * rows * COLUMNS * 4
    if variant == "bf16":
        return ring * rows * COLUMNS * 2
    if variant == "powersgd":
        return ring * (rows + COLUMNS) * POWERSGD_RANK * 4
    return state.bytes_sent / state.num_allreduces


class _Bucket(nn.Module):
    """One fp32 matrix whose gradient is `noise`: `loss = (weight * noise).sum()`."""

    def __init__(self, rows: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, COLUMNS))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return (self.weight * noise).sum()


def time_backward(model: DistributedDataParallel, noise: torch.Tensor, sync: bool) -> float:
    """Seconds of one backward through DDP (`sync=False`: under `no_sync()`, no exchange)."""
    dist.barrier()
    context = contextlib.nullcontext() if sync else model.no_sync()
    with context:
        loss = model(noise)
        start = time.perf_counter()
        loss.backward()
        elapsed = time.perf_counter() - start
    model.module.weight.grad = None
    return elapsed


def sweep_size(size_mb: int, rounds: int, rank: int) -> dict:
    rows = size_mb * 2**20 // (4 * COLUMNS)
    generator = torch.Generator().manual_seed(rank)
    noise = torch.randn(rows, COLUMNS, generator=generator)
    models, states = {}, {}
    for variant in VARIANTS:
        models[variant] = DistributedDataParallel(_Bucket(rows), bucket_cap_mb=size_mb + 1)
        states[variant] = register(models[variant], variant)
    for variant in VARIANTS:
        for _ in range(WARMUP_STEPS):
            time_backward(models[variant], noise, sync=True)
        time_backward(models[variant], noise, sync=False)
    if states["fourbit"] is not None:
        states["fourbit"].bytes_sent = states["fourbit"].num_allreduces = 0
    samples = {variant: [] for variant in VARIANTS}
    local = {variant: [] for variant in VARIANTS}
    loopback = {variant: 0 for variant in VARIANTS}
    for round_index in range(rounds):
        shift = round_index % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            local[variant].append(time_backward(models[variant], noise, sync=False))
            before = int(LOOPBACK_TX.read_text())
            samples[variant].append(time_backward(models[variant], noise, sync=True))
            loopback[variant] += int(LOOPBACK_TX.read_text()) - before
    result = {}
    for variant in VARIANTS:
        backward_ms = statistics.median(samples[variant]) * 1000
        local_ms = statistics.median(local[variant]) * 1000
        result[variant] = {
            "backward_ms": backward_ms,
            "no_sync_backward_ms": local_ms,
            "allreduce_ms": backward_ms - local_ms,
            "model_bytes": model_bytes(variant, rows, states[variant]),
            "loopback_bytes": loopback[variant] / rounds / WORLD_SIZE,
            "samples_ms": [t * 1000 for t in samples[variant]],
            "no_sync_samples_ms": [t * 1000 for t in local[variant]],
        }
    del models, states
    return result


def toy_run(variant: str, rank: int) -> float:
    generator = torch.Generator().manual_seed(7)
    true_weight = torch.randn(32, 8, generator=generator)
    features = torch.randn(TOY_STEPS, WORLD_SIZE * TOY_BATCH, 32, generator=generator)
    targets = torch.tanh(features @ true_weight) + 0.3 * torch.randn(features.shape[:2] + (8,), generator=generator)
    features = features[:, rank * TOY_BATCH : (rank + 1) * TOY_BATCH]
    targets = targets[:, rank * TOY_BATCH : (rank + 1) * TOY_BATCH]
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 8)))
    register(model, variant)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(TOY_STEPS):
        loss = nn.functional.mse_loss(model(features[step]), targets[step])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        losses.append(summed.item() / WORLD_SIZE)
    return statistics.fmean(losses[-20:])


def worker(rank: int, port: int, args: argparse.Namespace, output: Path) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    sizes = {}
    for size_mb in args.sizes_mb:
        sizes[str(size_mb)] = sweep_size(size_mb, args.rounds, rank)
        if rank == 0:
            line = ", ".join(f"{v} {sizes[str(size_mb)][v]['allreduce_ms']:.1f} ms" for v in VARIANTS)
            print(f"  {size_mb} MB: {line}", flush=True)
    toy = {variant: toy_run(variant, rank) for variant in VARIANTS}
    if rank == 0:
        output.write_text(json.dumps({"sizes": sizes, "toy_final_loss": toy}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def headline(sizes: dict, toy: dict) -> list[dict]:
    figures = []
    for size_mb, row in sizes.items():
        figures.append(
            {
                "name": f"fourbit_bytes_reduction_vs_fp32_{size_mb}mb",
                "value": round(row["fp32"]["model_bytes"] / row["fourbit"]["model_bytes"], 3),
                "target": BYTES_TARGET,
                "higher_is_better": True,
            }
        )
        if int(size_mb) >= TIME_TARGET_MIN_MB:
            figures.append(
                {
                    "name": f"fourbit_allreduce_time_ratio_vs_fp32_{size_mb}mb",
                    "value": round(row["fourbit"]["allreduce_ms"] / row["fp32"]["allreduce_ms"], 3),
                    "target": 1.0,
                    "higher_is_better": False,
                }
            )
    figures.append(
        {
            "name": "fourbit_toy_final_loss_gap_vs_fp32",
            "value": round(abs(toy["fourbit"] - toy["fp32"]) / toy["fp32"], 4),
            "target": LOSS_TARGET,
            "higher_is_better": False,
        }
    )
    return figures


def print_table(sizes: dict, toy: dict) -> None:
    print(f"\nOne gradient bucket, {WORLD_SIZE} processes, gloo on 127.0.0.1; medians; ratios against fp32")
    print(f"{'MB':>4} {'variant':<9} {'all-reduce ms':>13} {'time x':>6} {'MB sent':>8} {'bytes /':>7} {'lo MB':>7}")
    for size_mb, row in sizes.items():
        for variant in VARIANTS:
            cell = row[variant]
            time_ratio = cell["allreduce_ms"] / row["fp32"]["allreduce_ms"]
            reduction = row["fp32"]["model_bytes"] / cell["model_bytes"]
            print(
                f"{size_mb:>4} {variant:<9} {cell['allreduce_ms']:>13.1f} {time_ratio:>6.2f} "
                f"{cell['model_bytes'] / 2**20:>8.2f} {reduction:>7.1f} {cell['loopback_bytes'] / 2**20:>7.2f}"
            )
    print("\nToy regression, final loss (mean of the last 20 of 300 steps): ", end="")
    print(", ".join(f"{variant} {loss:.4f}" for variant, loss in toy.items()))


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    partial = args.output.with_suffix(".partial.json")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    print(f"Buckets of {args.sizes_mb} MB, {args.rounds} rounds, {WORLD_SIZE} processes")
    mp.spawn(worker, args=(free_port(), args, partial), nprocs=WORLD_SIZE, join=True)
    measured = json.loads(partial.read_text())
    partial.unlink()
    print_table(measured["sizes"], measured["toy_final_loss"])
    result = {
        "benchmark": "bench_comm",
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_comm.py", *sys.argv[1:]]),
        "machine": {**machine_info("cpu"), "torch_threads": 1, "processes": WORLD_SIZE},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "setup": {
            "bucket_columns": COLUMNS,
            "powersgd_rank": POWERSGD_RANK,
            "fourbit_chunk_size": CHUNK_SIZE,
            "rounds": args.rounds,
            "warmup_steps": WARMUP_STEPS,
        },
        "sizes": measured["sizes"],
        "toy_final_loss": measured["toy_final_loss"],
        "wall_time_s": time.perf_counter() - started,
        "headline": headline(measured["sizes"], measured["toy_final_loss"]),
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output} ({result['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
