"""Continuous-batching inference engine for `DeepseekV3MultimodalForConditionalGeneration` (greedy decoding).

Requests (token ids, with images and audio as the processor returns them) enter a bounded queue and come back as
futures and token streams (`RequestHandle`). At every decoding step the engine drops cancelled and timed-out
requests, admits waiting ones while a slot and the token budget allow (in arrival order; with a trained
`LengthPredictor`, the oldest first and then those whose predicted total length is closest to the batch's), prefills
them (text prompts together, padded only to their own longest; prompts with media or a cached prefix one by one),
and decodes one token for every request of the batch on a shared left-padded MLA latent cache (`LatentBatch`).
Requests leave the batch the step they finish. A `SelfTuningScheduler` may choose the batch size and token budget
online.

transformers' own continuous batching (`generate_batch`, transformers 5.24) does not run this model: its paged
cache has no `get_seq_length` (the model's forward fails with `AttributeError: 'PagedAttentionCache' object has no
attribute 'get_seq_length'`), and it stores per-head keys and values of one shape, where MLA caches a single
latent (`kv_lora_rank`) and a rotated key (`qk_rope_head_dim`) of different widths. The engine therefore drives the
model's own forward with a `DynamicCache` per batch. Greedy outputs equal `model.generate(do_sample=False)` request
by request (the placeholder tokens in the generation config's `suppress_tokens` are suppressed the same way).
"""

import asyncio
import concurrent.futures
import json
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.generation.logits_process import SuppressTokensLogitsProcessor
from transformers.utils import logging

from .latent_batch import LatentBatch, cache_from_layers, cache_layers
from .length_predictor import LengthPredictor, LengthRecord
from .prefix_cache import PrefixCache, PrefixEntry, media_digest
from .scheduler import SchedulerSetting, SelfTuningScheduler

