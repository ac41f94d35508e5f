"""The HTTP layer of `deepseekv3 serve`, chosen by measurement (issue 17): the standard library's threading server
(`ChatServer`, one thread per connection) against a minimal FastAPI app on uvicorn that calls the same
`ChatServer.parse_chat_request` and the same engine, so that only the HTTP layer differs.

Each variant runs in its own server process (one torch thread) serving the load test's tiny saved model (2 layers,
hidden 32, the default tokenizer's vocabulary), started once and warmed up. A load is 1,000 greedy chat requests
(16 distinct prompts, `max_tokens` 6) from 64 concurrent client threads, each with its own `httpx.Client` (the
`openai` client's transport; it keeps connections alive where the server allows), all non-streaming (`json`) or all
streaming (`stream`, timed to the `[DONE]` event). Per load: the p50/p90/p99/max of the request latencies, requests
per second, the server process's peak thread count (`/proc/<pid>/status`, sampled every 5 ms) and its CPU
milliseconds per request. Rounds run every (variant, load) pair once, the order rotating each round; the table gives
medians over `--rounds` (3). Every answer is checked to equal the other variants' for the same prompt.

The FastAPI app: `async` routes, the body parsed and the request submitted on the event loop, `await
handle.aresult()` for a JSON answer and `handle.astream()` for a stream (the engine's asyncio API, which waits for
each token in the event loop's default thread pool); uvicorn with its defaults (h11 and asyncio: httptools and uvloop
are not installed), access log off. `fastapi` keeps asyncio's default pool (min(32, CPUs + 4) threads: 6 on 2
cores); `fastapi_pool64` gives it 64, one per client, which tells the HTTP layer's cost from the token bridge's.
Neither has `ChatServer`'s guards (connection cap, deadlines, stop strings, disconnect handling): a lower bound on
what a port would cost.

Decision rule (`decide`): a FastAPI variant is chosen only with a p99 more than 10 % below the stdlib server's (past
the noise of a shared machine) and fewer threads, in both loads; otherwise the stdlib server stays (no new
dependency).

    python benchmarks/bench_http.py                    # about 4 minutes on 2 CPU cores
"""

import argparse
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from _harness import benchmark_record, write_results

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_http.json"
VARIANTS = ("stdlib", "fastapi", "fastapi_pool64")
POOL_THREADS = {"fastapi": None, "fastapi_pool64": 64}  # the event loop's default thread pool (None: asyncio's)
LOADS = ("json", "stream")
MODEL_NAME = "tiny"
NUM_PROMPTS, MAX_TOKENS = 16, 6
# the load test's model (tests/conftest.py's tiny configuration, media on, the default tokenizer's vocabulary)
MODEL_KWARGS = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "use_image_input": True,
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,
    "image_token_id": 3,
    "use_audio_input": True,
    "num_mel_bins": 8,
    "audio_conv_stride": 2,
    "audio_max_frames": 32,
    "audio_token_id": 4,
    "num_modality_types": 3,
    "contrastive_projection_dim": 16,
    "use_attention_gate": True,
}
PROMPTS = [f"Question {index}: what is {index * 7 % 13} plus {index}?" for index in range(NUM_PROMPTS)]


def save_model(directory: Path) -> None:
    from deepseekv3 import (
        DeepseekV3MultimodalConfig,
        DeepseekV3MultimodalForConditionalGeneration,
        DeepseekV3MultimodalProcessor,
    )
    from deepseekv3.tokenization import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    config = DeepseekV3MultimodalConfig(**MODEL_KWARGS, vocab_size=len(tokenizer))
    torch.manual_seed(2)
    DeepseekV3MultimodalForConditionalGeneration(config).eval().save_pretrained(directory)
    DeepseekV3MultimodalProcessor.from_config(config, tokenizer).save_pretrained(directory)


# ---- the server processes -------------------------------------------------------------------------------------


