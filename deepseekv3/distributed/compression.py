"""4-bit gradient compression for PyTorch DDP, with error feedback and byte counting.

`fourbit_hook` is a DDP communication hook (`DistributedDataParallel.register_comm_hook`). Each gradient bucket is
averaged in two compressed phases, the same traffic pattern as a ring all-reduce's reduce-scatter and all-gather:

1. Every rank adds its carried-over quantisation error to the bucket, quantises it to 4 bits (two codes per byte,
   one fp32 scale per `chunk_size` values) and sends shard `i` to rank `i` (`all_to_all_single`).
2. Rank `i` dequantises the shards it received, averages them, adds its own carried-over error for that shard,
   quantises the average again and sends it to every rank (`all_gather_single`).

Each rank sends `2 (world - 1) / world` of the compressed bucket, as a ring all-reduce sends that fraction of the
fp32 bucket, so the saving does not shrink as ranks are added (an all-gather of whole compressed buckets would
send `world - 1` times the payload). Every rank ends with bit-identical gradients, so replicas stay in sync.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019, "EF-SGD"): what quantisation drops in one step is added
to the next step's input, on the sending side (per rank and bucket) and on the averaging side (per shard). The
averaged gradients summed over steps then differ from the exact sums by at most one step's quantisation error, so
training converges like uncompressed training.

A non-finite value on any rank (fp16 loss scaling overflows by design) makes its chunk's scale non-finite; the rank
averaging that shard then sends a NaN scale in phase 2, so every rank sees the overflow, returns a bucket holding
inf/NaN (as an uncompressed all-reduce would, so `GradScaler` or the optimizer skips the step) and leaves the
error-feedback buffers as they were before that step.

The hook does not block backward: phase 1 is issued asynchronously and phase 2 from its future's callback, as
torch's PowerSGD hook chains its all-reduces. Collectives of one process group must be issued in the same order on
every rank, and a callback runs whenever a collective completes, so the hook issues its collectives on a private
process group (same ranks; DDP's own collectives, such as the unused-parameter all-reduce, stay on the user's) and
starts a bucket only once the previous bucket's exchange has finished.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback
from transformers.utils import logging

__all__ = [
    "FourBitCompressionCallback",
    "FourBitCompressionState",
    "compressed_allreduce",
    "dequantize_4bit",
    "fourbit_hook",
    "quantize_4bit",
    "register_fourbit_hook",
]

logger = logging.get_logger(__name__)

# Symmetric codes -7..7 around zero, stored as 1..15 in a nibble: zero is exact and the range is balanced.
_MAX_CODE = 7
_CODE_OFFSET = 8
_SCALE_BYTES = 4  # one fp32 scale per chunk


# Every hook group, kept until the interpreter exits. The exchange's callbacks run on the gloo worker thread and are
# released there; were the last reference to their group dropped on that thread (the state freed, then
# `destroy_process_group` run by the main thread while a callback was still finishing), the group's destructor would
# join the thread it runs on and abort the process ("Resource deadlock avoided"). One small group per state.
_HOOK_GROUPS: list[dist.ProcessGroup] = []


def quantize_4bit(values: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantises `values` to 4-bit codes, one scale per chunk of `chunk_size` consecutive values.

    Each value becomes `round(value / scale)` with `scale = max|chunk| / 7`, so the rounding error of a value is at
    most `max|chunk| / 14`.

    Args:
        values (`torch.Tensor` of shape `(numel,)`): fp32 values; `numel` a multiple of `chunk_size`, which is even.
        chunk_size (`int`): values sharing one scale.

    Returns:
        `(packed, scales)`: `packed` uint8 of shape `(numel // 2,)` (value `2k` in the low nibble, `2k + 1` in the
        high one) and `scales` fp32 of shape `(numel // chunk_size,)`.
    """
    packed, scales, _ = _quantize(values, chunk_size)
    return packed, scales


