"""Gradient all-reduce on links of 1 Gbit/s, 10 Gbit/s and an unlimited loopback: fp32, torch's bf16 and PowerSGD
hooks, and our 4-bit hook; a DDP training step; the 4-bit arithmetic's speed, and a projection to faster links.

Commands (from the repository root; the limited links need root and iproute2):

    .venv/bin/python benchmarks/bench_comm.py                       # every rate (about 5 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench_comm.py --rate 1gbit --sizes-mb 25 100 --rounds 7
    .venv/bin/python benchmarks/bench_comm.py --arithmetic --arithmetic-baseline dda4eda   # arithmetic only, printed

Links (`--rate`): `none` is the machine's loopback, unlimited; `1gbit` and `10gbit` are the loopback of a network
namespace made for the run and deleted after it (`benchmarks/_netns.py`), limited by tc's token bucket filter. The
rate limits the sum of both ranks' traffic (one loopback device): a ring all-reduce of B bytes per rank moves 2B
through it, so 100 MB of fp32 takes 1.68 s at `1gbit` where two machines with 1 Gbit/s full-duplex links would take
0.84 s. Every variant crosses the same limit, so their ratios hold.

Bucket sweep, per rate: two processes (`torch.multiprocessing`, gloo on 127.0.0.1, one torch thread each) hold, per
bucket size, one `DistributedDataParallel` model per variant: a single fp32 matrix of `size` MB (1024 columns) with
`bucket_cap_mb` above it, so each backward produces exactly one gradient bucket of that size. The gradient is a
fixed random tensor per rank (`loss = (weight * noise).sum()`). Variants, each registered with `register_comm_hook`:

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
the bytes it counted itself; `loopback_bytes` is the growth of the `lo` tx counter during the timed rounds per
backward and rank (in a namespace it counts only the benchmark's traffic; on the machine's loopback, everyone's).

Training step, per rate: the same two processes train a stack of 6 `Linear(2048, 2048)` (100.7 MB of fp32
parameters) with `bucket_cap_mb=25` (DDP makes three buckets of 33.6 MB; their sizes are recorded), 16 rows per rank,
MSE loss, SGD; a step is forward, backward (DDP's exchange, overlapping it) and `optimizer.step()`, timed by rank 0
after a barrier; medians of `--rounds` interleaved rounds after two warm-up steps. `local_step_ms` is the fp32
model's step under `no_sync()` (no exchange). PowerSGD is left out here (see `STEP_VARIANTS`).

Toy run (machine's loopback): a small MLP regression (32 -> 128 -> 8, 300 steps of 32 rows per rank) trained once per
variant and optimizer (SGD with momentum; AdamW) from the same initial weights; `final_loss` is the mean of the last
20 steps.

Arithmetic (this process, one torch thread, no link): `quantize_4bit` and `dequantize_4bit` in GB/s of fp32 values
(fresh outputs, as the functions return them), and `compressed_allreduce` on a 1-process gloo group (its collectives
copy locally): everything the hook computes per bucket, in its reused buffers, plus a fresh result tensor (the hook
decodes into the bucket instead), in ms and GB/s. A 1-process exchange quantises the whole bucket twice and decodes
it twice; with 2 processes the second quantisation covers half of it, so this overstates the 2-process arithmetic
slightly. `--arithmetic-baseline REV` also times the module at git revision REV (read with `git show`), for
before/after figures.

Projection (computed, not measured): per bucket and rank, fp32 = ring bytes / rate; 4-bit = the measured 1-process
exchange arithmetic + its bytes / rate, the phases not overlapping; full-duplex links of 100 and 400 Gbit/s, 2 ranks,
one CPU thread as here; fp32's own summation is left out. `fourbit_ms_with_loopback_arithmetic` takes instead the
4-bit all-reduce time measured on the unlimited loopback (both ranks' arithmetic sharing the machine's cores).
`break_even` is the rate below which the 4-bit exchange is the faster one. The same model with the shared loopback
(both ranks' bytes through one limit) is set against the measured times at 1 and 10 Gbit/s (`model_check`).

Headline (targets from the issue): the 4-bit hook's bytes against fp32 (>= 7.5x fewer), its all-reduce time against
fp32 at 1 Gbit/s for 25 and 100 MB buckets (<= 0.5x), and its toy final loss against fp32's with SGD and with AdamW
(within 2%); the other rates and the training step are reported without a target.

Writes `benchmarks/results/bench_comm.json` (machine, versions, every sample, `headline`).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _harness import benchmark_record, headline_entries, write_results
from _netns import RATE_BITS_PER_S, TBF_SETTINGS, shaped_loopback
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from deepseekv3.distributed import FourBitCompressionState, fourbit_hook
from deepseekv3.distributed import compression as compression_module

VARIANTS = ("fp32", "bf16", "powersgd", "fourbit")
# torch's PowerSGD hook chains its all-reduces on DDP's group; with gloo and several buckets the chained collectives
# of different buckets reached the ranks in different orders ("Received data size doesn't match expected size")
STEP_VARIANTS = ("fp32", "bf16", "fourbit")
RATES = ("none", "1gbit", "10gbit")
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_comm.json"
ROOT = Path(__file__).resolve().parent.parent
WORLD_SIZE = 2
COLUMNS = 1024
POWERSGD_RANK = 4
CHUNK_SIZE = 256
WARMUP_STEPS = 2
LOOPBACK_TX = Path("/sys/class/net/lo/statistics/tx_bytes")
STEP_LAYERS, STEP_WIDTH, STEP_BATCH, STEP_BUCKET_CAP_MB = 6, 2048, 16, 25
TOY_STEPS, TOY_BATCH = 300, 32
TOY_OPTIMIZERS = ("sgd", "adamw")
ARITHMETIC_REPEATS = 5
PROJECTION_GBITS = (100, 400)
BYTES_TARGET = 7.5
TIME_TARGET, TIME_TARGET_RATE, TIME_TARGET_SIZES_MB = 0.5, "1gbit", (25, 100)
LOSS_TARGET = 0.02


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", nargs="+", choices=RATES, default=list(RATES), help="links to measure")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 5, 25, 100], help="bucket sizes in MB")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per bucket size and step (at least 3)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    parser.add_argument("--arithmetic", action="store_true", help="only time the 4-bit arithmetic; print it")
    parser.add_argument("--arithmetic-baseline", metavar="REV", help="also time the compression module at git REV")
    # internal: run one rate's (or the toy run's) two processes and write their results to --partial
    parser.add_argument("--group", choices=(*RATES, "toy"), help=argparse.SUPPRESS)
    parser.add_argument("--partial", type=Path, help=argparse.SUPPRESS)
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


def time_training_steps(rounds: int, rank: int) -> dict:
    """Median step time of each variant on the `Linear` stack, and of the fp32 model under `no_sync()`."""
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(STEP_BATCH, STEP_WIDTH, generator=generator)
    targets = torch.randn(STEP_BATCH, STEP_WIDTH, generator=generator)
    bucket_bytes = {}

    def recording_fourbit_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        bucket_bytes[bucket.index()] = bucket.buffer().numel() * bucket.buffer().element_size()
        return fourbit_hook(state, bucket)

    models, optimizers = {}, {}
    for variant in STEP_VARIANTS:
        torch.manual_seed(0)
        stack = nn.Sequential(*(nn.Linear(STEP_WIDTH, STEP_WIDTH) for _ in range(STEP_LAYERS)))
        models[variant] = DistributedDataParallel(stack, bucket_cap_mb=STEP_BUCKET_CAP_MB)
        if variant == "fourbit":
            models[variant].register_comm_hook(FourBitCompressionState(chunk_size=CHUNK_SIZE), recording_fourbit_hook)
        else:
            register(models[variant], variant)
        optimizers[variant] = torch.optim.SGD(models[variant].parameters(), lr=1e-4)

    def step(variant: str, sync: bool = True) -> float:
        dist.barrier()
        start = time.perf_counter()
        with contextlib.nullcontext() if sync else models[variant].no_sync():
            nn.functional.mse_loss(models[variant](inputs), targets).backward()
        optimizers[variant].step()
        optimizers[variant].zero_grad()
        return time.perf_counter() - start

    for variant in STEP_VARIANTS:
        for _ in range(WARMUP_STEPS):
            step(variant)
    samples = {variant: [] for variant in STEP_VARIANTS}
    local = []
    for round_index in range(rounds):
        shift = round_index % len(STEP_VARIANTS)
        for variant in STEP_VARIANTS[shift:] + STEP_VARIANTS[:shift]:
            samples[variant].append(step(variant))
        local.append(step("fp32", sync=False))
    result = {
        variant: {"step_ms": statistics.median(times) * 1000, "samples_ms": [t * 1000 for t in times]}
        for variant, times in samples.items()
    }
    result["local_step_ms"] = statistics.median(local) * 1000
    # DDP's first step runs one bucket of every gradient, later steps the buckets it rebuilt in gradient order
    result["bucket_sizes_bytes"] = [bucket_bytes[index] for index in sorted(bucket_bytes)]
    result["parameter_bytes"] = sum(p.numel() * 4 for p in models["fp32"].parameters())
    return result


def toy_run(variant: str, optimizer_name: str, rank: int) -> float:
    generator = torch.Generator().manual_seed(7)
    true_weight = torch.randn(32, 8, generator=generator)
    features = torch.randn(TOY_STEPS, WORLD_SIZE * TOY_BATCH, 32, generator=generator)
    targets = torch.tanh(features @ true_weight) + 0.3 * torch.randn(features.shape[:2] + (8,), generator=generator)
    features = features[:, rank * TOY_BATCH : (rank + 1) * TOY_BATCH]
    targets = targets[:, rank * TOY_BATCH : (rank + 1) * TOY_BATCH]
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 8)))
    register(model, variant)
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
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


def worker(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    if args.group == "toy":
        measured = {name: {v: toy_run(v, name, rank) for v in VARIANTS} for name in TOY_OPTIMIZERS}
    else:
        measured = {"sizes": {}}
        for size_mb in args.sizes_mb:
            measured["sizes"][str(size_mb)] = sweep_size(size_mb, args.rounds, rank)
            if rank == 0:
                cells = measured["sizes"][str(size_mb)]
                line = ", ".join(f"{v} {cells[v]['allreduce_ms']:.1f} ms" for v in VARIANTS)
                print(f"  {args.group}, {size_mb} MB: {line}", flush=True)
        measured["training_step"] = time_training_steps(args.rounds, rank)
    if rank == 0:
        args.partial.write_text(json.dumps(measured))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_child(command: list[str]) -> None:
    """Runs `command` in a process group of its own, which is killed whole (the spawned workers too) if this process
    stops waiting for it."""
    # c10d warns on every connection that it cannot resolve the peer's name in a namespace (no resolver there)
    child = subprocess.Popen(command, env={**os.environ, "TORCH_CPP_LOG_LEVEL": "ERROR"}, start_new_session=True)
    try:
        if child.wait() != 0:
            raise subprocess.CalledProcessError(child.returncode, command)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def run_group(group: str, args: argparse.Namespace, directory: Path) -> dict:
    """Runs `group`'s two processes in a child process, in a rate-limited namespace for a limited rate."""
    partial = directory / f"{group}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--group", group, "--partial", str(partial)]
    command += ["--sizes-mb", *map(str, args.sizes_mb), "--rounds", str(args.rounds)]
    if group not in TBF_SETTINGS:
        run_child(command)
        return json.loads(partial.read_text())
    with shaped_loopback(group) as namespace:
        run_child([*namespace.prefix, *command])
        measured = json.loads(partial.read_text())
        measured["qdisc"] = namespace.qdisc_stats()
    return measured