def serve(variant: str, model_dir: str, max_connections: int) -> None:
    """Runs `variant`'s server on a free loopback port: prints its URL, serves until stdin closes."""
    torch.set_num_threads(1)  # a tiny model: one torch thread (two stall each other on a shared 2-core machine)
    from deepseekv3.serving import EngineConfig
    from deepseekv3.serving.launch import build_server
    from deepseekv3.serving.server import ServerConfig

    config = ServerConfig(port=0, model_name=MODEL_NAME, max_tokens=16, max_connections=max_connections)
    chat = build_server(model_dir, config, EngineConfig(), device="cpu")
    if variant == "stdlib":
        chat.start()
        print(chat.url, flush=True)
        sys.stdin.read()
        chat.stop()
        return
    import uvicorn

    chat._httpd.server_close()  # the stdlib server is built with the ChatServer but never started here
    chat.engine.start()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    app = fastapi_app(chat, POOL_THREADS[variant])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    threading.Thread(target=lambda: (sys.stdin.read(), setattr(server, "should_exit", True)), daemon=True).start()
    print(f"http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    server.run(sockets=[listener])
    chat.engine.stop(config.drain_timeout_s)


def fastapi_app(chat, pool_threads: int | None):
    """The FastAPI port of `ChatServer`'s chat route and `/health`, on `chat`'s request parsing and engine; with
    `pool_threads`, the event loop's default thread pool (where `astream` waits for tokens) has that many."""
    import asyncio
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    from deepseekv3.serving.server import _error_body, _RequestError

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if pool_threads is not None:
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(pool_threads))
        yield

    app = FastAPI(lifespan=lifespan)
    engine, tokenizer = chat.engine, chat.processor.tokenizer

    def error_response(error: _RequestError) -> JSONResponse:
        return JSONResponse({"error": _error_body(error)}, status_code=error.status)

    def envelope(request_id: str, kind: str) -> dict:
        return {"id": request_id, "object": kind, "created": int(time.time()), "model": chat.config.model_name}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": chat.config.model_name, "queued": engine.num_pending}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return error_response(_RequestError(400, f"malformed JSON: {error}"))
        try:
            inputs, max_tokens, stream, sampling, _ = chat.parse_chat_request(body)
            handle = engine.submit(
                inputs, max_new_tokens=max_tokens, timeout_s=chat.config.request_timeout_s, sampling=sampling
            )
        except _RequestError as error:
            return error_response(error)
        request_id, prompt_tokens = chat.next_id(), int(inputs["input_ids"].shape[-1])
        if not stream:
            result = await handle.aresult()
            content = tokenizer.decode(result.token_ids, skip_special_tokens=True)
            choice = {"index": 0, "message": {"role": "assistant", "content": content}}
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(result.token_ids)}
            payload = {**envelope(request_id, "chat.completion"), "usage": usage}
            return JSONResponse({**payload, "choices": [{**choice, "finish_reason": result.finish_reason}]})

        async def events():
            head = envelope(request_id, "chat.completion.chunk")
            yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
            tokens, sent = [], ""
            async for token in handle.astream():
                tokens.append(token)
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(sent) and not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits
                    delta = {"index": 0, "delta": {"content": text[len(sent) :]}}
                    yield f"data: {json.dumps({**head, 'choices': [delta]})}\n\n"
                    sent = text
            text = tokenizer.decode(tokens, skip_special_tokens=True)  # the end: what was held back goes out
            if len(text) > len(sent):
                delta = {"index": 0, "delta": {"content": text[len(sent) :]}}
                yield f"data: {json.dumps({**head, 'choices': [delta]})}\n\n"
            final = {"index": 0, "delta": {}, "finish_reason": handle.result().finish_reason}
            yield f"data: {json.dumps({**head, 'choices': [final]})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class ServerProcess:
    def __init__(self, variant: str, model_dir: Path, max_connections: int):
        command = [sys.executable, __file__, "--serve", variant, "--model-dir", str(model_dir)]
        command += ["--max-connections", str(max_connections)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("http://"):
            raise RuntimeError(f"the {variant} server did not start: {line!r}")
        self.url = line.strip()

    def threads(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---- the load -------------------------------------------------------------------------------------------------


def one_request(client: httpx.Client, prompt: int, stream: bool) -> str:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": PROMPTS[prompt]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }
    if not stream:
        response = client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]
    content = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                return "".join(content)
            if line.startswith("data: "):
                content.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    raise RuntimeError("the stream ended without [DONE]")


def run_load(server: ServerProcess, stream: bool, num_requests: int, num_clients: int) -> dict:
    """`num_requests` requests from `num_clients` threads; returns the figures and each prompt's answers."""
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for index in range(num_requests):
        pending.put(index % NUM_PROMPTS)
    latencies, answers, failures = [], {}, []
    lock = threading.Lock()

    def client_loop():
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while True:
                try:
                    prompt = pending.get_nowait()
                except queue.Empty:
                    return
                started = time.perf_counter()
                try:
                    answer = one_request(client, prompt, stream)
                except Exception as error:
                    with lock:
                        failures.append(repr(error))
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    answers.setdefault(prompt, set()).add(answer)

    peak_threads, sampling = server.threads(), threading.Event()

    def sample_threads():
        nonlocal peak_threads
        while not sampling.wait(0.005):
            peak_threads = max(peak_threads, server.threads())

    baseline_threads = server.threads()
    sampler = threading.Thread(target=sample_threads, daemon=True)
    sampler.start()
    cpu_before, started = server.cpu_seconds(), time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(num_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    cpu = server.cpu_seconds() - cpu_before
    sampling.set()
    sampler.join()
    latencies.sort()
    return {
        "p50_s": quantile(latencies, 0.50),
        "p90_s": quantile(latencies, 0.90),
        "p99_s": quantile(latencies, 0.99),
        "max_s": latencies[-1] if latencies else None,
        "requests_per_s": len(latencies) / wall,
        "baseline_threads": baseline_threads,
        "peak_threads": peak_threads,
        "server_cpu_ms_per_request": 1000 * cpu / num_requests,
        "wall_s": wall,
        "failures": len(failures),
        "first_failures": failures[:3],
        "answers": {prompt: sorted(texts) for prompt, texts in answers.items()},
    }


def quantile(ordered: list[float], fraction: float) -> float | None:
    """The `fraction` quantile of the sorted `ordered` (nearest rank), None when empty."""
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else None


FIGURES = ("p50_s", "p90_s", "p99_s", "max_s", "requests_per_s", "peak_threads", "server_cpu_ms_per_request")


def summarize(rounds: list[dict]) -> dict:
    """Per load and variant, the median of each figure over the rounds."""
    summary = {}
    for load in LOADS:
        for variant in VARIANTS:
            runs = [result[load][variant] for result in rounds]
            summary.setdefault(load, {})[variant] = {
                figure: statistics.median(run[figure] for run in runs if run[figure] is not None) for figure in FIGURES
            }
    return summary


def print_table(summary: dict) -> None:
    print(f"{'load':<7}{'variant':<16}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}{'threads':>9}{'cpu ms/req':>12}")
    for load, variants in summary.items():
        for variant, figures in variants.items():
            print(
                f"{load:<7}{variant:<16}{1000 * figures['p50_s']:>9.1f}{1000 * figures['p99_s']:>9.1f}"
                f"{figures['requests_per_s']:>8.1f}{figures['peak_threads']:>9.0f}"
                f"{figures['server_cpu_ms_per_request']:>12.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)  # a server process (internal)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--max-connections", type=int, default=128, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.model_dir, args.max_connections)
        return
    started = time.perf_counter()
    torch.set_num_threads(1)
    result = benchmark_record(__file__, "cpu")
    versions = {}
    for name in ("fastapi", "uvicorn", "starlette", "h11", "httpx"):
        module = __import__(name)
        versions[name] = getattr(module, "__version__", "?")
    result.update(versions=versions, requests=args.requests, clients=args.clients, max_tokens=MAX_TOKENS)
    result["load_average_before"] = os.getloadavg()  # other processes on the machine (the runs are interleaved)
    result["max_connections"] = 2 * args.clients  # ChatServer's cap, above the clients: none is refused
    with tempfile.TemporaryDirectory() as directory:
        model_dir = Path(directory) / MODEL_NAME
        save_model(model_dir)
        servers = {variant: ServerProcess(variant, model_dir, 2 * args.clients) for variant in VARIANTS}
        try:
            for server in servers.values():  # warm: the first forward passes are slow
                run_load(server, stream=False, num_requests=2 * args.clients, num_clients=args.clients)
            rounds = []
            pairs = [(load, variant) for load in LOADS for variant in VARIANTS]
            for index in range(args.rounds):
                rounds.append({load: {} for load in LOADS})
                for load, variant in pairs[index % len(pairs) :] + pairs[: index % len(pairs)]:
                    figures = run_load(servers[variant], load == "stream", args.requests, args.clients)
                    rounds[-1][load][variant] = figures
                    quantiles = " ".join(f"{1000 * figures[name]:.0f}" for name in FIGURES[:4])
                    print(f"round {index}: {load} {variant}: p50/p90/p99/max {quantiles} ms", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    answers = {}
    for round_ in rounds:
        for load in LOADS:
            for figures in round_[load].values():
                for prompt, texts in figures.pop("answers").items():
                    answers.setdefault(prompt, set()).update(texts)
    result["answers_agree"] = all(len(texts) == 1 for texts in answers.values()) and len(answers) == NUM_PROMPTS
    if not result["answers_agree"]:
        print("WARNING: the variants' answers to one prompt differ: the comparison is not like for like")
    result["failures"] = sum(
        figures["failures"] for round_ in rounds for load in LOADS for figures in round_[load].values()
    )
    result["rounds"] = rounds
    result["median"] = summary = summarize(rounds)
    result["load_average_after"] = os.getloadavg()
    print_table(summary)
    result["decision"] = decide(summary)
    print(result["decision"])
    write_results(result, args.output, started)


def decide(summary: dict) -> str:
    """Keeps the stdlib server unless a FastAPI variant has the lower p99 (by more than 10 %, past the noise) and
    fewer threads in both loads."""
    winners = [
        variant
        for variant in VARIANTS[1:]
        if all(
            summary[load][variant]["p99_s"] < 0.9 * summary[load]["stdlib"]["p99_s"]
            and summary[load][variant]["peak_threads"] < summary[load]["stdlib"]["peak_threads"]
            for load in LOADS
        )
    ]
    if winners:
        return f"{winners[0]}: lower p99 and fewer threads in both loads (reported; porting is a separate decision)"
    return "stdlib: no FastAPI/uvicorn variant has both the lower p99 and fewer threads in both loads"


if __name__ == "__main__":
    main()
