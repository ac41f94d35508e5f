"""Long context: blockwise local attention with sink tokens (`attention_block_size`, `attention_num_sink_tokens`),
through transformers' mask functions on every attention backend, counted from each row's first real token (a
left-padded row, in a forward, `generate` or the serving engine, equals the row alone), and YaRN rope scaling as
DeepSeek-V3 configures it."""

import pytest
import torch
from conftest import TINY_TEXT_KWARGS
from test_configuration import load_official_config_dict
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.masking_utils import create_causal_mask

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.modeling_deepseekv3 import block_local_mask_function

LONG_KWARGS = {**TINY_TEXT_KWARGS, "max_position_embeddings": 1024}


def build(attn_implementation: str = "eager", **overrides) -> DeepseekV3MultimodalForConditionalGeneration:
    torch.manual_seed(0)
    config = DeepseekV3MultimodalConfig(**{**LONG_KWARGS, **overrides})
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_a_block_as_long_as_the_sequence_equals_dense_attention(attn_implementation):
    input_ids = torch.randint(5, 96, (2, 40))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :7] = 0  # left padding
    dense = build(attn_implementation, use_attention_gate=True)
    blockwise = build(attn_implementation, use_attention_gate=True, attention_block_size=40)
    blockwise.load_state_dict(dense.state_dict())
    with torch.no_grad():
        expected = dense(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = blockwise(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def visible_positions(model, query: int, length: int) -> set[int]:
    """Positions whose input embedding has a non-zero gradient on the logits at `query`."""
    inputs_embeds = model.model.embed_tokens(torch.randint(5, 96, (1, length))).detach().requires_grad_()
    model(inputs_embeds=inputs_embeds).logits[0, query].sum().backward()
    influence = inputs_embeds.grad[0].abs().sum(dim=-1)
    return set(torch.nonzero(influence).flatten().tolist())


@pytest.mark.parametrize("num_sink_tokens", [0, 2])
def test_a_token_outside_the_window_has_no_influence(num_sink_tokens):
    # one layer: what a query sees is exactly its attention window (more layers widen the receptive field)
    model = build(num_hidden_layers=1, attention_block_size=8, attention_num_sink_tokens=num_sink_tokens)
    # query 29 is in block 3 (positions 24-31): it sees blocks 2 and 3 up to itself, and the sink tokens
    expected = set(range(16, 30)) | set(range(num_sink_tokens))
    assert visible_positions(model, 29, 48) == expected
    # the first position of a block still sees the whole block before it
    assert visible_positions(model, 24, 48) == set(range(16, 25)) | set(range(num_sink_tokens))


def test_each_layer_widens_the_receptive_field_by_one_window():
    model = build(attention_block_size=8)  # two layers
    assert visible_positions(model, 29, 48) == set(range(8, 30))


def test_mask_function_marks_own_and_previous_block_and_sinks():
    mask = block_local_mask_function(4, num_sink_tokens=1)
    queries = torch.arange(12)[:, None]
    keys = torch.arange(12)[None, :]
    allowed = mask(torch.tensor(0), torch.tensor(0), queries, keys) & (keys <= queries)
    assert allowed[11].nonzero().flatten().tolist() == [0, 4, 5, 6, 7, 8, 9, 10, 11]
    assert allowed[3].nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_incremental_decoding_equals_full_forward_with_blockwise_attention():
    model = build("sdpa", use_attention_gate=True, attention_block_size=6, attention_num_sink_tokens=2)
    input_ids = torch.randint(5, 96, (2, 30))
    with torch.no_grad():
        full = model(input_ids=input_ids).logits
        prefix = model(input_ids=input_ids[:, :17], use_cache=True)
        steps = [prefix.logits]
        cache = prefix.cache
        for position in range(17, 30):
            step = model(input_ids=input_ids[:, position : position + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
            cache = step.cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_packed_sequences_restart_their_blocks():
    model = build(attention_block_size=4, attention_num_sink_tokens=1)
    first, second = torch.randint(5, 96, (1, 9)), torch.randint(5, 96, (1, 11))
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(9), torch.arange(11)])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=position_ids).logits
        alone = model(input_ids=second).logits
    torch.testing.assert_close(together[:, 9:], alone, atol=1e-5, rtol=1e-5)


# blocks of 4 and 2 sink tokens on rows of 19 and 13 tokens: counted over the padded row, the 6 pads of the short
# row would take its sink positions and shift its blocks by 2
PADDED_BLOCK_KWARGS = {"use_attention_gate": True, "attention_block_size": 4, "attention_num_sink_tokens": 2}
PADDED_ROW_LENGTHS = (19, 13)


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` `(len(rows), longest)` of `rows` left-padded with the pad token 0."""
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row) :] = torch.tensor(row)
        attention_mask[index, length - len(row) :] = 1
    return input_ids, attention_mask


def random_rows(lengths: tuple[int, ...]) -> list[list[int]]:
    return [[1] + torch.randint(5, 96, (length - 1,)).tolist() for length in lengths]


@pytest.fixture
def fresh_compilation():
    """Drops the compiled kernels after the test. transformers compiles flex attention once per process with
    automatic dynamic shapes: after three shapes the kernel is rebuilt with symbolic sizes, which torch 2.13's CPU
    inductor then fails to compile for a longer sequence (`CppCompileError`, `cur_kvSplitSize8` not declared)."""
    yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:_compile flag on create_block_mask:DeprecationWarning")
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa", "flex_attention"])
@pytest.mark.usefixtures("fresh_compilation")
def test_a_left_padded_row_gets_the_blocks_and_sinks_of_the_row_alone(attn_implementation):
    model = build(attn_implementation, **PADDED_BLOCK_KWARGS)
    rows = random_rows(PADDED_ROW_LENGTHS)
    input_ids, attention_mask = left_padded(rows)
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask).logits
        for index, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(batched[index, -len(row) :], alone, atol=1e-5, rtol=1e-5)


def test_batched_generate_of_left_padded_rows_equals_each_row_alone():
    # 12 new tokens cross three block boundaries: the offset holds at every decoding step
    model = build("sdpa", **PADDED_BLOCK_KWARGS)
    rows = random_rows(PADDED_ROW_LENGTHS)
    input_ids, attention_mask = left_padded(rows)
    settings = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
    batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
    for index, row in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([row]), **settings)
        assert batched[index, input_ids.shape[1] :].tolist() == alone[0, len(row) :].tolist()


def test_the_serving_engine_gives_the_tokens_of_unpadded_generate_with_blockwise_attention():
    from deepseekv3.serving import Engine, EngineConfig

    model = build("sdpa", **PADDED_BLOCK_KWARGS)
    rows = random_rows((*PADDED_ROW_LENGTHS, 7))
    # the longest prompt finishes first: the engine then drops the padding columns no remaining row needs, and every
    # row's offset changes with them
    max_new_tokens = [5, 12, 9]
    expected = [
        model.generate(input_ids=torch.tensor([row]), max_new_tokens=count, do_sample=False)[0, len(row) :].tolist()
        for row, count in zip(rows, max_new_tokens)
    ]
    engine = Engine(model, EngineConfig(max_batch_size=len(rows)))
    handles = [engine.submit(row, max_new_tokens=count) for row, count in zip(rows, max_new_tokens)]
    with engine:  # queued before the loop starts: prefilled together
        results = [handle.result(timeout=60).token_ids for handle in handles]
    assert engine.stats["prefill_calls"] == 1  # one left-padded prefill, then decoding on the padded cache
    assert results == expected


# transformers 5.24's `flex_attention_mask` passes `_compile=True` to torch's `create_block_mask`, which torch 2.13
# deprecates: the warning is about transformers' call into torch, not about anything this package does.
@pytest.mark.filterwarnings("ignore:_compile flag on create_block_mask:DeprecationWarning")
def test_flex_attention_gives_the_blockwise_result_with_a_sparse_block_mask():
    kwargs = {"use_attention_gate": True, "attention_block_size": 128, "attention_num_sink_tokens": 4}
    eager, flex = build("eager", **kwargs), build("flex_attention", **kwargs)
    input_ids = torch.randint(5, 96, (1, 768))
    with torch.no_grad():
        expected = eager(input_ids=input_ids).logits
        actual = flex(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)

    # the block mask flex attention computes with: per 128-query tile, its own tile, the one before and the sinks'
    block_mask = create_causal_mask(
        config=flex.config,
        inputs_embeds=torch.zeros(1, 768, 1),
        attention_mask=None,
        cache=None,
        position_ids=torch.arange(768)[None],
        and_mask_function=block_local_mask_function(128, 4),
    )
    tiles = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks  # (batch, 1, query tiles)
    assert tiles.flatten().tolist() == [1, 2, 3, 3, 3, 3]  # dense causal: 1, 2, ..., 6 (quadratic)


def test_long_context_fields_are_validated():
    with pytest.raises(ValueError, match=r"attention_block_size \(0\) must be positive"):
        DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, attention_block_size=0)
    with pytest.raises(ValueError, match=r"attention_num_sink_tokens \(-1\) must be non-negative"):
        DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, attention_block_size=4, attention_num_sink_tokens=-1)
    with pytest.raises(ValueError, match=r"attention_num_sink_tokens \(2\) needs attention_block_size set"):
        DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, attention_num_sink_tokens=2)
    model = build(attention_block_size=8)
    model.config._attn_implementation = "flash_attention_2"  # takes no mask: the blocks would be dropped
    with pytest.raises(ValueError, match="attention_block_size needs an attention implementation that takes a mask"):
        model(input_ids=torch.randint(5, 96, (1, 12)))


def test_yarn_scaling_as_in_deepseek_v3_matches_transformers_beyond_the_original_window():
    rope = dict(load_official_config_dict()["rope_scaling"])
    assert rope["type"] == "yarn" and rope["mscale_all_dim"] == 1.0  # DeepSeek-V3's own setting
    # the same YaRN parameters with the original window shrunk to 32 positions, so 96 tokens run 3x past it
    rope_parameters = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": rope["factor"],
        "original_max_position_embeddings": 32,
        "beta_fast": rope["beta_fast"],
        "beta_slow": rope["beta_slow"],
        "mscale": rope["mscale"],
        "mscale_all_dim": rope["mscale_all_dim"],
    }
    yarn_kwargs = {
        **LONG_KWARGS,
        "max_position_embeddings": 32 * int(rope["factor"]),
        "rope_parameters": rope_parameters,
    }
    upstream_config = DeepseekV3Config(**yarn_kwargs, attn_implementation="eager")
    torch.manual_seed(0)
    upstream = DeepseekV3ForCausalLM(upstream_config).eval()
    ours = build(**yarn_kwargs)
    ours.load_state_dict(upstream.state_dict())
    unscaled = build()
    unscaled.load_state_dict(upstream.state_dict())
    assert ours.model.layers[0].self_attn.scaling > unscaled.model.layers[0].self_attn.scaling  # YaRN's mscale
    input_ids = torch.randint(5, 96, (1, 96))
    with torch.no_grad():
        expected = upstream(input_ids=input_ids).logits
        actual = ours(input_ids=input_ids).logits
        plain = unscaled(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert (plain - expected).abs().max() > 1e-4  # the scaling changes the model
