"""OpenAI-compatible HTTP server over the engine: `POST /v1/chat/completions` (streaming and not), `GET /v1/models`
and `GET /health`, on the standard library's threading HTTP server (one thread per connection; the engine's own
thread batches what they submit).

Messages are rendered with the processor's chat template. Content parts may be text, `image_url` with a `data:`
URL, `input_audio` (base64 WAV, as OpenAI sends it) or `audio_url` with a `data:` URL; the server never fetches a
remote URL. It binds to 127.0.0.1 unless told otherwise, refuses bodies over `max_request_bytes` (413) and answers
errors in OpenAI's shape, `{"error": {"message", "type", "code"}}`. Decoding is greedy: `temperature` must be 0 or
absent.

No client waits forever: a handler waits for its request in short slices, at most `request_timeout_s` (then 504),
and cancels the request as soon as its client has closed the connection, streaming or not. An engine fault answers
500, a stopping server 503, and `/health` answers 503 with the reason while the engine is unhealthy or stopping.
"""

import base64
import binascii
import io
import json
import select
import socket
import threading
import time
import wave
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers.utils import logging

from .engine import (
    Engine,
    EngineFaultError,
    EngineHealth,
    EngineOverloadedError,
    EngineStoppedError,
    RequestHandle,
    RequestTimeoutError,
    RequestTooLargeError,
)
from .router import Router

__all__ = ["ChatServer", "ServerConfig"]

logger = logging.get_logger(__name__)

_SAMPLING_RATE = 16_000
_POLL_S = 0.1  # how often a waiting handler looks at its client's connection
_SETTLE_GRACE_S = 1.0  # the engine expires a request at its next step: the handler gives it this long to say so


class _ClientLeftError(Exception):
    """The client closed its connection before its answer was ready."""


