"""The head gate's running state in the cache (issue 16, point 2; issue 15's static cache and full-graph compile).

Each cache layer keeps, per row, the sum and count of the gate's input over its real positions
(`DeepseekV3MultimodalGateStateMixin`), so a decoding step reads a fixed-size state instead of the whole cached
latent. Checked here: step-by-step decoding equals the full forward (left padding, dynamic and static caches, 4-D
masks, a cache rebuilt from its tensors, a layer class without the state); crop, beam reorder, batch select and
repeat stay exact; `generate` with a static cache equals the dynamic one; a compiled decoding step is one graph that
a shorter prompt does not recompile; and the gate's work in a step does not grow with the context.
"""

import pytest
import torch
from conftest import TINY_TEXT_KWARGS
from test_modeling import build_model, make_gates_vary
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import CompileConfig, DynamicCache, StaticCache
from transformers.cache_utils import Cache, DynamicLayer

from deepseekv3 import DeepseekV3MultimodalConfig
from deepseekv3.attention_deepseekv3 import (
    DeepseekV3MultimodalAttention,
    DeepseekV3MultimodalDynamicLayer,
    DeepseekV3MultimodalStaticLayer,
)

MAX_CACHE_LEN = 24


@pytest.fixture
def gated_model(tiny_config):
    """Every feature on (gate, patch positions in the values: the latent carries two more cached channels), gates
    that depend on the input."""
    model = build_model(tiny_config, "sdpa")
    make_gates_vary(model)
    return model


