"""Automatic prefix caching: every prefilled prompt is stored, so a later request that starts the same way hits
without a warm-up, requests with hits are prefilled together in one forward, media count by their content, and the
cache evicts least recently used prefixes within its byte budget. Hits give the tokens of `generate`."""

import contextlib

import pytest
import torch
from serving_helpers import AUDIO_ID, IMAGE_ID, NUM_IMAGE_TOKENS, generate_one, text_ids, tiny_media_model

from deepseekv3.serving import Engine, EngineConfig
from deepseekv3.serving.engine import latent_position_bytes


@pytest.fixture(scope="module")
def model():
    return tiny_media_model()


@contextlib.contextmanager
def recorded_forwards(model):
    """The `input_ids` shape of every forward of `model` inside the block, in order."""
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        yield shapes
    finally:
        hook.remove()


def served(engine: Engine, inputs, max_new_tokens: int = 8):
    """`inputs` served alone on `engine`: its result."""
    handle = engine.submit(inputs, max_new_tokens=max_new_tokens)
    engine.run_until_idle()
    return handle.result()


def test_a_second_request_sharing_a_long_system_prompt_hits_without_warm_up(model):
    generator = torch.Generator().manual_seed(21)
    system = text_ids(generator, 50)
    first, second = (system + [token] + text_ids(generator, 5)[1:] for token in (40, 41))
    engine = Engine(model)
    first_result = served(engine, first)
    with recorded_forwards(model) as shapes:
        handle = engine.submit(second, max_new_tokens=8)
        engine.step()
    assert shapes[0] == (1, len(second) - len(system))  # only what follows the system prompt is prefilled
    engine.run_until_idle()
    assert (first_result.cached_prefix_length, handle.result().cached_prefix_length) == (0, len(system))
    assert (engine.prefix_cache.hits, engine.prefix_cache.misses) == (1, 1)
    assert [first_result.token_ids, handle.result().token_ids] == [
        generate_one(model, {"input_ids": torch.tensor([prompt])}, 8) for prompt in (first, second)
    ]


def test_a_batch_of_hits_is_prefilled_in_one_forward(model, monkeypatch):
    generator = torch.Generator().manual_seed(22)
    system = text_ids(generator, 40)
    prompts = [system + text_ids(generator, length)[1:] for length in (3, 6, 9, 4)]
    engine = Engine(model)
    engine.warm_up([system])
    handles = [engine.submit(prompt, max_new_tokens=8) for prompt in prompts]
    batch_adds = []
    add = engine._batch.add
    monkeypatch.setattr(engine._batch, "add", lambda *args: batch_adds.append(args[0]) or add(*args))
    with recorded_forwards(model) as shapes:
        engine.step()
    # one prefill forward as wide as the longest new part, the rows joining the batch in one copy, one decoding step
    assert shapes[0] == (4, 9) and len(shapes) == 2 and shapes[1][1] == 1
    assert batch_adds == [[handle.request_id for handle in handles]]
    engine.run_until_idle()
    results = [handle.result() for handle in handles]
    assert [result.cached_prefix_length for result in results] == [len(prompt) - 9 for prompt in prompts]
    expected = [generate_one(model, {"input_ids": torch.tensor([prompt])}, 8) for prompt in prompts]
    assert [result.token_ids for result in results] == expected


def test_the_same_ids_with_other_media_miss(model):
    generator = torch.Generator().manual_seed(23)
    image = torch.randn(1, 3, 16, 16, generator=generator)
    image_ids = [1, 9, 10] + [IMAGE_ID] * NUM_IMAGE_TOKENS + [11, 12]
    clip = torch.randn(1, 8, 8, generator=generator)
    audio_ids = [1, 13] + [AUDIO_ID] * 4 + [7, 14]
    requests = [
        ({"input_ids": torch.tensor([image_ids]), "pixel_values": image}, 0),
        ({"input_ids": torch.tensor([image_ids]), "pixel_values": image + 0.5}, 3),  # other pixels: the text before
        ({"input_ids": torch.tensor([image_ids[:-1] + [15, 16]]), "pixel_values": image}, len(image_ids) - 1),
        ({"input_ids": torch.tensor([audio_ids]), "input_features": clip}, 1),  # shares BOS with the image prompts
        ({"input_ids": torch.tensor([audio_ids]), "input_features": clip.flip(-1)}, 2),  # another clip
        ({"input_ids": torch.tensor([audio_ids[:-1] + [17]]), "input_features": clip}, len(audio_ids) - 1),
    ]
    engine = Engine(model)
    results = [served(engine, inputs) for inputs, _ in requests]
    assert [result.cached_prefix_length for result in results] == [cached for _, cached in requests]
    assert [result.token_ids for result in results] == [generate_one(model, inputs, 8) for inputs, _ in requests]


