"""The 4-bit hook in every run: overflow steps, bf16 byte counts, the all-gather fallback, asynchronous phases, and
the exchange's arithmetic against the same steps done with the public quantisation functions.

Each test starts this file's workers (below) in 2 gloo processes with torchrun; the workers write what they saw and
the tests make the assertions.
"""

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import _env, _run, free_port, read_json, read_weights
from safetensors.torch import save_file
from teardown import exit_process
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from deepseekv3.distributed import dequantize_4bit, quantize_4bit

NUM_PROCESSES = 2
OVERFLOW_STEP, NUM_STEPS = 3, 6
# name: (numel, chunk_size, dtype). Shards of whole chunks are decoded straight into the result; the others (padded
# last chunk, a bf16 bucket, fewer values than ranks times two) go through the exchange's row buffer.
REFERENCE_CASES = {
    "aligned": (768, 64, torch.float32),
    "padded": (1001, 64, torch.float32),
    "bf16": (1000, 64, torch.bfloat16),
    "tiny": (3, 16, torch.float32),
}
REFERENCE_STEPS = 4


def _run_workers(worker: str, out_dir: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NUM_PROCESSES}"]
    command += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, worker, str(out_dir)]
    _run(command, _env())


@pytest.mark.distributed
def test_a_non_finite_gradient_skips_one_step_and_leaves_error_feedback_clean(tmp_path):
    _run_workers("overflow", tmp_path)
    for rank in range(NUM_PROCESSES):
        report = read_json(tmp_path / f"overflow{rank}.json")
        # only the injected step's averaged gradients are non-finite, on both ranks, and GradScaler skipped it
        assert report["non_finite_steps"] == [OVERFLOW_STEP]
        assert report["skipped_steps"] == [OVERFLOW_STEP]
        assert report["num_overflows"] >= 1
        assert report["errors_finite"], "the error-feedback buffers hold inf or NaN"
        weights = read_weights(tmp_path / f"overflow{rank}.safetensors")
        assert torch.isfinite(weights["injected"]).all()
        # the overflow step left no trace: the run equals one that never took that step
        assert torch.equal(weights["injected"], weights["skipped"])
    assert report["errors_unchanged"], "the overflow step changed the error feedback"