__all__ = [
    "Engine",
    "EngineConfig",
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


class EngineOverloadedError(RuntimeError):
    """The request queue is full (back-pressure): retry later."""


class EngineStoppedError(RuntimeError):
    """The engine was stopped before the request finished."""


class RequestTimeoutError(TimeoutError):
    """The request did not finish within its timeout."""


class RequestTooLargeError(ValueError):
    """The request can never fit: its prompt plus `max_new_tokens` exceed the model's positions or the token budget."""


@dataclass
class EngineConfig:
    """Engine settings (serving options: not saved with the weights nor by `save_state`).

    Args:
        max_batch_size (`int`, defaults to 16): most requests decoding together (when no scheduler chooses it).
        max_batch_tokens (`int`, defaults to 4096): token budget of the batch: the summed final lengths (prompt +
            `max_new_tokens`, or the predicted length with a trained predictor) of its requests.
        max_queue_size (`int`, defaults to 256): most requests waiting; past it `submit` raises
            `EngineOverloadedError`.
        default_max_new_tokens (`int`, defaults to 32): `max_new_tokens` of a request that names none.
        prefix_cache_bytes (`int`, defaults to 64 MiB): byte budget of the prefix cache.
        log_size (`int`, defaults to 10000): finished requests kept in the length log.
    """

    max_batch_size: int = 16
    max_batch_tokens: int = 4096
    max_queue_size: int = 256
    default_max_new_tokens: int = 32
    prefix_cache_bytes: int = 64 * 2**20
    log_size: int = 10_000

    def __post_init__(self):
        for name in ("max_batch_size", "max_batch_tokens", "max_queue_size", "default_max_new_tokens", "log_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 1")


@dataclass
class GenerationResult:
    """A finished request.

    Attributes:
        request_id (`int`), token_ids (`list[int]`): the generated tokens (the stop token included, as `generate`).
        finish_reason (`str`): `"stop"` (a stop token) or `"length"` (`max_new_tokens` reached).
        prompt_length (`int`), cached_prefix_length (`int`): prompt tokens, and how many came from the prefix cache.
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
    request's error, if any, at the end. `cancel()` stops the request at the next step.
    """

    def __init__(self, request_id: int):
        self.request_id = request_id
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._stream: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()

    def cancel(self) -> bool:
        """Cancels the request; False if it had already finished."""
        with self._lock:
            cancelled = self.future.cancel()
        if cancelled:
            self._stream.put(_END)
        return cancelled

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Blocks for the result; raises the request's error (`RequestTimeoutError`, `CancelledError`, ...)."""
        return self.future.result(timeout)

    async def aresult(self) -> GenerationResult:
        """`result()` for asyncio code."""
        return await asyncio.wrap_future(self.future)

    def __iter__(self) -> Iterator[int]:
        while (token := self._stream.get()) is not _END:
            yield token
        self.future.result()  # raises the error that ended the stream, if any

    async def astream(self) -> AsyncIterator[int]:
        """The token stream for asyncio code."""
        while (token := await asyncio.to_thread(self._stream.get)) is not _END:
            yield token
        await self.aresult()

    def _push(self, token: int) -> None:
        self._stream.put(token)

    def _settle(self, result: GenerationResult | None = None, error: BaseException | None = None) -> bool:
        with self._lock:
            if self.future.done():
                return False
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
        self._stream.put(_END)
        return True


@dataclass
class _Request:
    handle: RequestHandle
    input_ids: list[int]
    media: dict[str, torch.Tensor]
    max_new_tokens: int
    arrival: float
    deadline: float | None
    predicted_total: float = 0.0
    generated: list[int] = field(default_factory=list)
    admitted: float = 0.0
    first_token: float = 0.0
    cached_prefix_length: int = 0

    @property
    def request_id(self) -> int:
        return self.handle.request_id

    def is_finished(self, stop_ids: set[int]) -> bool:
        return len(self.generated) >= self.max_new_tokens or self.generated[-1] in stop_ids


class Engine:
    """Continuous-batching greedy generation on one model (see the module docstring).

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
        self.length_predictor = length_predictor
        self.scheduler = scheduler
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes)
        self.length_log: deque[LengthRecord] = deque(maxlen=self.config.log_size)
        generation_config = model.generation_config
        eos = generation_config.eos_token_id
        self.stop_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.pad_token_id = generation_config.pad_token_id if generation_config.pad_token_id is not None else 0
        suppress = generation_config.suppress_tokens
        self._suppress = SuppressTokensLogitsProcessor(suppress, device=model.device) if suppress else None
        self._batch = LatentBatch(model)
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
        self.stats = {
            "steps": 0,
            "prefill_calls": 0,
            "decode_steps": 0,
            "generated_tokens": 0,
            "finished": 0,
            "cancelled": 0,
            "timed_out": 0,
            "failed": 0,
            "peak_batch_size": 0,
            "peak_cache_positions": 0,
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

    # ---- submission -------------------------------------------------------------------------------------------

    def submit(
        self,
        inputs: Mapping[str, torch.Tensor] | Sequence[int],
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> RequestHandle:
        """Queues one request.

        Args:
            inputs (`Mapping` or `Sequence[int]`): the processor's output for one prompt (`input_ids` of shape `(1,
                len)`, and `pixel_values` / `input_features` / `input_features_mask` for its media), or plain token
                ids. `attention_mask` must be all ones (an unpadded prompt); `mm_token_type_ids` is derived again.
            max_new_tokens (`int`, *optional*): defaults to the config's `default_max_new_tokens`.
            timeout_s (`float`, *optional*): seconds from now after which the request fails with
                `RequestTimeoutError` (tokens already streamed stay streamed).

        Returns:
            `RequestHandle`

        Raises:
            `ValueError` for malformed inputs, `RequestTooLargeError` for a request that can never fit,
            `EngineOverloadedError` when the queue is full.
        """
        input_ids, media = self.parse_inputs(inputs)
        max_new_tokens = self.config.default_max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be at least 1")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s}) must be positive")
        self._check_fits(len(input_ids), max_new_tokens)
        now = time.monotonic()
        with self._lock:
            if self._stopping:
                raise EngineStoppedError("the engine is stopping")
            if self._num_pending >= self.config.max_queue_size:
                raise EngineOverloadedError(
                    f"the request queue is full ({self.config.max_queue_size} waiting); retry later"
                )
            handle = RequestHandle(self._next_id)
            self._next_id += 1
            deadline = None if timeout_s is None else now + timeout_s
            self._incoming.append(_Request(handle, input_ids, media, max_new_tokens, now, deadline))
            self._num_pending += 1
            self._wake.notify()
        return handle

    async def agenerate(
        self,
        inputs: Mapping[str, torch.Tensor] | Sequence[int],
        max_new_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> GenerationResult:
        """`submit` and await the result (the engine must be started)."""
        return await self.submit(inputs, max_new_tokens, timeout_s).aresult()

    def parse_inputs(
        self, inputs: Mapping[str, torch.Tensor] | Sequence[int]
    ) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Checks one request's inputs (see `submit`); returns its token ids and its media tensors by name."""
        if not isinstance(inputs, Mapping):
            input_ids, media = list(inputs), {}
        else:
            unknown = set(inputs) - {"input_ids", *_MEDIA_KEYS, *_IGNORED_KEYS}
            if unknown:
                raise ValueError(f"unknown input names {sorted(unknown)}; the engine takes input_ids and media")
            if "input_ids" not in inputs:
                raise ValueError("inputs need `input_ids`")
            ids = torch.as_tensor(inputs["input_ids"])
            if ids.ndim == 2 and ids.shape[0] != 1:
                raise ValueError(f"one prompt per request: input_ids has batch size {ids.shape[0]}")
            mask = inputs.get("attention_mask")
            if mask is not None and not bool(torch.as_tensor(mask).all()):
                raise ValueError("attention_mask has padding: submit each prompt unpadded")
            input_ids = ids.reshape(-1).tolist()
            media = {key: torch.as_tensor(inputs[key]) for key in _MEDIA_KEYS if inputs.get(key) is not None}
        if not input_ids:
            raise ValueError("the prompt is empty")
        vocab_size = self.model.config.vocab_size
        bad = [token for token in input_ids if not 0 <= int(token) < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        return [int(token) for token in input_ids], media

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
                f"engine's token budget ({budget}); this request can never be served"
            )

    # ---- the loop ---------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Runs the loop in a background thread."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="deepseekv3-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the loop; requests not finished fail with `EngineStoppedError` (counted in
        `stats["stopped_in_flight"]`, with any decoding row left)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._model_lock:
            error = EngineStoppedError("the engine stopped before the request finished")
            with self._lock:
                pending = list(self._incoming) + self._waiting + list(self._active.values())
                self._incoming.clear()
                self._num_pending = 0
            self.stats["stopped_in_flight"] = len(pending) + len(self._batch) - len(self._active)
            self._waiting, self._active = [], {}
            self._batch = LatentBatch(self.model)
            for request in pending:
                request.handle._settle(error=error)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._incoming and not self._waiting and not self._active:
                    self._wake.wait()
                if self._stopping:
                    return
            if not self.step():
                time.sleep(0.001)  # only timed-out or blocked work left: yield the CPU

    def run_until_idle(self) -> None:
        """Steps in the current thread until nothing is queued or decoding."""
        while self._incoming or self._waiting or self._active:
            self.step()

    def step(self) -> bool:
        """One scheduling step: expire, admit and prefill, decode one token per active request. Returns whether a
        forward pass ran."""
        with self._model_lock:
            started = time.perf_counter()
            self._take_incoming()
            self._drop_cancelled_and_expired(time.monotonic())
            admitted = self._choose_admissions(self.setting)
            try:
                tokens = self._prefill(admitted) if admitted else 0
                if self._active:
                    tokens += self._decode()
            except Exception as error:  # a failed forward fails the requests in it, never the loop
                logger.error(f"engine step failed: {error!r}")
                self._fail_in_flight(admitted, error)
                return True
            ran = bool(admitted) or tokens > 0
            if ran:
                self.stats["steps"] += 1
                if self.scheduler is not None:
                    self.scheduler.record(tokens, time.perf_counter() - started)
            return ran

    def _fail_in_flight(self, admitted: list[_Request], error: Exception) -> None:
        for request in [*admitted, *self._active.values()]:
            if request.handle._settle(error=error):
                self.stats["failed"] += 1
        self._active = {}
        self._batch = LatentBatch(self.model)

    def _take_incoming(self) -> None:
        with self._lock:
            arrived = list(self._incoming)
            self._incoming.clear()
        if not arrived:
            return
        new_tokens = [request.max_new_tokens for request in arrived]
        if self.length_predictor is not None:
            new_tokens = self.length_predictor.predict([r.input_ids for r in arrived], new_tokens)
        for request, predicted in zip(arrived, new_tokens):
            request.predicted_total = len(request.input_ids) + predicted
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
        free = setting.max_batch_size - len(self._active)
        if free <= 0 or not self._waiting:
            return []
        used = sum(request.predicted_total for request in self._active.values())
        is_predicted = self.length_predictor is not None and self.length_predictor.is_trained
        order = list(self._waiting)
        if is_predicted:
            # the oldest first (no starvation), then the requests of the most similar predicted total length
            group = [*self._active.values(), order[0]]
            anchor = sum(request.predicted_total for request in group) / len(group)
            order = [order[0], *sorted(order[1:], key=lambda request: abs(request.predicted_total - anchor))]
        admitted = []
        for request in order:
            if len(admitted) == free:
                break
            if used + request.predicted_total > setting.max_batch_tokens:
                if is_predicted:
                    continue
                break  # strict arrival order without a predictor
            admitted.append(request)
            used += request.predicted_total
        if not admitted and not self._active:
            admitted = [order[0]]  # fits the largest budget (checked at submit), so it runs alone
        chosen = {request.request_id for request in admitted}
        self._waiting = [request for request in self._waiting if request.request_id not in chosen]
        with self._lock:
            self._num_pending -= len(admitted)
        now = time.monotonic()
        for request in admitted:
            request.admitted = now
        return admitted

    # ---- forward passes ---------------------------------------------------------------------------------------

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        if self._suppress is not None:
            logits = self._suppress(None, logits)
        return logits.argmax(dim=-1)

    @torch.no_grad()
    def _prefill(self, requests: list[_Request]) -> int:
        """Prefills `requests`, emits their first tokens and adds the unfinished ones to the batch."""
        plain, single = [], []
        for request in requests:
            entry = self._lookup_prefix(request) if len(self.prefix_cache) else None
            if request.media or entry is not None:
                single.append((request, entry))
            else:
                plain.append(request)
        prefilled = []
        if plain:
            prefilled.append((plain, *self._prefill_padded(plain)))
        for request, entry in single:
            try:
                prefilled.append(([request], *self._prefill_one(request, entry)))
            except ValueError as error:  # bad media reach the model's own checks
                request.handle._settle(error=error)
                self.stats["failed"] += 1
        tokens = 0
        for group, cache, attention_mask, logits in prefilled:
            self.stats["prefill_calls"] += 1
            tokens += self._emit(group, self._greedy(logits), cache, attention_mask)
        return tokens

    def _prefill_padded(self, requests: list[_Request]) -> tuple:
        length = max(len(request.input_ids) for request in requests)
        input_ids = torch.full((len(requests), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(requests), length, dtype=torch.long)
        for row, request in enumerate(requests):
            input_ids[row, length - len(request.input_ids) :] = torch.tensor(request.input_ids)
            attention_mask[row, length - len(request.input_ids) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        device = self.model.device
        outputs = self.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=True,
            logits_to_keep=1,
        )
        return outputs.cache, attention_mask.to(device), outputs.logits[:, -1].float()

    def _prefill_one(self, request: _Request, entry: PrefixEntry | None) -> tuple:
        device = self.model.device
        media = {key: value.to(device) for key, value in request.media.items()}
        start, cache = 0, None
        if entry is not None:
            start = len(entry.token_ids)
            cache = cache_from_layers(entry.layers, self.model)
            media = _media_after(media, len(entry.image_digests), len(entry.clip_digests))
            request.cached_prefix_length = start
        length = len(request.input_ids)
        attention_mask = torch.ones(1, length, dtype=torch.long, device=device)
        outputs = self.model(
            input_ids=torch.tensor([request.input_ids[start:]], device=device),
            attention_mask=attention_mask,
            position_ids=torch.arange(start, length, device=device)[None],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **media,
        )
        return outputs.cache, attention_mask, outputs.logits[:, -1].float()

    def _decode(self) -> int:
        logits = self._batch.decode()
        self.stats["decode_steps"] += 1
        self.stats["peak_cache_positions"] = max(
            self.stats["peak_cache_positions"], len(self._batch) * self._batch.kv_length
        )
        tokens = self._greedy(logits)
        requests = [self._active[rid] for rid in self._batch.request_ids]
        kept = []
        for row, (request, token) in enumerate(zip(requests, tokens.tolist())):
            if self._append(request, token):
                kept.append(row)
        self._batch.next_tokens = tokens
        self._batch.keep(kept)
        return len(requests)

    def _emit(self, requests: list[_Request], tokens: torch.Tensor, cache, attention_mask: torch.Tensor) -> int:
        now = time.monotonic()
        kept = []
        for row, (request, token) in enumerate(zip(requests, tokens.tolist())):
            request.first_token = now
            if self._append(request, token):
                kept.append(row)
        if kept:
            index = torch.tensor(kept, device=attention_mask.device)
            layers = [tuple(tensor[index] for tensor in pair) for pair in cache_layers(cache)]
            self._batch.add(
                [requests[row].request_id for row in kept],
                cache_from_layers(layers, self.model),
                attention_mask[index],
                tokens[index],
            )
            for row in kept:
                self._active[requests[row].request_id] = requests[row]
            self.stats["peak_batch_size"] = max(self.stats["peak_batch_size"], len(self._active))
        return len(requests)

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
        self.length_log.append(LengthRecord(request.input_ids, len(request.generated), request.max_new_tokens))
        return False

    # ---- prefix cache -----------------------------------------------------------------------------------------

    def _digests(self, media: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        images = [media_digest(image) for image in media.get("pixel_values", [])]
        clips = []
        if "input_features" in media:
            masks = media.get("input_features_mask")
            for index, clip in enumerate(media["input_features"]):
                frames = int(masks[index].sum()) if masks is not None else clip.shape[-1]
                clips.append(media_digest(clip[:, :frames]))
        return images, clips

    def _lookup_prefix(self, request: _Request) -> PrefixEntry | None:
        return self.prefix_cache.lookup(request.input_ids, *self._digests(request.media))

    @torch.no_grad()
    def warm_up(self, prefixes: Sequence[Mapping[str, torch.Tensor] | Sequence[int]]) -> int:
        """Prefills `prefixes` (system prompts, recurring images: inputs as `submit` takes them) into the prefix
        cache; later prompts that start with one skip its prefill. Returns the cache's size in bytes.

        Raises `ValueError` when a prefix would cut through an image or audio span or cannot fit the cache.
        """
        for prefix in prefixes:
            input_ids, media = self.parse_inputs(prefix)
            self._check_whole_media(input_ids, media)
            device = self.model.device
            with self._model_lock:
                outputs = self.model(
                    input_ids=torch.tensor([input_ids], device=device),
                    use_cache=True,
                    logits_to_keep=1,
                    **{key: value.to(device) for key, value in media.items()},
                )
                images, clips = self._digests(media)
                entry = PrefixEntry(tuple(input_ids), tuple(images), tuple(clips), cache_layers(outputs.cache))
                self.prefix_cache.put(entry)
        return self.prefix_cache.nbytes

    def _check_whole_media(self, input_ids: list[int], media: Mapping[str, torch.Tensor]) -> None:
        config = self.model.config
        if config.use_image_input:
            count = input_ids.count(config.image_token_id)
            num_images = len(media.get("pixel_values", []))
            if count != num_images * config.num_image_tokens:
                raise ValueError(
                    f"the prefix has {count} image tokens but {num_images} images of {config.num_image_tokens} "
                    "tokens each: a prefix must hold whole images"
                )
        if config.use_audio_input and "input_features" in media:
            count = input_ids.count(config.audio_token_id)
            masks = media.get("input_features_mask")
            frames = masks.sum(dim=-1) if masks is not None else [clip.shape[-1] for clip in media["input_features"]]
            expected = sum(int(value) // config.audio_conv_stride for value in frames)
            if count != expected:
                raise ValueError(
                    f"the prefix has {count} audio tokens but its clips make {expected}: a prefix must hold "
                    "whole clips"
                )

    # ---- state ------------------------------------------------------------------------------------------------

    def save_state(self, directory: str | Path) -> None:
        """Writes the engine's learned state to `directory`: the length predictor, the scheduler's bandit, the
        generation log (`generation_log.jsonl`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / _LOG_NAME, "w") as log:
            for record in self.length_log:
                log.write(json.dumps(asdict(record)) + "\n")
        if self.length_predictor is not None:
            self.length_predictor.save(directory)
        if self.scheduler is not None:
            self.scheduler.save(directory)

    def load_state(self, directory: str | Path) -> None:
        """Loads what `save_state` wrote (the config stays this engine's own): the length predictor and the
        scheduler when saved, and the generation log."""
        directory = Path(directory)
        if not (directory / _LOG_NAME).is_file():
            raise FileNotFoundError(f"no {_LOG_NAME} in {directory}: pass a directory written by Engine.save_state")
        if (directory / "length_predictor.json").is_file():
            self.length_predictor = LengthPredictor.load(directory)
        if (directory / "scheduler.json").is_file():
            self.scheduler = SelfTuningScheduler.load(directory)
        self.length_log.clear()
        for line in (directory / _LOG_NAME).read_text().splitlines():
            self.length_log.append(LengthRecord(**json.loads(line)))


def _media_after(media: dict[str, torch.Tensor], num_images: int, num_clips: int) -> dict[str, torch.Tensor]:
    """The media of a prompt that are not inside its first `num_images` images and `num_clips` clips."""
    rest = {}
    if "pixel_values" in media and len(media["pixel_values"]) > num_images:
        rest["pixel_values"] = media["pixel_values"][num_images:]
    if "input_features" in media and len(media["input_features"]) > num_clips:
        rest["input_features"] = media["input_features"][num_clips:]
        if "input_features_mask" in media:
            rest["input_features_mask"] = media["input_features_mask"][num_clips:]
    return rest
