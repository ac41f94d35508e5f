"""Admission by what the batch cache really holds: rows x padded length within the token budget (measured in bytes
on the cache tensors after every step), preemption with recomputation when running requests outgrow it, room kept
for the oldest waiting request, and a clear error for a request that cannot fit even alone."""

import pytest
import torch
from serving_helpers import generate_one, mixed_requests, text_ids, tiny_media_model

from deepseekv3.serving import (
    Engine,
    EngineConfig,
    LengthPredictor,
    LengthPredictorConfig,
    LengthRecord,
    RequestTooLargeError,
    SamplingParams,
    SchedulerSetting,
    SelfTuningScheduler,
)
from deepseekv3.serving.latent_batch import padded_peak


@pytest.fixture(scope="module")
def model():
    return tiny_media_model()


def bytes_per_position(model) -> int:
    """Bytes one cached position of one row takes in every layer, measured on a one-token prefill's cache."""
    cache = model(input_ids=torch.tensor([[1]]), use_cache=True).cache
    return sum(tensor.nbytes for layer in cache.layers for tensor in (layer.keys, layer.values))


def cache_bytes(engine: Engine) -> int:
    """Bytes of the storage behind the decoding batch's cache tensors (each storage once)."""
    cache = engine._batch.cache
    if cache is None:
        return 0
    tensors = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values())


def run_within_budget(engine: Engine, budget_bytes: int, on_step=None) -> int:
    """Steps `engine` until idle, checking the cache's bytes after every step; returns the peak."""
    peak = 0
    while engine.num_pending or engine.num_active:
        engine.step()
        measured = cache_bytes(engine)
        assert measured <= budget_bytes
        assert engine.cache_nbytes == measured
        peak = max(peak, measured)
        if on_step is not None:
            on_step()
    return peak


def predictor_of(model, generated_length: int) -> LengthPredictor:
    """A trained predictor that predicts about `generated_length` new tokens for any prompt."""
    torch.manual_seed(0)
    predictor = LengthPredictor(LengthPredictorConfig(vocab_size=model.config.vocab_size))
    predictor.fit([LengthRecord(3, generated_length, 16, (1, 5 + index)) for index in range(40)])
    return predictor


def test_padded_peak_counts_rows_times_the_longest_at_every_step():
    assert padded_peak([]) == 0
    assert padded_peak([(10, 0)]) == 0  # finishes at its prefill: never joins the batch
    assert padded_peak([(10, 3)]) == 12  # alone: its own length at its last step
    # 10 rows of 100 positions leave after one step; a row of 10 then runs 500 steps alone
    assert padded_peak([(100, 1)] * 10 + [(10, 500)]) == max(11 * 100, 10 + 499)
    assert padded_peak([(5, 4), (50, 2)]) == max(2 * 51, 1 * 8)


def test_one_long_and_many_short_prompts_stay_within_the_byte_budget(model):
    generator = torch.Generator().manual_seed(3)
    prompts = [text_ids(generator, 2 + index % 5) for index in range(15)]
    prompts.insert(2, text_ids(generator, 90))  # 91 tokens: with any other row, over the budget
    config = EngineConfig(max_batch_size=16, max_batch_tokens=160)
    engine = Engine(model, config)
    handles = [engine.submit(prompt, max_new_tokens=8) for prompt in prompts]
    peak = run_within_budget(engine, config.max_batch_tokens * bytes_per_position(model))
    expected = [generate_one(model, {"input_ids": torch.tensor([prompt])}, 8) for prompt in prompts]
    assert [handle.result(timeout=0).token_ids for handle in handles] == expected
    assert engine.stats["peak_cache_positions"] <= config.max_batch_tokens
    assert engine.stats["peak_batch_size"] > 1  # the short prompts still batch together
    assert peak > 0 and engine.cache_nbytes == 0