def stored_bytes(engine: Engine) -> int:
    """Bytes of the storage behind every tensor the prefix cache holds, each storage once."""
    tensors = [tensor for entry in engine.prefix_cache.entries() for pair in entry.layers for tensor in pair]
    return sum({tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}.values())


def test_eviction_by_bytes_evicts_the_least_recently_used_prefix_and_stays_within_the_cap(model):
    cache = model(input_ids=torch.tensor([[1]]), use_cache=True).cache
    position_bytes = sum(tensor.nbytes for layer in cache.layers for tensor in (layer.keys, layer.values))
    cap = 50 * position_bytes
    engine = Engine(model, EngineConfig(prefix_cache_bytes=cap))
    generator = torch.Generator().manual_seed(24)
    # 20 tokens each, from different first tokens: two fit the cap, three do not
    prompts = {name: [token] + text_ids(generator, 19)[1:] for name, token in (("a", 5), ("b", 6), ("c", 7))}
    cached = {}

    def serve(name: str, prompt: list[int]) -> None:
        handle = engine.submit(prompt, max_new_tokens=4)
        while engine.num_pending or engine.num_active:
            engine.step()
            assert engine.prefix_cache.nbytes == stored_bytes(engine) <= cap
        cached[name] = handle.result().cached_prefix_length
        assert handle.result().token_ids == generate_one(model, {"input_ids": torch.tensor([prompt])}, 4)

    serve("a", prompts["a"])
    serve("b", prompts["b"])
    serve("a again", prompts["a"][:-1] + [90])  # uses "a": "b" is now the least recently used
    serve("c", prompts["c"])  # over the cap: "b" is evicted
    serve("b again", prompts["b"])  # a miss; over the cap again: "a", used before "c", is evicted
    serve("c again", prompts["c"][:-1] + [91])
    serve("a once more", prompts["a"])
    assert cached == {"a": 0, "b": 0, "a again": 19, "c": 0, "b again": 0, "c again": 19, "a once more": 0}


def shared_prompts(seed: int, count: int = 3, system_length: int = 40) -> tuple[list[int], list[list[int]]]:
    """A system prompt (BOS and `system_length - 1` tokens) and `count` prompts of it plus 5 tokens of their own,
    each from a different first token."""
    generator = torch.Generator().manual_seed(seed)
    system = text_ids(generator, system_length - 1)
    return system, [system + [30 + index] + text_ids(generator, 4)[1:] for index in range(count)]


def test_requests_admitted_together_compute_their_shared_system_prompt_once(model):
    system, prompts = shared_prompts(25)
    expected = [generate_one(model, {"input_ids": torch.tensor([prompt])}, 6) for prompt in prompts]
    engine = Engine(model, EngineConfig(prefill_chunk_tokens=None))
    handles = [engine.submit(prompt, max_new_tokens=6) for prompt in prompts]
    with recorded_forwards(model) as shapes:
        engine.step()
        engine.step()
    # the first request alone computes the system prompt; the others wait one step and read it from the cache
    assert shapes == [(1, len(prompts[0])), (1, 1), (2, 5), (3, 1)]
    engine.run_until_idle()
    assert [handle.result().cached_prefix_length for handle in handles] == [0, len(system), len(system)]
    assert [handle.result().token_ids for handle in handles] == expected

    # a prefix cache too small to keep the system prompt: nobody waits for it
    engine = Engine(model, EngineConfig(prefill_chunk_tokens=None, prefix_cache_bytes=1))
    handles = [engine.submit(prompt, max_new_tokens=6) for prompt in prompts]
    with recorded_forwards(model) as shapes:
        engine.step()
    assert shapes[0] == (3, len(prompts[0]))
    engine.run_until_idle()
    assert [handle.result().cached_prefix_length for handle in handles] == [0, 0, 0]
    assert [handle.result().token_ids for handle in handles] == expected


def test_a_request_admitted_before_its_prefix_was_cached_finds_it_when_its_prefill_starts(model):
    system, prompts = shared_prompts(26)
    # chunks of 8 positions: one request per forward, the second's prefill starts after the first's has stored it
    engine = Engine(model, EngineConfig(prefill_chunk_tokens=8))
    handles = [engine.submit(prompt, max_new_tokens=6) for prompt in prompts]
    engine.run_until_idle()
    assert [handle.result().cached_prefix_length for handle in handles] == [0, len(system), len(system)]
    expected = [generate_one(model, {"input_ids": torch.tensor([prompt])}, 6) for prompt in prompts]
    assert [handle.result().token_ids for handle in handles] == expected


@pytest.mark.parametrize("media", [False, True])
def test_the_bytes_of_a_cached_position_are_those_of_the_cache_tensors(media):
    model = tiny_media_model()
    model.config.use_image_position_values = media  # two more channels in the cached latent
    cache = model(input_ids=torch.tensor([[1, 5, 6]]), use_cache=True).cache
    measured = sum(tensor.nbytes for layer in cache.layers for tensor in (layer.keys, layer.values)) // 3
    assert latent_position_bytes(model) == measured
