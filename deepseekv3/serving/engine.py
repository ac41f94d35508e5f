"""Continuous-batching inference engine for `DeepseekV3MultimodalForConditionalGeneration` (greedy or sampled
decoding, chosen per request).

Requests (token ids, with images and audio as the processor returns them) enter a bounded queue and come back as
futures and token streams (`RequestHandle`). At every decoding step the engine drops cancelled and timed-out
requests, admits waiting ones while a slot and the token budget allow, runs one prefill forward, and decodes one token
for every request of the batch on a shared left-padded MLA latent cache (`LatentBatch`). Requests leave the batch the
step they finish. A `SelfTuningScheduler` may choose the batch size and token budget online.

Prefill is batched and chunked. Every prefilled prompt goes into the prefix cache (`PrefixCache`, a radix tree keyed
by token ids and, inside image and audio spans, media digests), and a request starts its prefill on the longest cached
prefix of its prompt (automatic prefix caching; `warm_up` fills the cache ahead). One forward per step prefills the
requests in admission order, text and media alike, hits and misses alike: left-padded, each row's cached positions
first and its new ones after, the new part as wide as the widest row's (a row with fewer new positions recomputes its
last cached ones instead of padding), and its finished rows join the batch in one copy. With `prefill_chunk_tokens`
that forward computes at most that many positions (rows x width), so a long prompt is prefilled a chunk per step while
the batch keeps decoding a token per step; chunks end at media span boundaries (a span is embedded whole and may
attend to itself both ways), so a span longer than a chunk is prefilled whole.

The token budget bounds what the cache really holds: rows x the longest row, padding included. Admission charges the
batch's padded cache over its coming steps (`padded_peak`), each request running to its predicted length
(`max_new_tokens` without a trained `LengthPredictor`, or once it has outgrown its prediction). The oldest waiting
request goes first; when it does not fit, younger ones may pass it once, then nothing passes it until it fits. The
others follow in arrival order (with a trained predictor, those whose predicted total length is closest to the
batch's first). Before every decoding step the actual cache is charged again; when the step would take it over the
budget, the youngest requests are preempted: their rows are dropped and they wait again, in arrival order, to be
prefilled later on their prompt plus the tokens they have generated (recomputation), which continues them with the
same tokens as an uninterrupted run. The oldest running request is never preempted: alone, a request always runs (it
fits the largest budget, checked at `submit`), even when a scheduler's current setting has a smaller one.

transformers' own continuous batching (`generate_batch`, transformers 5.24) does not run this model: its paged
cache has no `get_seq_length` (the model's forward fails with `AttributeError: 'PagedAttentionCache' object has no
attribute 'get_seq_length'`), and it stores per-head keys and values of one shape, where MLA caches a single
latent (`kv_lora_rank`) and a rotated key (`qk_rope_head_dim`) of different widths. The engine therefore drives the
model's own forward with a `DynamicCache` per batch. Greedy outputs equal `model.generate(do_sample=False)` request
by request (the placeholder tokens in the generation config's `suppress_tokens` are suppressed the same way). A request
with `SamplingParams` has its own logits processors applied to its own logits row and draws from its own generator
(`TokenSampler`), so the rows of one batch may sample differently, and a seeded request draws the same tokens alone or
in any batch.

Every request ends, in its result or a clear error. `submit` refuses malformed requests with `ValueError` (token ids
outside the vocabulary, placeholders without their media, media of the wrong shape). A prefill that fails is retried
one request at a time, so only the request that breaks it fails, and the decoding batch is not touched. Any other
exception in a step (length prediction, admission, decoding, cache compaction) fails every queued and decoding
request with `EngineFaultError`, resets the batch and lets the loop go on; `health` counts the faults and reports the
engine unhealthy after `max_consecutive_faults` failed steps in a row, until a step succeeds again.
"""

import asyncio
import bisect
import concurrent.futures
import functools
import json
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.generation.logits_process import SuppressTokensLogitsProcessor
from transformers.utils import logging

from ..embeddings_deepseekv3 import audio_tokens_per_clip
from .latent_batch import LatentBatch, cache_from_layers, cache_layers, padded_peak, select_rows, stack_rows
from .length_predictor import LengthPredictor, LengthRecord
from .prefix_cache import MediaPosition, PrefixCache, boundary_after, boundary_before, media_digest
from .sampling import SamplingParams, TokenSampler
from .scheduler import SchedulerSetting, SelfTuningScheduler

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineFaultError",
    "EngineHealth",
    "EngineOverloadedError",
    "EngineStoppedError",
    "GenerationResult",
    "RequestHandle",
    "RequestTimeoutError",
    "RequestTooLargeError",
]

logger = logging.get_logger(__name__)

_MEDIA_KEYS = ("pixel_values", "input_features", "input_features_mask")
_IGNORED_KEYS = ("attention_mask", "mm_token_type_ids")
_LOG_NAME = "generation_log.jsonl"
_END = object()
# a request waits a step for a prefix that another request's prefill is computing when they share this many positions
# (SGLang's in-batch prefix caching uses the same threshold)
SHARED_PREFIX_POSITIONS = 32


class EngineOverloadedError(RuntimeError):
    """The request queue is full (back-pressure): retry later."""


class EngineStoppedError(RuntimeError):
    """The engine was stopped (or its loop ended on an internal error) before the request finished."""


class EngineFaultError(RuntimeError):
    """The engine failed while serving the request, which was not finished; the exception is chained as the cause.

    Attributes:
        stage (`str`): where the engine failed: `"length prediction"`, `"admission"`, `"prefill"`, `"decode"`,
            `"cache compaction"` or `"loop"`.
    """

    def __init__(self, request_id: int, stage: str, error: BaseException):
        super().__init__(
            f"request {request_id} failed: the engine failed during {stage} ({type(error).__name__}: {error})"
        )
        self.stage = stage
        self.__cause__ = error


class RequestTimeoutError(TimeoutError):
    """The request did not finish within its timeout."""


class RequestTooLargeError(ValueError):
    """The request can never fit, even alone: its prompt plus `max_new_tokens` exceed the model's positions or the
    token budget."""


