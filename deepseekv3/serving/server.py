"""OpenAI-compatible HTTP server over the engine: `POST /v1/chat/completions` (streaming and not), `GET /v1/models`
and `GET /health`, on the standard library's threading HTTP server (one thread per connection; the engine's own
thread batches what they submit).

Messages are rendered with the processor's chat template. Content parts may be text, `image_url` with a `data:`
URL, `input_audio` (base64 WAV, as OpenAI sends it) or `audio_url` with a `data:` URL; the server never fetches a
remote URL. It binds to 127.0.0.1 unless told otherwise, refuses bodies over `max_request_bytes` (413) and answers
errors in OpenAI's shape, `{"error": {"message", "type", "code"}}`. A request may set `temperature`, `top_p`, `top_k`,
`seed`, `presence_penalty` and `frequency_penalty` (`SamplingParams`; without a temperature, or with 0, decoding is
greedy) and up to 4 `stop` strings, applied to the decoded text: the request is cancelled once one appears, the reply
ends before it, and a stream holds back text that may still turn out to begin one.

No client waits forever: a handler waits for its request in short slices, at most `request_timeout_s` (then 504),
and cancels the request as soon as its client has closed the connection, streaming or not; a client that leaves as
its answer is written only has its connection closed (no error is logged). An engine fault answers 500, a stopping
server 503, and `/health` answers 503 with the reason while the engine is unhealthy or stopping.
A 5xx body gives a generic message and the request's id; the exception and its traceback go to the server log.

Deployment guards (`ServerConfig`): with an `api_key`, every route but `GET /` (the chat page, which holds no data)
and `GET /health` needs `Authorization: Bearer <key>` (401 otherwise). A connection must deliver each request's head
and body within `socket_timeout_s` (a total deadline, so a client trickling a byte a second cannot hold a thread),
and at most `max_connections` are served at once: the next ones get 503 and are closed. Media are checked before
they are decoded: at most `max_images_per_request` images and `max_clips_per_request` audio clips, images in
`image_formats` and of at most `max_image_pixels` pixels, read from the header (400 otherwise).
"""

import base64
import binascii
import hmac
import io
import ipaddress
import json
import select
import socket
import threading
import time
import wave
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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
from .sampling import SamplingParams, StopStrings

__all__ = ["ChatServer", "ServerConfig"]

logger = logging.get_logger(__name__)

