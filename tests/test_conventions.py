"""transformers' model conventions our classes keep as upstream's `DeepseekV3ForCausalLM` keeps them.

Custom 4-D attention masks (transformers' `test_custom_4d_attention_mask`: a prepared mask is used as given), the
initialisation of every weight a checkpoint lacks through `_init_weights` (`test_can_init_all_missing_weights`, and
the same for each weight missing alone), and a processor class small enough to read (its work lives in the media and
layout modules).
"""

import copy
import inspect
from unittest.mock import patch

import pytest
import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from test_modeling import assert_packed_row_equals_its_sequences, build_model, make_gates_vary, multimodal_batch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedModel, set_seed
from transformers.testing_utils import CaptureLogger

from deepseekv3 import (
    DeepseekV3MultimodalConfig,
    DeepseekV3MultimodalForConditionalGeneration,
    DeepseekV3MultimodalModel,
)
from deepseekv3 import modeling_deepseekv3 as modeling
from deepseekv3.processing_deepseekv3 import DeepseekV3MultimodalProcessor

# Every feature that builds a module: images through a conv stem, audio, the attention gate, patch positions in the
# values, modality-type embeddings and projection heads with their temperature.
EVERY_FEATURE_KWARGS = {
    **TINY_TEXT_KWARGS,
    **TINY_MEDIA_KWARGS,
    "use_attention_gate": True,
    "use_image_position_values": True,
    "use_bidirectional_media_attention": True,
    "image_conv_stem_channels": 4,
}


@pytest.fixture
def every_feature_config() -> DeepseekV3MultimodalConfig:
    return DeepseekV3MultimodalConfig(**EVERY_FEATURE_KWARGS)


def _block_causal_mask(lengths: list[int], dtype: torch.dtype) -> torch.Tensor:
    """`(1, 1, total, total)` mask of sequences packed into one row: causal inside each, nothing across. bool: True
    attends; float: transformers' inverted form, 0 attends and the dtype's minimum masks."""
    segment = torch.cat([torch.full((length,), index) for index, length in enumerate(lengths)])
    total = segment.shape[0]
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    if dtype == torch.bool:
        return allowed[None, None]
    return torch.zeros(total, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _text_models(attn_implementation: str) -> tuple[DeepseekV3MultimodalForConditionalGeneration, torch.nn.Module]:
    """Ours (every new feature off) and transformers' `DeepseekV3ForCausalLM`, with the same weights."""
    upstream = DeepseekV3ForCausalLM(
        DeepseekV3Config(**TINY_TEXT_KWARGS, attn_implementation=attn_implementation)
    ).eval()
    ours = build_model(DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS), attn_implementation)
    ours.load_state_dict(upstream.state_dict(), strict=True)
    return ours, upstream