def test_preempted_requests_give_their_unpreempted_outputs(model):
    requests = [(inputs, 16) for inputs, _ in mixed_requests(10, seed=3)]
    sampled = (requests[-1][0], SamplingParams(temperature=0.8, top_k=20, seed=3))
    expected = [generate_one(model, inputs, n) for inputs, n in requests]
    alone = Engine(model)
    sampled_alone = alone.submit(sampled[0], max_new_tokens=16, sampling=sampled[1])
    alone.run_until_idle()
    longest = max(inputs["input_ids"].shape[1] for inputs, _ in requests) + 16
    config = EngineConfig(max_batch_size=8, max_batch_tokens=2 * longest)
    # predicting about 3 new tokens where 16 come, admission packs rows that outgrow the budget and are preempted
    engine = Engine(model, config, length_predictor=predictor_of(model, 3))
    handles = [engine.submit(inputs, max_new_tokens=n) for inputs, n in requests]
    sampled_handle = engine.submit(sampled[0], max_new_tokens=16, sampling=sampled[1])
    preempted = {}

    def record_preempted():
        for request in engine._waiting:
            if request.generated:
                preempted[request.request_id] = max(preempted.get(request.request_id, 0), len(request.generated))

    run_within_budget(engine, config.max_batch_tokens * bytes_per_position(model), record_preempted)
    assert engine.stats["preempted"] >= 2 and len(preempted) >= 2
    assert max(preempted.values()) >= 2 and sampled_handle.request_id in preempted  # recomputed with its tokens
    assert [handle.result(timeout=0).token_ids for handle in handles] == expected
    assert [list(handle) for handle in handles] == expected  # each token streamed once
    assert sampled_handle.result(timeout=0).token_ids == sampled_alone.result(timeout=0).token_ids
    for handle, (inputs, _) in zip(handles, requests):
        assert handle.result().prompt_length == inputs["input_ids"].shape[1]  # the prompt, not what was recomputed


def test_a_shrinking_budget_preempts_the_youngest_and_keeps_outputs(model):
    generator = torch.Generator().manual_seed(8)
    prompts = [text_ids(generator, 4 + index) for index in range(6)]
    scheduler = SelfTuningScheduler([SchedulerSetting(6, 256), SchedulerSetting(6, 48)], 1.0, epoch_steps=3)
    engine = Engine(model, scheduler=scheduler)
    handles = [engine.submit(prompt, max_new_tokens=12) for prompt in prompts]
    while scheduler.current.max_batch_tokens == 256:  # the bandit plays the large arm first
        engine.step()
    engine.step()
    assert engine.stats["preempted"] >= 1
    assert engine.cache_nbytes <= 48 * bytes_per_position(model)
    engine.run_until_idle()
    expected = [generate_one(model, {"input_ids": torch.tensor([prompt])}, 12) for prompt in prompts]
    assert [handle.result(timeout=0).token_ids for handle in handles] == expected


@pytest.mark.parametrize("with_predictor", [True, False])
def test_the_oldest_request_is_not_starved_by_a_stream_of_short_ones(model, with_predictor):
    generator = torch.Generator().manual_seed(4)
    max_new_tokens = 6
    predictor = predictor_of(model, 3) if with_predictor else None
    engine = Engine(model, EngineConfig(max_batch_size=8, max_batch_tokens=56), length_predictor=predictor)
    shorts = [text_ids(generator, 2) for _ in range(2)]
    handles = [engine.submit(prompt, max_new_tokens) for prompt in shorts]
    engine.step()
    long_prompt = text_ids(generator, 40)  # 41 + 6 positions: it fits only alone
    long = engine.submit(long_prompt, max_new_tokens)
    steps = 0
    while not long.future.done():  # a short request arrives at every step
        assert steps <= 2 * max_new_tokens + 2, "the oldest request starved"  # the batch drains, then it runs
        shorts.append(text_ids(generator, 2))
        handles.append(engine.submit(shorts[-1], max_new_tokens))
        engine.step()
        steps += 1
    engine.run_until_idle()
    assert long.result().token_ids == generate_one(model, {"input_ids": torch.tensor([long_prompt])}, max_new_tokens)
    expected = [generate_one(model, {"input_ids": torch.tensor([prompt])}, max_new_tokens) for prompt in shorts]
    assert [handle.result(timeout=0).token_ids for handle in handles] == expected


def test_a_budget_too_small_for_one_request_alone_is_refused_at_submit(model):
    engine = Engine(model, EngineConfig(max_batch_tokens=16))
    with pytest.raises(RequestTooLargeError, match=r"= 18 exceeds the engine's token budget \(16 cached positions\)"):
        engine.submit([1] * 10, max_new_tokens=8)
    scheduler = SelfTuningScheduler([SchedulerSetting(4, 8), SchedulerSetting(4, 16)], 1.0)
    with pytest.raises(RequestTooLargeError, match="token budget"):
        Engine(model, scheduler=scheduler).submit([1] * 10, max_new_tokens=8)
    assert engine.num_pending == 0
    # one that fits exactly is served, alone, within the budget
    handle = engine.submit([1, *range(5, 12)], max_new_tokens=8)
    waiting = engine.submit([1, 5], max_new_tokens=8)
    run_within_budget(engine, 16 * bytes_per_position(model))
    assert handle.result().token_ids == generate_one(model, {"input_ids": torch.tensor([[1, *range(5, 12)]])}, 8)
    assert waiting.result().token_ids == generate_one(model, {"input_ids": torch.tensor([[1, 5]])}, 8)
