"""Issue 17's load test: 1,000 requests from 64 concurrent clients against a real server process on loopback
serving a tiny saved model. 10 % are streams their client closes after the first chunk or two, 5 % non-streaming
requests whose socket closes before the answer comes, 5 % malformed (bad JSON, bad fields, bad media), the rest
well-formed, streaming and not, greedy and seeded. Every well-formed request is answered with its own prompt's
`generate` answer (seeded ones agree with each other), every malformed one gets a 4xx in OpenAI's error shape, the
server counts every request it accepted exactly once, and afterwards its batch, its queue and its threads are back
to their baseline.

The server process is `build_server` (what `deepseekv3 serve` runs) behind a small driver that prints the engine's
request counts when a line arrives on its stdin, and stops the server when stdin closes. Well-formed requests go
through the official `openai` client; raw sockets send what it cannot (bad JSON, a socket closed mid-request).
"""

import base64
import json
import queue
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import openai
import pytest
from serving_helpers import served_processor_and_model, wait_until
from transformers import AutoModelForCausalLM

from deepseekv3 import (
    DeepseekV3MultimodalProcessor,
)
from deepseekv3.serving import EngineConfig
from deepseekv3.serving import server as server_module
from deepseekv3.serving.launch import build_server
from deepseekv3.serving.server import ServerConfig

MODEL_NAME = "tiny"
NUM_REQUESTS, NUM_CLIENTS = 1000, 64
NUM_CANCELLED, NUM_DISCONNECTING, NUM_MALFORMED = 100, 50, 50
SEEDED = [(0, 11), (1, 12), (2, 13), (3, 11)]  # (prompt, seed) of the sampled requests
NUM_SEEDED = 10 * len(SEEDED)
MAX_TOKENS = 6
NUM_PROMPTS = 16  # distinct prompts, chosen among the candidates so that their greedy answers differ
WORDS = (
    "apple sky leaf snow coal sea rose gold ash mint sand rust plum ink lime fog moon star tree rain wind fire salt "
    "iron milk wool clay reed oak pine bark silk glass stone honey wax"
).split()
CANDIDATES = [f"What is {word}? {word}!" for word in WORDS] + [f"{a} {b} {a} {b}" for a, b in zip(WORDS, WORDS[1:])]
CLIENTS_TIMEOUT_S = 120  # the load takes 6-10 s on 2 busy cores: past this the server is stuck, and the test fails
# each client keeps its openai connection (keep-alive) open while it uses a raw socket: room for both
MAX_CONNECTIONS = 2 * NUM_CLIENTS