_SAMPLING_RATE = 16_000
_POLL_S = 0.1  # how often a waiting handler looks at its client's connection
_SETTLE_GRACE_S = 1.0  # the engine expires a request at its next step: the handler gives it this long to say so
_REFUSE_READ_S = 1.0  # a connection past max_connections gets this long to send its request head before its 503
_LINGER_S = 1.0  # after a refusal, how long the rest of the request is read and dropped, so the answer is not reset
_DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"  # `GET /`: the chat page, self-contained, no data
_CHAT_PAGE_HEADERS = {  # the page may talk to this server only, and run only its own inline script and style
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data: blob:; media-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_request_context = threading.local()  # the id of the request its handler thread is serving (for 5xx bodies, logs)


class _ClientLeftError(Exception):
    """The client closed its connection before its answer was ready."""


class _RequestError(Exception):
    """An error answered to the client: HTTP status, OpenAI error type and code."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        error_type: str = "invalid_request_error",
        code=None,
        cause: BaseException | None = None,
    ):
        super().__init__(message)
        self.status, self.error_type, self.code = status, error_type, code
        self.cause = cause  # an internal exception: logged with its traceback, never sent


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
        api_key (`str`, *optional*): when set, every route except `GET /` and `GET /health` requires the header
            `Authorization: Bearer <api_key>` (compared in constant time); others get 401 (`invalid_api_key`). Left
            out of the config's `repr`.
        socket_timeout_s (`float`, defaults to 30): the time a connection has to deliver a request's head and body
            (counted from the end of its previous answer, so it also closes idle keep-alive connections), and the
            bound on each socket write; past it the connection is closed (408 when the head had arrived).
        max_connections (`int`, defaults to 64): connections served at once (one thread each); up to as many more
            get 503 (`too_many_connections`) and are closed, and past that new connections are closed unanswered.
        max_images_per_request (`int`, defaults to 8): images a request may carry (400 `too_many_images`, before any
            is decoded); 0 refuses images.
        max_clips_per_request (`int`, defaults to 8): audio clips a request may carry (400 `too_many_audio_clips`);
            0 refuses audio.
        max_image_pixels (`int`, defaults to 4096 * 4096): largest width x height of an image, read from its header
            before it is decoded (400 `image_too_large`).
        image_formats (`tuple[str, ...]`, defaults to `("PNG", "JPEG", "WEBP", "GIF", "BMP")`): the Pillow formats
            accepted (400 `unsupported_image_format` otherwise); `"JPEG"` also accepts Pillow's `"MPO"` (camera
            JPEGs).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "deepseekv3"
    max_request_bytes: int = 16 * 2**20
    max_tokens: int = 256
    default_max_tokens: int = 64
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 10.0
    api_key: str | None = field(default=None, repr=False)
    socket_timeout_s: float = 30.0
    max_connections: int = 64
    max_images_per_request: int = 8
    max_clips_per_request: int = 8
    max_image_pixels: int = 4096 * 4096
    image_formats: tuple[str, ...] = _DEFAULT_IMAGE_FORMATS

    def __post_init__(self):
        if not self.socket_timeout_s > 0:
            raise ValueError(f"socket_timeout_s ({self.socket_timeout_s}) must be positive")
        for name in ("max_connections", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 1")
        for name in ("max_images_per_request", "max_clips_per_request"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be at least 0")
        if isinstance(self.image_formats, str):
            raise ValueError(f"image_formats ({self.image_formats!r}) must be a sequence of format names")
        self.image_formats = tuple(name.upper() for name in self.image_formats)
        if self.api_key == "":
            self.api_key = None


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
        self._httpd = _HTTPServer((self.config.host, self.config.port), self.config.max_connections)
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
        """Starts the engine and serves in a background thread. Warns when the server listens beyond loopback
        without an `api_key`."""
        if self.config.api_key is None and not _is_loopback(self.config.host):
            logger.warning(
                f"serving on {self.config.host} without an API key: anyone who reaches this address can use the "
                "model; set --api-key or DEEPSEEKV3_API_KEY (ServerConfig.api_key)"
            )
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
        to `drain_timeout_s`; the rest then fail with 503), then the socket closes, as do the connections waiting
        for a request, and the connections' threads end."""
        self._is_stopping = True
        self.engine.stop(self.config.drain_timeout_s)
        self._httpd.shutdown()
        self._httpd.close_idle_connections()
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

    def parse_chat_request(self, body: Any) -> tuple[dict, int, bool, SamplingParams, StopStrings]:
        """Checks a `/v1/chat/completions` body; returns the processor's inputs, `max_tokens`, `stream`, the sampling
        parameters and the stop strings. A bad value raises a 400 `_RequestError` naming its field."""
        if not isinstance(body, dict):
            raise _RequestError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        model = body.get("model")
        if model != self.config.model_name:
            raise _RequestError(
                HTTPStatus.NOT_FOUND,
                f"the model {model!r} does not exist; this server serves {self.config.model_name!r}",
                code="model_not_found",
            )
        if body.get("n", 1) != 1:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"n must be 1 (got {body.get('n')})")
        try:
            sampling = SamplingParams.from_request(body)
            stop = StopStrings(body.get("stop"))
        except ValueError as error:  # the message names the field and its range
            raise _RequestError(HTTPStatus.BAD_REQUEST, str(error)) from error
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
            rendered.append(_render_message(message, index, images, clips, self.config))
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
        return dict(inputs), max_tokens, stream, sampling, stop


def _render_message(message: Any, index: int, images: list, clips: list, config: ServerConfig | None = None) -> dict:
    """One OpenAI message as the chat template takes it; its media are decoded into `images` and `clips`, after
    `_check_media_counts` and, for images, `_decode_image`'s header checks (`config`'s limits; defaults without)."""
    config = config or ServerConfig()
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise _RequestError(
            HTTPStatus.BAD_REQUEST, f"messages[{index}] must be an object with role system, user or assistant"
        )
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    if not isinstance(content, list):
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"messages[{index}].content must be a string or a list of parts")
    _check_media_counts(content, index, len(images), len(clips), config)
    parts = []
    for part_index, part in enumerate(content):
        where = f"messages[{index}].content[{part_index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url")
            images.append(_decode_image(_data_url_bytes(url, where), where, config))
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


def _check_media_counts(content: list, index: int, num_images: int, num_clips: int, config: ServerConfig) -> None:
    """Refuses (400) a message whose media parts take the request past `max_images_per_request` or
    `max_clips_per_request` images or clips (`num_images` and `num_clips` came in earlier messages), before any of
    its media is decoded."""
    kinds = [part.get("type") for part in content if isinstance(part, dict)]
    num_images += kinds.count("image_url")
    num_clips += kinds.count("input_audio") + kinds.count("audio_url")
    if num_images > config.max_images_per_request:
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"messages[{index}]: the request carries at least {num_images} images; at most "
            f"{config.max_images_per_request} are accepted (max_images_per_request)",
            code="too_many_images",
        )
    if num_clips > config.max_clips_per_request:
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"messages[{index}]: the request carries at least {num_clips} audio clips; at most "
            f"{config.max_clips_per_request} are accepted (max_clips_per_request)",
            code="too_many_audio_clips",
        )


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


