"""Deployment options of `deepseekv3 serve` and `ChatServer`: device and dtype, the API key, socket deadlines and
the connection cap (slow and idle clients), media caps checked before decoding (a decompression bomb), and 5xx
bodies that keep internals in the server log. Driven through the official `openai` client and raw sockets, against
the `deepseekv3 serve` process and in-process servers."""

import base64
import concurrent.futures
import contextlib
import io
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import wave
import zlib

import httpx
import openai
import pytest
import torch
from PIL import Image, ImageFile
from serving_helpers import MESSAGES, MODEL_NAME, ask, error_of, served_processor_and_model, wait_until

from deepseekv3.cli import main
from deepseekv3.serving import Engine, EngineConfig
from deepseekv3.serving import launch as launch_module
from deepseekv3.serving import server as server_module
from deepseekv3.serving.launch import build_server
from deepseekv3.serving.server import ChatServer, ServerConfig

API_KEY = "test-key-0123"
SOCKET_TIMEOUT_S = 3.0  # the served process's; generous for a loaded 2-core machine
MAX_CONNECTIONS = 6


@pytest.fixture(scope="module")
def processor_and_model():
    return served_processor_and_model()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, processor_and_model):
    processor, model = processor_and_model
    directory = tmp_path_factory.mktemp("saved") / MODEL_NAME
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def openai_client(url: str, api_key: str = API_KEY, timeout: float = 30.0) -> openai.OpenAI:
    """No retries: each call is one request, so each error is the server's answer to it."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout)


def expected_answer(processor, model, messages=MESSAGES) -> str:
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :].tolist(), skip_special_tokens=True)


# ---- the `deepseekv3 serve` process: bfloat16, an API key from the environment, a 3 s socket deadline -------------


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """`deepseekv3 serve` in bfloat16 on the CPU, its key in DEEPSEEKV3_API_KEY: (url, the line it printed)."""
    command = [sys.executable, "-m", "deepseekv3.cli", "serve", str(model_dir), "--port", "0", "--device", "cpu"]
    command += ["--dtype", "bfloat16", "--max-tokens", "16", "--socket-timeout", str(SOCKET_TIMEOUT_S)]
    command += ["--max-connections", str(MAX_CONNECTIONS)]
    log = (tmp_path_factory.mktemp("serve") / "stderr.log").open("w")
    env = {**os.environ, "DEEPSEEKV3_API_KEY": API_KEY}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {MODEL_NAME} on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split(" ")[0]
        with openai_client(url) as client:
            ask(client)  # the first forward pass is slow: timings in tests start warm
        yield url, line
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        log.close()


def test_serve_command_answers_in_bfloat16_with_its_api_key(served, model_dir, processor_and_model):
    url, line = served
    assert line.rstrip().endswith("; cpu, bfloat16)"), line
    processor, _ = processor_and_model
    bf16_model = launch_module.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with openai_client(url) as client:
        assert ask(client) == expected_answer(processor, bf16_model)
    with openai_client(url, api_key="wrong-key") as client:
        error = error_of(lambda: ask(client))
    assert isinstance(error, openai.AuthenticationError) and error.status_code == 401, error
    assert error.body == {
        "message": "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
        "type": "authentication_error",
        "code": "invalid_api_key",
    }
    assert error.response.headers["www-authenticate"] == "Bearer"
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200  # open to probes
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert http.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401


def raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(connection: socket.socket) -> bytes:
    """What the server sends until it closes the connection (fails the test after the connection's timeout)."""
    received = b""
    while data := connection.recv(4096):
        received += data
    return received


def post_head(content_length: int) -> bytes:
    return (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {content_length}\r\n\r\n"
    ).encode()


def test_slow_and_idle_clients_are_cut_off_while_others_are_served(served, processor_and_model):
    """Slowloris: clients sending their body or head a byte a second, and one sending nothing, are disconnected
    about `--socket-timeout` after they connected (a deadline on the whole request, not on each read), while a
    normal request is answered at once."""
    url, _ = served
    trickling_body = [raw_connection(url) for _ in range(2)]
    for connection in trickling_body:
        connection.sendall(post_head(1000) + b"{")
    trickling_head, idle = raw_connection(url), raw_connection(url)
    started = time.monotonic()
    connections = [*trickling_body, trickling_head, idle]
    head, received, closed_after = post_head(1000), {id(c): b"" for c in connections}, {}
    with concurrent.futures.ThreadPoolExecutor(1) as pool, openai_client(url) as client:
        answer = pool.submit(lambda: (ask(client), time.monotonic() - started))
        tick = 0
        while len(closed_after) < len(connections) and time.monotonic() - started < 4 * SOCKET_TIMEOUT_S:
            for connection in connections:  # one byte a second
                if connection is not idle and id(connection) not in closed_after:
                    try:
                        connection.send(head[tick : tick + 1] if connection is trickling_head else b" ")
                    except OSError:  # the server closed it (a reset)
                        closed_after[id(connection)] = time.monotonic() - started
            deadline = time.monotonic() + 1.0
            while (remaining := deadline - time.monotonic()) > 0 and len(closed_after) < len(connections):
                open_ones = [c for c in connections if id(c) not in closed_after]
                for connection in select.select(open_ones, [], [], remaining)[0]:
                    try:
                        data = connection.recv(4096)
                    except OSError:
                        data = b""
                    received[id(connection)] += data
                    if not data:
                        closed_after[id(connection)] = time.monotonic() - started
            tick += 1
        text, answered_after = answer.result(timeout=30)
    for connection in connections:
        connection.close()
    assert text and answered_after < SOCKET_TIMEOUT_S, answered_after
    assert len(closed_after) == len(connections), closed_after
    for connection in connections:
        assert SOCKET_TIMEOUT_S - 0.5 < closed_after[id(connection)] < SOCKET_TIMEOUT_S + 2.0, closed_after
    for connection in trickling_body:  # the head had arrived: the client is told why
        assert received[id(connection)].startswith(b"HTTP/1.0 408"), received[id(connection)]
        assert b'"code": "request_timeout"' in received[id(connection)]


def test_connections_past_max_connections_get_503_then_the_server_serves_again(served):
    url, _ = served
    with contextlib.ExitStack() as stack:
        holders = [stack.enter_context(raw_connection(url)) for _ in range(MAX_CONNECTIONS)]
        for holder in holders:  # each holds a slot with a request under way
            holder.sendall(post_head(1000))
        with openai_client(url) as client:
            started = time.monotonic()
            error = error_of(lambda: ask(client))
            refused_after = time.monotonic() - started
        assert isinstance(error, openai.InternalServerError) and error.status_code == 503, error
        assert error.code == "too_many_connections" and "max_connections" in error.body["message"]
        assert error.response.headers["retry-after"] == "1"
        assert refused_after < SOCKET_TIMEOUT_S - 1, refused_after  # answered at once, not queued
    # the held connections are closed: their slots free again

    def is_served():
        with openai_client(url) as client:
            return error_of(lambda: ask(client)) is None

    wait_until(is_served, timeout=10)


# ---- in-process servers: media caps, error bodies, the API key warning, stopping ------------------------------


@contextlib.contextmanager
def running_server(processor, model, **options):
    config = ServerConfig(**{"port": 0, "model_name": MODEL_NAME, "max_tokens": 16, **options})
    with ChatServer(Engine(model), processor, config) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(processor_and_model):
    processor, model = processor_and_model
    options = {"max_images_per_request": 2, "max_clips_per_request": 1, "max_image_pixels": 64 * 64}
    with running_server(processor, model, **options) as running:
        yield running


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` RGB pixels, with a few bytes of pixel data: a few hundred bytes
    that a decoder would expand to width * height * 3."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlacing
    pixels = chunk(b"IDAT", zlib.compress(bytes(64)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def image_bytes(size=(20, 20), image_format="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=image_format)
    return buffer.getvalue()


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def audio_part() -> dict:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes(bytes(3200))
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode()}}


@pytest.fixture
def decodes(monkeypatch) -> list:
    """The sizes of the images the server decodes (`ImageFile.load` calls with pixels still to read)."""
    calls = []
    load = ImageFile.ImageFile.load

    def recording_load(self):
        if self.tile:
            calls.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return calls


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


def test_an_image_within_the_limits_is_decoded_and_answered(guarded, decodes):
    with openai_client(guarded.url) as client:
        assert ask(client, user(image_part(image_bytes()), audio_part()))
    assert decodes == [(20, 20)]


@pytest.mark.parametrize(
    ("messages", "code", "match", "num_decoded"),
    [
        (user(*[image_part(image_bytes())] * 3), "too_many_images", "at most 2 are accepted", 0),
        (user(image_part(image_bytes())) * 3, "too_many_images", "max_images_per_request", 2),
        (user(audio_part(), audio_part()), "too_many_audio_clips", "max_clips_per_request", 0),
        (user(image_part(png_header_only(20_000, 20_000))), "image_too_large", "400000000 pixels", 0),
        (user(image_part(png_header_only(5_000, 5_000))), "image_too_large", "5000x5000 (25000000 pixels)", 0),
        (user(image_part(image_bytes((65, 64)))), "image_too_large", "over max_image_pixels (4096)", 0),
        (user(image_part(image_bytes(image_format="TIFF"), "image/tiff")), "unsupported_image_format", "TIFF", 0),
    ],
    ids=["images", "images-across-messages", "clips", "bomb-20000x20000", "5000x5000", "65x64", "tiff"],
)
def test_media_over_the_limits_get_400_before_decoding(guarded, decodes, messages, code, match, num_decoded):
    with openai_client(guarded.url) as client:
        started = time.monotonic()
        error = error_of(lambda: ask(client, messages))
        elapsed = time.monotonic() - started
    assert isinstance(error, openai.BadRequestError), error
    assert error.code == code and match in error.body["message"], error.body
    assert len(decodes) == num_decoded
    assert elapsed < 2.0, elapsed  # refused from the header: nothing was decoded


class _FailingHandle:
    """A request handle whose every read raises an exception carrying internal detail."""

    def wait(self, timeout=None) -> bool:
        return True

    def result(self, timeout=None):
        raise RuntimeError("secret detail at /srv/internal/path")

    next_token = result

    def cancel(self) -> None:
        pass


@pytest.mark.parametrize("where", ["submit", "result", "stream"])
def test_5xx_bodies_name_the_request_and_keep_internals_in_the_log(guarded, monkeypatch, caplog, where):
    def failing_submit(*args, **kwargs):
        if where == "submit":
            raise RuntimeError("secret detail at /srv/internal/path")
        return _FailingHandle()

    monkeypatch.setattr(guarded.engine, "submit", failing_submit)
    with caplog.at_level(logging.ERROR, logger=server_module.logger.name), openai_client(guarded.url) as client:
        error = error_of(lambda: ask(client, stream=where == "stream"))
    assert isinstance(error, openai.APIError), error
    if where != "stream":
        assert isinstance(error, openai.InternalServerError) and error.status_code == 500
    message = error.body["message"]
    assert "secret" not in str(error.body) and "RuntimeError" not in str(error.body)
    assert message.startswith("internal error; see the server log for request chatcmpl-"), message
    request_id = message.rsplit(" ", 1)[1]
    records = [record for record in caplog.records if request_id in record.getMessage()]
    assert len(records) == 1 and "secret detail" in str(records[0].exc_info[1]), caplog.text
    assert "Traceback" in caplog.text


def test_4xx_bodies_keep_their_message(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": MESSAGES})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "the model 'gpt-4' does not exist; this server serves 'tiny'"


@pytest.mark.parametrize(
    ("host", "api_key", "warns"), [("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("127.0.0.1", None, False)]
)
def test_a_server_beyond_loopback_without_a_key_warns(processor_and_model, caplog, host, api_key, warns):
    processor, model = processor_and_model
    with caplog.at_level(logging.WARNING, logger=server_module.logger.name):
        with running_server(processor, model, host=host, api_key=api_key):
            pass
    assert ("without an API key" in caplog.text) == warns, caplog.text


def test_stop_closes_idle_connections_at_once(processor_and_model):
    processor, model = processor_and_model
    config = ServerConfig(port=0, model_name=MODEL_NAME, socket_timeout_s=30.0)
    server = ChatServer(Engine(model), processor, config).start()
    with raw_connection(server.url) as idle:
        wait_until(lambda: server._httpd._idle)  # its thread waits for a request head
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5.0  # not the 30 s socket timeout
        assert read_until_closed(idle) == b""


def test_a_body_over_the_deadline_gets_408(processor_and_model):
    processor, model = processor_and_model
    with running_server(processor, model, socket_timeout_s=0.5) as running, raw_connection(running.url) as slow:
        slow.sendall(post_head(100) + b"{")
        response = read_until_closed(slow)
    assert response.startswith(b"HTTP/1.0 408") and b"socket_timeout_s" in response


# ---- the command line and build_server --------------------------------------------------------------------------


def test_serve_help_lists_the_deployment_flags(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    flags = ["--device", "--dtype", "--api-key", "--socket-timeout", "--max-connections", "--max-images-per-request"]
    flags += ["--max-clips-per-request", "--max-image-pixels", "--image-formats", "--drain-timeout"]
    flags += ["--log-prompt-tokens", "--max-consecutive-faults", "--prefill-chunk-tokens", "DEEPSEEKV3_API_KEY"]
    assert all(flag in help_text for flag in flags), [flag for flag in flags if flag not in help_text]


@pytest.fixture
def built(monkeypatch) -> dict:
    """What `deepseekv3 serve` passes to `build_server` (which then fails, ending the command)."""
    calls = {}

    def recording_build_server(*args, **kwargs):
        calls.update(args=args, kwargs=kwargs)
        raise ValueError("recorded")

    monkeypatch.setattr(launch_module, "build_server", recording_build_server)
    monkeypatch.delenv("DEEPSEEKV3_API_KEY", raising=False)
    return calls


def test_serve_defaults_are_the_config_defaults(built, tmp_path):
    with pytest.raises(SystemExit, match="recorded"):
        main(["serve", str(tmp_path / "name")])
    _, server_config, engine_config, *_ = built["args"]
    assert server_config == ServerConfig(model_name="name")
    assert engine_config == EngineConfig()
    assert built["kwargs"]["dtype"] == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def test_serve_flags_reach_the_configs(built, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEKV3_API_KEY", "from-env")
    command = ["serve", str(tmp_path), "--device", "cpu", "--dtype", "float16", "--socket-timeout", "5"]
    command += ["--max-connections", "3", "--max-images-per-request", "1", "--max-clips-per-request", "0"]
    command += ["--max-image-pixels", "100", "--image-formats", "png,jpeg", "--drain-timeout", "2.5"]
    command += ["--log-prompt-tokens", "7", "--max-consecutive-faults", "9", "--default-max-tokens", "4"]
    command += ["--prefill-chunk-tokens", "64"]
    with pytest.raises(SystemExit, match="recorded"):
        main(command)
    _, server_config, engine_config, *_ = built["args"]
    assert server_config.api_key == "from-env"
    assert (server_config.socket_timeout_s, server_config.drain_timeout_s) == (5, 2.5)
    assert server_config.max_connections == 3
    assert (server_config.max_images_per_request, server_config.max_clips_per_request) == (1, 0)
    assert (server_config.max_image_pixels, server_config.image_formats) == (100, ("PNG", "JPEG"))
    assert server_config.default_max_tokens == 4
    assert (engine_config.log_prompt_tokens, engine_config.max_consecutive_faults) == (7, 9)
    assert engine_config.prefill_chunk_tokens == 64
    assert built["kwargs"] == {"device": torch.device("cpu"), "dtype": torch.float16}
    with pytest.raises(SystemExit, match="recorded"):
        main(["serve", str(tmp_path), "--api-key", "from-flag"])
    assert built["args"][1].api_key == "from-flag"
    assert "from-flag" not in repr(built["args"][1])
    with pytest.raises(SystemExit, match="recorded"):
        main(["serve", str(tmp_path), "--prefill-chunk-tokens", "0"])  # 0 turns chunked prefill off
    assert built["args"][2].prefill_chunk_tokens is None


@pytest.mark.parametrize(
    ("device", "match"),
    [
        pytest.param(
            "cuda",
            "not available on this machine",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
        ("warp-drive", "is not a torch device"),
    ],
)
def test_serve_refuses_an_unavailable_device_before_loading(model_dir, device, match):
    with pytest.raises(SystemExit, match=match):
        main(["serve", str(model_dir), "--port", "0", "--device", device])


def test_serve_refuses_bad_limits(model_dir):
    with pytest.raises(SystemExit, match="socket_timeout_s"):
        main(["serve", str(model_dir), "--port", "0", "--socket-timeout", "0"])


def test_build_server_loads_both_models_in_the_dtype(model_dir):
    config = ServerConfig(port=0, model_name=MODEL_NAME)
    server = build_server(model_dir, config, EngineConfig(), model_dir, device="cpu", dtype="bfloat16")
    with server:
        for engine in server.engine.engines.values():
            assert (engine.model.dtype, engine.model.device) == (torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="not one of"):
        build_server(model_dir, config, EngineConfig(), device="cpu", dtype="int8")