def _quantize(values: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[`quantize_4bit`] plus the values the codes decode to (fp32, `values`' shape), for the error feedback."""
    if values.ndim != 1 or values.numel() % chunk_size != 0 or chunk_size % 2 != 0:
        raise ValueError(
            f"quantize_4bit needs a 1-D tensor whose length is a multiple of an even chunk_size; got shape "
            f"{tuple(values.shape)} and chunk_size {chunk_size}"
        )
    chunks = values.float().view(-1, chunk_size)  # (num_chunks, chunk_size)
    scales = chunks.abs().amax(dim=1) / _MAX_CODE
    safe_scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero chunk codes to zeros
    codes = torch.round(chunks / safe_scales[:, None]).clamp_(-_MAX_CODE, _MAX_CODE)
    restored = (codes * scales[:, None]).view(-1)
    codes = (codes.to(torch.uint8) + _CODE_OFFSET).view(-1)  # int -> uint8 wraps, so the offset is added after
    packed = codes[0::2] | (codes[1::2] << 4)
    return packed, scales, restored


def dequantize_4bit(packed: torch.Tensor, scales: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Inverse of [`quantize_4bit`]: fp32 values of shape `(packed.numel() * 2,)`."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=1).view(-1, chunk_size)  # (num_chunks, chunk_size)
    return ((codes.float() - _CODE_OFFSET) * scales[:, None]).view(-1)


class FourBitCompressionState:
    """What [`fourbit_hook`] keeps between steps: the error-feedback buffers and the byte counters.

    Args:
        process_group (`torch.distributed.ProcessGroup`, *optional*): the group DDP averages over (default: the
            world).
        chunk_size (`int`, defaults to 256): values sharing one fp32 scale; even, at least 16. The payload is
            `0.5 + 4 / chunk_size` bytes per value, so 256 sends 7.76x fewer bytes than fp32 (3.88x fewer than
            bf16).

    Attributes:
        bytes_sent (`int`): compressed bytes this rank has sent to other ranks.
        uncompressed_bytes (`int`): bytes a ring all-reduce of the same buckets, in their own dtype (4 bytes a value
            for fp32, 2 for bf16 and fp16), sends per rank, `2 (world - 1) / world * element_size * numel`.
        fp32_bytes (`int`): the same for fp32 buckets, `2 (world - 1) / world * 4 * numel`, whatever the buckets'
            dtype (kept for readers of the earlier counters; equal to `uncompressed_bytes` for fp32 models).
        num_allreduces (`int`): buckets averaged so far.
        num_overflows (`int`): of those, buckets passed through non-finite (some rank had an inf or NaN).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, chunk_size: int = 256):
        if chunk_size < 16 or chunk_size % 2 != 0:
            raise ValueError(f"chunk_size ({chunk_size}) must be an even number of at least 16")
        self.process_group = process_group
        self.chunk_size = chunk_size
        self.bytes_sent = 0
        self.uncompressed_bytes = 0
        self.fp32_bytes = 0
        self.num_allreduces = 0
        self.num_overflows = 0
        self._sender_errors: dict[int, torch.Tensor] = {}
        self._shard_errors: dict[int, torch.Tensor] = {}
        self._hook_group: dist.ProcessGroup | None = None
        self._last_exchange: torch.futures.Future | None = None
        if dist.is_available() and dist.is_initialized():
            self._hook_group = self._new_hook_group()

    @property
    def compression_ratio(self) -> float:
        """Ring all-reduce bytes of the buckets in their own dtype over the bytes actually sent (0.0 before the first
        exchange)."""
        return self.uncompressed_bytes / self.bytes_sent if self.bytes_sent else 0.0

    def _new_hook_group(self) -> dist.ProcessGroup:
        # Only the group's members call this (use_local_synchronization), so a state may be built for a subgroup.
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(group)
        hook_group = dist.new_group(ranks, backend=dist.get_backend(group), use_local_synchronization=True)
        _HOOK_GROUPS.append(hook_group)
        return hook_group

    def _group_for_hook(self) -> dist.ProcessGroup:
        if self._hook_group is None:
            self._hook_group = self._new_hook_group()
        return self._hook_group

    def _error(self, errors: dict[int, torch.Tensor], key: int, like: torch.Tensor) -> torch.Tensor:
        # DDP rebuilds its buckets after the first iteration, so a key may come back with another size.
        error = errors.get(key)
        if error is None or error.shape != like.shape:
            error = torch.zeros_like(like)
            errors[key] = error
        return error


def _pack_rows(packed: torch.Tensor, scales: torch.Tensor, num_rows: int, row_numel: int) -> torch.Tensor:
    """`(num_rows, row_bytes)` uint8: each row's first `row_numel` codes, then its scales' bytes.

    A row is quantised padded to whole chunks; the codes of the padding (zeros) are not sent."""
    codes = packed.view(num_rows, -1)[:, : row_numel // 2]
    scale_bytes = scales.view(num_rows, -1).contiguous().view(torch.uint8).view(num_rows, -1)
    return torch.cat((codes, scale_bytes), dim=1)


def _row_scales(rows: torch.Tensor, row_numel: int) -> torch.Tensor:
    """The fp32 scales of packed rows, `(num_rows, chunks_per_row)`."""
    return rows[:, row_numel // 2 :].contiguous().view(torch.float32)


def _unpack_rows(rows: torch.Tensor, row_numel: int, chunk_size: int) -> torch.Tensor:
    """Inverse of [`_pack_rows`] then [`dequantize_4bit`]: fp32 of shape `(num_rows, row_numel)`."""
    num_rows = rows.shape[0]
    num_chunks = math.ceil(row_numel / chunk_size)
    codes = rows[:, : row_numel // 2]
    zero_codes = _CODE_OFFSET | (_CODE_OFFSET << 4)  # both nibbles decode to 0.0
    codes = F.pad(codes, (0, num_chunks * chunk_size // 2 - codes.shape[1]), value=zero_codes)
    values = dequantize_4bit(codes.reshape(-1), _row_scales(rows, row_numel).reshape(-1), chunk_size)
    return values.view(num_rows, -1)[:, :row_numel]


def _all_gather(output: torch.Tensor, row: torch.Tensor, group: dist.ProcessGroup) -> dist.Work:
    """Asynchronous all-gather of one row per rank into `output`: `all_gather_single` where this torch has it,
    `all_gather_into_tensor` (torch >= 2.0, the same result) before that."""
    all_gather_single = getattr(dist, "all_gather_single", None)
    if all_gather_single is not None:
        return all_gather_single(output, row, group=group, async_op=True)
    return dist.all_gather_into_tensor(output, row, group=group, async_op=True)


def _new_future(device: torch.device) -> torch.futures.Future:
    return torch.futures.Future(devices=[device]) if device.type == "cuda" else torch.futures.Future()


def _after(future: torch.futures.Future, result: torch.futures.Future, callback) -> None:
    """Runs `callback(future)` once `future` completes; an exception it raises (or `future`'s) fails `result`, so
    nothing waits forever on a failed exchange."""

    def run(done: torch.futures.Future) -> None:
        try:
            done.value()
            callback(done)
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits on `result`
            if not result.done():
                result.set_exception(error)

    future.add_done_callback(run)


def _compressed_allreduce_async(
    state: FourBitCompressionState, key: int, tensor: torch.Tensor, group: dist.ProcessGroup
) -> torch.futures.Future[torch.Tensor]:
    """[`compressed_allreduce`] as a future: phase 1 issued now, phase 2 from phase 1's completion callback.

    The error-feedback buffers are updated only when the exchange ends, and left as they were if any rank had a
    non-finite value."""
    world_size = dist.get_world_size(group)
    chunk_size = state.chunk_size
    numel = tensor.numel()
    shard_numel = 2 * math.ceil(numel / (2 * world_size))  # even: two codes per byte
    padded_shard = math.ceil(shard_numel / chunk_size) * chunk_size  # whole chunks, for the scales
    flat = F.pad(tensor.reshape(-1).float(), (0, world_size * shard_numel - numel)).view(world_size, shard_numel)
    padded = F.pad(flat, (0, padded_shard - shard_numel)).view(-1)  # (world_size * padded_shard,)
    result = _new_future(tensor.device)

    # phase 1: each rank's error-corrected gradient, shard i to rank i. A non-finite value makes its chunk's scale
    # inf or NaN, and that scale travels with the codes.
    corrected = padded + state._error(state._sender_errors, key, padded)
    packed, scales, restored = _quantize(corrected, chunk_size)
    sender_error = corrected - restored
    outgoing = _pack_rows(packed, scales, world_size, shard_numel)  # (world_size, row_bytes)
    incoming = torch.empty_like(outgoing)
    phase1 = dist.all_to_all_single(incoming, outgoing, group=group, async_op=True).get_future()

    def phase2(_: torch.futures.Future) -> None:
        # this rank's shard averaged over the ranks, error-corrected, sent to every rank
        shard_mean = _unpack_rows(incoming, shard_numel, chunk_size).mean(dim=0)
        shard_mean = F.pad(shard_mean, (0, padded_shard - shard_numel))
        shard_mean = shard_mean + state._error(state._shard_errors, key, shard_mean)
        shard_packed, shard_scales, shard_restored = _quantize(shard_mean, chunk_size)
        shard_error = shard_mean - shard_restored
        # a non-finite value anywhere in this shard, on any rank, shows as a NaN scale to every rank
        received_finite = torch.isfinite(_row_scales(incoming, shard_numel)).all()
        shard_scales = torch.where(received_finite, shard_scales, torch.full_like(shard_scales, math.nan))
        own_row = _pack_rows(shard_packed, shard_scales, 1, shard_numel)  # (1, row_bytes)
        gathered = torch.empty(world_size, own_row.shape[1], dtype=torch.uint8, device=tensor.device)
        phase2_future = _all_gather(gathered, own_row, group).get_future()
        _after(phase2_future, result, lambda done: finish(gathered, own_row.numel(), sender_error, shard_error))

    def finish(gathered: torch.Tensor, row_bytes: int, sender_error: torch.Tensor, shard_error: torch.Tensor):
        # every rank holds the same `gathered`, so every rank takes the same branch
        if bool(torch.isfinite(_row_scales(gathered, shard_numel)).all()):
            state._sender_errors[key] = sender_error
            state._shard_errors[key] = shard_error
        else:
            state.num_overflows += 1
        # Both phases send every row but this rank's own; the reference is a ring all-reduce of the bucket.
        state.bytes_sent += 2 * (world_size - 1) * row_bytes
        state.uncompressed_bytes += 2 * (world_size - 1) * numel * tensor.element_size() // world_size
        state.fp32_bytes += 2 * (world_size - 1) * numel * 4 // world_size
        state.num_allreduces += 1
        averaged = _unpack_rows(gathered, shard_numel, chunk_size).reshape(-1)[:numel]
        result.set_result(averaged.view(tensor.shape).to(tensor.dtype))

    _after(phase1, result, phase2)
    return result


def compressed_allreduce(state: FourBitCompressionState, key: int, tensor: torch.Tensor) -> torch.Tensor:
    """Averages `tensor` over the ranks of `state.process_group` in 4 bits, with error feedback.

    Every rank must call it with the same `key` and shape, in the same order. Returns a new tensor of `tensor`'s
    shape and dtype, bit-identical on every rank; holding inf or NaN if any rank's `tensor` did, in which case the
    error-feedback buffers are left unchanged.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    return _compressed_allreduce_async(state, key, tensor, group).wait()


def fourbit_hook(state: FourBitCompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: averages the bucket in 4 bits, as [`compressed_allreduce`] does, without blocking.

    Returns at once a future of the averaged bucket; the exchange runs while backward goes on. Register with
    `ddp_model.register_comm_hook(FourBitCompressionState(), fourbit_hook)`, or [`register_fourbit_hook`].
    """
    buffer = bucket.buffer()
    key = bucket.index()
    group = state._group_for_hook()
    result = _new_future(buffer.device)

    def start(_: torch.futures.Future | None = None) -> None:
        try:
            exchange = _compressed_allreduce_async(state, key, buffer, group)
        except BaseException as error:  # noqa: BLE001 - handed to DDP through the future
            result.set_exception(error)
            return
        _after(exchange, result, lambda done: result.set_result(buffer.copy_(done.value())))

    # Buckets are exchanged one after another, in the order DDP hands them over, which is the same on every rank.
    previous = state._last_exchange
    state._last_exchange = result
    if previous is None or previous.done():
        start()
    else:
        # an earlier bucket's failure fails that bucket's future; this one still runs its exchange
        previous.add_done_callback(start)
    return result


def register_fourbit_hook(
    model: DistributedDataParallel, process_group: dist.ProcessGroup | None = None, chunk_size: int = 256
) -> FourBitCompressionState:
    """Registers [`fourbit_hook`] on a DDP-wrapped model and returns its state (for the byte counters).

    With Accelerate, call it on what `accelerator.prepare(model)` returned, before the first backward.
    """
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"The 4-bit hook is a DistributedDataParallel communication hook; got {type(model).__name__}. "
            "FSDP and DeepSpeed reduce gradients with their own collectives."
        )
    state = FourBitCompressionState(process_group=process_group, chunk_size=chunk_size)
    model.register_comm_hook(state, fourbit_hook)
    return state


class FourBitCompressionCallback(TrainerCallback):
    """Registers [`fourbit_hook`] when a `Trainer` starts training under DDP, and logs its bytes.

    `Trainer` wraps the model in DDP inside `train()`, after callbacks are created, so the callback reads the wrapped
    model from the trainer: `trainer.add_callback(FourBitCompressionCallback(trainer))`. The logs passed to later
    callbacks (and `trainer.state.log_history`) gain `comm_bytes_sent` (this rank's compressed bytes so far) and
    `comm_compression_ratio` (ring all-reduce bytes of the buckets in their own dtype / bytes sent). In a single
    process (nothing to exchange) it does nothing.

    Args:
        trainer (`transformers.Trainer`): the trainer whose model to hook.
        chunk_size (`int`, defaults to 256): see [`FourBitCompressionState`].
    """

    def __init__(self, trainer, chunk_size: int = 256):
        self.trainer = trainer
        self.chunk_size = chunk_size
        self.state: FourBitCompressionState | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.state is not None:
            return
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, DistributedDataParallel):
            self.state = register_fourbit_hook(wrapped, chunk_size=self.chunk_size)
        elif args.world_size > 1:
            raise TypeError(
                f"FourBitCompressionCallback needs DDP training; the trainer wrapped the model in "
                f"{type(wrapped).__name__} (FSDP and DeepSpeed reduce gradients with their own collectives)"
            )
        else:
            logger.warning_once("FourBitCompressionCallback: single process, gradients are not exchanged")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.state is None or logs is None:
            return
        counters = {"comm_bytes_sent": self.state.bytes_sent, "comm_compression_ratio": self.state.compression_ratio}
        logs.update(counters)
        # `Trainer.log` appends a copy of `logs` to the history before the callbacks see them
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(counters)