# --- Custom 4-D attention masks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_custom_4d_attention_mask_as_transformers_tests_it(attn_implementation):
    """transformers' `test_custom_4d_attention_mask` data: three sequences that share their first three tokens, run
    as a batch, and as one row of the shared prefix and the three last tokens, which see the prefix but not each
    other (inverted float mask, repeated position ids)."""
    input_ids = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 14], [10, 11, 12, 15]])
    position_ids = torch.tensor([[0, 1, 2, 3]] * 3)
    shared_ids = torch.cat([input_ids[0, :-1], input_ids[:, -1]]).unsqueeze(0)
    visible = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 1, 0],
            [1, 1, 1, 0, 0, 1],
        ]
    )[None, None]
    shared_mask = visible.eq(0).float() * torch.finfo(torch.float32).min
    shared_positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    ours, upstream = _text_models(attn_implementation)
    with torch.no_grad():
        for model in (ours, upstream):
            last_tokens = model(input_ids, position_ids=position_ids).logits[:, -1]
            shared = model(shared_ids, attention_mask=shared_mask, position_ids=shared_positions).logits[0, -3:]
            torch.testing.assert_close(shared, last_tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours(shared_ids, attention_mask=shared_mask, position_ids=shared_positions).logits,
            upstream(shared_ids, attention_mask=shared_mask, position_ids=shared_positions).logits,
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize(
    "attn_implementation, mask_dtype",
    [("eager", torch.float32), ("sdpa", torch.float32), ("sdpa", torch.bool), ("eager", torch.bool)],
)
def test_packed_row_with_a_4d_mask_equals_separate_runs_as_upstream(attn_implementation, mask_dtype):
    """Three sequences packed into one row with a block-diagonal causal 4-D mask and restarting position ids give
    the logits of the three run alone, in ours as in upstream, and ours equal upstream's whatever the mask.

    Upstream's eager attention adds the mask to the scores, so it reads a bool mask as numbers (True adds 1, nothing
    is masked): there ours computes what upstream computes, and neither equals the separate runs."""
    ours, upstream = _text_models(attn_implementation)
    lengths = [5, 7, 4]
    sequences = [torch.randint(5, 96, (1, length)) for length in lengths]
    packed = {
        "input_ids": torch.cat(sequences, dim=1),
        "attention_mask": _block_causal_mask(lengths, mask_dtype),
        "position_ids": torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0),
    }
    with torch.no_grad():
        ours_packed, upstream_packed = ours(**packed).logits, upstream(**packed).logits
        ours_alone = torch.cat([ours(input_ids=ids).logits for ids in sequences], dim=1)
        upstream_alone = torch.cat([upstream(input_ids=ids).logits for ids in sequences], dim=1)
    torch.testing.assert_close(ours_packed, upstream_packed, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_alone, upstream_alone, atol=1e-5, rtol=0)
    reads_the_mask = not (attn_implementation == "eager" and mask_dtype == torch.bool)
    assert torch.allclose(ours_packed, ours_alone, atol=1e-5, rtol=0) == reads_the_mask


@pytest.mark.parametrize("attn_implementation, mask_dtype", [("eager", torch.float32), ("sdpa", torch.bool)])
def test_a_4d_mask_keeps_media_spans_bidirectional_and_the_gate_per_sequence(
    every_feature_config, attn_implementation, mask_dtype
):
    """With the head gate, patch positions in the values and bidirectional media attention on, a packed row of
    multimodal sequences under a block-diagonal 4-D mask equals the sequences run alone: each image and clip still
    attends to itself both ways, and each gate averages over its own sequence only."""
    model = build_model(every_feature_config, attn_implementation)
    make_gates_vary(model)
    assert_packed_row_equals_its_sequences(model, lambda lengths: _block_causal_mask(lengths, mask_dtype))


def test_incremental_decoding_with_4d_masks_equals_the_full_forward(every_feature_config):
    """A prompt with an image and a clip prefilled under a causal 4-D mask, then decoded token by token with a 4-D
    mask over the cache, gives the full forward's logits (gate, patch positions and media spans included)."""
    model = build_model(every_feature_config, "eager")
    make_gates_vary(model)
    batch = multimodal_batch(batch_size=1)
    input_ids = batch["input_ids"]
    length, prefix = input_ids.shape[1], input_ids.shape[1] - 4
    with torch.no_grad():
        full = model(**batch).logits
        out = model(
            **dict(batch, input_ids=input_ids[:, :prefix]), attention_mask=_block_causal_mask([prefix], torch.float32)
        )
        steps, cache = [out.logits], out.cache
        for position in range(prefix, length):
            out = model(
                input_ids=input_ids[:, position : position + 1],
                attention_mask=torch.zeros(1, 1, 1, position + 1),
                position_ids=torch.tensor([[position]]),
                cache=cache,
            )
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_a_4d_mask_is_used_as_given_with_blockwise_attention_and_a_warning():
    """`attention_block_size` builds its local window into the mask it prepares; a prepared 4-D mask is used as
    given (as upstream's `create_causal_mask` passes it on), and the model says once that the window is not added."""
    config = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, attention_block_size=4)
    model = build_model(config)
    input_ids = torch.randint(5, 96, (1, 16))
    causal = _block_causal_mask([16], torch.float32)
    with torch.no_grad():
        windowed = model(input_ids=input_ids).logits
        with CaptureLogger(modeling.logger) as captured:
            given = model(input_ids=input_ids, attention_mask=causal).logits
        config.attention_block_size = None
        full_causal = model(input_ids=input_ids).logits
    assert "attention_block_size's local window is not added" in captured.out
    torch.testing.assert_close(given, full_causal, atol=1e-6, rtol=0)
    assert (windowed - full_causal).abs().max() > 1e-4  # the window matters at this length