@dataclass
class EngineConfig:
    """Engine settings (serving options: not saved with the weights nor by `save_state`).

    Args:
        max_batch_size (`int`, defaults to 16): most requests decoding together (when no scheduler chooses it).
        max_batch_tokens (`int`, defaults to 4096): token budget of the batch: the most positions its cache holds,
            rows x the longest row (padding included).
        max_queue_size (`int`, defaults to 256): most requests waiting; past it `submit` raises
            `EngineOverloadedError`.
        default_max_new_tokens (`int`, defaults to 32): `max_new_tokens` of a request that names none.
        prefix_cache_bytes (`int`, defaults to 64 MiB): byte budget of the prefix cache (the bytes of its tensors).
        prefill_chunk_tokens (`int`, *optional*, defaults to 512): most positions one step's prefill forward
            computes (rows x the widest row, padding included), so a long prompt is prefilled in chunks, one per
            step, while the batch decodes; a media span longer than this is still prefilled whole. `None` prefills
            every admitted prompt in one forward.
        log_size (`int`, defaults to 10000): finished requests kept in the length log (a ring buffer).
        log_prompt_tokens (`int`, defaults to 0): last prompt tokens each length-log record keeps, as the features
            `LengthPredictor.fit` trains on; 0 keeps lengths only. They stay in memory: `save_state` writes lengths
            only.
        max_consecutive_faults (`int`, defaults to 3): failed steps in a row after which `health` reports the engine
            unhealthy (it keeps serving, and is healthy again once a step succeeds).
        absorbed_decoding (`bool`, defaults to `True`): decoding steps attend to the cached MLA latent directly
            instead of expanding it into every head's keys and values (`absorbed_decoding`); the same attention,
            summed in another order.
    """

    max_batch_size: int = 16
    max_batch_tokens: int = 4096
    max_queue_size: int = 256
    default_max_new_tokens: int = 32
    prefix_cache_bytes: int = 64 * 2**20
    prefill_chunk_tokens: int | None = 512
    log_size: int = 10_000
    log_prompt_tokens: int = 0
    max_consecutive_faults: int = 3
    absorbed_decoding: bool = True

    def __post_init__(self):
        names = (
            "max_batch_size",
            "max_batch_tokens",
            "max_queue_size",
            "default_max_new_tokens",
            "log_size",
            "max_consecutive_faults",
        )
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 1")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens ({self.prefill_chunk_tokens}) must be at least 1, or None")
        if self.log_prompt_tokens < 0:
            raise ValueError(f"log_prompt_tokens ({self.log_prompt_tokens}) must be at least 0")


@dataclass(frozen=True)
class EngineHealth:
    """What `Engine.health` (and the server's `/health`) reports.

    Attributes:
        is_healthy (`bool`): False after `max_consecutive_faults` failed steps in a row (until a step succeeds), or
            once the loop has ended on an internal error.
        reason (`str` or `None`): why the engine is unhealthy.
        faults (`int`): failed steps and prefills since the engine was built.
        last_fault (`str` or `None`): the latest fault: its stage and exception type.
    """

    is_healthy: bool
    reason: str | None
    faults: int
    last_fault: str | None


@dataclass
class GenerationResult:
    """A finished request.

    Attributes:
        request_id (`int`), token_ids (`list[int]`): the generated tokens (the stop token included, as `generate`).
        finish_reason (`str`): `"stop"` (a stop token) or `"length"` (`max_new_tokens` reached).
        prompt_length (`int`), cached_prefix_length (`int`): prompt tokens, and how many of them the prefill took
            from the prefix cache (those a batched prefill recomputed in place of padding do not count).
        queued_s, first_token_s, latency_s (`float`): seconds from submission to admission, to the first token, to
            the end.
    """

    request_id: int
    token_ids: list[int]
    finish_reason: str
    prompt_length: int
    cached_prefix_length: int
    queued_s: float
    first_token_s: float
    latency_s: float


