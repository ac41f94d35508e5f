"""Prefix cache: a warm prefix skips its prefill and gives the same outputs as a miss; LRU within a byte budget."""

import pytest
import torch
from serving_helpers import IMAGE_ID, NUM_IMAGE_TOKENS, generate_one, text_ids, tiny_media_model

from deepseekv3.serving import Engine, EngineConfig, PrefixCache, PrefixEntry


@pytest.fixture(scope="module")
def model():
    return tiny_media_model()


def test_text_prefix_hit_equals_miss(model):
    generator = torch.Generator().manual_seed(3)
    system = text_ids(generator, 30)
    prompts = [system + text_ids(generator, length)[1:] for length in (3, 7, 12)]
    prompts.append(text_ids(generator, 9))  # starts otherwise: a miss
    cold, warm = Engine(model), Engine(model)
    warm.warm_up([system])
    results = {}
    for name, engine in (("cold", cold), ("warm", warm)):
        handles = [engine.submit(prompt, max_new_tokens=12) for prompt in prompts]
        engine.run_until_idle()
        results[name] = [handle.result() for handle in handles]
    assert [r.token_ids for r in results["warm"]] == [r.token_ids for r in results["cold"]]
    assert [r.cached_prefix_length for r in results["warm"]] == [len(system)] * 3 + [0]
    assert [r.cached_prefix_length for r in results["cold"]] == [0] * 4
    assert (warm.prefix_cache.hits, warm.prefix_cache.misses) == (3, 1)
    expected = [generate_one(model, {"input_ids": torch.tensor([prompt])}, 12) for prompt in prompts]
    assert [r.token_ids for r in results["warm"]] == expected


def test_image_prefix_hits_only_the_same_pixels(model):
    generator = torch.Generator().manual_seed(4)
    image = torch.randn(1, 3, 16, 16, generator=generator)
    prefix_ids = [1, 9] + [IMAGE_ID] * NUM_IMAGE_TOKENS
    engine = Engine(model)
    engine.warm_up([{"input_ids": torch.tensor([prefix_ids]), "pixel_values": image}])
    requests = [
        {"input_ids": torch.tensor([prefix_ids + [20, 21, 22]]), "pixel_values": image},
        {"input_ids": torch.tensor([prefix_ids + [23, 24]]), "pixel_values": image + 0.5},  # other pixels
        {  # the cached image, then a second one after it
            "input_ids": torch.tensor([prefix_ids + [25] + [IMAGE_ID] * NUM_IMAGE_TOKENS + [26]]),
            "pixel_values": torch.cat([image, torch.randn(1, 3, 16, 16, generator=generator)]),
        },
    ]
    handles = [engine.submit(inputs, max_new_tokens=10) for inputs in requests]
    engine.run_until_idle()
    results = [handle.result() for handle in handles]
    assert [r.cached_prefix_length for r in results] == [len(prefix_ids), 0, len(prefix_ids)]
    assert [r.token_ids for r in results] == [generate_one(model, inputs, 10) for inputs in requests]


def test_warm_up_refuses_a_prefix_that_cuts_an_image(model):
    engine = Engine(model)
    half_image = {"input_ids": torch.tensor([[1] + [IMAGE_ID] * 4]), "pixel_values": torch.randn(1, 3, 16, 16)}
    with pytest.raises(ValueError, match="whole images"):
        engine.warm_up([half_image])
    with pytest.raises(ValueError, match="max_bytes"):
        Engine(model, EngineConfig(prefix_cache_bytes=64)).warm_up([[1, 5, 6, 7]])


def _entry(tokens: tuple[int, ...], length: int = 4) -> PrefixEntry:
    return PrefixEntry(tokens, (), (), [(torch.zeros(1, 1, length, 4), torch.zeros(1, 1, length, 4))])


def test_lru_evicts_least_recently_used_within_the_byte_budget():
    entry_bytes = _entry((1,)).nbytes  # 2 tensors of 16 fp32 values
    cache = PrefixCache(max_bytes=3 * entry_bytes)
    for tokens in ((1, 2), (1, 3), (1, 4)):
        cache.put(_entry(tokens))
    assert cache.lookup([1, 2, 9], [], []).token_ids == (1, 2)  # (1, 2) is now the most recent
    cache.put(_entry((1, 5)))  # evicts (1, 3), the least recently used
    assert len(cache) == 3 and cache.nbytes == 3 * entry_bytes
    assert cache.lookup([1, 3, 9], [], []) is None
    assert cache.lookup([1, 2, 9], [], []) is not None
    assert cache.lookup([1, 2], [], []) is None  # a prefix must leave at least one token to prefill
    cache.put(_entry((1, 2, 9)))
    assert cache.lookup([1, 2, 9, 9], [], []).token_ids == (1, 2, 9)  # the longest match wins
    with pytest.raises(ValueError, match="max_bytes"):
        cache.put(_entry((7,), length=100))
    with pytest.raises(ValueError, match="positive"):
        PrefixCache(0)