class _RequestError(Exception):
    """An error answered to the client: HTTP status, OpenAI error type and code."""

    def __init__(self, status: HTTPStatus, message: str, error_type: str = "invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.error_type, self.code = status, error_type, code


@dataclass
class ServerConfig:
    """HTTP settings.

    Args:
        host (`str`, defaults to `"127.0.0.1"`): address to bind (loopback only unless changed).
        port (`int`, defaults to 8000): 0 picks a free port.
        model_name (`str`, defaults to `"deepseekv3"`): the name clients put in `"model"`.
        max_request_bytes (`int`, defaults to 16 MiB): larger bodies get 413.
        max_tokens (`int`, defaults to 256): the largest `max_tokens` a request may ask for.
        default_max_tokens (`int`, defaults to 64): `max_tokens` of a request that names none.
        request_timeout_s (`float`, defaults to 120): per-request timeout: the engine's, and the bound on every
            wait of the HTTP handler (504 past it).
        drain_timeout_s (`float`, defaults to 10): on `stop`, seconds the requests already accepted have to finish
            (new ones get 503 meanwhile) before they fail.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "deepseekv3"
    max_request_bytes: int = 16 * 2**20
    max_tokens: int = 256
    default_max_tokens: int = 64
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 10.0


class ChatServer:
    """Serves an `Engine` (or a `Router`) and its processor over HTTP.

    Args:
        engine (`Engine` or `Router`): started and stopped with the server.
        processor (`DeepseekV3MultimodalProcessor`): renders the chat and encodes text, images and audio.
        config (`ServerConfig`, *optional*).
    """

    def __init__(self, engine: Engine | Router, processor, config: ServerConfig | None = None):
        self.engine = engine
        self.processor = processor
        self.config = config or ServerConfig()
        self._httpd = ThreadingHTTPServer((self.config.host, self.config.port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = self
        self._thread: threading.Thread | None = None
        self._ids = iter(range(1 << 62))
        self._ids_lock = threading.Lock()
        self._is_stopping = False

    @property
    def port(self) -> int:
        """The bound port (useful with `port=0`)."""
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def is_stopping(self) -> bool:
        return self._is_stopping

    @property
    def health(self) -> EngineHealth:
        """The engine's (or router's) health."""
        return self.engine.health

    def start(self) -> "ChatServer":
        """Starts the engine and serves in a background thread."""
        self.engine.start()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="deepseekv3-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Starts the engine and serves until interrupted (`KeyboardInterrupt`), then stops as `stop` does."""
        self.start()
        try:
            threading.Event().wait()  # a signal interrupts the wait
        finally:
            self.stop()

    def stop(self) -> None:
        """Drains and stops: new requests and `/health` get 503 while the engine finishes what it accepted (for up
        to `drain_timeout_s`; the rest then fail with 503), then the socket closes."""
        self._is_stopping = True
        self.engine.stop(self.config.drain_timeout_s)
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def next_id(self) -> str:
        with self._ids_lock:
            return f"chatcmpl-{next(self._ids)}"

    # ---- request translation ----------------------------------------------------------------------------------

    def parse_chat_request(self, body: Any) -> tuple[dict, int, bool]:
        """Checks a `/v1/chat/completions` body; returns the processor's inputs, `max_tokens` and `stream`."""
        if not isinstance(body, dict):
            raise _RequestError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        model = body.get("model")
        if model != self.config.model_name:
            raise _RequestError(
                HTTPStatus.NOT_FOUND,
                f"the model {model!r} does not exist; this server serves {self.config.model_name!r}",
                code="model_not_found",
            )
        temperature = body.get("temperature")
        if temperature not in (None, 0, 0.0):
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                f"decoding is greedy: temperature must be 0 (got {temperature})",
            )
        if body.get("n", 1) != 1:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"n must be 1 (got {body.get('n')})")
        if body.get("stop") is not None:
            raise _RequestError(HTTPStatus.BAD_REQUEST, "stop sequences are not supported")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", self.config.default_max_tokens))
        if (
            not isinstance(max_tokens, int)
            or isinstance(max_tokens, bool)
            or not 1 <= max_tokens <= self.config.max_tokens
        ):
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                f"max_tokens must be an integer in [1, {self.config.max_tokens}] (got {max_tokens!r})",
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"stream must be true or false (got {stream!r})")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _RequestError(HTTPStatus.BAD_REQUEST, "messages must be a non-empty list")
        rendered, images, clips = [], [], []
        for index, message in enumerate(messages):
            rendered.append(_render_message(message, index, images, clips))
        text = self.processor.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
        kwargs: dict[str, Any] = {"text": text, "return_tensors": "pt", "add_special_tokens": False}
        if images:
            kwargs["images"] = images
        if clips:
            kwargs["audio"], kwargs["sampling_rate"] = clips, _SAMPLING_RATE
        try:
            inputs = self.processor(**kwargs)
        except (ValueError, TypeError) as error:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"bad input: {error}") from error
        return dict(inputs), max_tokens, stream


def _render_message(message: Any, index: int, images: list, clips: list) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise _RequestError(
            HTTPStatus.BAD_REQUEST, f"messages[{index}] must be an object with role system, user or assistant"
        )
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    if not isinstance(content, list):
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"messages[{index}].content must be a string or a list of parts")
    parts = []
    for part_index, part in enumerate(content):
        where = f"messages[{index}].content[{part_index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url")
            images.append(_decode_image(_data_url_bytes(url, where), where))
            parts.append({"type": "image"})
        elif kind == "input_audio":
            audio = part.get("input_audio") or {}
            if audio.get("format", "wav") != "wav":
                raise _RequestError(HTTPStatus.BAD_REQUEST, f"{where}: only wav audio is supported")
            clips.append(_decode_wav(_base64_bytes(audio.get("data"), where), where))
            parts.append({"type": "audio"})
        elif kind == "audio_url":
            url = (part.get("audio_url") or {}).get("url")
            clips.append(_decode_wav(_data_url_bytes(url, where), where))
            parts.append({"type": "audio"})
        else:
            raise _RequestError(
                HTTPStatus.BAD_REQUEST,
                f"{where}: unsupported content part (types: text, image_url, input_audio, audio_url)",
            )
    return {"role": message["role"], "content": parts}


def _base64_bytes(data: Any, where: str) -> bytes:
    if not isinstance(data, str):
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"{where}: media data must be a base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"{where}: invalid base64 ({error})") from error