DRIVER = """
import json, sys, torch
torch.set_num_threads(1)  # a tiny model: one torch thread (two stall each other on a shared 2-core machine)
from deepseekv3.serving import EngineConfig
from deepseekv3.serving.launch import build_server
from deepseekv3.serving.server import ServerConfig
config = ServerConfig(port=0, model_name=sys.argv[2], max_tokens=16, max_connections=int(sys.argv[3]))
server = build_server(sys.argv[1], config, EngineConfig(), device="cpu").start()
print(server.url, flush=True)
for _ in sys.stdin:  # a line: the engine's request counts and its batch; end of input: stop
    batch = server.engine._batch
    layers = [] if batch.cache is None else batch.cache.layers
    tensors = [tensor for layer in layers for tensor in (layer.keys, layer.values)]
    cache_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    print(json.dumps({**server.engine.stats, "batch_rows": len(batch), "cache_bytes": cache_bytes}), flush=True)
server.stop()
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # a random model answers many prompts alike; this seed tells more of them apart
    processor, model = served_processor_and_model(seed=2)
    directory = tmp_path_factory.mktemp("saved") / MODEL_NAME
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def messages_of(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def prompts_and_answers(model_dir) -> tuple[list[str], list[str]]:
    """`NUM_PROMPTS` prompts whose greedy `generate` answers (with the saved model, decoded as the server decodes)
    all differ, so that an answer tells which prompt it belongs to, and those answers."""
    import deepseekv3  # noqa: F401  registers the Auto classes

    processor = DeepseekV3MultimodalProcessor.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = {}
    for prompt in CANDIDATES:
        text = processor.apply_chat_template(messages_of(prompt), tokenize=False, add_generation_prompt=True)
        inputs = processor(text=text, return_tensors="pt", add_special_tokens=False)
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        new_tokens = output[0, inputs["input_ids"].shape[1] :].tolist()
        answers.setdefault(processor.tokenizer.decode(new_tokens, skip_special_tokens=True), prompt)
        if len(answers) == NUM_PROMPTS:
            break
    assert len(answers) == NUM_PROMPTS, f"only {len(answers)} distinct answers among {len(CANDIDATES)} prompts"
    return list(answers.values()), list(answers)


class ServerProcess:
    """The driver process: its URL, its thread count, and its engine's counts on demand."""

    def __init__(self, model_dir, stderr_path):
        self._stderr = open(stderr_path, "w")
        command = [sys.executable, "-c", DRIVER, str(model_dir), MODEL_NAME, str(MAX_CONNECTIONS)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        line = self.process.stdout.readline()
        assert line.startswith("http://127.0.0.1:"), f"the server did not start: {line!r}"
        self.url = line.strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    def engine_counts(self) -> dict:
        self.process.stdin.write("counts\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def num_threads(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))

    def stop(self) -> int:
        """Closes stdin (the driver stops the server) and returns the exit code."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()
        return self.process.returncode


# ---- the requests ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    kind: str  # "greedy", "seeded", "cancelled", "disconnecting" or "malformed"
    prompt: int = 0  # index into the prompts
    stream: bool = False
    seed: int | None = None
    variant: int = 0  # which malformed request, how many chunks a cancelled stream reads, when a socket closes
    outcome: dict = field(default_factory=dict)


def make_jobs() -> list[Job]:
    rng = random.Random(17)
    jobs = [
        Job("cancelled", rng.randrange(NUM_PROMPTS), stream=True, variant=1 + index % 2)
        for index in range(NUM_CANCELLED)
    ]
    jobs += [Job("disconnecting", rng.randrange(NUM_PROMPTS), variant=index) for index in range(NUM_DISCONNECTING)]
    jobs += [Job("malformed", variant=index % len(MALFORMED)) for index in range(NUM_MALFORMED)]
    jobs += [
        Job("seeded", SEEDED[index % len(SEEDED)][0], stream=index % 3 == 0, seed=SEEDED[index % len(SEEDED)][1])
        for index in range(NUM_SEEDED)
    ]
    jobs += [Job("greedy", index % NUM_PROMPTS, stream=index % 2 == 1) for index in range(NUM_REQUESTS - len(jobs))]
    rng.shuffle(jobs)
    return jobs


def chat_request(job: Job, prompts: list[str]) -> dict:
    request = {"model": MODEL_NAME, "messages": messages_of(prompts[job.prompt]), "max_tokens": MAX_TOKENS}
    if job.seed is None:
        request["temperature"] = 0
    else:
        request.update(temperature=0.9, top_p=0.95, seed=job.seed)
    return request


def http_request(body: bytes) -> bytes:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def user_parts(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


_JUNK_IMAGE_URL = "data:image/png;base64," + base64.b64encode(b"GIF89a junk").decode()
# ("raw", body bytes) or ("openai", the call's keyword arguments besides model and max_tokens)
MALFORMED = [
    ("raw", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"'),
    ("raw", b'["not", "an", "object"]'),
    ("raw", b"\xff\xfe not utf-8"),
    ("openai", {"messages": messages_of("hi"), "temperature": 5}),
    ("openai", {"messages": messages_of("hi"), "max_tokens": 10_000}),
    ("openai", {"messages": messages_of("hi"), "model": "gpt-none"}),
    ("openai", {"messages": []}),
    ("openai", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("openai", {"messages": user_parts({"type": "image_url", "image_url": {"url": _JUNK_IMAGE_URL}})}),
    ("openai", {"messages": user_parts({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})}),
    ("openai", {"messages": user_parts({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}})}),
    ("openai", {"messages": user_parts({"type": "input_audio", "input_audio": {"data": "aGVsbG8="}})}),
]


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the answer on `sock` (asked with `Connection: close`)."""
    received = b""
    while data := sock.recv(65536):
        received += data
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def run_job(job: Job, prompts: list[str], client: openai.OpenAI, port: int) -> None:
    """Sends `job`'s request and records what came back in `job.outcome`."""
    if job.kind in ("greedy", "seeded"):
        request = chat_request(job, prompts)
        if job.stream:
            chunks = list(client.chat.completions.create(**request, stream=True))
            content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1]
            job.outcome.update(ids={chunk.id for chunk in chunks}, content=content, finish_reason=finish)
        else:
            response = client.chat.completions.create(**request)
            job.outcome.update(ids={response.id}, content=response.choices[0].message.content)
            job.outcome.update(finish_reason=response.choices[0].finish_reason)
    elif job.kind == "cancelled":
        stream = client.chat.completions.create(**chat_request(job, prompts), stream=True)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == job.variant:
                break
        stream.close()
        job.outcome["content"] = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        job.outcome["chunks"] = len(chunks)
    elif job.kind == "disconnecting":
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(http_request(json.dumps(chat_request(job, prompts)).encode()))
            time.sleep(0.002 * (job.variant % 10))  # closes at once, or while the request is queued or decoding
        job.outcome["sent"] = True
    else:
        how, request = MALFORMED[job.variant]
        if how == "raw":
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(http_request(request))
                job.outcome["status"], job.outcome["body"] = read_response(sock)
        else:
            try:
                client.chat.completions.create(**{"model": MODEL_NAME, "max_tokens": MAX_TOKENS, **request})
            except openai.APIStatusError as error:
                job.outcome["status"], job.outcome["body"] = error.status_code, error.response.json()


def run_clients(jobs: list[Job], prompts: list[str], url: str, port: int) -> float:
    """Runs `jobs` on `NUM_CLIENTS` threads, each with its own openai client (closed at the end); returns the
    seconds it took. An exception is recorded in its job's outcome."""
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for job in jobs:
        pending.put(job)

    def client_loop():
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
            while True:
                try:
                    job = pending.get_nowait()
                except queue.Empty:
                    return
                try:
                    run_job(job, prompts, client, port)
                except Exception as error:  # recorded, and asserted on by the test
                    job.outcome["error"] = repr(error)

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(NUM_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, started + CLIENTS_TIMEOUT_S - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"clients still running after {CLIENTS_TIMEOUT_S} s"
    return time.monotonic() - started


def health(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        status, body = read_response(sock)
    assert status == 200, body
    return body


# ---- the test -------------------------------------------------------------------------------------------------


def test_a_thousand_requests_from_64_clients_with_cancels_disconnects_and_malformed_ones(model_dir, tmp_path):
    prompts, references = prompts_and_answers(model_dir)
    server = ServerProcess(model_dir, tmp_path / "server.log")
    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
            # the first forward passes are slow: the load starts warm
            warm = client.chat.completions.create(**chat_request(Job("greedy"), prompts))
        assert warm.choices[0].message.content == references[0]
        wait_until(lambda: server.engine_counts()["finished"] == 1, timeout=10)
        baseline_threads = server.num_threads()

        jobs = make_jobs()
        elapsed = run_clients(jobs, prompts, server.url, server.port)
        by_kind = {kind: [job for job in jobs if job.kind == kind] for kind in ("greedy", "seeded", "cancelled")}
        by_kind.update(disconnecting=[job for job in jobs if job.kind == "disconnecting"])
        by_kind.update(malformed=[job for job in jobs if job.kind == "malformed"])
        counts = {kind: len(kind_jobs) for kind, kind_jobs in by_kind.items()}
        assert counts == {"greedy": 760, "seeded": 40, "cancelled": 100, "disconnecting": 50, "malformed": 50}
        errors = [(job.kind, job.outcome["error"]) for job in jobs if "error" in job.outcome]
        assert not errors, errors[:5]

        # every well-formed request is answered, with its own prompt's answer, once
        for job in by_kind["greedy"]:
            assert job.outcome["content"] == references[job.prompt], (job, references[job.prompt])
            assert job.outcome["finish_reason"] in ("stop", "length"), job
        answers_by_seed = {}
        for job in by_kind["seeded"]:
            answers_by_seed.setdefault((job.prompt, job.seed), set()).add(job.outcome["content"])
        assert all(len(answers) == 1 for answers in answers_by_seed.values()), answers_by_seed
        ids = [request_id for job in by_kind["greedy"] + by_kind["seeded"] for request_id in job.outcome["ids"]]
        assert len(ids) == len(set(ids)) == 800  # one id per answer (a stream's chunks share theirs), none reused
        for job in by_kind["cancelled"]:
            assert job.outcome["chunks"] == job.variant, job
            assert references[job.prompt].startswith(job.outcome["content"]), job
        for job in by_kind["malformed"]:
            assert 400 <= job.outcome["status"] < 500, job
            assert list(job.outcome["body"]) == ["error"], job
            assert set(job.outcome["body"]["error"]) == {"message", "type", "code"}, job
            assert job.outcome["body"]["error"]["message"], job

        # the engine counts each accepted request once: the warm-up, the well-formed, the cancelled and the
        # disconnecting ones (the malformed never reach it)
        accepted = 1 + 800 + NUM_CANCELLED + NUM_DISCONNECTING

        def num_settled() -> int:
            stats = server.engine_counts()
            return sum(stats[name] for name in ("finished", "cancelled", "timed_out", "failed"))

        wait_until(lambda: num_settled() >= accepted, timeout=30)
        stats = server.engine_counts()
        assert num_settled() == accepted, stats
        assert stats["timed_out"] == stats["failed"] == stats["faults"] == 0, stats
        assert stats["finished"] >= 1 + 800, stats  # a cancel that came after the last token counts as finished

        # the batch and the queue are empty, the cache freed, and the connections' threads gone
        reported = health(server.port)
        assert reported["queued"] == reported["active"] == 0, reported
        assert (stats["batch_rows"], stats["cache_bytes"]) == (0, 0), stats
        wait_until(lambda: server.num_threads() <= baseline_threads, timeout=10)
        settled = {name: stats[name] for name in ("finished", "cancelled", "timed_out", "failed")}
        print(
            f"\n{NUM_REQUESTS} requests from {NUM_CLIENTS} clients in {elapsed:.1f} s; {counts}; engine: {settled}, "
            f"peak batch {stats['peak_batch_size']}; server threads {baseline_threads} before and after"
        )
    finally:
        returncode = server.stop()
    assert returncode == 0
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log, log[-4000:]


# ---- a client that leaves just before its answer is written -------------------------------------------------


def reset_connection(sock: socket.socket) -> None:
    """Closes `sock` with a reset (no lingering): the server's next write to it fails at once."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture
def in_process_server(model_dir):
    config = ServerConfig(port=0, model_name=MODEL_NAME, max_tokens=16)
    server = build_server(model_dir, config, EngineConfig(), device="cpu")
    with server:
        yield server


def wait_for_handlers(server) -> None:
    """Waits until every connection's thread has ended (each frees its admission last)."""
    wait_until(lambda: not server._httpd._admissions, timeout=30)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_client_gone_when_its_answer_is_written_leaves_no_traceback(in_process_server, monkeypatch, capsys, stream):
    """The client leaves between the handler's last look at its connection and the answer (non-streaming), or the
    stream's final event: the write fails, which is the client's doing, not an error of the server."""
    server = in_process_server
    engine = server.engine
    prompts = [CANDIDATES[0]]
    if stream:  # the client leaves once the last token was sent: the final event's write fails
        send_event = server_module._Handler._send_event

        def final_event_breaks(self, payload):
            if payload.get("choices") and payload["choices"][0].get("finish_reason"):
                raise BrokenPipeError("the client left")
            send_event(self, payload)

        monkeypatch.setattr(server_module._Handler, "_send_event", final_event_breaks)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(http_request(json.dumps({**chat_request(Job("greedy"), prompts), "stream": True}).encode()))
            while sock.recv(65536):  # open until the server closes it, so no other write fails first
                pass
    else:  # the handler has not seen the client leave; the answer is written to a reset connection
        monkeypatch.setattr(server_module._Handler, "_client_left", lambda self: False)
        release = threading.Event()
        step = engine.step
        monkeypatch.setattr(engine, "step", lambda: release.wait(60) and step())
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(http_request(json.dumps(chat_request(Job("greedy"), prompts)).encode()))
        wait_until(lambda: engine.num_pending == 1)
        reset_connection(sock)
        release.set()
    wait_for_handlers(server)
    assert engine.stats["finished"] == 1, engine.stats
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        assert client.chat.completions.create(**chat_request(Job("greedy"), prompts)).choices[0].message.content


def test_a_burst_of_connections_waits_in_the_listen_queue(in_process_server, monkeypatch):
    """While the accepting thread is busy (a loaded machine), a burst of up to `max_connections` connections waits
    in the kernel's listen queue: none is dropped (a SYN retried after 1, 3, 7 s) or reset, as with the standard
    library's queue of 5. Then each is served."""
    server = in_process_server
    release = threading.Event()
    process_request = server._httpd.process_request

    def held_process_request(request, client_address):
        release.wait(60)
        process_request(request, client_address)

    monkeypatch.setattr(server._httpd, "process_request", held_process_request)
    connections = []
    try:
        for _ in range(server.config.max_connections):  # the first holds the accepting thread; the rest queue
            connections.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
    finally:
        release.set()
    for sock in connections:
        with sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert read_response(sock)[0] == 200
