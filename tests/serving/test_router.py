"""Model routing: requests go to the full or the lite model by complexity; decisions are logged."""

import concurrent.futures
import threading

import pytest
import torch
from serving_helpers import generate_one, mixed_requests, text_ids, tiny_media_model

from deepseekv3.serving import router as router_module
from deepseekv3.serving.router import ComplexityClassifier, Router, RoutingDecision, RoutingPolicy


@pytest.fixture(scope="module")
def models():
    return tiny_media_model(seed=0), tiny_media_model(seed=1, num_hidden_layers=1)


def test_policy_routes_by_media_and_length_and_outputs_match_each_model(models):
    full, lite = models
    generator = torch.Generator().manual_seed(0)
    short, long = text_ids(generator, 5), text_ids(generator, 40)
    media_request = mixed_requests(2)[1][0]  # a short prompt with an image
    requests = [({"input_ids": torch.tensor([short])}, "lite"), ({"input_ids": torch.tensor([long])}, "full")]
    requests.append((media_request, "full"))
    router = Router(full, lite, RoutingPolicy(max_lite_prompt_tokens=16))
    with router:
        handles = [router.submit(inputs, max_new_tokens=6) for inputs, _ in requests]
        results = [handle.result(timeout=60) for handle in handles]
    decisions = list(router.decisions)
    assert [d.model for d in decisions] == [target for _, target in requests]
    assert [d.reason for d in decisions] == ["short text prompt", "prompt longer than 16 tokens", "media"]
    assert [d.prompt_length for d in decisions] == [len(short), len(long), media_request["input_ids"].shape[1]]
    assert decisions[2].num_images == 1
    for result, (inputs, target) in zip(results, requests):
        assert result.token_ids == generate_one(full if target == "full" else lite, inputs, 6)


def test_learned_classifier_routes_what_it_was_taught(models):
    full, lite = models
    vocab = full.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    prompts = [text_ids(generator, 6) for _ in range(60)]
    prompts = [[token for token in prompt if token != 50] for prompt in prompts]
    needs_full = [index % 2 == 0 for index in range(60)]
    prompts = [prompt + [50, 50] if label else prompt for prompt, label in zip(prompts, needs_full)]
    classifier = ComplexityClassifier(vocab)
    classifier.fit(prompts, [(0, 0)] * len(prompts), needs_full)
    router = Router(full, lite, RoutingPolicy(classifier=classifier))
    routed = [router.route(prompt).model for prompt in ([1, 7, 8, 50, 50], [1, 7, 8, 9])]
    assert routed == ["full", "lite"]
    assert all(decision.reason == "classifier" and 0 <= decision.score <= 1 for decision in router.decisions)


def test_router_refuses_models_with_different_vocabularies(models):
    full, _ = models
    with pytest.raises(ValueError, match="one vocabulary"):
        Router(full, tiny_media_model(vocab_size=80))


def test_concurrent_routes_get_distinct_ids_and_the_log_keeps_the_latest(models, monkeypatch):
    router = Router(*models, log_size=1)
    barrier = threading.Barrier(2, timeout=60)

    def decision_at_the_same_moment(*args):  # both threads build their decision together
        barrier.wait()
        return RoutingDecision(*args)

    monkeypatch.setattr(router_module, "RoutingDecision", decision_at_the_same_moment)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        decisions = list(pool.map(router.route, [[1, 5, 6], [1, 7, 8]]))
    assert sorted(decision.request_id for decision in decisions) == [0, 1]
    assert list(router.decisions) in ([decisions[0]], [decisions[1]])  # a ring buffer of log_size decisions
