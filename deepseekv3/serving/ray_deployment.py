"""Replicas on Ray Serve: N engine replicas behind Ray Serve's HTTP proxy, with the routes of `deepseekv3 serve`.

`build_app` returns a Ray Serve application of two deployments:

- `EngineReplica` (`num_replicas` of them): each loads the model as `deepseekv3 serve` does (`build_server`) and runs
  our `ChatServer` on a loopback port inside the replica. A request reaches it as a `ForwardedRequest` and its answer
  streams back unchanged (status, headers, body or server-sent events), so every route, error, limit, API-key check and
  stop string is the `ChatServer`'s own. Its `check_health` is the engine's health, so Ray replaces a replica whose
  engine stays unhealthy (`/health` answering 503).
- `OpenAIIngress` (one, no CPU of its own): the HTTP entry behind Ray's proxy. It reads the request (413 over
  `max_request_bytes`), keys it with `prefix_key` and calls an engine replica through a handle whose request router
  is `PrefixAffinityRouter`. Answers carry the replica's id in the `x-deepseekv3-replica` header.

Routing: a chat request's key is a digest of its first message, the one the chat template renders first (the system
prompt; in a conversation without one, its first turn). `PrefixAffinityRouter` ranks the replicas by rendezvous
hashing of the key with each replica's id and sends the request to the first, so every request sharing that first
message, and every later turn of a conversation, goes to the replica whose prefix cache already holds it. When that
replica is at `max_ongoing_requests` (the engine's `max_batch_size`: its batch is full), or does not answer Ray's
queue-length probe in time (`RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S`, 0.1 s), the request goes to the least
loaded other replica instead. A request without messages goes to the least loaded replica. When a replica is added
or removed, only the keys that ranked it first move.

`deepseekv3 serve MODEL_DIR --ray-replicas N` (`serve_forever`) starts a local Ray cluster, or joins the one at
`--ray-address`, and serves until Ctrl-C.
"""

import dataclasses
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

try:
    import httpx
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
except ImportError as error:
    raise ImportError(
        f"serving on Ray needs the `ray` extra: pip install 'deepseekv3[ray]' ({error.name} is missing)"
    ) from error
from transformers.utils import logging

from .engine import EngineConfig
from .launch import build_server
from .server import ServerConfig, _is_loopback

__all__ = [
    "APP_NAME",
    "REPLICA_HEADER",
    "EngineReplica",
    "ForwardedRequest",
    "OpenAIIngress",
    "PrefixAffinityRouter",
    "build_app",
    "prefix_key",
    "rank_replicas",
    "serve_forever",
]

logger = logging.get_logger(__name__)

APP_NAME = "deepseekv3"
REPLICA_HEADER = "x-deepseekv3-replica"  # the unique id of the replica that answered
# set by each hop for itself (httpx toward the replica's server, uvicorn toward the client)
_HOP_HEADERS = frozenset({"host", "connection", "keep-alive", "content-length", "transfer-encoding", "date", "server"})
_READ_GRACE_S = 10.0  # the replica's server answers within its request timeout + 1 s; reads wait this much longer


