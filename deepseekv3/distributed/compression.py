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

The arithmetic is memory-bound, so it makes few passes and allocates nothing per step: each state reuses its scratch
buffers (grown to the largest bucket, about `2.9 + 2.1 / world_size` times its fp32 bytes; on CPU, allocating
bucket-sized tensors cost more page faults than the arithmetic itself), codes are packed with exact fp32 arithmetic,
decoded by one gather from a 256-entry table (both values of a byte at once), and what quantisation dropped is
computed while the codes travel. The results are bit-identical to quantising with [`quantize_4bit`] and decoding
with [`dequantize_4bit`] step by step.
"""

import math

import torch
import torch.distributed as dist
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
_ZERO_BYTE = _CODE_OFFSET | (_CODE_OFFSET << 4)  # both nibbles decode to 0.0
_SCALE_BYTES = 4  # one fp32 scale per chunk
_DECODE_TABLES: dict[torch.device, torch.Tensor] = {}


# Every group an exchange runs on (the hook's private groups, and the groups `compressed_allreduce` is called with),
# kept until the interpreter exits. The exchange's callbacks run on the gloo worker thread and are released there;
# were the last reference to their group dropped on that thread (the state freed, or `destroy_process_group` run by
# the main thread while a callback that already completed the caller's future was still finishing), the group's
# destructor would join the thread it runs on and abort the process ("Resource deadlock avoided").
_HOOK_GROUPS: list[dist.ProcessGroup] = []


def _keep_alive(group: dist.ProcessGroup) -> None:
    if not any(kept is group for kept in _HOOK_GROUPS):
        _HOOK_GROUPS.append(group)


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
    if values.ndim != 1 or values.numel() % chunk_size != 0 or chunk_size % 2 != 0:
        raise ValueError(
            f"quantize_4bit needs a 1-D tensor whose length is a multiple of an even chunk_size; got shape "
            f"{tuple(values.shape)} and chunk_size {chunk_size}"
        )
    chunks = values.float().view(-1, chunk_size)
    byte_values = torch.empty(values.numel() // 2, device=values.device)
    scales = _quantize(chunks, torch.empty_like(chunks), byte_values)
    return byte_values.to(torch.uint8), scales


def dequantize_4bit(packed: torch.Tensor, scales: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Inverse of [`quantize_4bit`]: fp32 values of shape `(packed.numel() * 2,)`."""
    values = torch.empty(packed.numel() * 2, device=packed.device)
    index = torch.empty(packed.numel(), dtype=torch.int32, device=packed.device)
    _dequantize(packed.view(1, -1), scales, values, chunk_size, index)
    return values


def _quantize(chunks: torch.Tensor, codes: torch.Tensor, byte_values: torch.Tensor) -> torch.Tensor:
    """[`quantize_4bit`] into buffers the caller reuses; returns the scales, `(num_chunks,)`.

    Args:
        chunks (`torch.Tensor` of shape `(num_chunks, chunk_size)`): fp32 values, left unchanged.
        codes (`torch.Tensor`, `chunks`' shape): fp32, receives each value's code -7..7 (the values they decode to
            are `codes * scales[:, None]`). A chunk holding inf or NaN gets a non-finite scale and arbitrary codes.
        byte_values (`torch.Tensor` of shape `(numel // 2,)`): fp32, receives the packed bytes as whole numbers
            0..255, for a copy into a uint8 buffer.
    """
    # max|x| from two reductions, without an |x| temporary; a NaN propagates through both
    scales = torch.maximum(chunks.amax(dim=1), chunks.amin(dim=1).neg_()).div_(_MAX_CODE)
    safe_scales = torch.where(scales > 0, scales, 1.0)  # an all-zero chunk codes to zeros
    torch.div(chunks, safe_scales[:, None], out=codes).round_().clamp_(-_MAX_CODE, _MAX_CODE)
    pairs = codes.view(-1, 2)
    # (high + 8) * 16 + (low + 8), exact in fp32
    torch.add(pairs[:, 0], pairs[:, 1], alpha=16, out=byte_values).add_(_CODE_OFFSET * 17)
    return scales


def _decode_table(device: torch.device) -> torch.Tensor:
    """`(256,)` float64 whose entry `b` holds, as two fp32, the codes of byte `b` minus the offset (low nibble
    first): one gather decodes both values of a byte."""
    table = _DECODE_TABLES.get(device)
    if table is None:
        byte = torch.arange(256)
        pairs = torch.stack((byte & 0x0F, byte >> 4), dim=1).float() - _CODE_OFFSET
        table = pairs.to(device).view(torch.float64).view(-1)
        _DECODE_TABLES[device] = table
    return table