@pytest.mark.filterwarnings("ignore:_compile flag on create_block_mask:DeprecationWarning")
def test_a_flex_attention_block_mask_is_used_as_given_as_upstream():
    """A `BlockMask` (the prepared mask of flex attention) passes through as upstream passes it; the head gate, which
    must know the keys each position sees, refuses it by name instead of averaging over the wrong ones."""
    from torch.nn.attention.flex_attention import create_block_mask

    ours, upstream = _text_models("flex_attention")
    input_ids = torch.randint(5, 96, (1, 16))
    block_mask = create_block_mask(lambda batch, head, q_idx, kv_idx: q_idx >= kv_idx, 1, None, 16, 16, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=input_ids, attention_mask=block_mask).logits,
            upstream(input_ids=input_ids, attention_mask=block_mask).logits,
            atol=1e-5,
            rtol=0,
        )
        gated = build_model(DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, use_attention_gate=True), "flex_attention")
        with pytest.raises(ValueError, match="use_attention_gate needs the attention mask as a tensor"):
            gated(input_ids=input_ids, attention_mask=block_mask)


def test_open_media_spans_is_the_overlay_create_causal_mask_adds(every_feature_config):
    """On a causal 4-D mask, `open_media_spans` gives the mask `create_causal_mask` builds from the media spans."""
    model = build_model(every_feature_config, "sdpa")
    batch = multimodal_batch(batch_size=2)
    inputs_embeds, block_sequence_ids = model.model.embed_inputs(
        batch["input_ids"], None, batch["pixel_values"], batch["input_features"]
    )
    length = inputs_embeds.shape[1]
    position_ids = torch.arange(length).unsqueeze(0)
    built = model.model._block_mask(inputs_embeds, None, None, position_ids, block_sequence_ids)
    causal = _block_causal_mask([length], torch.bool).expand(2, -1, -1, -1)
    assert torch.equal(modeling.open_media_spans(causal, block_sequence_ids), built.expand(2, -1, -1, -1))


# --- Initialising missing weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [DeepseekV3MultimodalForConditionalGeneration, DeepseekV3MultimodalModel])
def test_can_init_all_missing_weights_as_transformers_tests_it(model_class):
    """transformers' `test_can_init_all_missing_weights`: with the same seed before each module's initialisation, a
    model built from its config and one loaded from an empty state dict (every tensor on the meta device, then
    initialised by `_init_weights` alone) are identical."""
    config = DeepseekV3MultimodalConfig(**EVERY_FEATURE_KWARGS)
    initialize_weights = PreTrainedModel._initialize_weights

    def seeded_initialize_weights(self, module, is_custom_code=False):
        set_seed(0)
        initialize_weights(self, module, is_custom_code)

    with patch.object(PreTrainedModel, "_initialize_weights", seeded_initialize_weights):
        from_config = model_class(copy.deepcopy(config))
        from_nothing = model_class.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    assert list(from_config.state_dict()) == list(from_nothing.state_dict())
    buffers = {name for name, _ in from_config.named_buffers()}
    different = {
        name
        for (name, expected), actual in zip(from_config.state_dict().items(), from_nothing.state_dict().values())
        if name not in buffers and not torch.equal(expected, actual)
    }
    assert different == set(), f"not initialised by _init_weights: {sorted(different)}"


