"""The continuous-batching engine: greedy outputs equal one-by-one `generate`, and under load every request gets its
answer or a clear error, exactly once, in bounded memory."""

import asyncio
import concurrent.futures
import random
import time

import pytest
import torch
from serving_helpers import generate_one, mixed_requests, text_ids, tiny_media_model

from deepseekv3.serving import (
    Engine,
    EngineConfig,
    EngineOverloadedError,
    EngineStoppedError,
    LengthPredictor,
    LengthPredictorConfig,
    LengthRecord,
    RequestTimeoutError,
    RequestTooLargeError,
    SchedulerSetting,
    SelfTuningScheduler,
)


@pytest.fixture(scope="module")
def model():
    return tiny_media_model()


def test_engine_matches_one_by_one_generate_on_mixed_batch(model):
    requests = mixed_requests(16)
    expected = [generate_one(model, inputs, max_new_tokens) for inputs, max_new_tokens in requests]
    # a batch of 4 on 16 requests: requests join when a slot frees and leave when they finish
    with Engine(model, EngineConfig(max_batch_size=4)) as engine:
        handles = [engine.submit(inputs, max_new_tokens=n) for inputs, n in requests]
        streamed = [list(handle) for handle in handles]
        results = [handle.result(timeout=60) for handle in handles]
    assert [result.token_ids for result in results] == expected
    assert streamed == expected
    assert engine.stats["peak_batch_size"] == 4
    assert engine.stats["finished"] == len(requests)
    for result, (inputs, n) in zip(results, requests):
        assert result.prompt_length == inputs["input_ids"].shape[1]
        assert result.finish_reason == ("length" if len(result.token_ids) == n else "stop")
        assert 0 <= result.queued_s <= result.first_token_s <= result.latency_s


def test_engine_with_predictor_and_scheduler_keeps_outputs(model):
    requests = mixed_requests(12, seed=5)
    expected = [generate_one(model, inputs, n) for inputs, n in requests]
    predictor = LengthPredictor(LengthPredictorConfig(vocab_size=model.config.vocab_size))
    predictor.fit([LengthRecord([1, 5 + i], 1 + i % 7, 24) for i in range(40)], epochs=2)
    settings = [SchedulerSetting(2, 256), SchedulerSetting(6, 512)]
    scheduler = SelfTuningScheduler(settings, latency_bound_s=1.0, epoch_steps=2)
    engine = Engine(model, length_predictor=predictor, scheduler=scheduler)
    handles = [engine.submit(inputs, max_new_tokens=n) for inputs, n in requests]
    engine.run_until_idle()
    assert [handle.result().token_ids for handle in handles] == expected
    assert sum(scheduler.bandit.counts) >= 2  # the bandit was consulted and rewarded
    assert len(engine.length_log) == len(requests)


def test_load_1000_requests_with_cancellations_and_timeouts(model):
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    config = EngineConfig(max_batch_size=16, max_batch_tokens=1024, max_queue_size=64)
    prompts = [(text_ids(generator, rng.randint(1, 12)), rng.randint(1, 6)) for _ in range(1000)]
    to_cancel = set(rng.sample(range(1000), 100))
    to_time_out = set(rng.sample(sorted(set(range(1000)) - to_cancel), 50))
    handles, overloaded = [], 0
    with Engine(model, config) as engine:
        for index, (ids, max_new_tokens) in enumerate(prompts):
            timeout_s = 1e-4 if index in to_time_out else 60.0
            while True:
                try:
                    handle = engine.submit(ids, max_new_tokens=max_new_tokens, timeout_s=timeout_s)
                    break
                except EngineOverloadedError:  # back-pressure: the queue holds 64
                    overloaded += 1
                    time.sleep(0.002)
            handles.append(handle)
            if index in to_cancel:
                handle.cancel()
        outcomes = []
        for handle in handles:
            try:
                outcomes.append(("ok", handle.result(timeout=120)))
            except concurrent.futures.CancelledError:
                outcomes.append(("cancelled", None))
            except RequestTimeoutError as error:
                assert "timed out" in str(error)
                outcomes.append(("timeout", None))
    stats = engine.stats
    assert stats["stopped_in_flight"] == 0  # nothing left queued or decoding once every answer is in
    kinds = [kind for kind, _ in outcomes]
    assert len(outcomes) == 1000  # none lost
    assert overloaded > 0  # the bounded queue pushed back
    assert {index for index, kind in enumerate(kinds) if kind == "cancelled"} == to_cancel
    assert {index for index, kind in enumerate(kinds) if kind == "timeout"} <= to_time_out
    assert kinds.count("timeout") >= 1
    assert stats["finished"] == kinds.count("ok")
    assert stats["finished"] + stats["cancelled"] + stats["timed_out"] == 1000
    assert len({handle.request_id for handle in handles}) == 1000
    # none duplicated: each finished request has as many tokens as it asked for or up to its stop token
    for (kind, result), (ids, max_new_tokens) in zip(outcomes, prompts):
        if kind == "ok":
            assert len(result.token_ids) == max_new_tokens or result.token_ids[-1] == 2
            assert result.prompt_length == len(ids)
    # memory bounded: never more rows than the batch size, never longer rows than the longest request
    assert stats["peak_batch_size"] <= config.max_batch_size
    assert stats["peak_cache_positions"] <= config.max_batch_size * (13 + 6)
    # and the answers are the right ones
    for index in rng.sample([i for i, kind in enumerate(kinds) if kind == "ok"], 10):
        ids, max_new_tokens = prompts[index]
        assert outcomes[index][1].token_ids == generate_one(model, {"input_ids": torch.tensor([ids])}, max_new_tokens)