@dataclasses.dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request on its way from the ingress to an engine replica.

    Attributes:
        method (`str`), path (`str`, with its query), headers (`tuple[tuple[str, str], ...]`), body (`bytes`).
        prefix_key (`str` or `None`): what `PrefixAffinityRouter` routes on (`prefix_key`).
    """

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    prefix_key: str | None


def prefix_key(body: bytes) -> str | None:
    """The routing key of a request body: the SHA-256 of its first message (as canonical JSON), or None for a body
    that is not a JSON object with a non-empty `messages` list (the replica's server answers those)."""
    try:
        payload = json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        return None
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list) or not messages:
        return None
    first = json.dumps(messages[0], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(first.encode()).hexdigest()


def rank_replicas(key: str, replica_ids: Sequence[str]) -> list[str]:
    """`replica_ids` in the order `PrefixAffinityRouter` prefers them for `key` (rendezvous hashing: by the digest of
    the key and the replica's id, highest first)."""
    return sorted(
        replica_ids, key=lambda replica_id: hashlib.sha256(f"{key}:{replica_id}".encode()).digest(), reverse=True
    )


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: a request with a `prefix_key` goes to the replica `rank_replicas` puts first, or,
    when that one is at `max_ongoing_requests` or slow to report its queue, to the least loaded of the others; a
    request without one goes to the least loaded replica."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        arguments = pending_request.args if pending_request is not None else ()
        key = getattr(arguments[0], "prefix_key", None) if arguments else None
        if key is None:
            return [candidate_replicas]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        ranked = [by_id[replica_id] for replica_id in rank_replicas(key, list(by_id))]
        return [ranked[:1], ranked[1:]]


@serve.deployment(name="EngineReplica")
class EngineReplica:
    """One engine and its `ChatServer` on a loopback port; `forward` relays a request to it. The arguments are those
    of `build_server` (the server's host and port are replaced by 127.0.0.1 and a free port)."""

    def __init__(
        self,
        model_dir: str,
        server_config: ServerConfig,
        engine_config: EngineConfig,
        lite_model_dir: str | None,
        engine_state_dir: str | None,
        warm_up_system: Sequence[str],
        device: str | None,
        dtype: str,
    ):
        local = dataclasses.replace(server_config, host="127.0.0.1", port=0)
        self._server = build_server(
            model_dir,
            local,
            engine_config,
            lite_model_dir,
            engine_state_dir,
            warm_up_system,
            device=device,
            dtype=dtype,
        ).start()
        self._client = httpx.AsyncClient(
            base_url=self._server.url,
            timeout=server_config.request_timeout_s + _READ_GRACE_S,
            limits=httpx.Limits(max_connections=server_config.max_connections),
        )
        self._replica_id = serve.get_replica_context().replica_tag

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[Any]:
        """Yields the answer's status and headers (`REPLICA_HEADER` added), then its body's chunks as they come.
        Closing the generator (the client left) closes the connection, and the server cancels the request."""
        outgoing = self._client.build_request(
            request.method, request.path, headers=request.headers, content=request.body
        )
        response = await self._client.send(outgoing, stream=True)
        try:
            headers = {name: value for name, value in response.headers.items() if name not in _HOP_HEADERS}
            yield response.status_code, {**headers, REPLICA_HEADER: self._replica_id}
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

    def check_health(self) -> None:
        """Ray's health check: raises while the engine is unhealthy (Ray replaces the replica after 3 in a row)."""
        health = self._server.health
        if not health.is_healthy:
            raise RuntimeError(f"the engine is unhealthy: {health.reason}")

    def __del__(self) -> None:
        """On Ray's graceful shutdown: drains the server (`drain_timeout_s`) and stops the engine."""
        server = getattr(self, "_server", None)  # None when the model failed to load
        if server is not None:
            server.stop()


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0})
class OpenAIIngress:
    """The HTTP entry: every request goes, keyed by `prefix_key`, to an engine replica, and its answer streams back.

    Args:
        engine (`DeploymentHandle`): the `EngineReplica` deployment.
        max_request_bytes (`int`): larger bodies get 413 here, before any replica is involved.
    """

    def __init__(self, engine: DeploymentHandle, max_request_bytes: int):
        self._engine = engine.options(stream=True)
        self._max_request_bytes = max_request_bytes

    async def __call__(self, request: Request) -> Response:
        body = await self._read_body(request)
        if body is None:
            error = {
                "message": f"the request body exceeds the limit of {self._max_request_bytes} bytes",
                "type": "invalid_request_error",
                "code": "request_too_large",
            }
            return JSONResponse({"error": error}, status_code=413)
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = tuple((name, value) for name, value in request.headers.items() if name not in _HOP_HEADERS)
        forwarded = ForwardedRequest(request.method, path, headers, body, prefix_key(body))
        stream = self._engine.forward.remote(forwarded)
        status, response_headers = await anext(stream)
        return StreamingResponse(_relay(stream), status_code=status, headers=response_headers)

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None once it is over `max_request_bytes` (by its Content-Length, or as it is read)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._max_request_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_request_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)


