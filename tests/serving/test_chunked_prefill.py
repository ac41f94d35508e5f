"""Chunked prefill (`prefill_chunk_tokens`): a long prompt is prefilled a chunk per step, between decoding steps, so
the requests already decoding get a token at every step; chunks never cut an image or audio span, and outputs equal
the unchunked engine's and `generate`'s."""

import math

import pytest
import torch
from serving_helpers import (
    AUDIO_ID,
    IMAGE_ID,
    NUM_IMAGE_TOKENS,
    generate_one,
    mixed_requests,
    text_ids,
    tiny_media_model,
)
from test_admission import bytes_per_position, predictor_of, run_within_budget

from deepseekv3.serving import Engine, EngineConfig


@pytest.fixture(scope="module")
def model():
    return tiny_media_model()


def record_prefills(engine: Engine, monkeypatch) -> list[list[tuple[int, int, int]]]:
    """Every prefill forward of `engine` from now on: `(request_id, start, end)` of each row."""
    forwards = []
    prefill_forward = engine._prefill_forward

    def recorded(plan):
        forwards.append([(request.request_id, start, end) for request, start, end in plan])
        return prefill_forward(plan)

    monkeypatch.setattr(engine, "_prefill_forward", recorded)
    return forwards


def media_prompt(generator: torch.Generator) -> tuple[dict, list[tuple[int, int]]]:
    """Text, an image, text, an audio clip, text; and the image's and the clip's spans."""
    before, between, after = (text_ids(generator, length)[1:] for length in (5, 4, 9))
    ids = [1, *before, *[IMAGE_ID] * NUM_IMAGE_TOKENS, *between, *[AUDIO_ID] * 6, 7, *after]
    image_start = 1 + len(before)
    audio_start = image_start + NUM_IMAGE_TOKENS + len(between)
    inputs = {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(1, 3, 16, 16, generator=generator),
        "input_features": torch.randn(1, 8, 12, generator=generator),
    }
    return inputs, [(image_start, image_start + NUM_IMAGE_TOKENS), (audio_start, audio_start + 6)]


def test_chunked_prefill_gives_the_unchunked_outputs_on_text_and_media(model, monkeypatch):
    generator = torch.Generator().manual_seed(31)
    media, spans = media_prompt(generator)
    requests = [{"input_ids": torch.tensor([text_ids(generator, 90)])}, media, *(r for r, _ in mixed_requests(4))]
    expected = [generate_one(model, inputs, 10) for inputs in requests]
    for chunk in (None, 8, 5):
        engine = Engine(model, EngineConfig(prefill_chunk_tokens=chunk))
        forwards = record_prefills(engine, monkeypatch)
        handles = [engine.submit(inputs, max_new_tokens=10) for inputs in requests]
        engine.run_until_idle()
        assert [handle.result().token_ids for handle in handles] == expected, chunk
        if chunk is None:
            assert len(forwards) == 1  # every prompt at once
            continue
        for rows in forwards:  # at most a chunk of positions, unless one row takes a whole media span
            width = max(end - start for _, start, end in rows)
            assert len(rows) * width <= chunk or (len(rows) == 1 and width in (NUM_IMAGE_TOKENS, 6)), rows
        long_rows = [row for rows in forwards for row in rows if row[0] == handles[0].request_id]
        assert len(long_rows) >= math.ceil(91 / chunk)
        media_cuts = {cut for rows in forwards for rid, *cuts in rows if rid == handles[1].request_id for cut in cuts}
        assert not any(start < cut < end for start, end in spans for cut in media_cuts), media_cuts