def load_compression(revision: str, directory: Path):
    """The compression module at git `revision`."""
    source = subprocess.run(
        ["git", "show", f"{revision}:deepseekv3/distributed/compression.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = directory / f"compression_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"compression_{revision}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_seconds(function) -> float:
    function()  # warm-up: the exchange's buffers are allocated on first use
    times = []
    for _ in range(ARITHMETIC_REPEATS):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_arithmetic(sizes_mb: list[int], modules: dict) -> dict:
    """Per compression module and bucket size: GB/s of quantise+pack, unpack+dequantise and a 1-process exchange."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    result = {code: {} for code in modules}
    for size_mb in sizes_mb:
        values = torch.randn(size_mb * 2**20 // 4, generator=torch.Generator().manual_seed(0))
        for code, module in modules.items():
            packed, scales = module.quantize_4bit(values, CHUNK_SIZE)
            state = module.FourBitCompressionState(chunk_size=CHUNK_SIZE)
            times = {
                "quantize": median_seconds(partial(module.quantize_4bit, values, CHUNK_SIZE)),
                "dequantize": median_seconds(partial(module.dequantize_4bit, packed, scales, CHUNK_SIZE)),
                "exchange": median_seconds(partial(module.compressed_allreduce, state, 0, values)),
            }
            nbytes = values.numel() * 4
            result[code][str(size_mb)] = {
                **{f"{name}_gb_per_s": nbytes / seconds / 1e9 for name, seconds in times.items()},
                **{f"{name}_ms": seconds * 1000 for name, seconds in times.items()},
            }
            del packed, scales, state
    dist.destroy_process_group()
    return result


def print_arithmetic(arithmetic: dict) -> None:
    print("\n4-bit arithmetic, one CPU thread, no link; GB/s of fp32 bucket bytes (medians)")
    print(f"{'code':<12} {'MB':>4} {'quantise+pack':>13} {'unpack+deq':>10} {'exchange ms':>11} {'exchange GB/s':>13}")
    for code, sizes in arithmetic.items():
        for size_mb, cell in sizes.items():
            print(
                f"{code:<12} {size_mb:>4} {cell['quantize_gb_per_s']:>13.2f} {cell['dequantize_gb_per_s']:>10.2f} "
                f"{cell['exchange_ms']:>11.1f} {cell['exchange_gb_per_s']:>13.2f}"
            )


def projection(links: dict, arithmetic: dict) -> dict:
    """Modelled 4-bit and fp32 all-reduce times (see the module docstring), with the model set against the
    measured times on the shared loopback."""
    reference = next(iter(links.values()))["sizes"]
    rows = {"projected": [], "break_even": [], "model_check": []}
    for size_mb, cell in arithmetic.items():
        if size_mb not in reference:
            continue
        fp32_bytes = reference[size_mb]["fp32"]["model_bytes"]
        fourbit_bytes = reference[size_mb]["fourbit"]["model_bytes"]
        arithmetic_ms = cell["exchange_ms"]
        # the 2-process exchange on the unlimited loopback: arithmetic of both ranks sharing 2 cores, plus a copy
        loopback_ms = links["none"]["sizes"][size_mb]["fourbit"]["allreduce_ms"] if "none" in links else None
        # below this rate the bytes 4-bit saves take longer on the link than its arithmetic
        break_even = (fp32_bytes - fourbit_bytes) * 8 / (arithmetic_ms / 1000) / 1e9
        rows["break_even"].append({"size_mb": int(size_mb), "gbit_per_s": break_even})
        for gbit in PROJECTION_GBITS:
            link_ms = fourbit_bytes * 8 / (gbit * 1e9) * 1000
            rows["projected"].append(
                {
                    "size_mb": int(size_mb),
                    "gbit_per_s": gbit,
                    "fp32_ms": fp32_bytes * 8 / (gbit * 1e9) * 1000,
                    "fourbit_ms": arithmetic_ms + link_ms,
                    "fourbit_ms_with_loopback_arithmetic": None if loopback_ms is None else loopback_ms + link_ms,
                }
            )
        for rate, measured in links.items():
            if rate not in RATE_BITS_PER_S:
                continue
            shared_ms = WORLD_SIZE * fourbit_bytes * 8 / RATE_BITS_PER_S[rate] * 1000
            rows["model_check"].append(
                {
                    "size_mb": int(size_mb),
                    "rate": rate,
                    "modelled_fourbit_ms": arithmetic_ms + shared_ms,
                    "measured_fourbit_ms": measured["sizes"][size_mb]["fourbit"]["allreduce_ms"],
                    "modelled_fp32_ms": WORLD_SIZE * fp32_bytes * 8 / RATE_BITS_PER_S[rate] * 1000,
                    "measured_fp32_ms": measured["sizes"][size_mb]["fp32"]["allreduce_ms"],
                }
            )
    return rows


def headline(links: dict, toy: dict) -> list[dict]:
    figures = []
    first = next(iter(links.values()))["sizes"]
    for size_mb, row in first.items():
        reduction = row["fp32"]["model_bytes"] / row["fourbit"]["model_bytes"]
        figures.append((f"fourbit_bytes_reduction_vs_fp32_{size_mb}mb", reduction, BYTES_TARGET, True))
    for rate, measured in links.items():
        for size_mb, row in measured["sizes"].items():
            ratio = row["fourbit"]["allreduce_ms"] / row["fp32"]["allreduce_ms"]
            targeted = rate == TIME_TARGET_RATE and int(size_mb) in TIME_TARGET_SIZES_MB
            name = f"fourbit_allreduce_time_ratio_vs_fp32_{size_mb}mb_{rate}"
            figures.append((name, ratio, TIME_TARGET if targeted else None, False))
        step = measured["training_step"]
        ratio = step["fourbit"]["step_ms"] / step["fp32"]["step_ms"]
        figures.append((f"fourbit_training_step_time_ratio_vs_fp32_{rate}", ratio, None, False))
    for name, losses in toy.items():
        gap = abs(losses["fourbit"] - losses["fp32"]) / losses["fp32"]
        figures.append((f"fourbit_toy_final_loss_gap_vs_fp32_{name}", gap, LOSS_TARGET, False))
    return headline_entries(figures)


def print_tables(links: dict, toy: dict, projected: dict) -> None:
    for rate, measured in links.items():
        print(f"\nOne gradient bucket, {WORLD_SIZE} processes, gloo, link {rate}; medians; ratios against fp32")
        print(
            f"{'MB':>4} {'variant':<9} {'all-reduce ms':>13} {'time x':>6} {'MB sent':>8} {'bytes /':>7} {'lo MB':>7}"
        )
        for size_mb, row in measured["sizes"].items():
            for variant in VARIANTS:
                cell = row[variant]
                time_ratio = cell["allreduce_ms"] / row["fp32"]["allreduce_ms"]
                reduction = row["fp32"]["model_bytes"] / cell["model_bytes"]
                print(
                    f"{size_mb:>4} {variant:<9} {cell['allreduce_ms']:>13.1f} {time_ratio:>6.2f} "
                    f"{cell['model_bytes'] / 2**20:>8.2f} {reduction:>7.1f} {cell['loopback_bytes'] / 2**20:>7.2f}"
                )
        step = measured["training_step"]
        cells = ", ".join(f"{v} {step[v]['step_ms']:.0f} ms" for v in STEP_VARIANTS)
        print(
            f"Training step ({STEP_LAYERS} x Linear({STEP_WIDTH}), {len(step['bucket_sizes_bytes'])} buckets): ",
            end="",
        )
        print(f"{cells}; no exchange {step['local_step_ms']:.0f} ms")
    for name, losses in toy.items():
        print(f"Toy regression, {name}, final loss: " + ", ".join(f"{v} {loss:.4f}" for v, loss in losses.items()))
    print("\nProjection (modelled, not measured): 2 ranks, full-duplex links, measured 1-process 4-bit arithmetic")
    for row in projected["projected"]:
        contended = row["fourbit_ms_with_loopback_arithmetic"]
        print(
            f"  {row['size_mb']:>3} MB at {row['gbit_per_s']} Gbit/s: fp32 {row['fp32_ms']:.1f} ms, "
            f"4-bit {row['fourbit_ms']:.1f} ms ({row['fourbit_ms'] / row['fp32_ms']:.1f}x)"
            + ("" if contended is None else f"; with the 2-process loopback arithmetic {contended:.1f} ms")
        )
    for row in projected["break_even"]:
        print(f"  {row['size_mb']:>3} MB: 4-bit is faster than fp32 below {row['gbit_per_s']:.1f} Gbit/s per rank")
    for row in projected["model_check"]:
        print(
            f"  model check {row['size_mb']:>3} MB at {row['rate']} (shared loopback): 4-bit modelled "
            f"{row['modelled_fourbit_ms']:.0f} ms, measured {row['measured_fourbit_ms']:.0f} ms; fp32 modelled "
            f"{row['modelled_fp32_ms']:.0f} ms, measured {row['measured_fp32_ms']:.0f} ms"
        )


def main() -> None:
    args = parse_args()
    if args.group is not None:
        mp.spawn(worker, args=(free_port(), args), nprocs=WORLD_SIZE, join=True)
        return
    started = time.perf_counter()
    # a terminated run unwinds, so the namespace it made is deleted
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        modules = {"this_tree": compression_module}
        if args.arithmetic_baseline is not None:
            baseline = load_compression(args.arithmetic_baseline, Path(directory))
            modules = {args.arithmetic_baseline: baseline, **modules}
        load_at_start = os.getloadavg()
        arithmetic = measure_arithmetic(args.sizes_mb, modules)
        print_arithmetic(arithmetic)
        if args.arithmetic:
            return
        print(f"\nBuckets of {args.sizes_mb} MB, {args.rounds} rounds, {WORLD_SIZE} processes, links {args.rate}")
        links = {rate: run_group(rate, args, Path(directory)) for rate in args.rate}
        toy = run_group("toy", args, Path(directory))
    projected = projection(links, arithmetic["this_tree"])
    print_tables(links, toy, projected)
    result = {
        **benchmark_record(__file__, "cpu"),
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "setup": {
            "processes": WORLD_SIZE,
            "torch_threads": 1,
            "bucket_columns": COLUMNS,
            "powersgd_rank": POWERSGD_RANK,
            "fourbit_chunk_size": CHUNK_SIZE,
            "rounds": args.rounds,
            "warmup_steps": WARMUP_STEPS,
            "tbf_burst_latency": {rate: TBF_SETTINGS[rate] for rate in args.rate if rate in TBF_SETTINGS},
            "training_step": {"layers": STEP_LAYERS, "width": STEP_WIDTH, "batch_per_rank": STEP_BATCH},
        },
        "links": links,
        "toy_final_loss": toy,
        "arithmetic": arithmetic,
        "projection": projected,
    }
    result["headline"] = headline(links, toy)
    write_results(result, args.output, started)


if __name__ == "__main__":
    main()