async def _relay(stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """The body's chunks; when the response stops early (the client left), the replica's generator is cancelled."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        stream.cancel()


def build_app(
    model_dir: str | Path,
    server_config: ServerConfig,
    engine_config: EngineConfig,
    num_replicas: int = 2,
    lite_model_dir: str | Path | None = None,
    engine_state_dir: str | Path | None = None,
    warm_up_system: Sequence[str] = (),
    device: str | None = None,
    dtype: str = "auto",
    ray_actor_options: dict | None = None,
) -> serve.Application:
    """The Ray Serve application: `num_replicas` `EngineReplica`s behind one `OpenAIIngress`.

    Args:
        model_dir, server_config, engine_config, lite_model_dir, engine_state_dir, warm_up_system, device, dtype: as
            for `build_server`; each replica loads the model itself, so the directories must exist on every node that
            runs one. `device` (e.g. `"cuda"`) is resolved in the replica, among the devices Ray gave it.
            `server_config.host` and `port` are not used (Ray's proxy listens; `serve_forever`).
        num_replicas (`int`, defaults to 2): engine replicas.
        ray_actor_options (`dict`, *optional*): each replica's resources, e.g. `{"num_gpus": 1}`, or
            `{"num_gpus": 0.5}` for two replicas per GPU (defaults to Ray's: one CPU, no GPU).

    Raises:
        `FileNotFoundError`: `model_dir` has no `config.json` here.
        `ValueError`: `num_replicas` is below 1.
    """
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass a directory written by save_pretrained")
    if num_replicas < 1:
        raise ValueError(f"num_replicas ({num_replicas}) must be at least 1")
    engine = EngineReplica.options(
        num_replicas=num_replicas,
        max_ongoing_requests=engine_config.max_batch_size,
        ray_actor_options=ray_actor_options,
        request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter),
    ).bind(
        str(model_dir),
        server_config,
        engine_config,
        None if lite_model_dir is None else str(lite_model_dir),
        None if engine_state_dir is None else str(engine_state_dir),
        list(warm_up_system),
        device,
        dtype,
    )
    ingress = OpenAIIngress.options(max_ongoing_requests=num_replicas * server_config.max_connections)
    return ingress.bind(engine, server_config.max_request_bytes)


def serve_forever(
    app: serve.Application,
    server_config: ServerConfig,
    address: str | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Runs `app` behind Ray Serve's HTTP proxy on `server_config.host` and `port` until `KeyboardInterrupt`, then
    deletes the application and disconnects from Ray.

    Args:
        app (`serve.Application`): `build_app`'s.
        server_config (`ServerConfig`): where the proxy listens; without an `api_key` on a non-loopback host, a
            warning is logged.
        address (`str`, *optional*): the Ray cluster to join (`"auto"`, `"ray://head:10001"`, ...); by default the
            one `RAY_ADDRESS` names, or one `ray start` started on this machine, else a new local cluster, which stops
            on exit.
        on_ready (`Callable[[], None]`, *optional*): called once the replicas are serving.
    """
    if server_config.api_key is None and not _is_loopback(server_config.host):
        logger.warning(
            f"serving on {server_config.host} without an API key: anyone who reaches this address can use the "
            "model; set --api-key or DEEPSEEKV3_API_KEY (ServerConfig.api_key)"
        )
    ray.init(address=address)
    try:
        serve.start(http_options={"host": server_config.host, "port": server_config.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        try:
            if on_ready is not None:
                on_ready()
            threading.Event().wait()  # a signal interrupts the wait
        finally:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()
