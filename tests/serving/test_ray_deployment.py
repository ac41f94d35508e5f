"""Replicas on Ray Serve (`deepseekv3.serving.ray_deployment`): a local Ray cluster on 127.0.0.1 runs two engine
replicas behind Ray Serve's HTTP proxy, driven by the official `openai` client. Each request is answered exactly
once, greedy answers equal `generate`, and requests sharing a first message go to the replica the prefix router
ranks first."""

import concurrent.futures
import json
import socket

import httpx
import openai
import pytest
import ray
from ray import serve
from serving_helpers import MODEL_NAME, served_processor_and_model

from deepseekv3.serving import EngineConfig
from deepseekv3.serving.ray_deployment import APP_NAME, REPLICA_HEADER, build_app, prefix_key, rank_replicas
from deepseekv3.serving.server import ServerConfig

MAX_TOKENS = 6
MAX_REQUEST_BYTES = 64 * 1024
SYSTEM_PROMPTS = [f"You are helper {name}. Answer briefly." for name in "ABCDEFGH"]
QUESTIONS = ["What is red?", "Name a shape."]
SINGLE_TURNS = [f"Is {colour} warm?" for colour in ("red", "blue", "green", "grey", "pink", "gold")]
SINGLE_TURNS += [f"Count to {number}." for number in range(2, 8)]


def conversations() -> list[list[dict]]:
    """8 system prompts with 2 questions each, 12 one-turn chats, and a second turn of the first one-turn chat:
    20 distinct first messages."""
    chats = [
        [{"role": "system", "content": system}, {"role": "user", "content": question}]
        for system in SYSTEM_PROMPTS
        for question in QUESTIONS
    ]
    chats += [[{"role": "user", "content": text}] for text in SINGLE_TURNS]
    follow_up = [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": "And blue?"}]
    chats.append([{"role": "user", "content": SINGLE_TURNS[0]}, *follow_up])
    return chats


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def processor_and_model():
    return served_processor_and_model()


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory, processor_and_model):
    """Ray Serve on a local Ray cluster of 2 CPUs: 2 engine replicas (one CPU each) behind the proxy on 127.0.0.1."""
    processor, model = processor_and_model
    model_dir = tmp_path_factory.mktemp("ray") / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
        # a replica busy decoding on a loaded machine may answer the router's queue-length probe late; the router
        # would then pass it over, so the test gives it time
        patch.setenv("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "5")
        # Serve's controller kills a proxy that is not ready within 5 s (its default) and fails `serve.start`: on a
        # loaded 2-core machine the proxy's start took longer (ActorDiedError, killed by ray.kill)
        patch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "120")
        patch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "120")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServerConfig(model_name=MODEL_NAME, max_tokens=16, max_request_bytes=MAX_REQUEST_BYTES)
        serve.run(build_app(model_dir, config, EngineConfig(), num_replicas=2), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def expected_answer(processor, model, messages) -> str:
    """Greedy `generate` on the chat, decoded as the server decodes."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=text, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :].tolist(), skip_special_tokens=True)


def ask(client: openai.OpenAI, messages: list[dict], stream: bool) -> tuple[str, str, str]:
    """(replica, completion id, answer) of one chat request, streamed or not."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, stream=stream
    )
    replica = raw.headers[REPLICA_HEADER]
    if not stream:
        completion = raw.parse()
        return replica, completion.id, completion.choices[0].message.content
    chunks = list(raw.parse())
    assert len({chunk.id for chunk in chunks}) == 1
    return replica, chunks[0].id, "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_two_replicas_answer_once_equal_generate_and_keep_prefixes_together(ray_url, processor_and_model):
    processor, model = processor_and_model
    chats = conversations()
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="unused", max_retries=0, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda item: ask(client, item[1], item[0] % 3 == 0), enumerate(chats)))

    # each request ran exactly once: every replica's server numbers its requests from 0, and no number is missing
    # (a request run twice would use one) or repeated
    replicas = sorted({replica for replica, _, _ in answers})
    assert len(replicas) == 2, replicas
    for replica in replicas:
        ids = sorted(int(id_.removeprefix("chatcmpl-")) for name, id_, _ in answers if name == replica)
        assert ids == list(range(len(ids))), (replica, ids)

    for messages, (replica, _, content) in zip(chats, answers):
        assert content == expected_answer(processor, model, messages), messages
        # requests sharing a first message share a replica: the one rendezvous hashing ranks first
        key = prefix_key(json.dumps({"messages": messages}).encode())
        assert replica == rank_replicas(key, replicas)[0], messages

    # the other routes, and errors in OpenAI's shape, come through the proxy too
    assert [model.id for model in client.models.list()] == [MODEL_NAME]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="other", messages=chats[0], max_tokens=2)
    assert missing.value.code == "model_not_found"
    with httpx.Client(base_url=ray_url, timeout=60) as http:
        too_large = http.post("/v1/chat/completions", content=b"x" * (MAX_REQUEST_BYTES + 1))
        health = http.get("/health")
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"
    assert health.status_code == 200 and health.json()["status"] == "ok"