def _data_url_bytes(url: Any, where: str) -> bytes:
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where}: media must be a data URL (data:<mime>;base64,...); remote URLs are not fetched",
        )
    return _base64_bytes(url.split(";base64,", 1)[1], where)


def _decode_image(data: bytes, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"{where}: not a readable image ({error})") from error
    return image


def _decode_wav(data: bytes, where: str) -> np.ndarray:
    """16 kHz mono float32 from a PCM WAV file (the channels averaged)."""
    try:
        with wave.open(io.BytesIO(data)) as reader:
            rate, channels, width = reader.getframerate(), reader.getnchannels(), reader.getsampwidth()
            frames = reader.readframes(reader.getnframes())
    except (wave.Error, EOFError) as error:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"{where}: not a readable WAV file ({error})") from error
    if width not in (1, 2, 4):
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"{where}: unsupported WAV sample width {width} bytes")
    if rate != _SAMPLING_RATE:
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where}: audio must be sampled at {_SAMPLING_RATE} Hz (got {rate})",
        )
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    samples = np.frombuffer(frames, dtype=dtype).astype(np.float32)
    if width == 1:
        samples = samples - 128.0
    samples /= float(2 ** (8 * width - 1))
    if samples.size == 0:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"{where}: the WAV file has no samples")
    return samples.reshape(-1, channels).mean(axis=1)