def test_each_missing_weight_is_initialised_by_init_weights(monkeypatch):
    """Every tensor of a checkpoint, left out alone, is initialised on load as a fresh model initialises it: exactly
    for a constant initialisation (zeros, ones, the gate bias, `logit_scale`), at the fresh tensor's scale for a
    random one (std 0.02 for most, fan-in scaled for the image stem), while the others load unchanged.

    Missing tensors are allocated filled with NaN, so one that `_init_weights` never writes cannot pass by the luck
    of zeroed memory."""
    config = DeepseekV3MultimodalConfig(**EVERY_FEATURE_KWARGS)
    fresh = DeepseekV3MultimodalForConditionalGeneration(copy.deepcopy(config))
    saved = {name: tensor.clone() for name, tensor in fresh.state_dict().items()}
    empty_like = torch.empty_like

    def nan_filled_empty_like(*args, **kwargs):
        tensor = empty_like(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty_like", nan_filled_empty_like)
    problems = []
    for missing in saved:
        state_dict = {name: tensor for name, tensor in saved.items() if name != missing}
        loaded = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(
            None, config=copy.deepcopy(config), state_dict=state_dict
        ).state_dict()
        expected, actual = saved[missing], loaded[missing]
        if not all(torch.equal(loaded[name], tensor) for name, tensor in state_dict.items()):
            problems.append(f"{missing}: leaving it out changed a loaded tensor")
        elif not torch.isfinite(actual).all():
            problems.append(f"{missing}: not written by _init_weights")
        elif expected.numel() > 1 and bool((expected == expected.flatten()[0]).all()):
            if not torch.equal(actual, expected):
                problems.append(
                    f"{missing}: {actual.flatten()[:4].tolist()} where a fresh model has {expected.flatten()[0]}"
                )
        elif expected.numel() == 1:
            if not torch.equal(actual, expected):
                problems.append(f"{missing}: {actual.item()} where a fresh model has {expected.item()}")
        elif not 0.5 < float(actual.float().std() / expected.float().std()) < 2.0:
            problems.append(
                f"{missing}: std {actual.float().std():.4f} where a fresh model has {expected.float().std():.4f}"
            )
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("contrastive_projection_dim", [16, None])
def test_media_modules_are_initialised_as_documented_with_or_without_projection_heads(contrastive_projection_dim):
    """The modality-type embedding starts at zero (a text model with it switched on starts with unchanged logits)
    and the image stem at He's fan-in scale, whether or not the model has projection heads (and so a parameter of
    its own that transformers could otherwise take as a reason to initialise its children)."""
    kwargs = {**EVERY_FEATURE_KWARGS, "image_conv_stem_channels": 16}
    kwargs["contrastive_projection_dim"] = contrastive_projection_dim
    model = DeepseekV3MultimodalForConditionalGeneration(DeepseekV3MultimodalConfig(**kwargs))
    assert torch.equal(model.model.modality_type_embedding.weight, torch.zeros(3, 32))
    for conv in (model.model.image_stem[0], model.model.image_stem[2]):
        fan_in = conv.weight[0].numel()
        assert abs(float(conv.weight.detach().std()) / (2.0 / fan_in) ** 0.5 - 1.0) < 0.2
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))


# --- The processor -----------------------------------------------------------------------------------------------


def test_processor_class_fits_on_a_few_screens():
    """The processor class wires transformers' pipeline to the media and layout functions; it stays at most 250
    lines, docstrings included."""
    lines, _ = inspect.getsourcelines(DeepseekV3MultimodalProcessor)
    assert len(lines) <= 250, f"DeepseekV3MultimodalProcessor is {len(lines)} lines"