class RequestHandle:
    """What `Engine.submit` returns: a future of the `GenerationResult` and a stream of tokens.

    Iterate (or `async for` over `astream()`) to receive tokens as they are generated; the iteration raises the
    request's error, if any, at the end. `cancel()` stops the request at the next step. The stream has one consumer.
    """

    def __init__(self, request_id: int):
        self.request_id = request_id
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._stream: queue.SimpleQueue = queue.SimpleQueue()
        self._is_ended = False
        # however the future ends (result, error, or a cancel from any thread or from asyncio), the stream ends too
        self.future.add_done_callback(lambda _: self._stream.put(_END))

    def cancel(self) -> bool:
        """Cancels the request and ends its stream; False if it had already finished."""
        return self.future.cancel()

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Blocks for the result; raises the request's error (`RequestTimeoutError`, `CancelledError`, ...)."""
        return self.future.result(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the request has ended or `timeout` seconds have passed; returns whether it has ended."""
        done, _ = concurrent.futures.wait([self.future], timeout)
        return bool(done)

    def next_token(self, timeout: float | None = None) -> int | None:
        """The next generated token, or `None` once the stream has ended (`result()` then holds the outcome).

        Raises:
            `TimeoutError` when no token came within `timeout` seconds.
        """
        if self._is_ended:
            return None
        try:
            token = self._stream.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no token of request {self.request_id} within {timeout} s") from None
        if token is _END:
            self._is_ended = True
            return None
        return token

    async def aresult(self) -> GenerationResult:
        """`result()` for asyncio code; cancelling the awaiting task cancels the request."""
        return await asyncio.wrap_future(self.future)

    def __iter__(self) -> Iterator[int]:
        while (token := self.next_token()) is not None:
            yield token
        self.future.result()  # raises the error that ended the stream, if any

    async def astream(self) -> AsyncIterator[int]:
        """The token stream for asyncio code. Cancelling the consuming task (or leaving the stream early) cancels the
        request, which ends the stream and so frees the worker thread waiting on it."""
        try:
            while (token := await asyncio.to_thread(self.next_token)) is not None:
                yield token
        finally:
            self.cancel()  # a no-op once the request has ended
        await self.aresult()

    def _push(self, token: int) -> None:
        self._stream.put(token)

    def _settle(self, result: GenerationResult | None = None, error: BaseException | None = None) -> bool:
        """Sets the outcome; False when the request had already ended (cancelled meanwhile, say)."""
        try:
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
        except concurrent.futures.InvalidStateError:
            return False
        return True


@dataclass
class _PromptLayout:
    """A prompt's prefix-cache keys, and the position of each image's and clip's first placeholder with its
    `pixel_values` / unpadded `input_features`."""

    keys: list
    images: list[tuple[int, torch.Tensor]]
    clips: list[tuple[int, torch.Tensor]]


@dataclass
class _Request:
    handle: RequestHandle
    input_ids: list[int]
    media: dict[str, torch.Tensor]
    max_new_tokens: int
    arrival: float
    deadline: float | None
    sampler: TokenSampler | None = None  # None: plain greedy (the batch's argmax)
    predicted_new_tokens: int = 0
    passed_over: bool = False  # younger requests were admitted while it waited as the oldest
    generated: list[int] = field(default_factory=list)
    admitted: float = 0.0
    first_token: float = 0.0
    cached_prefix_length: int = 0
    layout: _PromptLayout | None = None  # computed at its first prefill
    prefilling: bool = False  # admitted, and its prefill not complete
    keys: list | None = None  # prefix-cache keys of `prefill_ids`, from its prefill's start to its end
    prefilled: int = 0  # leading positions of `prefill_ids` whose latents `prefill_layers` hold
    prefill_layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    computed: bool = False  # a prefill forward has computed some of its positions (`prefill_layers` hold them)

    @property
    def request_id(self) -> int:
        return self.handle.request_id

    @property
    def predicted_total(self) -> int:
        return len(self.input_ids) + self.predicted_new_tokens

    @property
    def prefill_ids(self) -> list[int]:
        """The prompt and the tokens generated before a preemption: what its (next) prefill computes."""
        return self.input_ids + self.generated

    def padded_row(self, emitted: int) -> tuple[int, int]:
        """Its `(length, steps)` for `padded_peak` once `emitted` tokens are out: the positions it caches at its next
        decoding step, and the steps it runs to its predicted length (to `max_new_tokens` once outgrown)."""
        final = self.predicted_new_tokens if self.predicted_new_tokens > len(self.generated) else self.max_new_tokens
        return len(self.input_ids) + emitted, final - emitted

    def end_prefill(self) -> None:
        """Drops the state of its prefill (complete, or given up when it is preempted)."""
        self.prefilling, self.keys, self.prefilled, self.prefill_layers = False, None, 0, None
        self.computed = False

    def is_finished(self, stop_ids: set[int]) -> bool:
        return len(self.generated) >= self.max_new_tokens or self.generated[-1] in stop_ids


class Engine:
    """Continuous-batching generation on one model, greedy or sampled per request (see the module docstring).

    Args:
        model (`PreTrainedModel`): a `DeepseekV3MultimodalForConditionalGeneration` (any device, any dtype).
        config (`EngineConfig`, *optional*): engine settings.
        length_predictor (`LengthPredictor`, *optional*): output-length predictor for admission and grouping.
        scheduler (`SelfTuningScheduler`, *optional*): chooses batch size and token budget online; without it the
            config's `max_batch_size` / `max_batch_tokens` hold.

    Use `start()` / `stop()` (or `with engine:`) to run the loop in a background thread, or call `step()` /
    `run_until_idle()` from the current thread.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: EngineConfig | None = None,
        length_predictor: LengthPredictor | None = None,
        scheduler: SelfTuningScheduler | None = None,
    ):
        self.model = model.eval()
        self.config = config or EngineConfig()
        self._check_predictor(length_predictor)
        self.length_predictor = length_predictor
        self.scheduler = scheduler
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes)
        self._cacheable_positions = self.config.prefix_cache_bytes // latent_position_bytes(model)
        self.length_log: deque[LengthRecord] = deque(maxlen=self.config.log_size)
        generation_config = model.generation_config
        eos = generation_config.eos_token_id
        self.stop_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.pad_token_id = generation_config.pad_token_id if generation_config.pad_token_id is not None else 0
        suppress = generation_config.suppress_tokens
        self._suppress = SuppressTokensLogitsProcessor(suppress, device=model.device) if suppress else None
        self._batch = LatentBatch(model, self.config.absorbed_decoding)
        self._active: dict[int, _Request] = {}
        self._waiting: list[_Request] = []
        self._incoming: deque[_Request] = deque()
        self._num_pending = 0  # incoming + waiting, bounded by max_queue_size
        self._next_id = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._model_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_deadline = 0.0
        self._consecutive_faults = 0
        self._last_fault: str | None = None
        self._loop_error: str | None = None  # why the loop thread ended, when an internal error ended it
        self.stats = {
            "steps": 0,
            "prefill_calls": 0,
            "decode_steps": 0,
            "decoded_rows": 0,  # rows over all decoding steps: the batch's mean occupancy is this / decode_steps
            "generated_tokens": 0,
            "finished": 0,
            "cancelled": 0,
            "timed_out": 0,
            "failed": 0,
            "faults": 0,
            "peak_batch_size": 0,
            "peak_cache_positions": 0,
            "preempted": 0,
            "stopped_in_flight": 0,
        }

    @property
    def setting(self) -> SchedulerSetting:
        """The batch setting of the next step."""
        if self.scheduler is not None:
            return self.scheduler.current
        return SchedulerSetting(self.config.max_batch_size, self.config.max_batch_tokens)

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_pending(self) -> int:
        return self._num_pending

    @property
    def cache_nbytes(self) -> int:
        """Bytes the decoding batch's cache tensors hold."""
        return self._batch.nbytes

    @property
    def health(self) -> EngineHealth:
        """Whether the engine serves (see `EngineHealth`)."""
        reason = None
        if self._loop_error is not None:
            reason = self._loop_error
        elif self._consecutive_faults >= self.config.max_consecutive_faults:
            reason = (
                f"the engine failed {self._consecutive_faults} times in a row, the latest during {self._last_fault}; "
                "it recovers when a step succeeds"
            )
        return EngineHealth(reason is None, reason, self.stats["faults"], self._last_fault)

    # ---- submission -------------------------------------------------------------------------------------------

    def submit(
        self,
        inputs: Mapping[str, torch.Tensor] | Sequence[int],
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
        *,
        sampling: SamplingParams | None = None,
    ) -> RequestHandle:
        """Queues one request.

        Args:
            inputs (`Mapping` or `Sequence[int]`): the processor's output for one prompt (`input_ids` of shape `(1,
                len)`, and `pixel_values` / `input_features` / `input_features_mask` for its media), or plain token
                ids. `attention_mask` must be all ones (an unpadded prompt); `mm_token_type_ids` is derived again.
            max_new_tokens (`int`, *optional*): defaults to the config's `default_max_new_tokens`.
            timeout_s (`float`, *optional*): seconds from now after which the request fails with
                `RequestTimeoutError` (tokens already streamed stay streamed).
            sampling (`SamplingParams`, *optional*): how the request chooses its tokens; defaults to greedy decoding.
                A seeded request's generator is seeded here, once.

        Returns:
            `RequestHandle`

        Raises:
            `ValueError` for malformed inputs (see `parse_inputs`; placeholders without their media, media of the
            wrong shape; `max_new_tokens` below 1), `RequestTooLargeError` for a request that can never fit,
            `EngineOverloadedError` when the queue is full, `EngineStoppedError` when the engine is stopping.
        """
        input_ids, media = self.parse_inputs(inputs)
        self._check_media(input_ids, media)
        max_new_tokens = self.config.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens!r}) must be an integer of at least 1")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s ({timeout_s}) must be positive")
        self._check_fits(len(input_ids), max_new_tokens)
        sampler = None
        if sampling is not None and not sampling.is_plain_greedy:
            sampler = TokenSampler(sampling, self.model.device)
        now = time.monotonic()
        with self._lock:
            if self._loop_error is not None:
                raise EngineStoppedError(self._loop_error)
            if self._stopping:
                raise EngineStoppedError("the engine is stopping")
            if self._num_pending >= self.config.max_queue_size:
                raise EngineOverloadedError(
                    f"the request queue is full ({self.config.max_queue_size} waiting); retry later"
                )
            handle = RequestHandle(self._next_id)
            self._next_id += 1
            deadline = None if timeout_s is None else now + timeout_s
            self._incoming.append(_Request(handle, input_ids, media, max_new_tokens, now, deadline, sampler))
            self._num_pending += 1
            self._wake.notify()
        return handle

    async def agenerate(
        self,
        inputs: Mapping[str, torch.Tensor] | Sequence[int],
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
        *,
        sampling: SamplingParams | None = None,
    ) -> GenerationResult:
        """`submit` and await the result (the engine must be started)."""
        return await self.submit(inputs, max_new_tokens, timeout_s, sampling=sampling).aresult()

    def parse_inputs(
        self, inputs: Mapping[str, torch.Tensor] | Sequence[int]
    ) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Checks one request's inputs (see `submit`); returns its token ids and its media tensors by name.

        Raises `ValueError` for unknown input names, padding, more than one prompt, an empty prompt, ids that are not
        integers or lie outside the vocabulary.
        """
        if not isinstance(inputs, Mapping):
            inputs = {"input_ids": inputs}
        unknown = set(inputs) - {"input_ids", *_MEDIA_KEYS, *_IGNORED_KEYS}
        if unknown:
            raise ValueError(f"unknown input names {sorted(unknown)}; the engine takes input_ids and media")
        if "input_ids" not in inputs:
            raise ValueError("inputs need `input_ids`")
        try:
            ids = torch.as_tensor(inputs["input_ids"])
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"input_ids must be integer token ids ({error})") from error
        if ids.ndim == 2 and ids.shape[0] != 1:
            raise ValueError(f"one prompt per request: input_ids has batch size {ids.shape[0]}")
        if ids.numel() == 0:
            raise ValueError("the prompt is empty")
        if ids.ndim > 2 or ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise ValueError(
                f"input_ids must be integer token ids of shape (len,) or (1, len), got {ids.dtype} of shape "
                f"{tuple(ids.shape)}"
            )
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).all()):
            raise ValueError("attention_mask has padding: submit each prompt unpadded")
        input_ids = ids.reshape(-1).tolist()
        vocab_size = self.model.config.vocab_size
        bad = [token for token in input_ids if not 0 <= token < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        media = {key: torch.as_tensor(inputs[key]) for key in _MEDIA_KEYS if inputs.get(key) is not None}
        return input_ids, media

    def _check_media(self, input_ids: list[int], media: Mapping[str, torch.Tensor]) -> None:
        """Raises `ValueError` unless every image and clip has the model's shape and exactly its placeholders (as
        many as the model makes of it), and every placeholder its media."""
        config = self.model.config
        if "input_features_mask" in media and "input_features" not in media:
            raise ValueError("input_features_mask without input_features")
        for modality, key in (("image", "pixel_values"), ("audio", "input_features")):
            if not getattr(config, f"use_{modality}_input"):
                if key in media:
                    raise ValueError(f"got {key} but the model has use_{modality}_input=False")
                continue
            placeholders = input_ids.count(getattr(config, f"{modality}_token_id"))
            if modality == "image":
                expected = self._image_tokens(media.get("pixel_values"))
            else:
                expected = self._audio_tokens(media.get("input_features"), media.get("input_features_mask"))
            if placeholders != expected:
                count = len(media[key]) if key in media else 0
                raise ValueError(
                    f"input_ids hold {placeholders} {modality} placeholder tokens but the {count} {modality} "
                    f"input(s) make {expected}: every {modality} needs its placeholders, and every placeholder its "
                    f"{modality} (whole {'images' if modality == 'image' else 'clips'} only)"
                )

    def _image_tokens(self, pixel_values: torch.Tensor | None) -> int:
        config = self.model.config
        if pixel_values is None:
            return 0
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}"
            )
        return len(pixel_values) * config.num_image_tokens

    def _audio_tokens(self, features: torch.Tensor | None, mask: torch.Tensor | None) -> int:
        if features is None:
            return 0
        return int(audio_tokens_per_clip(self.model.config, features, mask).sum())

    def _check_fits(self, prompt_length: int, max_new_tokens: int) -> None:
        total = prompt_length + max_new_tokens
        limit = self.model.config.max_position_embeddings
        if total > limit:
            raise RequestTooLargeError(
                f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
                f"max_position_embeddings ({limit}); this request can never be served"
            )
        settings = self.scheduler.settings if self.scheduler is not None else [self.setting]
        budget = max(setting.max_batch_tokens for setting in settings)
        if total > budget:
            raise RequestTooLargeError(
                f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"engine's token budget ({budget} cached positions); this request can never be served, even alone"
            )

    # ---- the loop ---------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Runs the loop in a background thread."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping, self._loop_error = False, None
        self._thread = threading.Thread(target=self._run, name="deepseekv3-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stops the loop. `submit` raises `EngineStoppedError` from the call on; requests already accepted are
        served for up to `drain_timeout_s` more seconds, and those then unfinished fail with `EngineStoppedError`
        (counted in `stats["stopped_in_flight"]`)."""
        with self._lock:
            self._stopping = True
            self._drain_deadline = time.monotonic() + drain_timeout_s
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._model_lock:
            self.stats["stopped_in_flight"] = self._fail_all(
                lambda request_id: EngineStoppedError(f"the engine stopped before request {request_id} finished")
            )

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _is_idle(self) -> bool:
        return not self._incoming and not self._waiting and not self._active

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and self._is_idle():
                        self._wake.wait()
                    if self._stopping and (self._is_idle() or time.monotonic() >= self._drain_deadline):
                        return
                if not self.step():
                    time.sleep(0.001)  # only timed-out or blocked work left: yield the CPU
        except Exception as error:  # step() settles its own faults: this is the loop itself failing
            logger.error("the engine loop stopped on an internal error", exc_info=error)
            self._loop_error = f"the engine loop stopped on an internal error ({type(error).__name__}); restart it"
            with self._model_lock:
                self._fail_all(functools.partial(EngineFaultError, stage="loop", error=error))

    def run_until_idle(self) -> None:
        """Steps in the current thread until nothing is queued or decoding."""
        while not self._is_idle():
            self.step()

    def step(self) -> bool:
        """One scheduling step: expire, admit, run one prefill forward (a chunk of it with `prefill_chunk_tokens`),
        decode one token per request in the batch. Returns whether a forward pass ran. A failure fails the requests it
        concerns (see the module docstring), never the caller."""
        with self._model_lock:
            started = time.perf_counter()
            stage, setting, tokens = "length prediction", self.setting, 0
            try:
                self._take_incoming()
                stage = "cache compaction"
                self._drop_cancelled_and_expired(time.monotonic())
                stage = "admission"
                for request in self._choose_admissions(setting):
                    request.prefilling = True
                    self._active[request.request_id] = request
                stage = "prefill"
                prefilling = any(request.prefilling for request in self._active.values())
                if prefilling:
                    tokens = self._prefill()
                if len(self._batch):
                    stage = "decode"
                    self._preempt(setting.max_batch_tokens)
                if len(self._batch):
                    decoded, kept = self._decode()
                    tokens += decoded
                    stage = "cache compaction"
                    self._batch.keep(kept)
            except Exception as error:
                self._record_fault(stage, error)
                self._fail_all(functools.partial(EngineFaultError, stage=stage, error=error))
                return True
            ran = prefilling or tokens > 0
            if tokens > 0:
                self._consecutive_faults = 0
            if ran:
                self.stats["steps"] += 1
                if self.scheduler is not None:
                    self.scheduler.record(tokens, time.perf_counter() - started)
            return ran

    def _record_fault(self, stage: str, error: Exception) -> None:
        logger.error(f"engine fault during {stage}", exc_info=error)
        self.stats["faults"] += 1
        self._consecutive_faults += 1
        self._last_fault = f"{stage} ({type(error).__name__})"

    def _fail_all(self, make_error: Callable[[int], Exception]) -> int:
        """Fails every queued and admitted request with `make_error(request_id)` and empties the batch. Returns how
        many requests it failed."""
        with self._lock:
            requests = list(self._incoming)
            self._incoming.clear()
            self._num_pending = 0
        requests += [*self._waiting, *self._active.values()]
        self._waiting, self._active = [], {}
        self._batch = LatentBatch(self.model, self.config.absorbed_decoding)
        failed = 0
        for request in {request.request_id: request for request in requests}.values():
            if request.handle._settle(error=make_error(request.request_id)):
                failed += 1
        self.stats["failed"] += failed
        return failed

    def _take_incoming(self) -> None:
        with self._lock:
            arrived = list(self._incoming)
        if not arrived:
            return
        new_tokens = [request.max_new_tokens for request in arrived]
        if self.length_predictor is not None:
            # may raise: the requests stay queued until predicted, so the fault fails them with the others
            new_tokens = self.length_predictor.predict([r.input_ids for r in arrived], new_tokens)
        for request, predicted in zip(arrived, new_tokens):
            request.predicted_new_tokens = math.ceil(predicted)
        with self._lock:
            for _ in arrived:  # submit only appends, so the oldest are the ones predicted
                self._incoming.popleft()
        self._waiting.extend(arrived)

    def _drop_cancelled_and_expired(self, now: float) -> None:
        kept = []
        for request in self._waiting:
            if not self._settle_if_dead(request, now):
                kept.append(request)
        if len(kept) != len(self._waiting):
            with self._lock:
                self._num_pending -= len(self._waiting) - len(kept)
            self._waiting = kept
        dead = [rid for rid, request in self._active.items() if self._settle_if_dead(request, now)]
        if dead:
            for rid in dead:
                del self._active[rid]
            self._batch.keep([row for row, rid in enumerate(self._batch.request_ids) if rid not in dead])

    def _settle_if_dead(self, request: _Request, now: float) -> bool:
        if request.handle.cancelled:
            self.stats["cancelled"] += 1
            return True
        if request.deadline is not None and now >= request.deadline:
            error = RequestTimeoutError(
                f"request {request.request_id} timed out after {now - request.arrival:.3f} s with "
                f"{len(request.generated)} of at most {request.max_new_tokens} tokens generated"
            )
            if request.handle._settle(error=error):
                self.stats["timed_out"] += 1
            else:
                self.stats["cancelled"] += 1
            return True
        return False

    def _choose_admissions(self, setting: SchedulerSetting) -> list[_Request]:
        """The waiting requests to admit while a slot is free and the batch's padded cache over its coming steps stays
        within the token budget (see the module docstring)."""
        free = setting.max_batch_size - len(self._active)
        if free <= 0 or not self._waiting:
            return []
        # a request still in prefill emits a token when its prefill completes
        rows = [request.padded_row(len(request.generated) + request.prefilling) for request in self._active.values()]
        oldest, *order = self._waiting  # in arrival order
        if self.length_predictor is not None and self.length_predictor.is_trained:
            # after the oldest, the requests of the most similar predicted total length
            group = [*self._active.values(), oldest]
            anchor = sum(request.predicted_total for request in group) / len(group)
            order.sort(key=lambda request: abs(request.predicted_total - anchor))
        admitted = []
        for request in [oldest, *order]:
            if len(admitted) == free:
                break
            row = request.padded_row(len(request.generated) + 1)  # its prefill emits a token
            if padded_peak([*rows, row]) <= setting.max_batch_tokens:
                admitted.append(request)
                rows.append(row)
            elif request is oldest and oldest.passed_over:
                break  # its room is reserved: nothing younger goes ahead while the batch shrinks
        if admitted and admitted[0] is not oldest:
            oldest.passed_over = True
        if not admitted and not self._active:
            admitted = [oldest]  # fits the largest budget (checked at submit), so it runs alone
        chosen = {request.request_id for request in admitted}
        self._waiting = [request for request in self._waiting if request.request_id not in chosen]
        with self._lock:
            self._num_pending -= len(admitted)
        now = time.monotonic()
        for request in admitted:
            request.admitted = request.admitted or now  # a preempted request keeps its first admission
        return admitted

    def _preempt(self, budget: int) -> None:
        """Before a decoding step: while the step would take the cache over `budget` positions, drops the youngest
        admitted request (never the last one, which fits the largest budget alone) and queues it again in arrival
        order, keeping its tokens, to be prefilled later on its prompt plus those tokens. A request still in prefill
        counts as the row it becomes, and gives up the latents of its prefill when preempted."""
        running = sorted(self._active.values(), key=lambda request: request.request_id)
        preempted = []
        # the step feeds every row its pending token: rows x (longest prompt + generated tokens) positions
        while len(running) > 1 and len(running) * max(len(r.input_ids) + len(r.generated) for r in running) > budget:
            preempted.append(running.pop())
        if not preempted:
            return
        dropped = {request.request_id for request in preempted}
        self._batch.keep([row for row, rid in enumerate(self._batch.request_ids) if rid not in dropped])
        for request in preempted:
            del self._active[request.request_id]
            request.end_prefill()
            bisect.insort(self._waiting, request, key=lambda waiting: waiting.request_id)
        with self._lock:
            self._num_pending += len(preempted)
        self.stats["preempted"] += len(preempted)

    # ---- forward passes ---------------------------------------------------------------------------------------

    def _next_tokens(self, logits: torch.Tensor, requests: Sequence[_Request]) -> torch.Tensor:
        """The next token of each row of `logits` `(len(requests), vocab_size)`: the argmax for plain greedy rows (in
        one call, as `generate`), each other row by its request's own sampler."""
        if self._suppress is not None:
            logits = self._suppress(None, logits)
        tokens = logits.argmax(dim=-1)
        for row, request in enumerate(requests):
            if request.sampler is not None:
                tokens[row] = request.sampler(request.generated, logits[row])
        return tokens

    @torch.no_grad()
    def _prefill(self) -> int:
        """Runs this step's prefill forward (`_plan_prefill`), emits the first token of each request whose prefill it
        completes and adds the unfinished ones to the batch. When a forward of several requests fails, they are
        prefilled again one at a time; a request whose own prefill fails fails alone (with the model's `ValueError`
        about its inputs, or `EngineFaultError`), and the batch is not touched. Returns how many requests completed
        their prefill."""
        plan = self._plan_prefill()
        outputs = []
        try:
            outputs.append((plan, self._prefill_forward(plan)))
        except Exception as error:
            if len(plan) == 1:
                self._fail_prefill(plan[0][0], error)
            else:
                logger.warning(f"the prefill of {len(plan)} requests failed ({error!r}); retrying them one by one")
                for request, _, end in plan:
                    alone = _aligned([(request, end)])
                    try:
                        outputs.append((alone, self._prefill_forward(alone)))
                    except Exception as own_error:
                        self._fail_prefill(request, own_error)
        return sum(self._finish_prefill(rows, *result) for rows, result in outputs)

    def _fail_prefill(self, request: _Request, error: Exception) -> None:
        if isinstance(error, ValueError):  # the model's own checks refused this request's inputs
            request.handle._settle(error=error)
        else:
            self._record_fault("prefill", error)
            request.handle._settle(error=EngineFaultError(request.request_id, "prefill", error))
        self._active.pop(request.request_id)
        self.stats["failed"] += 1

    def _plan_prefill(self) -> list[tuple[_Request, int, int]]:
        """The rows of this step's prefill forward, `(request, start, end)`: each feeds the positions `[start, end)`
        of its `prefill_ids` on its first `start` positions, cached (see `_aligned`). The oldest request in prefill
        always takes part, with at most `prefill_chunk_tokens` new positions (`_chunk_end`); the others join, in
        admission order, while the forward's positions (rows x the widest row, padding included) stay within
        `prefill_chunk_tokens`. Without chunking, every request in prefill joins with its whole prompt.

        Shared prefixes are computed once. A request whose prefill has not started looks the prefix cache up again at
        every step, so it finds what earlier requests' prefills have stored since it was admitted (a shared system
        prompt among requests admitted together). And a request stays out of this step's forward when a row already
        in it computes at least `SHARED_PREFIX_POSITIONS` positions of its prompt past what it has cached: it reads
        them from the cache at the next step instead of computing them again."""
        chunk = self.config.prefill_chunk_tokens
        rows, plan = [], []
        for request in self._active.values():
            if not request.prefilling:
                continue
            if request.keys is None:
                self._start_prefill(request)
            elif not request.computed and self._cached_length(request) > request.prefilled:
                self._start_prefill(request)  # another request's prefill has stored more of its prompt since
            if plan and _computes_prefix_of(plan, request, self._cacheable_positions):
                continue
            end = len(request.keys) if chunk is None else _chunk_end(request.keys, request.prefilled, chunk)
            candidate = _aligned([*rows, (request, end)])
            if not plan or chunk is None or len(candidate) * _width(candidate) <= chunk:
                rows, plan = [*rows, (request, end)], candidate
        return plan

    def _prefill_forward(self, plan: list[tuple[_Request, int, int]]) -> tuple:
        """One forward over `plan`'s rows, left-padded: the cached positions of every row in the first columns, its
        new ones (as wide as the widest row) after them. Returns the cache, its attention mask and each row's last
        logits."""
        width, cached = _width(plan), max(start for _, start, _ in plan)
        input_ids = torch.full((len(plan), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(len(plan), width, dtype=torch.long)
        attention_mask = torch.zeros(len(plan), cached + width, dtype=torch.long)
        images, clips = [], []
        for row, (request, start, end) in enumerate(plan):
            input_ids[row, width - (end - start) :] = torch.tensor(request.prefill_ids[start:end])
            position_ids[row, width - (end - start) :] = torch.arange(start, end)
            attention_mask[row, cached - start : cached] = 1
            attention_mask[row, cached + width - (end - start) :] = 1
            images += [image for position, image in request.layout.images if start <= position < end]
            clips += [clip for position, clip in request.layout.clips if start <= position < end]
        media = {}
        if images:
            media["pixel_values"] = torch.stack(images)
        if clips:  # each clip unpadded: padded again to the longest of this forward
            frames = max(clip.shape[-1] for clip in clips)
            media["input_features"] = torch.stack([F.pad(clip, (0, frames - clip.shape[-1])) for clip in clips])
            real = torch.tensor([clip.shape[-1] for clip in clips])
            media["input_features_mask"] = (torch.arange(frames) < real[:, None]).long()
        cache = None
        if cached:
            template = next(request.prefill_layers for request, start, _ in plan if start)
            rows = [
                [tuple(tensor[..., :start, :] for tensor in pair) for pair in request.prefill_layers or template]
                for request, start, _ in plan
            ]
            cache = cache_from_layers(stack_rows(rows, cached), self.model)
        device = self.model.device
        outputs = self.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **{key: value.to(device) for key, value in media.items()},
        )
        return outputs.cache, attention_mask.to(device), outputs.logits[:, -1].float()

    def _finish_prefill(
        self, plan: list[tuple[_Request, int, int]], cache, attention_mask: torch.Tensor, logits: torch.Tensor
    ) -> int:
        """After a prefill forward: stores every row's positions in the prefix cache, keeps the cache of the rows
        with more chunks to go, and emits the first token of the others, adding the unfinished ones to the batch (one
        copy of the batch cache for all of them). Returns how many requests completed their prefill."""
        self.stats["prefill_calls"] += 1
        completed = []
        for row, (request, start, end) in enumerate(plan):
            request.cached_prefix_length = min(request.cached_prefix_length, start)
            layers = [tuple(tensor[row : row + 1, :, -end:] for tensor in pair) for pair in cache_layers(cache)]
            self.prefix_cache.insert(request.keys[:end], layers)
            if end == len(request.keys):
                completed.append(row)
            else:
                request.prefilled, request.computed = end, True
                request.prefill_layers, _ = select_rows(cache, attention_mask, [row])
        if not completed:
            return 0
        requests = [plan[row][0] for row in completed]
        tokens = self._next_tokens(logits[completed], requests)
        now = time.monotonic()
        kept = []
        for index, (request, token) in enumerate(zip(requests, tokens.tolist())):
            request.end_prefill()
            if not request.generated:  # a preempted request keeps its first token's time
                request.first_token = now
            if self._append(request, token):
                kept.append(index)
        if kept:
            layers, mask = select_rows(cache, attention_mask, [completed[index] for index in kept])
            request_ids = [requests[index].request_id for index in kept]
            self._batch.add(request_ids, cache_from_layers(layers, self.model), mask, tokens[kept])
            self.stats["peak_batch_size"] = max(self.stats["peak_batch_size"], len(self._batch))
        return len(requests)

    def _decode(self) -> tuple[int, list[int]]:
        """Decodes one token for every row; returns how many rows decoded and the rows that go on."""
        logits = self._batch.decode()
        self.stats["decode_steps"] += 1
        self.stats["decoded_rows"] += len(self._batch)
        self.stats["peak_cache_positions"] = max(
            self.stats["peak_cache_positions"], len(self._batch) * self._batch.kv_length
        )
        requests = [self._active[rid] for rid in self._batch.request_ids]
        tokens = self._next_tokens(logits, requests)
        kept = []
        for row, (request, token) in enumerate(zip(requests, tokens.tolist())):
            if self._append(request, token):
                kept.append(row)
        self._batch.next_tokens = tokens
        return len(requests), kept

    def _append(self, request: _Request, token: int) -> bool:
        """Adds a generated token; settles the request when it is finished. Returns whether it continues."""
        request.generated.append(token)
        request.handle._push(token)
        self.stats["generated_tokens"] += 1
        if not request.is_finished(self.stop_ids):
            return True
        self._active.pop(request.request_id, None)
        now = time.monotonic()
        result = GenerationResult(
            request_id=request.request_id,
            token_ids=list(request.generated),
            finish_reason="stop" if request.generated[-1] in self.stop_ids else "length",
            prompt_length=len(request.input_ids),
            cached_prefix_length=request.cached_prefix_length,
            queued_s=request.admitted - request.arrival,
            first_token_s=request.first_token - request.arrival,
            latency_s=now - request.arrival,
        )
        if request.handle._settle(result):
            self.stats["finished"] += 1
        else:  # cancelled while its last token was computed
            self.stats["cancelled"] += 1
        keep = self.config.log_prompt_tokens
        features = tuple(request.input_ids[-keep:]) if keep else ()
        self.length_log.append(
            LengthRecord(len(request.input_ids), len(request.generated), request.max_new_tokens, features)
        )
        return False

    # ---- prefix cache -----------------------------------------------------------------------------------------

    def _prompt_layout(self, input_ids: list[int], media: Mapping[str, torch.Tensor]) -> _PromptLayout:
        """A prompt's prefix-cache keys (`MediaPosition`s over each image and clip span) and its media by span."""
        config = self.model.config
        spans, images, clips = [], [], []
        if "pixel_values" in media:
            positions = [position for position, token in enumerate(input_ids) if token == config.image_token_id]
            size = config.num_image_tokens
            for index, image in enumerate(media["pixel_values"]):
                start = positions[index * size]
                spans.append((start, positions[(index + 1) * size - 1] + 1, media_digest(image)))
                images.append((start, image))
        if "input_features" in media:
            positions = [position for position, token in enumerate(input_ids) if token == config.audio_token_id]
            features, masks = media["input_features"], media.get("input_features_mask")
            first = 0
            for index, count in enumerate(audio_tokens_per_clip(config, features, masks).tolist()):
                if count:  # a clip that makes no token adds nothing to the embeddings
                    clip = features[index] if masks is None else features[index, :, : int(masks[index].sum())]
                    spans.append((positions[first], positions[first + count - 1] + 1, media_digest(clip)))
                    clips.append((positions[first], clip))
                first += count
        keys = list(input_ids)
        for start, end, digest in spans:
            for position in range(start, end):
                keys[position] = MediaPosition(input_ids[position], digest, position - start)
        return _PromptLayout(keys, images, clips)

    def _cached_length(self, request: _Request) -> int:
        return self.prefix_cache.match_length(request.keys, len(request.keys) - 1)

    def _start_prefill(self, request: _Request) -> None:
        """Looks up the longest cached prefix of the request's `prefill_ids` (at least one position is left to
        compute the first logits)."""
        if request.layout is None:
            request.layout = self._prompt_layout(request.input_ids, request.media)
        request.keys = request.layout.keys + request.generated
        request.prefilled, request.prefill_layers = self.prefix_cache.lookup(request.keys, len(request.keys) - 1)
        request.cached_prefix_length = min(request.prefilled, len(request.input_ids))

    @torch.no_grad()
    def warm_up(self, prefixes: Sequence[Mapping[str, torch.Tensor] | Sequence[int]]) -> int:
        """Prefills `prefixes` (system prompts, recurring images: inputs as `submit` takes them) into the prefix
        cache ahead of the requests that start with them. Returns the cache's size in bytes.

        Raises `ValueError` when a prefix would cut through an image or audio span or cannot fit the cache.
        """
        for prefix in prefixes:
            input_ids, media = self.parse_inputs(prefix)
            self._check_media(input_ids, media)
            layout = self._prompt_layout(input_ids, media)
            device = self.model.device
            with self._model_lock:
                outputs = self.model(
                    input_ids=torch.tensor([input_ids], device=device),
                    use_cache=True,
                    logits_to_keep=1,
                    **{key: value.to(device) for key, value in media.items()},
                )
                layers = cache_layers(outputs.cache)
                nbytes = sum(tensor.nbytes for pair in layers for tensor in pair)
                if nbytes > self.prefix_cache.max_bytes:
                    raise ValueError(
                        f"a prefix of {len(input_ids)} tokens takes {nbytes} bytes, more than the prefix cache's "
                        f"max_bytes ({self.prefix_cache.max_bytes})"
                    )
                self.prefix_cache.insert(layout.keys, layers)
        return self.prefix_cache.nbytes

    # ---- state ------------------------------------------------------------------------------------------------

    def save_state(self, directory: str | Path) -> None:
        """Writes the engine's learned state to `directory`: the length predictor, the scheduler's bandit, the
        generation log (`generation_log.jsonl`: the lengths of each logged request, never its tokens)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / _LOG_NAME, "w") as log:
            for record in self.length_log:
                lengths = {key: value for key, value in asdict(record).items() if key != "prompt_ids"}
                log.write(json.dumps(lengths) + "\n")
        if self.length_predictor is not None:
            self.length_predictor.save(directory)
        if self.scheduler is not None:
            self.scheduler.save(directory)

    def load_state(self, directory: str | Path) -> None:
        """Loads what `save_state` wrote (the config stays this engine's own): the length predictor and the
        scheduler when saved, and the generation log.

        Raises `ValueError` when the saved length predictor reads another vocabulary than the model's.
        """
        directory = Path(directory)
        if not (directory / _LOG_NAME).is_file():
            raise FileNotFoundError(f"no {_LOG_NAME} in {directory}: pass a directory written by Engine.save_state")
        if (directory / "length_predictor.json").is_file():
            predictor = LengthPredictor.load(directory)
            self._check_predictor(predictor)
            self.length_predictor = predictor
        if (directory / "scheduler.json").is_file():
            self.scheduler = SelfTuningScheduler.load(directory)
        self.length_log.clear()
        for line in (directory / _LOG_NAME).read_text().splitlines():
            self.length_log.append(LengthRecord(**json.loads(line)))

    def _check_predictor(self, predictor: LengthPredictor | None) -> None:
        if predictor is not None and predictor.config.vocab_size != self.model.config.vocab_size:
            raise ValueError(
                f"the length predictor reads a vocabulary of {predictor.config.vocab_size} tokens but the model has "
                f"{self.model.config.vocab_size}: it was trained for another model"
            )


def latent_position_bytes(model: PreTrainedModel) -> int:
    """Bytes one cached position takes in `model`'s MLA cache: per layer, the latent (with the two image-coordinate
    channels under `use_image_position_values`) and the rotated key, in the model's dtype."""
    config = model.config
    width = config.kv_lora_rank + 2 * bool(config.use_image_position_values) + config.qk_rope_head_dim
    return config.num_hidden_layers * width * model.dtype.itemsize


def _chunk_end(keys: list, start: int, chunk: int) -> int:
    """Where the chunk of a prompt (its prefix-cache keys) that starts at `start` ends: after at most `chunk`
    positions, at a boundary. A media span is never cut: the chunk ends before it, or, when the span starts the chunk
    and is longer than `chunk`, after it."""
    end = boundary_before(keys, min(len(keys), start + chunk))
    return end if end > start else boundary_after(keys, start + 1)


def _aligned(rows: list[tuple[_Request, int]]) -> list[tuple[_Request, int, int]]:
    """`(request, start, end)` of the rows of one prefill forward, each request feeding its positions up to `end`.

    Rows are left-padded, so each row's cached positions and new ones must meet at the forward's first new column:
    a row with a cache feeds the forward's full width, recomputing the last of its cached positions where it has
    fewer new ones than the widest row (the forward would compute padding there otherwise); a row without one is
    left-padded. A start inside a media span moves back to the span's start, which widens the forward.
    """
    width = max(end - request.prefilled for request, end in rows)
    while True:
        plan = [(request, boundary_before(request.keys, max(0, end - width)), end) for request, end in rows]
        if _width(plan) == width:
            return plan
        width = _width(plan)


def _width(plan: list[tuple[_Request, int, int]]) -> int:
    return max(end - start for _, start, end in plan)


def _computes_prefix_of(plan: list[tuple[_Request, int, int]], request: _Request, cacheable: int) -> bool:
    """Whether a row of `plan` computes the next `SHARED_PREFIX_POSITIONS` positions of `request`'s prompt past what
    it has cached, and the prefix cache (`cacheable` positions at most) can keep them for the request's next step."""
    stop = request.prefilled + SHARED_PREFIX_POSITIONS
    if stop >= len(request.keys) or stop > cacheable:
        return False
    head = request.keys[:stop]
    return any(end >= stop and other.keys[:stop] == head for other, _, end in plan)