def test_running_requests_get_a_token_at_every_step_while_a_long_prompt_is_prefilled(model, monkeypatch):
    generator = torch.Generator().manual_seed(32)
    shorts = [text_ids(generator, 4), text_ids(generator, 6)]
    long_prompt = text_ids(generator, 90)
    expected = [generate_one(model, {"input_ids": torch.tensor([prompt])}, 40) for prompt in shorts]
    assert [len(tokens) for tokens in expected] == [40, 40]  # neither stops while the long prompt is prefilled
    engine = Engine(model, EngineConfig(prefill_chunk_tokens=8))
    handles = [engine.submit(prompt, max_new_tokens=40) for prompt in shorts]
    while len(engine._batch) < 2:
        engine.step()
    running = [engine._active[handle.request_id] for handle in handles]
    long = engine.submit(long_prompt, max_new_tokens=8)
    forwards = record_prefills(engine, monkeypatch)
    prefill_steps, long_first_token = 0, False
    while not long_first_token:
        generated = [len(request.generated) for request in running]
        engine.step()
        prefill_steps += 1
        assert [len(request.generated) for request in running] == [count + 1 for count in generated]
        assert len(forwards) == prefill_steps  # one prefill forward per step...
        rows = forwards[-1]
        assert len(rows) * max(end - start for _, start, end in rows) <= 8  # ...of at most a chunk
        long_first_token = long.future.done() or bool(engine._active[long.request_id].generated)
    assert prefill_steps == math.ceil(len(long_prompt) / 8)
    engine.run_until_idle()
    assert [handle.result().token_ids for handle in handles] == expected
    assert long.result().token_ids == generate_one(model, {"input_ids": torch.tensor([long_prompt])}, 8)


def test_a_request_preempted_during_its_chunked_prefill_gives_its_unpreempted_output(model, monkeypatch):
    requests = [(inputs, 16) for inputs, _ in mixed_requests(10, seed=3)]
    expected = [generate_one(model, inputs, n) for inputs, n in requests]
    longest = max(inputs["input_ids"].shape[1] for inputs, _ in requests) + 16
    config = EngineConfig(max_batch_size=8, max_batch_tokens=2 * longest, prefill_chunk_tokens=6)
    engine = Engine(model, config, length_predictor=predictor_of(model, 3))
    preempted_in_prefill = set()
    preempt = engine._preempt

    def recorded_preempt(budget):
        prefilling = {rid for rid, request in engine._active.items() if request.prefilling and request.prefilled}
        preempt(budget)
        preempted_in_prefill.update(prefilling - set(engine._active))

    monkeypatch.setattr(engine, "_preempt", recorded_preempt)
    handles = [engine.submit(inputs, max_new_tokens=n) for inputs, n in requests]
    run_within_budget(engine, config.max_batch_tokens * bytes_per_position(model))
    assert preempted_in_prefill  # some lost the chunks they had prefilled
    assert [handle.result(timeout=0).token_ids for handle in handles] == expected


def test_blockwise_attention_gives_the_tokens_of_generate_with_hits_and_chunks():
    """Rows stay left-padded with no padding between cached and new positions, so blocks and sinks, counted from
    each row's first real token, stay where they are in an unpadded run."""
    model = tiny_media_model(attention_block_size=4, attention_num_sink_tokens=2)
    generator = torch.Generator().manual_seed(33)
    system = text_ids(generator, 30)
    requests = [{"input_ids": torch.tensor([system + text_ids(generator, n)[1:]])} for n in (3, 9, 14)]
    requests += [inputs for inputs, _ in mixed_requests(4)]
    expected = [generate_one(model, inputs, 10) for inputs in requests]
    for chunk in (None, 5):
        engine = Engine(model, EngineConfig(prefill_chunk_tokens=chunk))
        engine.warm_up([system])
        handles = [engine.submit(inputs, max_new_tokens=10) for inputs in requests[:2]]
        engine.step()  # the rest join while these decode
        handles += [engine.submit(inputs, max_new_tokens=10) for inputs in requests[2:]]
        engine.run_until_idle()
        assert [handle.result().token_ids for handle in handles] == expected, chunk
        assert max(handle.result().cached_prefix_length for handle in handles) == len(system)


def test_prefill_chunk_tokens_must_be_positive_or_none():
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        EngineConfig(prefill_chunk_tokens=0)