@pytest.mark.parametrize(
    ("prompt", "max_new_tokens", "error", "match"),
    [
        ([1] * 120, 20, RequestTooLargeError, "max_position_embeddings"),
        ([1] * 40, 30, RequestTooLargeError, "token budget"),
        ([], 4, ValueError, "empty"),
        ([1, 500], 4, ValueError, "outside the vocabulary"),
        ([1, 5], 0, ValueError, "max_new_tokens"),
        ({"input_ids": torch.ones(2, 3, dtype=torch.long)}, 4, ValueError, "batch size 2"),
        (
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[0, 1, 1]])},
            4,
            ValueError,
            "padding",
        ),
        ({"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.ones(1, 3)}, 4, ValueError, "labels"),
    ],
)
def test_submit_rejects_requests_that_can_never_fit_or_are_malformed(model, prompt, max_new_tokens, error, match):
    engine = Engine(model, EngineConfig(max_batch_tokens=64))
    with pytest.raises(error, match=match):
        engine.submit(prompt, max_new_tokens=max_new_tokens)
    assert engine.num_pending == 0


def test_full_queue_pushes_back_and_stop_fails_pending(model):
    engine = Engine(model, EngineConfig(max_queue_size=2))
    first, second = engine.submit([1, 5, 6], 3), engine.submit([1, 7], 3)
    with pytest.raises(EngineOverloadedError, match="queue is full"):
        engine.submit([1, 8], 3)
    engine.stop()
    for handle in (first, second):
        with pytest.raises(EngineStoppedError):
            handle.result(timeout=1)


def test_cancel_and_timeout_are_clear_errors_in_result_and_stream(model):
    engine = Engine(model)
    cancelled = engine.submit([1, 5, 6, 7], 10)
    timed_out = engine.submit([1, 8, 9], 10, timeout_s=1e-6)
    kept = engine.submit([1, 10, 11], 10)
    assert cancelled.cancel()
    time.sleep(0.01)
    engine.run_until_idle()
    with pytest.raises(concurrent.futures.CancelledError):
        cancelled.result()
    with pytest.raises(RequestTimeoutError, match="timed out"):
        list(timed_out)
    assert kept.result().token_ids == generate_one(model, {"input_ids": torch.tensor([[1, 10, 11]])}, 10)
    assert not kept.cancel()  # already finished
    assert engine.stats["cancelled"] == 1 and engine.stats["timed_out"] == 1


def test_bad_media_fails_only_its_request(model):
    requests = mixed_requests(4)
    bad = dict(requests[1][0])
    bad["pixel_values"] = torch.randn(1, 3, 8, 8)  # the model takes 16x16 images
    engine = Engine(model)
    good = [engine.submit(inputs, n) for inputs, n in requests]
    failing = engine.submit(bad, 4)
    engine.run_until_idle()
    with pytest.raises(ValueError, match="pixel_values"):
        failing.result()
    assert [h.result().token_ids for h in good] == [generate_one(model, i, n) for i, n in requests]


def test_async_generate_and_stream(model):
    ids = [1, 12, 13, 14]
    expected = generate_one(model, {"input_ids": torch.tensor([ids])}, 8)

    async def run(engine):
        result = await engine.agenerate(ids, max_new_tokens=8)
        streamed = [token async for token in engine.submit(ids, max_new_tokens=8).astream()]
        return result.token_ids, streamed

    with Engine(model) as engine:
        assert asyncio.run(run(engine)) == (expected, expected)


def test_state_round_trip(model, tmp_path):
    predictor = LengthPredictor(LengthPredictorConfig(vocab_size=model.config.vocab_size))
    predictor.fit([LengthRecord([1, 5 + i], 2 + i % 5, 16) for i in range(20)], epochs=3)
    scheduler = SelfTuningScheduler([SchedulerSetting(2, 128), SchedulerSetting(8, 512)], 0.5, epoch_steps=1)
    engine = Engine(model, length_predictor=predictor, scheduler=scheduler)
    handles = [engine.submit([1, 5 + i], 3) for i in range(6)]
    engine.run_until_idle()
    assert all(handle.future.done() for handle in handles)
    engine.save_state(tmp_path)
    loaded = Engine(model)
    loaded.load_state(tmp_path)
    assert list(loaded.length_log) == list(engine.length_log)
    assert loaded.scheduler.bandit.counts == scheduler.bandit.counts
    prompts = [[1, 5, 6], [1, 9]]
    assert loaded.length_predictor.predict(prompts, [16, 16]) == predictor.predict(prompts, [16, 16])
    with pytest.raises(FileNotFoundError, match="save_state"):
        Engine(model).load_state(tmp_path / "missing")