def _dequantize(
    codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, chunk_size: int, index: torch.Tensor
) -> None:
    """Decodes rows of packed codes into `out`, each row zero-padded to whole chunks.

    Args:
        codes (`torch.Tensor` of shape `(num_rows, code_bytes)`): uint8, any strides.
        scales (`torch.Tensor`): fp32, one per chunk of `out`.
        out (`torch.Tensor` of shape `(num_rows * padded_row,)`): contiguous fp32 at an even offset; row `r`'s
            values at `r * padded_row`, with `padded_row` a multiple of `chunk_size`.
        chunk_size (`int`): values sharing one scale.
        index (`torch.Tensor` of shape `(num_rows * padded_row // 2,)`): int32 scratch.
    """
    num_rows, code_bytes = codes.shape
    index = index.view(num_rows, -1)
    index[:, :code_bytes].copy_(codes)
    index[:, code_bytes:].fill_(_ZERO_BYTE)
    torch.index_select(_decode_table(out.device), 0, index.view(-1), out=out.view(torch.float64))
    out.view(-1, chunk_size).mul_(scales.view(-1, 1))


class FourBitCompressionState:
    """What [`fourbit_hook`] keeps between steps: the error-feedback buffers, the byte counters and the scratch
    buffers its exchanges reuse (so a state runs one exchange at a time, as the hook does).

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
        self._buffers: dict[str, torch.Tensor] = {}
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
        _keep_alive(hook_group)
        return hook_group

    def _group_for_hook(self) -> dist.ProcessGroup:
        if self._hook_group is None:
            self._hook_group = self._new_hook_group()
        return self._hook_group

    def _error(self, errors: dict[int, torch.Tensor], key: int, numel: int, device: torch.device) -> torch.Tensor:
        # DDP rebuilds its buckets after the first iteration, so a key may come back with another size.
        error = errors.get(key)
        if error is None or error.numel() != numel or error.device != device:
            error = torch.zeros(numel, device=device)
            errors[key] = error
        return error

    def _buffer(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """`numel` values of the named scratch buffer, 1-D, starting at its first byte.

        Exchanges run one at a time, so each reuses the same buffers, grown to the largest bucket: allocating a
        bucket-sized tensor costs a page fault per 4 KiB on CPU, more than the arithmetic done in it."""
        nbytes = numel * dtype.itemsize
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < nbytes or buffer.device != device:
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._buffers[name] = buffer
        return buffer[:nbytes].view(dtype)


def _keep_dropped(values: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Turns `codes` (from [`_quantize`] of `values`, both `(num_chunks, chunk_size)`) into what the quantisation
    dropped: `values` minus what the codes decode to, the next step's error feedback."""
    codes.mul_(scales[:, None])
    torch.sub(values, codes, out=codes)


def _row_spans(numel: int, num_rows: int, row_numel: int) -> list[tuple[int, int, int]]:
    """`(row, start, length)` of each row's values in a flat tensor of `numel` cut into rows of `row_numel`."""
    spans = []
    for row in range(num_rows):
        start = row * row_numel
        spans.append((row, start, max(0, min(row_numel, numel - start))))
    return spans


def _write_row_bytes(rows: torch.Tensor, byte_values: torch.Tensor, scales: torch.Tensor, code_bytes: int) -> None:
    """Fills `rows` `(num_rows, row_bytes)`: each row's first `code_bytes` packed codes, then its scales' bytes.

    A row is quantised padded to whole chunks; the codes of the padding (zeros) are not sent."""
    num_rows = rows.shape[0]
    rows[:, :code_bytes].copy_(byte_values.view(num_rows, -1)[:, :code_bytes])
    rows[:, code_bytes:].copy_(scales.view(torch.uint8).view(num_rows, -1))


