"""4-bit gradient compression: packing, the per-step error bound, error feedback, convergence, bytes on the wire."""

import math

import pytest
import torch
from distributed_helpers import read_json, read_weights, run_torchrun
from torch import nn

from deepseekv3.distributed import FourBitCompressionState, dequantize_4bit, quantize_4bit, register_fourbit_hook

NUM_PROCESSES = 2
# what `workers.compressed_steps` runs
STEPS_NUMEL, STEPS_CHUNK, NUM_STEPS, NUM_RANDOM_STEPS = 3000, 64, 30, 5


def _chunk_absmax(values: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
    """Per element, the largest |value| of its chunk."""
    absmax = torch.zeros(int(chunk_ids.max()) + 1).scatter_reduce(0, chunk_ids, values.abs(), "amax")
    return absmax[chunk_ids]


def _chunk_ids(numel: int, world_size: int, chunk_size: int) -> torch.Tensor:
    """Chunk of each element: the bucket is split into `world_size` even shards, each cut into chunks."""
    shard_numel = 2 * math.ceil(numel / (2 * world_size))
    index = torch.arange(numel)
    chunks_per_shard = math.ceil(shard_numel / chunk_size)
    return (index // shard_numel) * chunks_per_shard + (index % shard_numel) // chunk_size


def test_quantize_4bit_packs_two_codes_per_byte_within_half_a_step():
    values = torch.randn(4 * 128) * torch.linspace(0.001, 10.0, 4 * 128)
    values[:128] = 0.0  # an all-zero chunk
    packed, scales = quantize_4bit(values, 128)
    assert packed.dtype == torch.uint8 and packed.shape == (256,)
    assert scales.shape == (4,)
    restored = dequantize_4bit(packed, scales, 128)
    chunk_absmax = values.abs().view(4, 128).amax(dim=1).repeat_interleave(128)
    assert torch.all((restored - values).abs() <= chunk_absmax / 14 * (1 + 1e-6))
    assert torch.equal(restored[:128], torch.zeros(128))
    # the extreme of each chunk is exact, and every code decodes to a multiple of the chunk's step
    torch.testing.assert_close(restored.view(4, 128).abs().amax(dim=1), values.view(4, 128).abs().amax(dim=1))
    steps = restored.view(4, 128)[1:] / scales[1:, None]
    torch.testing.assert_close(steps, steps.round())
    assert int(steps.abs().max()) == 7


def test_quantize_4bit_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of an even chunk_size"):
        quantize_4bit(torch.zeros(100), 64)
    with pytest.raises(ValueError, match="multiple of an even chunk_size"):
        quantize_4bit(torch.zeros(2, 64), 64)
    with pytest.raises(ValueError, match=r"chunk_size \(15\)"):
        FourBitCompressionState(chunk_size=15)


def test_register_fourbit_hook_needs_ddp():
    with pytest.raises(TypeError, match="DistributedDataParallel communication hook; got Linear"):
        register_fourbit_hook(nn.Linear(2, 2))


@pytest.mark.distributed
def test_compressed_allreduce_error_bound_and_error_feedback(tmp_path):
    run_torchrun(NUM_PROCESSES, "compressed_steps", str(tmp_path))
    runs = [read_weights(tmp_path / f"steps{rank}.safetensors") for rank in range(NUM_PROCESSES)]
    inputs = torch.stack([run["inputs"] for run in runs])  # (ranks, steps, numel)
    outputs = runs[0]["outputs"]
    assert torch.equal(outputs, runs[1]["outputs"]), "ranks must end with identical gradients"
    exact = inputs.mean(dim=0)  # (steps, numel)
    errors = (outputs - exact).abs()
    chunk_ids = _chunk_ids(STEPS_NUMEL, NUM_PROCESSES, STEPS_CHUNK)

    # step 0 (nothing carried over): each rank's rounding and the average's rounding, half a step each
    step0_bound = torch.stack([_chunk_absmax(inputs[rank, 0], chunk_ids) for rank in range(NUM_PROCESSES)])
    step0_bound = 2 * step0_bound.mean(dim=0) / 14
    assert torch.all(errors[0] <= step0_bound * (1 + 1e-5))
    assert errors[0].max() > 0.05 * step0_bound.max(), "the values were not quantised"

    # Later steps also return last step's carried error. With M the largest |gradient| of a chunk over all steps and
    # ranks, a carried error is at most M/13 per rank and 14M/169 per shard, so a step is off by at most
    # 2M/13 + 28M/169 < 0.32 M.
    largest = torch.stack(
        [_chunk_absmax(inputs[rank, step], chunk_ids) for rank in range(NUM_PROCESSES) for step in range(NUM_STEPS)]
    ).amax(dim=0)
    assert torch.all(errors <= 0.32 * largest)

    # Error feedback: summed over all 30 steps, the averages are off by the last step's carried errors only,
    # M/13 + 14M/169 < 0.16 M, however many steps there were.
    cumulative_error = (outputs.sum(dim=0) - exact.sum(dim=0)).abs()
    assert torch.all(cumulative_error <= 0.16 * largest)
    # without feedback, the same fixed gradient's rounding error would repeat every step and add up past that bound
    fixed = inputs[:, NUM_RANDOM_STEPS]
    quantized = [dequantize_4bit(*quantize_4bit(_sharded(row, chunk_ids), STEPS_CHUNK), STEPS_CHUNK) for row in fixed]
    rounded_mean = torch.stack([_unsharded(row, chunk_ids) for row in quantized]).mean(dim=0)
    without_feedback = (NUM_STEPS - NUM_RANDOM_STEPS) * (rounded_mean - fixed.mean(dim=0)).abs()
    assert without_feedback.max() > 0.16 * largest[without_feedback.argmax()]

    # bytes: two phases, each sending one (codes + scales) row per other rank, against a ring all-reduce in fp32
    metrics = read_json(tmp_path / "steps0.json")
    shard_numel = STEPS_NUMEL // NUM_PROCESSES
    row_bytes = shard_numel // 2 + 4 * math.ceil(shard_numel / STEPS_CHUNK)
    assert metrics["num_allreduces"] == NUM_STEPS
    assert metrics["bytes_sent"] == NUM_STEPS * 2 * (NUM_PROCESSES - 1) * row_bytes
    assert metrics["fp32_bytes"] == NUM_STEPS * 2 * (NUM_PROCESSES - 1) * STEPS_NUMEL * 4 // NUM_PROCESSES


def _sharded(values: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
    """`values` laid out chunk by chunk, each chunk zero-padded to `STEPS_CHUNK` (for a direct `quantize_4bit`)."""
    padded = torch.zeros((int(chunk_ids.max()) + 1) * STEPS_CHUNK)
    padded[_padded_positions(chunk_ids)] = values
    return padded


def _unsharded(values: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
    return values[_padded_positions(chunk_ids)]


def _padded_positions(chunk_ids: torch.Tensor) -> torch.Tensor:
    first_of_chunk = torch.zeros(int(chunk_ids.max()) + 1, dtype=torch.long).scatter_reduce(
        0, chunk_ids, torch.arange(len(chunk_ids)), "amin", include_self=False
    )
    return chunk_ids * STEPS_CHUNK + torch.arange(len(chunk_ids)) - first_of_chunk[chunk_ids]


@pytest.mark.distributed
def test_ddp_with_fourbit_hook_converges_like_fp32_on_a_fraction_of_the_bytes(tmp_path):
    run_torchrun(NUM_PROCESSES, "toy_training", str(tmp_path))
    results = read_json(tmp_path / "toy.json")
    # the last 20 steps' mean loss (each step's loss is one noisy batch)
    final = {variant: sum(run["losses"][-20:]) / 20 for variant, run in results.items()}
    assert final["fp32"] < 0.5 * results["fp32"]["losses"][0], "the toy task must actually be learned"
    assert abs(final["fourbit"] - final["fp32"]) <= 0.02 * final["fp32"]
    assert results["fourbit"]["fp32_bytes"] >= 7.5 * results["fourbit"]["bytes_sent"]
    for variant in ("fp32", "fourbit"):
        rank_weights = [read_weights(tmp_path / f"{variant}_weights{rank}.safetensors")["weights"] for rank in (0, 1)]
        assert torch.equal(*rank_weights), f"{variant}: replicas drifted apart"