@pytest.mark.distributed
def test_bf16_buckets_are_counted_in_bf16(tmp_path):
    _run_workers("bf16", tmp_path)
    report = read_json(tmp_path / "bf16_0.json")
    assert report["bucket_dtypes"] == ["torch.bfloat16"]
    expected = sum(2 * (NUM_PROCESSES - 1) * numel * 2 // NUM_PROCESSES for numel in report["bucket_numels"])
    assert report["uncompressed_bytes"] == expected
    assert report["fp32_bytes"] == 2 * expected  # the earlier counter keeps its fp32 meaning
    assert report["compression_ratio"] == pytest.approx(expected / report["bytes_sent"])
    assert 3.5 < report["compression_ratio"] < 3.9  # 16 bits against 4 bits plus one fp32 scale per 256 values


@pytest.mark.distributed
def test_all_gather_fallback_for_torch_without_all_gather_single(tmp_path):
    _run_workers("fallback", tmp_path)
    for rank in range(NUM_PROCESSES):
        report = read_json(tmp_path / f"fallback{rank}.json")
        assert report["fallback_calls"] > 0, "the fallback collective was not used"
        outputs = read_weights(tmp_path / f"fallback{rank}.safetensors")
        assert torch.equal(outputs["native"], outputs["fallback"])
        assert torch.equal(outputs["native_ddp"], outputs["fallback_ddp"])


@pytest.mark.distributed
def test_hook_returns_before_the_exchange_and_trains_like_the_synchronous_hook(tmp_path):
    _run_workers("overlap", tmp_path)
    report = read_json(tmp_path / "overlap0.json")
    assert report["future_types_ok"]
    assert report["num_buckets"] > 1
    # rank 1 joins each exchange late, so rank 0's future cannot be complete when the hook returns
    assert not any(report["done_at_return"]), report["done_at_return"]
    weights = [read_weights(tmp_path / f"overlap{rank}.safetensors") for rank in range(NUM_PROCESSES)]
    assert torch.equal(weights[0]["async"], weights[1]["async"]), "replicas drifted apart"
    torch.testing.assert_close(weights[0]["async"], weights[0]["sync"], rtol=1e-6, atol=1e-7)


@pytest.mark.distributed
def test_exchange_equals_the_same_steps_done_with_the_public_functions(tmp_path):
    _run_workers("reference", tmp_path)
    runs = [read_weights(tmp_path / f"reference{rank}.safetensors") for rank in range(NUM_PROCESSES)]
    for name, (_, chunk_size, dtype) in REFERENCE_CASES.items():
        inputs = torch.stack([run[f"{name}_inputs"] for run in runs])  # (ranks, steps, numel)
        expected = _reference_exchange(inputs, chunk_size).to(dtype)
        for rank, run in enumerate(runs):
            assert run[f"{name}_outputs"].dtype == dtype
            assert torch.equal(run[f"{name}_outputs"], expected), f"{name}, rank {rank}"


def _reference_exchange(inputs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The averages `compressed_allreduce` returns, step after step with error feedback, for `inputs` of shape
    `(ranks, steps, numel)`: every rank's shards quantised (phase 1), each shard's mean quantised (phase 2)."""
    ranks, steps, numel = inputs.shape
    shard_numel = 2 * math.ceil(numel / (2 * ranks))
    padded_shard = math.ceil(shard_numel / chunk_size) * chunk_size

    def decoded(values: torch.Tensor) -> torch.Tensor:
        return dequantize_4bit(*quantize_4bit(values.reshape(-1), chunk_size), chunk_size).view(values.shape)

    sender_errors = torch.zeros(ranks, ranks, padded_shard)  # (sender, shard, value)
    shard_errors = torch.zeros(ranks, padded_shard)
    outputs = []
    for step in range(steps):
        flat = nn.functional.pad(inputs[:, step].float(), (0, ranks * shard_numel - numel))
        corrected = nn.functional.pad(flat.view(ranks, ranks, shard_numel), (0, padded_shard - shard_numel))
        corrected = corrected + sender_errors
        sent = decoded(corrected)
        sender_errors = corrected - sent
        means = nn.functional.pad(sent[..., :shard_numel].mean(dim=0), (0, padded_shard - shard_numel))
        means = means + shard_errors
        averaged = decoded(means)
        shard_errors = means - averaged
        outputs.append(averaged[:, :shard_numel].reshape(-1)[:numel])
    return torch.stack(outputs)


# ---- workers (run by torchrun: `python test_compression_correctness.py NAME OUT_DIR`) ----


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


def _data(rank: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11 + rank)
    return torch.randn(steps, 8, 16, generator=generator), torch.randn(steps, 8, 4, generator=generator)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([param.detach().float().reshape(-1) for param in model.parameters()])


def _errors(state) -> list[torch.Tensor]:
    return [error.clone() for errors in (state._sender_errors, state._shard_errors) for error in errors.values()]


def overflow(out_dir: str) -> None:
    from deepseekv3.distributed import register_fourbit_hook

    rank = dist.get_rank()
    features, targets = _data(rank, NUM_STEPS)
    report, weights = {}, {}
    for variant in ("injected", "skipped"):
        model = DistributedDataParallel(_model())
        state = register_fourbit_hook(model, chunk_size=64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        non_finite_steps, skipped_steps, errors_finite = [], [], True
        for step in range(NUM_STEPS):
            inputs = features[step].clone()
            if step == OVERFLOW_STEP:
                if variant == "skipped":
                    continue
                if rank == 1:
                    inputs[0, 0] = float("inf")
                errors_before = _errors(state)
            loss = nn.functional.mse_loss(model(inputs), targets[step])
            scaler.scale(loss).backward()
            if not all(torch.isfinite(param.grad).all() for param in model.parameters()):
                non_finite_steps.append(step)
            scale, before = scaler.get_scale(), _flat(model.module)
            scaler.step(optimizer)
            if torch.equal(before, _flat(model.module)):
                skipped_steps.append(step)
            scaler.update(new_scale=scale)  # keep the scale, so both variants see the same arithmetic
            optimizer.zero_grad()
            errors_finite &= all(torch.isfinite(error).all() for error in _errors(state))
            if variant == "injected" and step == OVERFLOW_STEP:
                errors_after = _errors(state)
                report["errors_unchanged"] = len(errors_before) == len(errors_after) and all(
                    torch.equal(before, after) for before, after in zip(errors_before, errors_after)
                )
        weights[variant] = _flat(model.module)
        if variant == "injected":
            report.update(
                non_finite_steps=non_finite_steps,
                skipped_steps=skipped_steps,
                errors_finite=bool(errors_finite),
                num_overflows=getattr(state, "num_overflows", -1),
            )
    save_file(weights, str(Path(out_dir, f"overflow{rank}.safetensors")))
    Path(out_dir, f"overflow{rank}.json").write_text(json.dumps(report))


def bf16(out_dir: str) -> None:
    from deepseekv3.distributed import fourbit_hook
    from deepseekv3.distributed.compression import FourBitCompressionState

    rank = dist.get_rank()
    features, targets = _data(rank, 2)
    model = DistributedDataParallel(_model().to(torch.bfloat16))
    state = FourBitCompressionState()
    dtypes, numels = set(), []

    def recording_hook(state, bucket):
        dtypes.add(str(bucket.buffer().dtype))
        numels.append(bucket.buffer().numel())
        return fourbit_hook(state, bucket)

    model.register_comm_hook(state, recording_hook)
    for step in range(2):
        model(features[step].bfloat16()).float().sub(targets[step]).square().mean().backward()
    report = {
        "bucket_dtypes": sorted(dtypes),
        "bucket_numels": numels,
        "bytes_sent": state.bytes_sent,
        "uncompressed_bytes": getattr(state, "uncompressed_bytes", None),
        "fp32_bytes": state.fp32_bytes,
        "compression_ratio": state.compression_ratio,
    }
    Path(out_dir, f"bf16_{rank}.json").write_text(json.dumps(report))


def _ddp_steps(steps: int) -> torch.Tensor:
    from deepseekv3.distributed import register_fourbit_hook

    features, targets = _data(dist.get_rank(), steps)
    model = DistributedDataParallel(_model())
    register_fourbit_hook(model, chunk_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        nn.functional.mse_loss(model(features[step]), targets[step]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return _flat(model.module)


def fallback(out_dir: str) -> None:
    from deepseekv3.distributed import FourBitCompressionState, compressed_allreduce

    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(5 + rank)
    inputs = torch.randn(3, 1000, generator=generator)
    outputs = {}
    native_state = FourBitCompressionState(chunk_size=64)
    outputs["native"] = torch.stack([compressed_allreduce(native_state, 0, row) for row in inputs])
    outputs["native_ddp"] = _ddp_steps(3)

    # torch before 2.13: no all_gather_single
    calls = []
    all_gather_single, all_gather_into_tensor = dist.all_gather_single, dist.all_gather_into_tensor

    def counting_all_gather_into_tensor(*args, **kwargs):
        calls.append(1)
        return all_gather_into_tensor(*args, **kwargs)

    del dist.all_gather_single
    dist.all_gather_into_tensor = counting_all_gather_into_tensor
    try:
        fallback_state = FourBitCompressionState(chunk_size=64)
        outputs["fallback"] = torch.stack([compressed_allreduce(fallback_state, 0, row) for row in inputs])
        outputs["fallback_ddp"] = _ddp_steps(3)
    finally:
        dist.all_gather_single, dist.all_gather_into_tensor = all_gather_single, all_gather_into_tensor
    save_file(outputs, str(Path(out_dir, f"fallback{rank}.safetensors")))
    Path(out_dir, f"fallback{rank}.json").write_text(json.dumps({"fallback_calls": len(calls)}))


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _model()
        self.unused = nn.Linear(4, 4)  # DDP's unused-parameter all-reduce runs beside the hook's exchanges

    def forward(self, inputs):
        return self.body(inputs)


def _sync_hook(state, bucket):
    """The hook as it was: both phases inside the call, a completed future."""
    from deepseekv3.distributed import compressed_allreduce

    buffer = bucket.buffer()
    buffer.copy_(compressed_allreduce(state, bucket.index(), buffer))
    future = torch.futures.Future()
    future.set_result(buffer)
    return future


def overlap(out_dir: str) -> None:
    from deepseekv3.distributed import FourBitCompressionState, fourbit_hook

    rank = dist.get_rank()
    steps = 4
    features, targets = _data(rank, steps)
    done_at_return, future_types_ok, bucket_indices, weights = [], True, set(), {}

    def late_hook(state, bucket):
        nonlocal future_types_ok
        if rank == 1:
            time.sleep(0.2)
        future = fourbit_hook(state, bucket)
        if rank == 0:
            done_at_return.append(future.done())
        future_types_ok &= isinstance(future, torch.futures.Future)
        bucket_indices.add(bucket.index())
        return future

    for variant, hook in (("async", late_hook), ("sync", _sync_hook)):
        torch.manual_seed(0)
        model = DistributedDataParallel(_WithUnused(), bucket_cap_mb=0.004, find_unused_parameters=True)
        model.register_comm_hook(FourBitCompressionState(chunk_size=64), hook)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(steps):
            nn.functional.mse_loss(model(features[step]), targets[step]).backward()
            optimizer.step()
            optimizer.zero_grad()
        weights[variant] = _flat(model.module)
    save_file(weights, str(Path(out_dir, f"overlap{rank}.safetensors")))
    report = {"done_at_return": done_at_return, "future_types_ok": future_types_ok, "num_buckets": len(bucket_indices)}
    Path(out_dir, f"overlap{rank}.json").write_text(json.dumps(report))


def reference(out_dir: str) -> None:
    from deepseekv3.distributed import FourBitCompressionState, compressed_allreduce

    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(23 + rank)
    tensors = {}
    for name, (numel, chunk_size, dtype) in REFERENCE_CASES.items():
        state = FourBitCompressionState(chunk_size=chunk_size)
        magnitudes = torch.logspace(-2, 1, REFERENCE_STEPS)[:, None]
        inputs = (torch.randn(REFERENCE_STEPS, numel, generator=generator) * magnitudes).to(dtype)
        tensors[f"{name}_inputs"] = inputs
        tensors[f"{name}_outputs"] = torch.stack([compressed_allreduce(state, 0, row) for row in inputs])
    save_file(tensors, str(Path(out_dir, f"reference{rank}.safetensors")))


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        workers = {
            "overflow": overflow,
            "bf16": bf16,
            "fallback": fallback,
            "overlap": overlap,
            "reference": reference,
        }
        workers[sys.argv[1]](*sys.argv[2:])
    finally:
        dist.destroy_process_group()
    exit_process(0)  # see teardown.py: the hook's groups and their gloo threads live until the process exits