def _left_padded_batch(lengths: list[int], total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rows, total)` token ids and mask, row r left-padded to `total` from its `lengths[r]` real tokens."""
    input_ids = torch.randint(5, 96, (len(lengths), total))
    attention_mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, total - length :] = 1
        input_ids[row, : total - length] = 0
    return input_ids, attention_mask


def _new_cache(model, kind: str):
    return DynamicCache(config=model.config) if kind == "dynamic" else StaticCache(model.config, MAX_CACHE_LEN)


@torch.no_grad()
def _continue(model, input_ids, attention_mask, start: int, cache) -> torch.Tensor:
    """Feeds positions `start..` one at a time on `cache`; the logits `(rows, len - start, vocab)`."""
    steps = []
    for position in range(start, input_ids.shape[1]):
        mask = None if attention_mask is None else attention_mask[:, : position + 1]
        out = model(input_ids=input_ids[:, position : position + 1], attention_mask=mask, cache=cache, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@torch.no_grad()
def _prefill(model, input_ids, attention_mask, length: int, cache) -> torch.Tensor:
    mask = None if attention_mask is None else attention_mask[:, :length]
    return model(input_ids=input_ids[:, :length], attention_mask=mask, cache=cache, use_cache=True).logits


def _assert_equal_where_real(logits, expected, attention_mask) -> None:
    real = torch.ones(logits.shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)


def _assert_decoding_equals_the_full_forward(model, input_ids, attention_mask, prefix: int, cache) -> None:
    """Prefills `prefix` positions on `cache`, then decodes the rest token by token: the full forward's logits at
    the real positions."""
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = torch.cat(
        [
            _prefill(model, input_ids, attention_mask, prefix, cache),
            _continue(model, input_ids, attention_mask, prefix, cache),
        ],
        dim=1,
    )
    _assert_equal_where_real(logits, full, attention_mask)


# --- Cache exactness -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("padded", [True, False])
def test_step_by_step_decoding_equals_the_full_forward(gated_model, cache_kind, padded):
    """A left-padded batch (one row all padding in the prefill) or no mask at all, prefilled then decoded token by
    token: the logits of the full forward, and every layer ends with a state counting exactly the real positions."""
    input_ids, attention_mask = _left_padded_batch([14, 11, 7], 14)
    attention_mask = attention_mask if padded else None
    cache = _new_cache(gated_model, cache_kind)
    _assert_decoding_equals_the_full_forward(gated_model, input_ids, attention_mask, 6, cache)
    layer_class = DeepseekV3MultimodalDynamicLayer if cache_kind == "dynamic" else DeepseekV3MultimodalStaticLayer
    real_counts = torch.full((3, 1), 14.0) if attention_mask is None else attention_mask.sum(1, keepdim=True).float()
    for layer in cache.layers:
        assert type(layer) is layer_class and layer.has_gate_state
        assert layer.gate_sum.shape == (3, gated_model.config.kv_lora_rank)
        torch.testing.assert_close(layer.gate_count, real_counts, atol=0, rtol=0)


@pytest.mark.parametrize(
    "operation, cache_kind",
    [
        ("crop", "dynamic"),
        ("crop", "static"),
        ("reorder", "dynamic"),
        ("reorder", "static"),
        ("select", "dynamic"),
        ("repeat", "dynamic"),
        ("rebuild", "dynamic"),
    ],
)
def test_cache_operations_keep_decoding_exact(gated_model, operation, cache_kind):
    """After a prefill: `crop` of three rejected tokens (assisted decoding), `reorder_cache` with repeated beams,
    `batch_select_indices`, `batch_repeat_interleave`, or a cache rebuilt from its tensors (as the serving engine
    merges batches); decoding then goes on and equals the full forward of the rows it now holds."""
    input_ids, attention_mask = _left_padded_batch([13, 10, 6], 13)
    with torch.no_grad():
        full = gated_model(input_ids=input_ids, attention_mask=attention_mask).logits
    cache = _new_cache(gated_model, cache_kind)
    prefix, rows = 8, [0, 1, 2]
    _prefill(gated_model, input_ids, attention_mask, prefix, cache)
    if operation == "crop":
        rejected = torch.randint(5, 96, (3, 3))
        mask = torch.cat([attention_mask[:, :prefix], torch.ones(3, 3, dtype=torch.long)], dim=1)
        with torch.no_grad():
            gated_model(input_ids=rejected, attention_mask=mask, cache=cache, use_cache=True)
        cache.crop(-3)
    elif operation == "reorder":
        rows = [2, 0, 0]
        cache.reorder_cache(torch.tensor(rows))
    elif operation == "select":
        rows = [2, 0]
        cache.batch_select_indices(torch.tensor(rows))
    elif operation == "repeat":
        rows = [0, 0, 1, 1, 2, 2]
        cache.batch_repeat_interleave(2)
    else:
        cache = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache.layers])
    decoded = _continue(gated_model, input_ids[rows], attention_mask[rows], prefix, cache)
    _assert_equal_where_real(decoded, full[rows][:, prefix:], attention_mask[rows][:, prefix:])


def test_a_layer_class_without_the_state_recomputes_it_exactly(gated_model):
    """A cache layer class the gate does not adopt (a subclass of transformers' `DynamicLayer`, as a quantized
    cache's is) keeps no state: each step sums the cached latent again, with the same result."""

    class OtherLayer(DynamicLayer):
        pass

    input_ids, attention_mask = _left_padded_batch([12, 8], 12)
    cache = Cache(layer_class_to_replicate=OtherLayer)
    _assert_decoding_equals_the_full_forward(gated_model, input_ids, attention_mask, 5, cache)
    assert all(type(layer) is OtherLayer and not hasattr(layer, "gate_sum") for layer in cache.layers)


def _causal_4d_mask(attention_mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """`(rows, 1, end - start, end)` bool mask of queries `start..end` over keys `0..end`, as `create_causal_mask`
    builds it from a padding mask: causal, padding keys hidden from every query."""
    queries, keys = torch.arange(start, end)[:, None], torch.arange(end)[None, :]
    return ((keys <= queries)[None] & attention_mask[:, None, :end].bool())[:, None]


@pytest.mark.parametrize("layer_class", [DynamicLayer, "other"])
def test_4d_masks_over_the_cache_equal_the_padding_mask(gated_model, layer_class):
    """Prefill and decoding steps under causal 4-D masks over a left-padded batch (the real positions read from the
    mask: no query sees a padding key) give the full forward's logits under the 2-D mask, with the state (an adopted
    `DynamicLayer`) and without it (recomputed at every step)."""

    class OtherLayer(DynamicLayer):
        pass

    input_ids, attention_mask = _left_padded_batch([12, 8, 3], 12)
    with torch.no_grad():
        full = gated_model(input_ids=input_ids, attention_mask=attention_mask).logits
        cache = Cache(layer_class_to_replicate=DynamicLayer if layer_class is DynamicLayer else OtherLayer)
        prefix = 6
        steps = [
            gated_model(
                input_ids=input_ids[:, :prefix], attention_mask=_causal_4d_mask(attention_mask, 0, prefix), cache=cache
            ).logits
        ]
        for position in range(prefix, 12):
            mask = _causal_4d_mask(attention_mask, position, position + 1)
            out = gated_model(input_ids=input_ids[:, position : position + 1], attention_mask=mask, cache=cache)
            steps.append(out.logits)
    _assert_equal_where_real(torch.cat(steps, dim=1), full, attention_mask)


# --- generate with a static cache, and torch.compile ---------------------------------------------------------------


@pytest.mark.parametrize("inputs", ["input_ids", "inputs_embeds", "beam_search"])
def test_static_cache_generate_equals_dynamic_generate(gated_model, inputs):
    """Greedy (and beam) `generate` on a left-padded batch: `cache_implementation="static"` (a prepared 4-D mask at
    every step, the gate's state in fixed buffers) gives the tokens and the logits of the dynamic cache (the tokens
    alone would not see a wrong state: in a tiny random model the gates barely move the argmax)."""
    input_ids, attention_mask = _left_padded_batch([9, 5], 9)
    kwargs = {"attention_mask": attention_mask, "max_new_tokens": 6, "do_sample": False, "output_logits": True}
    if inputs == "inputs_embeds":
        kwargs["inputs_embeds"] = gated_model.get_input_embeddings()(input_ids).detach()
    else:
        kwargs["input_ids"] = input_ids
    if inputs == "beam_search":
        kwargs["num_beams"] = 3
    dynamic = gated_model.generate(**kwargs, return_dict_in_generate=True)
    static = gated_model.generate(**kwargs, cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(static.logits, dynamic.logits, atol=1e-5, rtol=1e-5)
    assert all(
        type(layer) is DeepseekV3MultimodalStaticLayer and layer.has_gate_state for layer in static.cache.layers
    )


@pytest.mark.parametrize("media", [False, True], ids=["text", "image_and_audio_inputs"])
def test_compiled_static_decoding_is_one_graph_without_recompiles(tiny_config, media):
    """`generate` with a static cache and `compile_config(fullgraph=True)` on a model with the gate, text-only or
    with image and audio inputs switched on: the decoding step compiles into one graph (fullgraph raises on any graph
    break), a shorter prompt reuses it (`error_on_recompile`), and the tokens equal the uncompiled dynamic cache's.

    Compiled on CPU with the "eager" backend: dynamo's capture is what decides graph breaks and guards; inductor
    compiles the same graph (a minute on 2 CPU cores, so not run here)."""
    config = tiny_config if media else DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, use_attention_gate=True)
    gated_model = build_model(config, "sdpa")
    make_gates_vary(gated_model)
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None, dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles only on accelerators otherwise
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for length in (10, 6):
                input_ids, attention_mask = _left_padded_batch([length, length - 3], length)
                kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": 6}
                dynamic = gated_model.generate(**kwargs, do_sample=False)
                compiled = gated_model.generate(
                    **kwargs, do_sample=False, cache_implementation="static", compile_config=compile_config
                )
                assert torch.equal(compiled, dynamic)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


# --- constant cost -------------------------------------------------------------------------------------------------

# ops whose cost is what they return, not the whole input they index or view
_INDEXING_OPS = {"index_select", "slice", "select", "diagonal", "index", "view", "_unsafe_view", "expand", "unsqueeze"}


class _ElementsRead(TorchDispatchMode):
    """Counts the tensor elements the aten ops under it read: every input's, or an indexing or view op's output."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        read = out if func.overloadpacket.__name__ in _INDEXING_OPS else (args, kwargs)
        self.count += sum(leaf.numel() for leaf in tree_leaves(read) if isinstance(leaf, torch.Tensor))
        return out


def test_a_decoding_steps_gate_work_does_not_grow_with_the_context(gated_model, monkeypatch):
    """The elements the gate reads in one decoding step (a left-padded batch) are the same after 12 and 90 cached
    positions, and so are its state's shapes: no pass over the cached latent."""
    counter = _ElementsRead()
    gate = DeepseekV3MultimodalAttention._gate

    def counted_gate(self, *args, **kwargs):
        with counter:
            return gate(self, *args, **kwargs)

    monkeypatch.setattr(DeepseekV3MultimodalAttention, "_gate", counted_gate)
    elements, shapes = {}, {}
    for context in (12, 90):
        input_ids, attention_mask = _left_padded_batch([context + 1, context - 4], context + 1)
        cache = DynamicCache(config=gated_model.config)
        _prefill(gated_model, input_ids, attention_mask, context, cache)
        counter.count = 0
        _continue(gated_model, input_ids, attention_mask, context, cache)
        elements[context] = counter.count
        shapes[context] = [(layer.gate_sum.shape, layer.gate_count.shape) for layer in cache.layers]
    assert elements[12] == elements[90] > 0
    assert shapes[12] == shapes[90]