def _decode_image(data: bytes, where: str, config: ServerConfig) -> Image.Image:
    """Decodes an image once its header passed `config`'s checks: its format in `image_formats`, and at most
    `max_image_pixels` pixels (`Image.open` reads the header only; `load` decodes)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # Pillow's own bound (far above ours): it refuses to open it
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where}: the image is over max_image_pixels ({config.max_image_pixels}): {error}",
            code="image_too_large",
        ) from error
    except (UnidentifiedImageError, OSError) as error:
        raise _RequestError(HTTPStatus.BAD_REQUEST, f"{where}: not a readable image ({error})") from error
    image_format = "JPEG" if image.format == "MPO" else image.format  # a camera JPEG (with a preview) is MPO
    if image_format not in config.image_formats:
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where}: the image format {image.format} is not accepted (accepted: {', '.join(config.image_formats)})",
            code="unsupported_image_format",
        )
    width, height = image.size
    if width * height > config.max_image_pixels:
        raise _RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{where}: the image is {width}x{height} ({width * height} pixels), over max_image_pixels "
            f"({config.max_image_pixels})",
            code="image_too_large",
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
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


def _is_loopback(host: str) -> bool:
    """Whether `host` (an address to bind) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "" (every interface) or a host name
        return False


class _DeadlineSocketIO(socket.SocketIO):
    """The reading side of a connection whose reads all end by `deadline` (a `time.monotonic()` value), not only
    each within the socket's timeout: a client sending a byte a second cannot keep its thread reading."""

    def __init__(self, sock: socket.socket):
        super().__init__(sock, "rb")
        self.deadline = float("inf")

    def readinto(self, buffer) -> int | None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request was not received in time")
        per_read = self._sock.gettimeout()
        self._sock.settimeout(remaining if per_read is None else min(remaining, per_read))
        try:
            return super().readinto(buffer)
        finally:
            self._sock.settimeout(per_read)


