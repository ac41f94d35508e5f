"""The OpenAI-compatible server, driven by real HTTP clients on loopback (httpx, and the official `openai` client),
in process and as the `deepseekv3 serve` command: answers equal `generate`, every client gets its answer or an error
within its timeout whatever fails, and a client that leaves has its request cancelled."""

import base64
import concurrent.futures
import contextlib
import io
import json
import math
import signal
import struct
import subprocess
import sys
import threading
import wave

import httpx
import openai
import pytest
import torch
from PIL import Image
from serving_helpers import (
    FAULT_STAGES,
    MESSAGES,
    MODEL_NAME,
    ask,
    error_of,
    inject_fault,
    raise_injected_fault,
    run_in_thread,
    served_processor_and_model,
    wait_until,
)

from deepseekv3.cli import main
from deepseekv3.serving import Engine, EngineConfig, LengthPredictor, LengthPredictorConfig
from deepseekv3.serving import server as server_module
from deepseekv3.serving.launch import build_server
from deepseekv3.serving.router import Router
from deepseekv3.serving.server import ChatServer, ServerConfig

MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def processor_and_model():
    return served_processor_and_model()


@pytest.fixture(scope="module")
def server(processor_and_model):
    processor, model = processor_and_model
    config = ServerConfig(port=0, model_name=MODEL_NAME, max_request_bytes=MAX_BYTES, max_tokens=16)
    with ChatServer(Engine(model), processor, config) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def png_data_url(colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_base64(seconds: float = 0.2, rate: int = 16000) -> str:
    samples = [int(8000 * math.sin(2 * math.pi * 440 * t / rate)) for t in range(int(seconds * rate))]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return base64.b64encode(buffer.getvalue()).decode()


def expected_answer(processor, model, messages, images=(), audio=(), max_tokens=8) -> tuple[str, int]:
    """What greedy `generate` answers to the same chat, decoded as the server decodes."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs = {"images": list(images)} if images else {}
    if audio:
        kwargs.update(audio=list(audio), sampling_rate=16000)
    inputs = processor(text=text, return_tensors="pt", add_special_tokens=False, **kwargs)
    output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True), len(new_tokens)


def chat(messages, **extra) -> dict:
    return {"model": MODEL_NAME, "messages": messages, "max_tokens": 8, **extra}


def test_health_and_models(client):
    health = {"status": "ok", "model": MODEL_NAME, "queued": 0, "active": 0, "faults": 0, "last_fault": None}
    assert client.get("/health").json() == health
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL_NAME
    assert client.get("/nowhere").status_code == 404


def test_completion_equals_generate_streaming_and_not(client, processor_and_model):
    processor, model = processor_and_model
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is red?"}]
    answer, count = expected_answer(processor, model, messages)
    response = client.post("/v1/chat/completions", json=chat(messages))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL_NAME
    assert body["choices"][0]["message"] == {"role": "assistant", "content": answer}
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] == count
    with client.stream("POST", "/v1/chat/completions", json=chat(messages, stream=True)) as stream:
        assert stream.headers["content-type"] == "text/event-stream"
        events = [line[len("data: ") :] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_image_and_audio_content_parts(client, processor_and_model):
    processor, model = processor_and_model
    content = [
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}},
        {"type": "text", "text": "What do you see and hear?"},
    ]
    response = client.post("/v1/chat/completions", json=chat([{"role": "user", "content": content}]))
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(png_data_url().split(",", 1)[1])))
    with wave.open(io.BytesIO(base64.b64decode(wav_base64()))) as reader:
        audio = torch.frombuffer(bytearray(reader.readframes(reader.getnframes())), dtype=torch.int16)
    rendered = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, content[2]]}]
    answer, _ = expected_answer(processor, model, rendered, [image], [(audio.float() / 32768).numpy()])
    assert response.json()["choices"][0]["message"]["content"] == answer


@pytest.mark.parametrize(
    ("payload", "status", "match"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (chat([{"role": "user", "content": "hi"}], model="gpt-4"), 404, "does not exist"),
        (chat([]), 400, "non-empty"),
        (chat([{"role": "wizard", "content": "hi"}]), 400, "role"),
        (chat([{"role": "user", "content": "hi"}], temperature=2.5), 400, "temperature"),
        (chat([{"role": "user", "content": "hi"}], max_tokens=1000), 400, "max_tokens"),
        (
            chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]),
            400,
            "data URL",
        ),
        (
            chat(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
                    }
                ]
            ),
            400,
            "not a readable image",
        ),
        (
            chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "%%%"}}]}]),
            400,
            "invalid base64",
        ),
        (
            chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "aGVsbG8="}}]}]),
            400,
            "not a readable WAV",
        ),
        (
            chat(
                [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": wav_base64(rate=8000)}}],
                    }
                ]
            ),
            400,
            "16000 Hz",
        ),
        (chat([{"role": "user", "content": [{"type": "video"}]}]), 400, "unsupported content part"),
        (chat([{"role": "user", "content": "x" * 400}]), 400, "max_position_embeddings"),
        (chat([{"role": "user", "content": "x" * (MAX_BYTES + 10)}]), 413, "exceeds the limit"),
    ],
)
def test_bad_requests_get_clear_errors(client, payload, status, match):
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert match in error["message"]
    assert set(error) == {"message", "type", "code"}
    assert client.get("/health").status_code == 200  # the server is still up


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, processor_and_model):
    processor, model = processor_and_model
    directory = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_serve_command_on_a_saved_model(model_dir, processor_and_model):
    processor, model = processor_and_model
    command = [sys.executable, "-m", "deepseekv3.cli", "serve", str(model_dir), "--port", "0"]
    command += ["--warm-up-system", "Answer briefly.", "--max-tokens", "16"]
    # started with SIGINT ignored, as a background job of a non-interactive shell is: Ctrl-C must still stop it
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("serving model on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split(" ")[0]
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is red?"}]
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/health").json()["model"] == "model"
            body = http.post("/v1/chat/completions", json={"model": "model", "messages": messages, "max_tokens": 8})
        assert body.status_code == 200
        assert body.json()["choices"][0]["message"]["content"] == expected_answer(processor, model, messages)[0]
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0


def test_built_server_routes_loads_engine_state_and_warms_up(model_dir, tmp_path, processor_and_model):
    processor, model = processor_and_model
    state = Engine(model)
    state.length_predictor = LengthPredictor(LengthPredictorConfig(vocab_size=model.config.vocab_size))
    state.save_state(tmp_path / "state")
    config = ServerConfig(port=0, model_name=MODEL_NAME)
    server = build_server(model_dir, config, EngineConfig(), model_dir, tmp_path / "state", ["Answer briefly."])
    router = server.engine
    assert isinstance(router, Router)
    assert isinstance(router.engines["full"].length_predictor, LengthPredictor)
    assert [len(engine.prefix_cache) for engine in router.engines.values()] == [1, 1]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Red?"}]
    with server, httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post("/v1/chat/completions", json=chat(messages))
    assert response.status_code == 200
    assert [decision.model for decision in router.decisions] == ["lite"]
    assert router.engines["lite"].prefix_cache.hits == 1
    assert response.json()["choices"][0]["message"]["content"] == expected_answer(processor, model, messages)[0]


def test_serve_command_reports_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="no config.json"):
        main(["serve", str(tmp_path / "missing"), "--port", "0"])


# ---- faults, timeouts, disconnects and stopping, through the official openai client -----------------------------


@contextlib.contextmanager
def running_server(processor, model, engine_config: EngineConfig | None = None, **options):
    config = ServerConfig(**{"port": 0, "model_name": MODEL_NAME, "max_tokens": 16, **options})
    with ChatServer(Engine(model, engine_config), processor, config) as running:
        yield running


def openai_client(server: ChatServer, timeout: float = 60.0) -> openai.OpenAI:
    """No retries: each call is one request, so each error is the server's answer to it."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def hold_engine(engine: Engine, patch) -> threading.Event:
    """Holds the engine's loop before each step until the returned event is set (bounded, so a failing test cannot
    hang the suite)."""
    release = threading.Event()
    step = engine.step

    def held_step():
        release.wait(120)
        return step()

    patch.setattr(engine, "step", held_step)
    return release


def record_handles(engine: Engine, patch) -> list:
    """The handles of the requests the server submits to `engine`, as it submits them."""
    handles = []
    submit = engine.submit

    def recording_submit(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    patch.setattr(engine, "submit", recording_submit)
    return handles


@pytest.mark.parametrize("stage", FAULT_STAGES)
def test_engine_fault_gives_every_client_an_error_and_health_the_reason(processor_and_model, monkeypatch, stage):
    processor, model = processor_and_model
    expected, _ = expected_answer(processor, model, MESSAGES)
    engine_config = EngineConfig(max_consecutive_faults=1)
    with running_server(processor, model, engine_config) as server, openai_client(server) as client:
        with monkeypatch.context() as patch:
            inject_fault(stage, server.engine, patch)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                calls = [lambda stream=stream: ask(client, stream=stream) for stream in (False, False, True, True)]
                errors = list(pool.map(error_of, calls))
            assert all(isinstance(error, openai.APIError) for error in errors), errors
            for error in errors[:2]:
                assert isinstance(error, openai.InternalServerError) and error.status_code == 500
            assert all(f"the engine failed during {stage}" in error.message for error in errors)
            health = httpx.get(f"{server.url}/health", timeout=60)
            assert health.status_code == 503
            assert health.json()["error"]["code"] == "engine_unhealthy" and stage in health.json()["error"]["message"]
        # the fault is gone: the next request is served, and the engine is healthy again
        assert ask(client) == expected
        health = httpx.get(f"{server.url}/health", timeout=60).json()
        assert health["status"] == "ok" and health["faults"] >= 1 and stage in health["last_fault"]


def test_a_failed_engine_loop_makes_health_and_new_requests_503(processor_and_model, monkeypatch):
    processor, model = processor_and_model
    with running_server(processor, model) as server, openai_client(server) as client:
        with monkeypatch.context() as patch:
            patch.setattr(server.engine, "step", raise_injected_fault)
            error = error_of(lambda: ask(client))
            assert isinstance(error, openai.InternalServerError) and "during loop" in error.message
            health = httpx.get(f"{server.url}/health", timeout=60)
            assert health.status_code == 503 and "loop stopped" in health.json()["error"]["message"]
            error = error_of(lambda: ask(client))
            assert isinstance(error, openai.APIStatusError) and error.status_code == 503


def test_a_stuck_engine_answers_within_the_request_timeout(processor_and_model, monkeypatch):
    processor, model = processor_and_model
    with running_server(processor, model, request_timeout_s=1.0) as server, openai_client(server) as client:
        release = hold_engine(server.engine, monkeypatch)
        try:
            for stream in (False, True):
                error = run_in_thread(lambda stream=stream: error_of(lambda: ask(client, stream=stream)))
                assert isinstance(error, openai.APIError) and "within 1.0 s" in error.message, error
                if not stream:
                    assert error.status_code == 504
        finally:
            release.set()


def test_a_client_that_leaves_has_its_request_cancelled(processor_and_model, monkeypatch):
    processor, model = processor_and_model
    with running_server(processor, model) as server:
        release = hold_engine(server.engine, monkeypatch)
        handles = record_handles(server.engine, monkeypatch)
        try:
            # the client gives up after 2 s and closes its connection; the engine has not run the request
            with openai_client(server, timeout=2.0) as impatient:
                assert isinstance(error_of(lambda: ask(impatient)), openai.APITimeoutError)
            wait_until(lambda: handles and handles[0].cancelled)
        finally:
            release.set()
        wait_until(lambda: server.engine.stats["cancelled"] == 1)
        assert server.engine.num_pending == server.engine.num_active == 0


def test_a_broken_pipe_on_the_first_event_cancels_the_stream(processor_and_model, monkeypatch):
    processor, model = processor_and_model
    send_event = server_module._Handler._send_event
    calls = []

    def first_event_breaks(self, payload):
        calls.append(payload)
        if len(calls) == 1:
            raise BrokenPipeError("the client left")
        send_event(self, payload)

    monkeypatch.setattr(server_module._Handler, "_send_event", first_event_breaks)
    with running_server(processor, model) as server, openai_client(server) as client:
        release = hold_engine(server.engine, monkeypatch)
        handles = record_handles(server.engine, monkeypatch)
        try:
            assert ask(client, stream=True) == ""  # the stream ends with no event
            wait_until(lambda: handles and handles[0].cancelled)
        finally:
            release.set()
        wait_until(lambda: server.engine.stats["cancelled"] == 1)
        assert len(calls) == 1


def test_a_stopping_server_answers_503_and_finishes_what_it_accepted(processor_and_model, monkeypatch):
    processor, model = processor_and_model
    expected, _ = expected_answer(processor, model, MESSAGES)
    server = running_server(processor, model, drain_timeout_s=120.0)
    with server as running, openai_client(running) as client, concurrent.futures.ThreadPoolExecutor(2) as pool:
        release = hold_engine(running.engine, monkeypatch)
        try:
            accepted = pool.submit(ask, client)
            wait_until(lambda: running.engine.num_pending == 1)
            stopping = pool.submit(running.stop)
            wait_until(lambda: httpx.get(f"{running.url}/health", timeout=60).status_code == 503)
            assert httpx.get(f"{running.url}/health", timeout=60).json()["error"]["code"] == "stopping"
            error = error_of(lambda: ask(client))
            assert isinstance(error, openai.APIStatusError) and error.status_code == 503
        finally:
            release.set()
        assert accepted.result(timeout=120) == expected
        stopping.result(timeout=120)