class _Handler(BaseHTTPRequestHandler):
    server_version = "deepseekv3"

    @property
    def app(self) -> ChatServer:
        return self.server.app

    def log_message(self, format: str, *args) -> None:  # the access log goes through the engine's logger, not stderr
        return

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send_health()
        elif self.path == "/v1/models":
            model = {"id": self.app.config.model_name, "object": "model", "owned_by": "deepseekv3"}
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        else:
            self._send_error(_RequestError(HTTPStatus.NOT_FOUND, f"no route {self.path}", code="not_found"))

    def do_POST(self) -> None:
        try:
            if self.path != "/v1/chat/completions":
                raise _RequestError(HTTPStatus.NOT_FOUND, f"no route {self.path}", code="not_found")
            body = self._read_json()
            inputs, max_tokens, stream = self.app.parse_chat_request(body)
            handle = self.app.engine.submit(
                inputs, max_new_tokens=max_tokens, timeout_s=self.app.config.request_timeout_s
            )
        except _RequestError as error:
            self._send_error(error)
            return
        except RequestTooLargeError as error:
            self._send_error(_RequestError(HTTPStatus.BAD_REQUEST, str(error), code="context_length_exceeded"))
            return
        except EngineOverloadedError as error:
            self._send_error(_RequestError(HTTPStatus.TOO_MANY_REQUESTS, str(error), "rate_limit_error"))
            return
        except EngineStoppedError as error:
            self._send_error(_RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(error), "server_error", "stopping"))
            return
        except ValueError as error:
            self._send_error(_RequestError(HTTPStatus.BAD_REQUEST, str(error)))
            return
        except Exception as error:  # a bug must still answer the client, not drop the connection
            self._send_error(_RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, repr(error), "server_error"))
            return
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        deadline = time.monotonic() + self.app.config.request_timeout_s + _SETTLE_GRACE_S
        if stream:
            self._stream(handle, prompt_tokens, deadline)
        else:
            self._complete(handle, prompt_tokens, deadline)

    def _send_health(self) -> None:
        if self.app.is_stopping:
            error = _RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is stopping", "server_error", "stopping")
            self._send_error(error)
            return
        health = self.app.health
        if not health.is_healthy:
            self._send_error(
                _RequestError(HTTPStatus.SERVICE_UNAVAILABLE, health.reason, "server_error", "engine_unhealthy")
            )
            return
        engine = self.app.engine
        body = {"status": "ok", "model": self.app.config.model_name, "queued": engine.num_pending}
        body.update(active=engine.num_active, faults=health.faults, last_fault=health.last_fault)
        self._send_json(HTTPStatus.OK, body)

    def _client_left(self) -> bool:
        """Whether the client has closed its connection: the socket reads as ready, yet holds no byte."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):  # reset, or already closed
            return True

    def _check_waiting(self, handle: RequestHandle, deadline: float) -> None:
        """Between two slices of waiting: cancels the request and raises when its client has left
        (`_ClientLeftError`) or when it outlived the request timeout (a 504 `_RequestError`)."""
        if self._client_left():
            handle.cancel()
            raise _ClientLeftError
        if time.monotonic() >= deadline:
            handle.cancel()
            timeout = self.app.config.request_timeout_s
            raise _RequestError(
                HTTPStatus.GATEWAY_TIMEOUT, f"request not answered within {timeout} s", "timeout_error"
            )

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise _RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if not length.isdigit():
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
        limit = self.app.config.max_request_bytes
        if int(length) > limit:
            self.close_connection = True  # the body is left unread
            raise _RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request body ({length} bytes) exceeds the limit of {limit} bytes",
                code="request_too_large",
            )
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {error}") from error

    def _decode(self, token_ids: list[int]) -> str:
        return self.app.processor.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _complete(self, handle: RequestHandle, prompt_tokens: int, deadline: float) -> None:
        try:
            while not handle.wait(_POLL_S):
                self._check_waiting(handle, deadline)
            result = handle.result()
        except _ClientLeftError:
            return
        except _RequestError as error:
            self._send_error(error)
            return
        except Exception as error:  # the engine's error for this request
            self._send_error(_engine_error(error))
            return
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": self._decode(result.token_ids)},
            "finish_reason": result.finish_reason,
        }
        completion_tokens = len(result.token_ids)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        self._send_json(HTTPStatus.OK, {**self._envelope("chat.completion"), "choices": [choice], "usage": usage})

    def _stream(self, handle: RequestHandle, prompt_tokens: int, deadline: float) -> None:
        envelope = self._envelope("chat.completion.chunk")
        tokens, sent = [], ""
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self._send_event({**envelope, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            while True:
                try:
                    token = handle.next_token(_POLL_S)
                except TimeoutError:
                    self._check_waiting(handle, deadline)
                    continue
                if token is None:
                    break
                tokens.append(token)
                text = self._decode(tokens)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
                    continue
                if len(text) > len(sent):
                    delta = {"content": text[len(sent) :]}
                    self._send_event({**envelope, "choices": [{"index": 0, "delta": delta}]})
                    sent = text
            result = handle.result()
        except (_ClientLeftError, ConnectionError):  # the client left (a broken pipe, a reset, a closed socket)
            handle.cancel()
            return
        except Exception as error:
            failure = error if isinstance(error, _RequestError) else _engine_error(error)
            try:
                self._send_event({"error": _error_body(failure)})
                self.wfile.write(b"data: [DONE]\n\n")
            except ConnectionError:
                pass  # the client left too
            return
        final = {"index": 0, "delta": {}, "finish_reason": result.finish_reason}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens)}
        usage["total_tokens"] = prompt_tokens + len(tokens)
        self._send_event({**envelope, "choices": [final], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")

    def _envelope(self, kind: str) -> dict:
        return {
            "id": self.app.next_id(),
            "object": kind,
            "created": int(time.time()),
            "model": self.app.config.model_name,
        }

    def _send_event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: _RequestError) -> None:
        self._send_json(error.status, {"error": _error_body(error)})


def _error_body(error: _RequestError) -> dict:
    return {"message": str(error), "type": error.error_type, "code": error.code}


def _engine_error(error: Exception) -> _RequestError:
    """The answer to a request the engine failed; internals (exception texts) go to the server log only."""
    if isinstance(error, RequestTimeoutError):
        return _RequestError(HTTPStatus.GATEWAY_TIMEOUT, str(error), "timeout_error")
    if isinstance(error, EngineStoppedError):
        return _RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(error), "server_error", "stopping")
    if isinstance(error, ValueError):  # the model's own checks refused the request's inputs
        return _RequestError(HTTPStatus.BAD_REQUEST, str(error))
    if isinstance(error, EngineFaultError):  # the engine logged the details
        return _RequestError(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            f"the engine failed during {error.stage}; the request was not completed",
            "server_error",
        )
    logger.error("request failed", exc_info=error)
    return _RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, "the request failed", "server_error")