class _Handler(BaseHTTPRequestHandler):
    server_version = "deepseekv3"
    is_over_capacity = False  # `_OverCapacityHandler`: the connection is past `max_connections`

    @property
    def app(self) -> ChatServer:
        return self.server.app

    def log_message(self, format: str, *args) -> None:  # the access log goes through the engine's logger, not stderr
        return

    def setup(self) -> None:
        self.timeout = self.app.config.socket_timeout_s  # each socket read and write (StreamRequestHandler sets it)
        super().setup()
        self.rfile.close()  # replaced by a reader whose reads end by the request's deadline
        self._reader = _DeadlineSocketIO(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        """Reads and answers one request; its head and body must arrive within `socket_timeout_s` (a connection
        past `max_connections` has at most `_REFUSE_READ_S`), counted from now: the end of the previous answer."""
        limit = self.app.config.socket_timeout_s
        if self.is_over_capacity:
            limit = min(limit, _REFUSE_READ_S)
        self._reader.deadline = time.monotonic() + limit
        self.server.set_idle(self.connection, True)
        try:
            super().handle_one_request()
        except ConnectionError:
            # the client left (a reset, a broken pipe) while its request was read or its answer written, after the
            # last look at its connection: its request has ended, so only the connection is left to close
            self.close_connection = True
        finally:
            self.server.set_idle(self.connection, False)

    def parse_request(self) -> bool:
        """Parses the request head, then gives the request its id and refuses it when the connection is past
        `max_connections` (503) or the API key is missing or wrong (401): `do_*` runs only when this is True."""
        if not super().parse_request():
            return False
        self.server.set_idle(self.connection, False)
        self.request_id = _request_context.request_id = self.app.next_id()
        if self.is_over_capacity:
            limit = self.app.config.max_connections
            message = f"the server is serving its maximum of {limit} connections (max_connections); retry later"
            error = _RequestError(HTTPStatus.SERVICE_UNAVAILABLE, message, "server_error", "too_many_connections")
            self._refuse(error, {"Retry-After": "1"})
            return False
        if not self._is_authorized():
            message = "missing or invalid API key: send the header 'Authorization: Bearer <key>'"
            error = _RequestError(HTTPStatus.UNAUTHORIZED, message, "authentication_error", "invalid_api_key")
            self._refuse(error, {"WWW-Authenticate": "Bearer"})
            return False
        return True

    def _is_authorized(self) -> bool:
        """Whether the request may proceed: no `api_key` is set, it asks for `GET /health` or the chat page `GET /`
        (which holds no data), or it carries the key as `Authorization: Bearer <key>` (compared in constant time)."""
        api_key = self.app.config.api_key
        if api_key is None or (self.command == "GET" and self.path in ("/", "/health")):
            return True
        scheme, _, token = (self.headers.get("Authorization") or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

    def _refuse(self, error: _RequestError, headers: dict[str, str]) -> None:
        """Answers `error` without reading the request's body and closes the connection, reading and dropping
        what the client still sends for up to `_LINGER_S` first: closing on unread bytes resets the connection,
        which can destroy the answer before the client reads it."""
        try:
            self._send_json(error.status, {"error": _error_body(error)}, {**headers, "Connection": "close"})
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_S
            while (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                if not self.connection.recv(65536):
                    break
        except OSError:  # a timeout, a reset: the client is gone or too slow; close anyway
            pass

    def do_GET(self) -> None:
        if self.path == "/":
            page = _CHAT_PAGE.read_bytes()
            self.send_response(HTTPStatus.OK)
            for name, value in {**_CHAT_PAGE_HEADERS, "Content-Length": str(len(page))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(page)
        elif self.path == "/health":
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
            inputs, max_tokens, stream, sampling, stop = self.app.parse_chat_request(body)
            handle = self.app.engine.submit(
                inputs, max_new_tokens=max_tokens, timeout_s=self.app.config.request_timeout_s, sampling=sampling
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
            self._send_error(_internal_error(error))
            return
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        deadline = time.monotonic() + self.app.config.request_timeout_s + _SETTLE_GRACE_S
        if stream:
            self._stream(handle, prompt_tokens, deadline, stop)
        else:
            self._complete(handle, prompt_tokens, deadline, stop)

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
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError as error:  # past the request's deadline (`_DeadlineSocketIO`)
            self.close_connection = True
            timeout = self.app.config.socket_timeout_s
            raise _RequestError(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the request body was not received within {timeout} s (socket_timeout_s)",
                code="request_timeout",
            ) from error
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {error}") from error

    def _decode(self, token_ids: list[int]) -> str:
        return self.app.processor.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _next_token(self, handle: RequestHandle, deadline: float) -> int | None:
        """The request's next token (None when it has finished), checking the client and the deadline meanwhile."""
        while True:
            try:
                return handle.next_token(_POLL_S)
            except TimeoutError:
                self._check_waiting(handle, deadline)

    def _complete(self, handle: RequestHandle, prompt_tokens: int, deadline: float, stop: StopStrings) -> None:
        tokens, content, is_stopped = [], "", False
        try:
            # with stop strings, read the tokens as they come, to cancel the request as soon as one appears
            while stop and not is_stopped:
                token = self._next_token(handle, deadline)
                if token is None:
                    break
                tokens.append(token)
                content, is_stopped = stop.cut(self._decode(tokens))
            if is_stopped:
                handle.cancel()  # a no-op when its last token had already finished it
                finish_reason = "stop"
            else:
                while not handle.wait(_POLL_S):
                    self._check_waiting(handle, deadline)
                result = handle.result()
                tokens = result.token_ids
                content, is_stopped = stop.cut(self._decode(tokens))
                finish_reason = "stop" if is_stopped else result.finish_reason
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
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
        }
        completion_tokens = len(tokens)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        self._send_json(HTTPStatus.OK, {**self._envelope("chat.completion"), "choices": [choice], "usage": usage})

    def _stream(self, handle: RequestHandle, prompt_tokens: int, deadline: float, stop: StopStrings) -> None:
        envelope = self._envelope("chat.completion.chunk")
        tokens, sent, is_stopped = [], "", False
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self._send_event({**envelope, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            while not is_stopped:
                token = self._next_token(handle, deadline)
                if token is None:
                    break
                tokens.append(token)
                text, is_stopped = stop.cut(self._decode(tokens))
                if is_stopped:
                    handle.cancel()  # a no-op when its last token had already finished it
                elif text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
                    continue
                else:
                    text = stop.streamable(text)  # hold back what may begin a stop string
                if len(text) > len(sent):
                    delta = {"content": text[len(sent) :]}
                    self._send_event({**envelope, "choices": [{"index": 0, "delta": delta}]})
                    sent = text
            finish_reason = "stop"
            if not is_stopped:
                finish_reason = handle.result().finish_reason
                text = self._decode(tokens)  # no stop string came: what was held back goes out
                if len(text) > len(sent):
                    delta = {"content": text[len(sent) :]}
                    self._send_event({**envelope, "choices": [{"index": 0, "delta": delta}]})
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
        final = {"index": 0, "delta": {}, "finish_reason": finish_reason}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens)}
        usage["total_tokens"] = prompt_tokens + len(tokens)
        self._send_event({**envelope, "choices": [final], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")

    def _envelope(self, kind: str) -> dict:
        return {
            "id": self.request_id,
            "object": kind,
            "created": int(time.time()),
            "model": self.app.config.model_name,
        }

    def _send_event(self, payload: dict) -> None:
        """Writes one server-sent event; a client that has not read for `socket_timeout_s` counts as gone
        (`ConnectionAbortedError`, so the stream cancels its request)."""
        try:
            self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
            self.wfile.flush()
        except TimeoutError as error:
            self.close_connection = True
            raise ConnectionAbortedError("the client stopped reading the stream") from error

    def _send_json(self, status: HTTPStatus, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: _RequestError) -> None:
        self._send_json(error.status, {"error": _error_body(error)})


class _OverCapacityHandler(_Handler):
    """Serves a connection past `max_connections`: reads its request head (for at most `_REFUSE_READ_S`), answers
    503 and closes."""

    is_over_capacity = True


class _HTTPServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` (a daemon thread per connection) serving at most `max_connections` connections at once.
    Up to `max_connections` more are answered 503 by an `_OverCapacityHandler`; past those, a new connection is
    closed unanswered, so a flood of connections neither queues forever nor starts unbounded threads. Connections
    wait to be accepted in a listen queue of `2 * max_connections` (the kernel caps it at `net.core.somaxconn`)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], max_connections: int):
        # socketserver listens with a queue of 5: on a loaded machine, where the accepting thread waits for the GIL,
        # a burst of clients overflows it, and the kernel drops their SYNs (retried after 1, 3, 7 s) or resets them
        self.request_queue_size = 2 * max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refusal_slots = threading.BoundedSemaphore(max_connections)
        self._admissions: dict[socket.socket, tuple[type[_Handler], threading.BoundedSemaphore]] = {}
        self._admissions_lock = threading.Lock()
        self._idle: set[socket.socket] = set()  # connections waiting for (the rest of) a request head
        super().__init__(address, _Handler)

    def set_idle(self, connection: socket.socket, is_idle: bool) -> None:
        with self._admissions_lock:
            if is_idle:
                self._idle.add(connection)
            else:
                self._idle.discard(connection)

    def close_idle_connections(self) -> None:
        """Shuts the connections waiting for a request (keep-alive ones, slow ones), so their threads end now
        rather than at their deadline."""
        with self._admissions_lock:
            idle = list(self._idle)
        for connection in idle:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed meanwhile
                pass

    def process_request(self, request: socket.socket, client_address) -> None:
        handler_class, slots = _Handler, self._slots
        if not slots.acquire(blocking=False):
            handler_class, slots = _OverCapacityHandler, self._refusal_slots
            if not slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
        with self._admissions_lock:
            self._admissions[request] = (handler_class, slots)
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._release(request)
            raise

    def finish_request(self, request: socket.socket, client_address) -> None:
        with self._admissions_lock:
            handler_class, _ = self._admissions[request]
        handler_class(request, client_address, self)

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: socket.socket) -> None:
        with self._admissions_lock:
            admission = self._admissions.pop(request, None)
        if admission is not None:
            admission[1].release()


def _error_body(error: _RequestError) -> dict:
    """The OpenAI error object answering `error`. A 5xx is logged here, with its cause's traceback, under the id of
    the request its thread serves, and answered with its generic message and that id, never an exception's text;
    a 4xx keeps its message."""
    message = str(error)
    if error.status >= 500:
        request_id = getattr(_request_context, "request_id", None) or "(unknown)"
        if error.status == HTTPStatus.INTERNAL_SERVER_ERROR:
            logger.error(f"request {request_id} failed: {message}", exc_info=error.cause)
            message = f"{message}; see the server log for request {request_id}"
        else:
            logger.info(f"request {request_id}: {error.status.value} {message}")
            message = f"{message} (request {request_id})"
    return {"message": message, "type": error.error_type, "code": error.code}


def _internal_error(error: BaseException) -> _RequestError:
    """A 500 for an unexpected exception: its text and traceback go to the server log only (`_error_body`)."""
    return _RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error", "server_error", cause=error)


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
    return _internal_error(error)
