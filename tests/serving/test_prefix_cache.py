"""Prefix cache: a warm prefix skips its prefill and gives the same outputs as a miss; a radix tree that shares
prefixes, never ends a prefix inside a media span, and evicts least recently used leaves within a byte budget."""

import pytest
import torch
from serving_helpers import IMAGE_ID, NUM_IMAGE_TOKENS, generate_one, text_ids, tiny_media_model

from deepseekv3.serving import Engine, EngineConfig, PrefixCache
from deepseekv3.serving.prefix_cache import MediaPosition


@pytest.fixture(scope="module")
def model():
    return tiny_media_model()


def test_text_prefix_hit_equals_miss(model):
    generator = torch.Generator().manual_seed(3)
    system = text_ids(generator, 30)
    prompts = [system + text_ids(generator, length)[1:] for length in (3, 7, 12)]
    prompts.append(text_ids(generator, 9)[1:])  # starts otherwise: a miss
    cold, warm = Engine(model), Engine(model)
    warm.warm_up([system])
    results = {}
    for name, engine in (("cold", cold), ("warm", warm)):
        handles = [engine.submit(prompt, max_new_tokens=12) for prompt in prompts]
        engine.run_until_idle()
        results[name] = [handle.result() for handle in handles]
    assert [r.token_ids for r in results["warm"]] == [r.token_ids for r in results["cold"]]
    # prefilled together, every row feeds as many positions as the longest new part (12): a hit with a shorter one
    # recomputes the last of its cached positions there, where the forward would otherwise compute padding
    assert [r.cached_prefix_length for r in results["warm"]] == [len(prompt) - 12 for prompt in prompts[:3]] + [0]
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
    results = []
    for inputs in requests:  # one at a time: each is prefilled on all it can take from the cache
        handle = engine.submit(inputs, max_new_tokens=10)
        engine.run_until_idle()
        results.append(handle.result())
    # other pixels: only the two text tokens before the image
    assert [r.cached_prefix_length for r in results] == [len(prefix_ids), 2, len(prefix_ids)]
    assert [r.token_ids for r in results] == [generate_one(model, inputs, 10) for inputs in requests]


def test_warm_up_refuses_a_prefix_that_cuts_an_image(model):
    engine = Engine(model)
    half_image = {"input_ids": torch.tensor([[1] + [IMAGE_ID] * 4]), "pixel_values": torch.randn(1, 3, 16, 16)}
    with pytest.raises(ValueError, match="whole images"):
        engine.warm_up([half_image])
    with pytest.raises(ValueError, match="max_bytes"):
        Engine(model, EngineConfig(prefix_cache_bytes=64)).warm_up([[1, 5, 6, 7]])


def latents(keys: list, tag: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two layers of `(kv_nope, k_rot)` for `keys`, `(1, 1, len(keys), 4)`: position `i` holds `tag + i`."""
    values = (tag + torch.arange(len(keys), dtype=torch.float32))[None, None, :, None].expand(1, 1, -1, 4)
    return [(values.clone(), values.clone()) for _ in range(2)]


POSITION_BYTES = 2 * 2 * 4 * 4  # two layers of two fp32 tensors of width 4


def stored_bytes(cache: PrefixCache) -> int:
    """Bytes of the storage behind every stored tensor, each storage once."""
    tensors = [tensor for entry in cache.entries() for pair in entry.layers for tensor in pair]
    return sum({tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}.values())


def test_the_tree_shares_prefixes_and_returns_their_latents():
    cache = PrefixCache(max_bytes=1 << 20)
    first, second = [1, 5, 6, 7], [1, 5, 8]
    cache.insert(first, latents(first, 0.0))
    cache.insert(second, latents(second, 100.0))
    assert len(cache) == 3  # [1, 5], then [6, 7] and [8]
    assert cache.nbytes == stored_bytes(cache) == 5 * POSITION_BYTES
    length, layers = cache.lookup([1, 5, 8, 9], 3)
    assert length == 3
    # [1, 5] was stored by the first prompt, [8] by the second
    assert layers[1][0][0, 0, :, 0].tolist() == [0.0, 1.0, 102.0]
    assert cache.lookup([1, 5, 6, 7], 3)[0] == 3  # at least one position is left to compute
    assert cache.lookup([2, 5], 1) == (0, None)
    assert (cache.hits, cache.misses) == (2, 1)


def test_a_prefix_never_ends_inside_a_media_span():
    image = [MediaPosition(IMAGE_ID, "digest", offset) for offset in range(4)]
    cache = PrefixCache(max_bytes=1 << 20)
    stored = [1, 9, *image, 10]
    cache.insert(stored, latents(stored, 0.0))
    assert cache.lookup([1, 9, *image, 11], 7)[0] == 6  # the whole image and the text before it
    # a prompt that ends with the image: one position is left to compute, so the whole image is
    assert cache.lookup([1, 9, *image], 5)[0] == 2
    other = [MediaPosition(IMAGE_ID, "other", offset) for offset in range(4)]
    assert cache.lookup([1, 9, *other, 10], 6)[0] == 2  # the same ids with another image: only the text before it


def test_lru_evicts_least_recently_used_leaves_within_the_byte_budget():
    cache = PrefixCache(max_bytes=10 * POSITION_BYTES)
    prompts = {name: [token] * 4 for name, token in (("a", 5), ("b", 6))}
    for name in ("a", "b"):
        cache.insert(prompts[name], latents(prompts[name], 0.0))
    assert cache.lookup([5, 5, 5, 5, 9], 4)[0] == 4  # "a" is now the most recently used
    cache.insert([7] * 4, latents([7] * 4, 0.0))  # 12 positions: "b", the least recently used, goes
    assert cache.nbytes == stored_bytes(cache) == 8 * POSITION_BYTES
    assert cache.lookup([6, 6, 6, 6, 9], 4) == (0, None)
    assert cache.lookup([5, 5, 5, 5, 9], 4)[0] == 4
    # a longer prompt sharing "a": eviction shortens prefixes from their ends, "a"'s first positions stay
    longer = [5] * 4 + [8] * 5
    cache.insert(longer, latents(longer, 0.0))
    assert cache.nbytes <= cache.max_bytes and cache.nbytes == stored_bytes(cache)
    assert cache.lookup([5, 5, 5, 5, 8, 8, 8, 8, 8, 9], 9)[0] == 9
    # a prompt larger than the whole budget is stored up to what fits
    huge = list(range(10, 30))
    cache.insert(huge, latents(huge, 0.0))
    assert cache.nbytes == stored_bytes(cache) == 10 * POSITION_BYTES
    assert cache.lookup([*huge, 1], 20)[0] == 10
    with pytest.raises(ValueError, match="positive"):
        PrefixCache(0)