def _row_scales(rows: torch.Tensor, code_bytes: int) -> torch.Tensor:
    """The fp32 scales of rows written by [`_write_row_bytes`], `(num_rows, chunks_per_row)`."""
    return rows[:, code_bytes:].contiguous().view(torch.float32)


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
    state: FourBitCompressionState,
    key: int,
    tensor: torch.Tensor,
    group: dist.ProcessGroup,
    out: torch.Tensor | None = None,
) -> torch.futures.Future[torch.Tensor]:
    """[`compressed_allreduce`] as a future: phase 1 issued now, phase 2 from phase 1's completion callback.

    The average is written into `out` (contiguous, `tensor`'s shape and dtype; may be `tensor` itself, read only in
    phase 1) or a new tensor. The error-feedback buffers are updated only when the exchange ends, and left as they
    were if any rank had a non-finite value."""
    _keep_alive(group)
    world_size = dist.get_world_size(group)
    chunk_size = state.chunk_size
    numel = tensor.numel()
    device = tensor.device
    shard_numel = 2 * math.ceil(numel / (2 * world_size))  # even: two codes per byte
    padded_shard = math.ceil(shard_numel / chunk_size) * chunk_size  # whole chunks, for the scales
    code_bytes = shard_numel // 2
    row_bytes = code_bytes + _SCALE_BYTES * padded_shard // chunk_size
    padded_numel = world_size * padded_shard
    spans = _row_spans(numel, world_size, shard_numel)
    flat = tensor.reshape(-1)
    result = _new_future(device)

    def buffer(name: str, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return state._buffer(name, size, dtype, device)

    # phase 1: each rank's error-corrected gradient, zero-padded to whole chunks per shard, shard i to rank i. A
    # non-finite value makes its chunk's scale inf or NaN, and that scale travels with the codes.
    sender_error = state._error(state._sender_errors, key, padded_numel, device)
    error_rows = sender_error.view(world_size, padded_shard)
    corrected = buffer("rows", padded_numel).view(world_size, padded_shard)
    for row, start, length in spans:
        torch.add(flat[start : start + length], error_rows[row, :length], out=corrected[row, :length])
        corrected[row, length:].zero_()  # the error is zero there too
    sender_dropped = buffer("codes", padded_numel).view(-1, chunk_size)
    byte_values = buffer("work", padded_numel // 2)
    scales = _quantize(corrected.view(-1, chunk_size), sender_dropped, byte_values)
    outgoing = buffer("outgoing", world_size * row_bytes, torch.uint8).view(world_size, row_bytes)
    _write_row_bytes(outgoing, byte_values, scales, code_bytes)
    incoming = buffer("incoming", world_size * row_bytes, torch.uint8).view(world_size, row_bytes)
    phase1 = dist.all_to_all_single(incoming, outgoing, group=group, async_op=True).get_future()
    # while the codes travel; phase 2, registered after this, may reuse `corrected`
    _keep_dropped(corrected.view(-1, chunk_size), sender_dropped, scales)

    def phase2(_: torch.futures.Future) -> None:
        # this rank's shard averaged over the ranks, error-corrected, sent to every rank
        received = buffer("rows", padded_numel)
        incoming_scales = _row_scales(incoming, code_bytes)
        index = buffer("work", padded_numel // 2, torch.int32)
        _dequantize(incoming[:, :code_bytes], incoming_scales, received, chunk_size, index)
        shard = buffer("shard", padded_shard)
        torch.mean(received.view(world_size, padded_shard)[:, :shard_numel], dim=0, out=shard[:shard_numel])
        shard[shard_numel:].zero_()
        shard_error = state._error(state._shard_errors, key, padded_shard, device)
        shard.add_(shard_error)
        shard_dropped = buffer("shard_codes", padded_shard).view(-1, chunk_size)
        byte_values = buffer("work", padded_shard // 2)
        shard_scales = _quantize(shard.view(-1, chunk_size), shard_dropped, byte_values)
        # a non-finite value anywhere in this shard, on any rank, shows as a NaN scale to every rank
        shard_scales.masked_fill_(~torch.isfinite(incoming_scales).all(), math.nan)
        own_row = buffer("own_row", row_bytes, torch.uint8).view(1, row_bytes)
        _write_row_bytes(own_row, byte_values, shard_scales, code_bytes)
        gathered = buffer("gathered", world_size * row_bytes, torch.uint8).view(world_size, row_bytes)
        phase2_future = _all_gather(gathered, own_row, group).get_future()
        _keep_dropped(shard.view(-1, chunk_size), shard_dropped, shard_scales)  # while the codes travel
        _after(phase2_future, result, lambda done: finish(gathered, shard_dropped, shard_error))

    def finish(gathered: torch.Tensor, shard_dropped: torch.Tensor, shard_error: torch.Tensor) -> None:
        # every rank holds the same `gathered`, so every rank takes the same branch
        gathered_scales = _row_scales(gathered, code_bytes)
        if bool(torch.isfinite(gathered_scales).all()):
            sender_error.copy_(sender_dropped.view(-1))
            shard_error.copy_(shard_dropped.view(-1))
        else:
            state.num_overflows += 1
        # Both phases send every row but this rank's own; the reference is a ring all-reduce of the bucket.
        state.bytes_sent += 2 * (world_size - 1) * row_bytes
        state.uncompressed_bytes += 2 * (world_size - 1) * numel * tensor.element_size() // world_size
        state.fp32_bytes += 2 * (world_size - 1) * numel * 4 // world_size
        state.num_allreduces += 1
        averaged = torch.empty_like(tensor, memory_format=torch.contiguous_format) if out is None else out
        index = buffer("work", padded_numel // 2, torch.int32)
        direct = averaged.dtype == torch.float32 and averaged.storage_offset() % 2 == 0
        if direct and numel == padded_numel:  # no padding anywhere: decode straight into the result
            _dequantize(gathered[:, :code_bytes], gathered_scales, averaged.view(-1), chunk_size, index)
        else:
            decoded = buffer("rows", padded_numel).view(world_size, padded_shard)
            _dequantize(gathered[:, :code_bytes], gathered_scales, decoded.view(-1), chunk_size, index)
            averaged_flat = averaged.view(-1)
            for row, start, length in spans:
                averaged_flat[start : start + length].copy_(decoded[row, :length])
        result.set_result(averaged)

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
            exchange = _compressed_allreduce_async(state, key, buffer, group, out=buffer)
        except BaseException as error:  # noqa: BLE001 - handed to DDP through the future
            result.set_exception(error)
            return
        _after(exchange, result, lambda done: result.set_result(done.value()))

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
