"""The model: parity with transformers' DeepSeek-V3, causality, cache, generate, features, precision, bad input."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from safetensors import safe_open
from test_configuration import load_official_config_dict
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPooling

from deepseekv3 import (
    DeepseekV3MultimodalConfig,
    DeepseekV3MultimodalForConditionalGeneration,
    DeepseekV3MultimodalModel,
)
from deepseekv3.modeling_deepseekv3 import attention_distillation_loss, contrastive_loss

IMAGE_TOKEN, AUDIO_TOKEN = TINY_MEDIA_KWARGS["image_token_id"], TINY_MEDIA_KWARGS["audio_token_id"]
NUM_IMAGE_TOKENS = (TINY_MEDIA_KWARGS["image_size"] // TINY_MEDIA_KWARGS["patch_size"]) ** 2
AUDIO_FRAMES = 12  # 6 audio tokens at stride 2

# Every tensor of `tiny_config` with every feature on (and a 4-channel conv stem): the names and shapes are the
# checkpoint format, so a change may add a new feature's keys but never rename, reshape or drop one of these.
EXPECTED_STATE_DICT_SHAPES = {
    "lm_head.weight": (96, 32),
    "model.audio_frame_embedding.bias": (32,),
    "model.audio_frame_embedding.weight": (32, 8, 2),
    "model.audio_projection.weight": (16, 32),
    "model.embed_tokens.weight": (96, 32),
    "model.image_patch_embedding.bias": (32,),
    "model.image_patch_embedding.weight": (32, 4, 8, 8),
    "model.image_position_embedding.weight": (16, 32),
    "model.image_projection.weight": (16, 32),
    "model.image_stem.0.bias": (4,),
    "model.image_stem.0.weight": (4, 3, 3, 3),
    "model.image_stem.2.bias": (4,),
    "model.image_stem.2.weight": (4, 4, 3, 3),
    "model.layers.0.input_layernorm.weight": (32,),
    "model.layers.0.mlp.down_proj.weight": (32, 64),
    "model.layers.0.mlp.gate_proj.weight": (64, 32),
    "model.layers.0.mlp.up_proj.weight": (64, 32),
    "model.layers.0.post_attention_layernorm.weight": (32,),
    "model.layers.0.self_attn.head_gate.down_proj.bias": (2,),
    "model.layers.0.self_attn.head_gate.down_proj.weight": (2, 16),
    "model.layers.0.self_attn.head_gate.up_proj.bias": (4,),
    "model.layers.0.self_attn.head_gate.up_proj.weight": (4, 2),
    "model.layers.0.self_attn.kv_a_layernorm.weight": (16,),
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (24, 32),
    "model.layers.0.self_attn.kv_b_proj.weight": (64, 16),
    "model.layers.0.self_attn.o_proj.weight": (32, 32),
    "model.layers.0.self_attn.q_a_layernorm.weight": (16,),
    "model.layers.0.self_attn.q_a_proj.weight": (16, 32),
    "model.layers.0.self_attn.q_b_proj.weight": (64, 16),
    "model.layers.1.input_layernorm.weight": (32,),
    "model.layers.1.mlp.experts.down_proj": (8, 32, 16),
    "model.layers.1.mlp.experts.gate_up_proj": (8, 32, 32),
    "model.layers.1.mlp.gate.e_score_correction_bias": (8,),
    "model.layers.1.mlp.gate.weight": (8, 32),
    "model.layers.1.mlp.shared_experts.down_proj.weight": (32, 16),
    "model.layers.1.mlp.shared_experts.gate_proj.weight": (16, 32),
    "model.layers.1.mlp.shared_experts.up_proj.weight": (16, 32),
    "model.layers.1.post_attention_layernorm.weight": (32,),
    "model.layers.1.self_attn.head_gate.down_proj.bias": (2,),
    "model.layers.1.self_attn.head_gate.down_proj.weight": (2, 16),
    "model.layers.1.self_attn.head_gate.up_proj.bias": (4,),
    "model.layers.1.self_attn.head_gate.up_proj.weight": (4, 2),
    "model.layers.1.self_attn.kv_a_layernorm.weight": (16,),
    "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": (24, 32),
    "model.layers.1.self_attn.kv_b_proj.weight": (64, 16),
    "model.layers.1.self_attn.o_proj.weight": (32, 32),
    "model.layers.1.self_attn.q_a_layernorm.weight": (16,),
    "model.layers.1.self_attn.q_a_proj.weight": (16, 32),
    "model.layers.1.self_attn.q_b_proj.weight": (64, 16),
    "model.logit_scale": (),
    "model.modality_type_embedding.weight": (3, 32),
    "model.norm.weight": (32,),
    "model.text_projection.weight": (16, 32),
}


def build_model(config: DeepseekV3MultimodalConfig, attn_implementation: str = "eager"):
    config._attn_implementation = attn_implementation
    return DeepseekV3MultimodalForConditionalGeneration(config).eval()


def multimodal_batch(batch_size: int = 2, text_before: int = 3, text_after: int = 6) -> dict:
    """Per row: text, one image, text, one audio clip, text. Ids >= 5 are text (0-4 are special)."""
    rows = []
    for _ in range(batch_size):
        row = (
            torch.randint(5, 96, (text_before,)).tolist()
            + [IMAGE_TOKEN] * NUM_IMAGE_TOKENS
            + torch.randint(5, 96, (2,)).tolist()
            + [AUDIO_TOKEN] * (AUDIO_FRAMES // 2)
            + torch.randint(5, 96, (text_after,)).tolist()
        )
        rows.append(row)
    return {
        "input_ids": torch.tensor(rows),
        "pixel_values": torch.randn(batch_size, 3, 16, 16),
        "input_features": torch.randn(batch_size, 8, AUDIO_FRAMES),
    }


@pytest.fixture
def media_config(tiny_config) -> DeepseekV3MultimodalConfig:
    tiny_config.use_bidirectional_media_attention = True
    return tiny_config


def make_gates_vary(model) -> None:
    """The gate starts at a constant; random last-layer weights make it depend on the input, as after training."""
    for name, param in model.named_parameters():
        if "head_gate.up_proj" in name:
            torch.nn.init.normal_(param, std=2.0)


# --- Invariant 1: parity with transformers' DeepseekV3ForCausalLM ------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}])
def test_gate_off_matches_transformers_logits_both_directions(tiny_text_config, attn_implementation, rope, tmp_path):
    upstream_config = DeepseekV3Config(
        **TINY_TEXT_KWARGS, rope_parameters=rope, attn_implementation=attn_implementation
    )
    upstream = DeepseekV3ForCausalLM(upstream_config).eval()
    ours_config = DeepseekV3MultimodalConfig.from_text_config(upstream_config)
    ours = build_model(ours_config, attn_implementation)
    ours.load_state_dict(upstream.state_dict(), strict=True)
    input_ids = torch.randint(0, 96, (2, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # left padding
    with torch.no_grad():
        expected = upstream(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (actual - expected).abs().max() <= 1e-5

    # the other direction, through files on disk: our checkpoint into transformers' class
    ours.save_pretrained(tmp_path / "ours")
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", config=upstream_config).eval()
    with torch.no_grad():
        back = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (back - expected).abs().max() <= 1e-5


def test_upstream_test_config_routing_past_the_chosen_groups_loads_and_matches_transformers():
    """transformers' own DeepSeek-V3 test config routes each token to 8 experts while its 1 chosen group of 2 holds 4:
    upstream's router then takes the other 4 from the masked group. Ours loads it (with a warning) and computes the
    same logits."""
    from transformers.testing_utils import CaptureLogger

    import deepseekv3.configuration_deepseekv3 as configuration

    # the values of transformers' DeepseekV3ModelTester.get_config (tests/models/deepseek_v3)
    upstream_config = DeepseekV3Config(
        vocab_size=99, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, n_group=2, topk_group=1, num_experts_per_tok=8, first_k_dense_replace=1,
        norm_topk_prob=True, aux_loss_alpha=0.001, hidden_act="silu", max_position_embeddings=512,
        initializer_range=0.02, use_cache=True, pad_token_id=0, attention_dropout=0.0,
    )  # fmt: skip
    upstream = DeepseekV3ForCausalLM(upstream_config).eval()
    with CaptureLogger(configuration.logger) as captured:
        ours_config = DeepseekV3MultimodalConfig.from_text_config(upstream_config)
    assert "num_experts_per_tok (8) is more than the 4 experts" in captured.out
    ours = build_model(ours_config, "eager")
    ours.load_state_dict(upstream.state_dict(), strict=True)
    input_ids = torch.randint(0, 99, (2, 24))
    with torch.no_grad():
        expected = upstream(input_ids=input_ids).logits
        actual = ours(input_ids=input_ids).logits
    assert (actual - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
def test_experts_kernels_are_selectable_as_upstream(tiny_text_config, experts_implementation):
    upstream = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_TEXT_KWARGS)).eval()
    assert DeepseekV3MultimodalForConditionalGeneration(tiny_text_config).config._experts_implementation == (
        upstream.config._experts_implementation
    )
    ours = build_model(tiny_text_config)
    ours.load_state_dict(upstream.state_dict())
    ours.set_experts_implementation(experts_implementation)
    assert ours.config._experts_implementation == experts_implementation
    input_ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, upstream(input_ids=input_ids).logits)


def test_transformers_checkpoint_loads_with_no_missing_or_unexpected_keys(tmp_path):
    upstream = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_TEXT_KWARGS))
    upstream.save_pretrained(tmp_path)
    _, info = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(
        tmp_path, config=DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


# --- The official 671B configuration on the meta device --------------------------------------------------------


def count_parameters(model: torch.nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def test_official_config_parameter_count_matches_transformers_plus_new_parts():
    official = load_official_config_dict()
    with torch.device("meta"):
        upstream_count = count_parameters(DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(official)))
        plain = DeepseekV3MultimodalConfig.from_dict(official)
        plain_count = count_parameters(DeepseekV3MultimodalForConditionalGeneration(plain))
        extended = DeepseekV3MultimodalConfig.from_dict(
            {
                **official,
                "use_attention_gate": True,
                "use_image_input": True,
                "image_token_id": 128000,
                "use_audio_input": True,
                "audio_token_id": 128001,
                "num_modality_types": 3,
                "contrastive_projection_dim": 1024,
            }
        )
        extended_count = count_parameters(DeepseekV3MultimodalForConditionalGeneration(extended))
    assert upstream_count == plain_count == 671_026_404_352

    hidden, heads, gate_width = 7168, 128, 7168 // 16
    gate = (512 * gate_width + gate_width) + (gate_width * heads + heads)
    image = 3 * hidden * 16 * 16 + hidden + (224 // 16) ** 2 * hidden  # patch conv + a position per patch
    audio = 80 * hidden * 4 + hidden
    modality_types = 3 * hidden
    projections = 3 * hidden * 1024 + 1  # text, image and audio heads + logit_scale
    assert extended_count - plain_count == 61 * gate + image + audio + modality_types + projections


# --- Invariant 2: causality ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_future_tokens_never_change_past_logits(media_config, attn_implementation):
    model = build_model(media_config, attn_implementation)
    make_gates_vary(model)
    batch = multimodal_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    length = batch["input_ids"].shape[1]
    for position in (length - 1, length - 4, length - 6):  # text positions after the media
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][:, position:] = torch.randint(5, 96, changed["input_ids"][:, position:].shape)
        with torch.no_grad():
            logits = model(**changed).logits
        torch.testing.assert_close(logits[:, :position], reference[:, :position], atol=1e-6, rtol=0)
        assert (logits[:, position:] - reference[:, position:]).abs().max() > 1e-4


def test_bidirectional_media_attention_sees_the_whole_span_only_when_on(tiny_config):
    batch = multimodal_batch(batch_size=1)
    first_image_position = 3
    for bidirectional in (False, True):
        tiny_config.use_bidirectional_media_attention = bidirectional
        model = build_model(tiny_config)
        changed_pixels = batch["pixel_values"].clone()
        changed_pixels[..., -4:, -4:] += 1.0  # only the last patch changes
        with torch.no_grad():
            hidden = model.model(**batch).last_hidden_state
            changed = model.model(**dict(batch, pixel_values=changed_pixels)).last_hidden_state
        first_patch_moved = (hidden[0, first_image_position] - changed[0, first_image_position]).abs().max() > 1e-5
        assert bool(first_patch_moved) == bidirectional
        torch.testing.assert_close(hidden[0, :first_image_position], changed[0, :first_image_position])


# --- Invariant 3: cache ----------------------------------------------------------------------------------------


def test_incremental_decoding_equals_full_forward_with_gates_and_media(media_config):
    model = build_model(media_config, "sdpa")
    make_gates_vary(model)
    batch = multimodal_batch()
    input_ids = batch["input_ids"]
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding in row 1
    with torch.no_grad():
        full = model(**batch, attention_mask=attention_mask).logits
        prefix = input_ids.shape[1] - 5
        out = model(**dict(batch, input_ids=input_ids[:, :prefix]), attention_mask=attention_mask[:, :prefix])
        steps = [out.logits]
        cache = out.cache
        for position in range(prefix, input_ids.shape[1]):
            out = model(
                input_ids=input_ids[:, position : position + 1],
                attention_mask=attention_mask[:, : position + 1],
                cache=cache,
            )
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    valid = attention_mask.bool()
    torch.testing.assert_close(incremental[valid], full[valid], atol=1e-5, rtol=1e-5)


def test_past_key_values_is_accepted_for_cache_as_upstream(tiny_config):
    """transformers 5's backward-compatible name: `past_key_values=` is `cache=` (with its deprecation warning), for
    the base model and the LM, as upstream's DeepSeek-V3 takes it."""
    model = build_model(tiny_config, "sdpa")
    make_gates_vary(model)
    input_ids = torch.randint(5, 96, (2, 10))
    with torch.no_grad():
        full = model(input_ids=input_ids).logits[:, -1]
        for module in (model, model.model):
            prefix = module(input_ids=input_ids[:, :-1], use_cache=True)
            with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
                step = module(input_ids=input_ids[:, -1:], past_key_values=prefix.cache, use_cache=True)
            assert step.cache is prefix.cache and step.cache.get_seq_length() == 10
            if module is model:
                torch.testing.assert_close(step.logits[:, -1], full, atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_a_rows_logits(tiny_config):
    model = build_model(tiny_config, "sdpa")
    make_gates_vary(model)
    input_ids = torch.randint(5, 96, (1, 12))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), input_ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=input_ids).logits
        with_padding = model(input_ids=padded, attention_mask=mask).logits[:, 4:]
    torch.testing.assert_close(with_padding, alone, atol=1e-5, rtol=1e-5)


def test_greedy_generate_equals_step_by_step_argmax(media_config):
    model = build_model(media_config, "sdpa")
    make_gates_vary(model)
    batch = multimodal_batch(batch_size=1)
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)

    sequence = batch["input_ids"]
    with torch.no_grad():
        for _ in range(6):
            logits = model(**dict(batch, input_ids=sequence), use_cache=False).logits[:, -1]
            logits[:, [IMAGE_TOKEN, AUDIO_TOKEN]] = float("-inf")  # suppressed in generation_config
            sequence = torch.cat([sequence, logits.argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


# --- Invariant 5: packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_row_equals_its_sequences_one_by_one(media_config, attn_implementation):
    model = build_model(media_config, attn_implementation)
    make_gates_vary(model)
    assert_packed_row_equals_its_sequences(model)


def assert_packed_row_equals_its_sequences(model, mask_of_lengths=None) -> None:
    """A row packing a text-only sequence between two with an image and a clip (positions restarting at each) gives
    the logits of each sequence run alone. `mask_of_lengths(lengths)`, if given, is the packed row's attention mask."""
    first = multimodal_batch(batch_size=1)
    second_ids = torch.randint(5, 96, (1, 9))
    third = multimodal_batch(batch_size=1, text_before=1, text_after=2)
    lengths = [first["input_ids"].shape[1], second_ids.shape[1], third["input_ids"].shape[1]]
    packed = {
        "input_ids": torch.cat([first["input_ids"], second_ids, third["input_ids"]], dim=1),
        "position_ids": torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0),
        "pixel_values": torch.cat([first["pixel_values"], third["pixel_values"]]),
        "input_features": torch.cat([first["input_features"], third["input_features"]]),
    }
    if mask_of_lengths is not None:
        packed["attention_mask"] = mask_of_lengths(lengths)
    with torch.no_grad():
        packed_logits = model(**packed).logits
        alone = [model(**first).logits, model(input_ids=second_ids).logits, model(**third).logits]
    torch.testing.assert_close(packed_logits, torch.cat(alone, dim=1), atol=1e-5, rtol=1e-5)


# --- Save / load -----------------------------------------------------------------------------------------------


def test_save_and_reload_through_auto_classes(tiny_config, tmp_path):
    model = build_model(tiny_config)
    make_gates_vary(model)
    batch = multimodal_batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "modeling_deepseekv3.py").exists() and (tmp_path / "configuration_deepseekv3.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is DeepseekV3MultimodalForConditionalGeneration
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is DeepseekV3MultimodalModel
    torch.testing.assert_close(base.embed_tokens.weight, model.model.embed_tokens.weight)


def all_features_config(tiny_config) -> DeepseekV3MultimodalConfig:
    return DeepseekV3MultimodalConfig(**{**tiny_config.to_dict(), "image_conv_stem_channels": 4})


def test_state_dict_keys_and_shapes_are_the_checkpoint_format(tiny_config):
    model = build_model(all_features_config(tiny_config))
    assert {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()} == EXPECTED_STATE_DICT_SHAPES


def test_saved_checkpoint_stores_experts_one_by_one_as_upstream(tiny_config, tmp_path):
    """On disk every routed expert has its own `gate_proj` / `up_proj` / `down_proj` (the official DeepSeek-V3
    layout, which transformers fuses on load); every other tensor is saved under its state-dict name."""
    build_model(all_features_config(tiny_config)).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        saved_shapes = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
    expected = {name: shape for name, shape in EXPECTED_STATE_DICT_SHAPES.items() if ".mlp.experts." not in name}
    for name, shape in EXPECTED_STATE_DICT_SHAPES.items():
        if name.endswith(".mlp.experts.down_proj"):
            prefix, (num_experts, hidden, intermediate) = name.removesuffix("down_proj"), shape
            for expert in range(num_experts):
                expected[f"{prefix}{expert}.gate_proj.weight"] = (intermediate, hidden)
                expected[f"{prefix}{expert}.up_proj.weight"] = (intermediate, hidden)
                expected[f"{prefix}{expert}.down_proj.weight"] = (hidden, intermediate)
    assert saved_shapes == expected


PLAN_CONFIGS = {
    "text": {},
    "every_feature": {**TINY_MEDIA_KWARGS, "use_attention_gate": True, "use_image_position_values": True},
    "dense_no_q_lora": {"first_k_dense_replace": 2, "q_lora_rank": None},
}


def generic_names(model: torch.nn.Module) -> set[str]:
    """Module and parameter names with layer indices as `*`, the form of the parallel plans."""
    names = [name for name, _ in [*model.named_modules(), *model.named_parameters()]]
    return {".".join("*" if part.isdigit() else part for part in name.split(".")) for name in names}


@pytest.mark.parametrize("features", PLAN_CONFIGS)
def test_tensor_parallel_plan_names_only_built_modules(features):
    """Every entry of the parallel plans names a module or parameter the config builds, for features on and off;
    upstream's plans for the LM head (tensor, pipeline, FSDP) are kept."""
    config = DeepseekV3MultimodalConfig(**{**TINY_TEXT_KWARGS, **PLAN_CONFIGS[features]})
    model = build_model(config)
    for module in (model, model.model):
        built = generic_names(module)
        assert module.tp_plan and module.pp_plan
        for plan in (module.tp_plan, module.ep_plan, module.pp_plan, module.fsdp_plan):
            assert set(plan) <= built, sorted(set(plan) - built)
    plan = model.tp_plan
    assert DeepseekV3ForCausalLM._tp_plan.items() <= plan.items()
    assert DeepseekV3ForCausalLM._pp_plan.items() <= model.pp_plan.items()
    assert DeepseekV3ForCausalLM._fsdp_plan.items() <= model.fsdp_plan.items()
    optional = ("model.layers.*.self_attn.head_gate.up_proj", "model.text_projection", "model.image_projection")
    assert all((name in plan) == (features == "every_feature") for name in optional)
    assert ("model.layers.*.mlp.experts" in plan) == (features != "dense_no_q_lora")
    assert ("model.layers.*.self_attn.q_proj" in plan) == (features == "dense_no_q_lora")


# --- Training machinery ----------------------------------------------------------------------------------------


def gradients(model, batch) -> dict:
    model.zero_grad()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_gradient_checkpointing_gives_identical_gradients(media_config):
    model = build_model(media_config).train()
    batch = multimodal_batch()
    plain = gradients(model, batch)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed = gradients(model, batch)
    assert plain.keys() == checkpointed.keys() and any("head_gate" in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_loss_is_shifted_cross_entropy(tiny_config):
    model = build_model(tiny_config)
    batch = multimodal_batch()
    labels = batch["input_ids"].clone()
    labels[:, :3] = -100
    out = model(**batch, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


def test_bfloat16_load_keeps_sensitive_modules_in_float32(tiny_config, tmp_path):
    build_model(tiny_config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    sensitive = ("norm.weight", "mlp.gate.weight", "e_score_correction_bias", "head_gate", "modality_type_embedding")
    seen = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "rotary_emb" in name:
            continue
        keep = next((pattern for pattern in sensitive if pattern in name), None)
        seen.add(keep)
        assert tensor.dtype == (torch.float32 if keep else torch.bfloat16), name
    assert seen >= set(sensitive)
    out = model(**multimodal_batch())  # mixed fp32/bf16 modules run without autocast
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def is_kept_in_fp32(name: str, modules: set[str]) -> bool:
    """transformers' own test of the lists (`test_keep_in_fp32_modules`): an entry names whole dotted components."""
    return any(re.search(rf"(?:^|\.){module}(?:\.|$)", name) for module in modules)


@pytest.mark.parametrize("features", PLAN_CONFIGS)
def test_fp32_module_lists_name_only_built_modules_and_hold_in_init(features):
    config = DeepseekV3MultimodalConfig(**{**TINY_TEXT_KWARGS, **PLAN_CONFIGS[features]})
    torch.set_default_dtype(torch.bfloat16)  # the fixture restores float32
    model = DeepseekV3MultimodalForConditionalGeneration(config)
    strict = model._keep_in_fp32_modules_strict
    assert not model._keep_in_fp32_modules & strict
    assert strict == model.model._keep_in_fp32_modules_strict
    names = list(model.state_dict())
    for module in strict:
        assert any(is_kept_in_fp32(name, {module}) for name in names), f"{module} names no tensor of the model"
    assert ("head_gate" in strict) == ("modality_type_embedding" in strict) == (features == "every_feature")
    for name, tensor in model.state_dict().items():
        if "rotary_emb" not in name:
            assert tensor.dtype == (torch.float32 if is_kept_in_fp32(name, strict) else torch.bfloat16), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_modules_load_as_transformers_checks_them(tiny_config, tmp_path, dtype):
    """The load keeps in fp32 exactly what the strict list names, read as transformers' common test reads it (whole
    dotted components) and as `from_pretrained` applies it (a pattern search): the two readings agree."""
    build_model(tiny_config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    for name, tensor in model.state_dict().items():
        expected = torch.float32 if is_kept_in_fp32(name, model._keep_in_fp32_modules_strict) else dtype
        assert tensor.dtype == expected, name


# --- Each new config field does what it claims -----------------------------------------------------------------


def test_feature_switches_add_exactly_their_parameters(tiny_text_config, tiny_config):
    plain_keys = set(build_model(tiny_text_config).state_dict())
    new_keys = set(build_model(tiny_config).state_dict()) - plain_keys
    prefixes = {key.split(".")[1] if key.startswith("model.") else key for key in new_keys}
    assert prefixes == {
        "layers",
        "image_patch_embedding",
        "image_position_embedding",
        "audio_frame_embedding",
        "modality_type_embedding",
        "text_projection",
        "image_projection",
        "audio_projection",
        "logit_scale",
    }
    assert all("self_attn.head_gate." in key for key in new_keys if key.startswith("model.layers."))


def test_a_new_gate_starts_open_at_every_position(tiny_config):
    """Built from its config, every head's gate is sigmoid(4) = 0.982 whatever the input (zero last-layer weights),
    so switching gates on in a pretrained model barely moves its outputs at the start of training."""
    model = build_model(tiny_config)
    out = model(**multimodal_batch(), output_gate_values=True)
    for gate_values in out.gate_values:
        torch.testing.assert_close(gate_values, torch.full_like(gate_values, torch.sigmoid(torch.tensor(4.0)).item()))


def test_attention_gate_values_are_per_head_and_scale_attention(tiny_config):
    model = build_model(tiny_config)
    make_gates_vary(model)
    batch = multimodal_batch()
    out = model(**batch, output_gate_values=True)
    assert len(out.gate_values) == tiny_config.num_hidden_layers
    batch_size, length = batch["input_ids"].shape
    for gate_values in out.gate_values:
        assert gate_values.shape == (batch_size, length, tiny_config.num_attention_heads)
        assert ((gate_values > 0) & (gate_values < 1)).all()
        assert gate_values.std() > 1e-3  # dynamic: differs across positions and heads
    gate = model.model.layers[0].self_attn.head_gate
    assert gate.down_proj.out_features == tiny_config.hidden_size // tiny_config.attention_gate_ratio
    with torch.no_grad():
        gate.up_proj.bias.fill_(-1e4)  # every head of layer 0 closed: its attention contributes nothing
        closed = model(**batch).logits
        model.model.layers[0].self_attn.o_proj.weight.mul_(3.0)
        closed_again = model(**batch).logits
    torch.testing.assert_close(closed, closed_again)


def test_skipped_heads_save_work_and_equal_zeroed_gates(tiny_config):
    model = build_model(tiny_config)
    batch = multimodal_batch()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.head_gate.up_proj.bias.copy_(torch.tensor([-12.0, -12.0, 4.0, 4.0]))
    with FlopCounterMode(display=False) as all_heads:
        with torch.no_grad():
            model(**batch)

    model.config.attention_gate_skip_threshold = 0.01
    with FlopCounterMode(display=False) as skipping:
        with torch.no_grad():
            skipped = model(**batch, output_gate_values=True)
    assert skipping.get_total_flops() < all_heads.get_total_flops()
    assert skipped.gate_values[0][..., :2].max() < 0.01  # the recorded gates still cover every head

    model.config.attention_gate_skip_threshold = 0.0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.head_gate.up_proj.bias[:2] = -1e4  # sigmoid underflows to exactly 0
        zeroed = model(**batch).logits
    torch.testing.assert_close(skipped.logits, zeroed, atol=1e-5, rtol=1e-5)

    model.config.attention_gate_skip_threshold = 0.01
    model.train()  # never skipped while training
    with FlopCounterMode(display=False) as training:
        model(**batch)
    assert training.get_total_flops() == all_heads.get_total_flops()


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_media_features_reach_the_logits(tiny_config, modality):
    model = build_model(tiny_config)
    batch = multimodal_batch()
    key = "pixel_values" if modality == "image" else "input_features"
    changed = dict(batch, **{key: batch[key] + 1.0})
    with torch.no_grad():
        reference, moved = model(**batch).logits, model(**changed).logits
    first_media = 3 if modality == "image" else 3 + NUM_IMAGE_TOKENS + 2
    torch.testing.assert_close(moved[:, :first_media], reference[:, :first_media])
    assert (moved[:, first_media:] - reference[:, first_media:]).abs().max() > 1e-4


def test_image_coordinates_are_each_patchs_row_and_column(tiny_config):
    model = build_model(tiny_config)
    batch = multimodal_batch(batch_size=1)
    coordinates = model.model.get_image_coordinates(batch["input_ids"], torch.zeros(1, 1, 1))
    is_image = batch["input_ids"][0] == IMAGE_TOKEN
    assert not coordinates[0, ~is_image].any()
    grid = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])  # a 4 x 4 patch grid, row-major
    expected = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1).reshape(-1, 2)
    torch.testing.assert_close(coordinates[0, is_image], expected)


def test_position_values_add_the_attended_patch_position_to_each_heads_output(tiny_config):
    """With `use_image_position_values`, each head's output (the input of `o_proj`) gains, in its first two channels,
    the attention-weighted (row, column) of the patches it attends to, and nothing else changes."""
    tiny_config.use_attention_gate = False
    with_values = build_model(tiny_config)
    without = build_model(DeepseekV3MultimodalConfig(**{**tiny_config.to_dict(), "use_image_position_values": False}))
    without.load_state_dict(with_values.state_dict())
    batch = multimodal_batch(batch_size=1)
    head_outputs = {}
    for name, model in (("with", with_values), ("without", without)):
        attention = model.model.layers[0].self_attn
        hook = attention.o_proj.register_forward_pre_hook(
            lambda module, args, name=name: head_outputs.update({name: args[0]})
        )
        with torch.no_grad():
            weights = model.model(**batch, output_attentions=True).attentions[0]  # (1, heads, seq, seq)
        hook.remove()
    coordinates = with_values.model.get_image_coordinates(batch["input_ids"], torch.zeros(1, 1, 1))
    expected_shift = weights[0] @ coordinates[0]  # (heads, seq, 2): attention-weighted patch position
    heads, v_head_dim = tiny_config.num_attention_heads, tiny_config.v_head_dim
    shift = (head_outputs["with"] - head_outputs["without"])[0].view(-1, heads, v_head_dim).transpose(0, 1)
    torch.testing.assert_close(shift[..., :2], expected_shift, atol=1e-5, rtol=1e-5)
    assert shift[..., :2].abs().max() > 0.1
    assert not shift[..., 2:].any()
    text_only = {"input_ids": torch.randint(5, 96, (1, 10))}
    with torch.no_grad():
        torch.testing.assert_close(with_values(**text_only).logits, without(**text_only).logits)


def test_padded_audio_frames_are_ignored(tiny_config):
    model = build_model(tiny_config)
    batch = multimodal_batch(batch_size=1)
    padded_features = torch.cat([batch["input_features"], torch.randn(1, 8, 8)], dim=-1)
    mask = torch.cat([torch.ones(1, AUDIO_FRAMES), torch.zeros(1, 8)], dim=-1)
    with torch.no_grad():
        reference = model(**batch).logits
        padded = model(**dict(batch, input_features=padded_features), input_features_mask=mask).logits
    torch.testing.assert_close(padded, reference)


def test_modality_type_embedding_marks_positions(tiny_config):
    model = build_model(tiny_config)
    batch = multimodal_batch()
    with torch.no_grad():
        reference = model(**batch).logits
        model.model.modality_type_embedding.weight[2].normal_()  # audio rows only
        changed = model(**batch).logits
        explicit = model(**batch, mm_token_type_ids=model.model.get_modality_ids(batch["input_ids"], None)).logits
    first_audio = 3 + NUM_IMAGE_TOKENS + 2
    torch.testing.assert_close(changed[:, :first_audio], reference[:, :first_audio])
    assert (changed[:, first_audio:] - reference[:, first_audio:]).abs().max() > 1e-4
    torch.testing.assert_close(explicit, changed)


def test_contrastive_features(tiny_config):
    model = build_model(tiny_config)
    batch = multimodal_batch()
    assert model.model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
    input_ids = torch.randint(5, 96, (2, 7))
    text = model.get_text_features(input_ids=input_ids).pooler_output
    padded_ids = torch.cat([input_ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([torch.ones(2, 7), torch.zeros(2, 3)], dim=1).long()
    padded = model.get_text_features(input_ids=padded_ids, attention_mask=padded_mask).pooler_output
    torch.testing.assert_close(padded, text, atol=1e-5, rtol=1e-5)
    image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    audio = model.get_audio_features(input_features=batch["input_features"]).pooler_output
    assert text.shape == image.shape == audio.shape == (2, 16)
    assert not torch.allclose(image[0], image[1])


@pytest.mark.parametrize("owner", ["model", "base"])
def test_feature_getters_follow_transformers_multimodal_convention(tiny_config, owner):
    """As transformers 5's multimodal models: keyword inputs, `output_hidden_states` / `output_attentions` /
    `return_dict` honoured, a `BaseModelOutputWithPooling` whose `pooler_output` is the projected feature."""
    model = build_model(tiny_config)
    module = model if owner == "model" else model.model
    batch = multimodal_batch()
    text_ids = torch.randint(5, 96, (2, 7))
    calls = {
        "text": (module.get_text_features, {"input_ids": text_ids}, 7),
        "image": (module.get_image_features, {"pixel_values": batch["pixel_values"]}, NUM_IMAGE_TOKENS),
        "audio": (module.get_audio_features, {"input_features": batch["input_features"]}, AUDIO_FRAMES // 2),
    }
    layers = tiny_config.num_hidden_layers
    for getter, inputs, length in calls.values():
        with torch.no_grad():
            outputs = getter(**inputs, output_hidden_states=True, output_attentions=True)
            as_tuple = getter(**inputs, return_dict=False)
        assert isinstance(outputs, BaseModelOutputWithPooling)
        assert outputs.last_hidden_state.shape == (2, length, tiny_config.hidden_size)
        assert outputs.pooler_output.shape == (2, tiny_config.contrastive_projection_dim)
        assert len(outputs.hidden_states) == layers + 1 and len(outputs.attentions) == layers
        assert outputs.attentions[0].shape == (2, tiny_config.num_attention_heads, length, length)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[1], outputs.pooler_output)
        assert getter(**inputs).hidden_states is None
    model.config.return_dict = False
    assert isinstance(module.get_text_features(input_ids=text_ids), tuple)


def test_text_features_without_projection_heads_are_the_pooled_final_states(tiny_text_config):
    model = build_model(tiny_text_config)
    input_ids = torch.randint(5, 96, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    with torch.no_grad():
        features = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert features.shape == (2, tiny_text_config.hidden_size)
    torch.testing.assert_close(features[0], hidden[0].mean(dim=0))
    torch.testing.assert_close(features[1], hidden[1, :5].mean(dim=0))
    for getter, inputs in (
        (model.get_image_features, {"pixel_values": torch.randn(1, 3, 16, 16)}),
        (model.get_audio_features, {"input_features": torch.randn(1, 8, 12)}),
    ):
        with pytest.raises(ValueError, match=r"needs use_(image|audio)_input=True"):
            getter(**inputs)
    with pytest.raises(ValueError, match="contrastive_projection_dim"):
        model.model.contrastive_loss(input_ids)


# transformers 5.24 passes flex attention's deprecated `_compile` flag itself; that warning is not ours to fix.
@pytest.mark.filterwarnings("ignore:_compile flag on create_block_mask:DeprecationWarning")
@pytest.mark.parametrize("attn_implementation", ["sdpa", "flex_attention"])
def test_attention_backends_agree_with_eager(media_config, attn_implementation):
    batch = multimodal_batch()
    eager = build_model(media_config, "eager")
    make_gates_vary(eager)
    other = build_model(DeepseekV3MultimodalConfig(**media_config.to_dict()), attn_implementation)
    other.load_state_dict(eager.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(**batch).logits, eager(**batch).logits, atol=1e-5, rtol=1e-5)


# --- Bad input: a ValueError that names the numbers ------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tiny_config):
    model = build_model(tiny_config)
    batch = multimodal_batch()
    cases = [
        (dict(batch, pixel_values=batch["pixel_values"][:1]), "32 image placeholder tokens but the 1 image"),
        (dict(batch, pixel_values=torch.randn(2, 3, 8, 8)), r"pixel_values must have shape \(num_images, 3, 16, 16\)"),
        (
            dict(batch, input_features=torch.randn(2, 5, 12)),
            r"input_features must have shape \(num_clips, 8, frames\)",
        ),
        (dict(batch, input_features=torch.randn(2, 8, 40)), "40 frames"),
        (dict(batch, input_features=batch["input_features"][:, :, :10]), "12 audio placeholder tokens but the 2"),
        ({"input_ids": batch["input_ids"]}, "64 image placeholder tokens but no `pixel_values`"[2:]),
        ({"input_ids": batch["input_ids"], "inputs_embeds": torch.randn(2, 4, 32)}, "got both"),
        ({}, "got neither"),
        ({"inputs_embeds": torch.randn(2, 4, 32), "pixel_values": batch["pixel_values"]}, "locate their placeholders"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**inputs)


def test_a_sequence_past_max_position_embeddings_runs_as_upstream_with_a_warning(tiny_text_config):
    from transformers.testing_utils import CaptureLogger

    import deepseekv3.modeling_deepseekv3 as modeling

    upstream = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_TEXT_KWARGS)).eval()
    ours = build_model(tiny_text_config)
    ours.load_state_dict(upstream.state_dict(), strict=True)
    input_ids = torch.randint(5, 96, (1, 129))  # max_position_embeddings is 128
    logger = modeling.logger
    with CaptureLogger(logger) as captured, torch.no_grad():
        actual = ours(input_ids=input_ids).logits
        expected = upstream(input_ids=input_ids).logits
    assert "Sequence length 129 (cached + new tokens) is longer than max_position_embeddings (128)" in captured.out
    assert (actual - expected).abs().max() <= 1e-5


def test_media_for_a_modality_the_config_lacks_is_refused(tiny_text_config):
    model = build_model(tiny_text_config)
    with pytest.raises(ValueError, match="use_image_input=False"):
        model(input_ids=torch.randint(5, 96, (1, 4)), pixel_values=torch.randn(1, 3, 16, 16))


# --- Alignment loss terms --------------------------------------------------------------------------------------


def test_contrastive_loss_is_symmetric_clip_infonce():
    text, media = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(2.0)
    normalized_text, normalized_media = (torch.nn.functional.normalize(x, dim=-1) for x in (text, media))
    logits = scale.exp() * normalized_text @ normalized_media.T
    targets = torch.arange(4)
    expected = (
        torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)
    ) / 2
    torch.testing.assert_close(contrastive_loss(text, media, scale), expected)
    aligned = contrastive_loss(media, media, torch.tensor(4.6))
    assert aligned < 0.05 < contrastive_loss(media.roll(1, dims=0), media, torch.tensor(4.6))


def test_contrastive_batch_returns_only_that_term_and_trains_the_scale(tiny_config):
    model = build_model(tiny_config).train()
    batch = multimodal_batch()
    captions = torch.randint(5, 96, (4, 6))  # two images, then two clips
    out = model(
        pixel_values=batch["pixel_values"], input_features=batch["input_features"], contrastive_input_ids=captions
    )
    assert out.logits is None and out.lm_loss is None
    assert out.loss is out.contrastive_loss and out.loss > 0
    out.loss.backward()
    assert model.model.logit_scale.grad is not None and model.model.text_projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="has 3 texts but there are 4 images and audio clips"):
        model(
            pixel_values=batch["pixel_values"],
            input_features=batch["input_features"],
            contrastive_input_ids=captions[:3],
        )


def test_contrastive_loss_leaves_false_negatives_out():
    text, media = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(2.0)
    is_false_negative = torch.zeros(4, 4, dtype=torch.bool)
    is_false_negative[0, 1] = is_false_negative[1, 0] = True  # pairs 0 and 1 share a caption
    # the same as the loss with those logits removed by hand
    logits = scale.exp() * torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(media, dim=-1).T
    logits = logits.masked_fill(is_false_negative, float("-inf"))
    targets = torch.arange(4)
    expected = (
        torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)
    ) / 2
    torch.testing.assert_close(contrastive_loss(text, media, scale, is_false_negative), expected)
    assert not torch.allclose(contrastive_loss(text, media, scale), expected)


def test_contrastive_batch_masks_identical_captions_and_media(tiny_config):
    """Two pairs with the same caption, or the same image, are not negatives of each other; the loss with those
    duplicates equals the loss where they are masked by hand."""
    model = build_model(tiny_config).train()
    batch = multimodal_batch()
    pixel_values = batch["pixel_values"][[0, 0]]  # the same image twice
    captions = torch.randint(5, 96, (4, 6))
    captions[3] = captions[2]  # the two clips share a caption
    features = {"pixel_values": pixel_values, "input_features": batch["input_features"]}
    loss = model(**features, contrastive_input_ids=captions).contrastive_loss
    text = model.model.get_text_features(input_ids=captions).pooler_output
    media = torch.cat(
        [
            model.model.get_image_features(pixel_values=pixel_values).pooler_output,
            model.model.get_audio_features(input_features=batch["input_features"]).pooler_output,
        ]
    )
    is_false_negative = torch.zeros(4, 4, dtype=torch.bool)
    is_false_negative[0, 1] = is_false_negative[1, 0] = is_false_negative[2, 3] = is_false_negative[3, 2] = True
    torch.testing.assert_close(loss, contrastive_loss(text, media, model.model.logit_scale, is_false_negative))
    assert not torch.allclose(loss, contrastive_loss(text, media, model.model.logit_scale))


def test_contrastive_scale_keeps_its_gradient_above_100():
    """`logit_scale` is used as it is (the trainer clamps the parameter), so above log(100) it still learns."""
    text, media = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(5.0, requires_grad=True)  # exp(5) = 148
    contrastive_loss(text, media, scale).backward()
    assert scale.grad.abs().item() > 0


def distillation_batch():
    batch = multimodal_batch()
    query_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    query_mask[:, -6:] = True  # the trailing question text
    targets = torch.zeros(2, NUM_IMAGE_TOKENS)
    targets[0, :4] = 0.25  # the top row of patches
    targets[1, -2:] = 0.5
    return batch, query_mask, targets


def test_distillation_loss_is_zero_at_the_students_own_attention_and_trains(tiny_config):
    model = build_model(tiny_config).train()
    batch, query_mask, targets = distillation_batch()
    out = model(**batch, labels=batch["input_ids"], distillation_targets=targets, distillation_query_mask=query_mask)
    torch.testing.assert_close(out.loss, out.lm_loss + out.distillation_loss)

    with torch.no_grad():  # the model's own head-averaged text-to-image attention per position, as the target
        attentions = model(**batch, output_attentions=True).attentions
        image_mask = batch["input_ids"] == IMAGE_TOKEN
        image_positions = image_mask.nonzero()[:, 1].view(2, 1, 1, -1)
        attention = attentions[-1]
        to_image = attention.gather(-1, image_positions.expand(*attention.shape[:3], NUM_IMAGE_TOKENS))
        own = (to_image / to_image.sum(-1, keepdim=True).clamp(min=1e-12)).mean(1)  # (batch, seq, patches)
    assert attention_distillation_loss(attentions[-1:], image_mask, query_mask, own).abs() < 1e-5
    # a target shared by the row's positions is each position's target: their losses agree
    shared = attention_distillation_loss(attentions, image_mask, query_mask, targets)
    per_position = attention_distillation_loss(
        attentions, image_mask, query_mask, targets[:, None, :].expand(-1, query_mask.shape[1], -1)
    )
    torch.testing.assert_close(shared, per_position)
    # the loss reads each position's own target: one position's target on a single patch raises it
    moved = own.clone()
    moved[0, -1] = F.one_hot(torch.tensor(0), NUM_IMAGE_TOKENS).float()
    assert attention_distillation_loss(attentions[-1:], image_mask, query_mask, moved) > 0.1
    # per group of heads: heads 0-1 put 3/4 of their attention on patch 0 and 1/4 on patch 1, heads 2-3 the reverse.
    # Each group's own split is a zero-loss target; half on each patch is zero-loss for the heads' average but costs
    # each group KL((1/2, 1/2) || (3/4, 1/4)) = log(4/3) / 2
    split = torch.zeros_like(attention)
    first_patches = image_positions[:, 0, 0, :2]  # (batch, 2): sequence positions of patches 0 and 1
    for row in range(2):
        split[row, :2, :, first_patches[row]] = torch.tensor([0.75, 0.25])
        split[row, 2:, :, first_patches[row]] = torch.tensor([0.25, 0.75])
    patches = torch.zeros(2, NUM_IMAGE_TOKENS)
    patches[:, :2] = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    own_groups = patches.expand(2, query_mask.shape[1], -1, -1)  # (batch, seq, group, patches)
    assert attention_distillation_loss((split,), image_mask, query_mask, own_groups).abs() < 1e-6
    halves = patches.mean(0).expand(2, query_mask.shape[1], -1)
    assert attention_distillation_loss((split,), image_mask, query_mask, halves).abs() < 1e-6
    per_group = attention_distillation_loss((split,), image_mask, query_mask, halves[:, :, None].expand(-1, -1, 2, -1))
    torch.testing.assert_close(per_group, torch.log(torch.tensor(4 / 3)) / 2)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(**batch, distillation_targets=targets, distillation_query_mask=query_mask).distillation_loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_distillation_refuses_what_it_cannot_compute(tiny_config):
    batch, query_mask, targets = distillation_batch()
    sdpa = build_model(DeepseekV3MultimodalConfig(**tiny_config.to_dict()), "sdpa")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        sdpa(**batch, distillation_targets=targets, distillation_query_mask=query_mask)
    eager = build_model(tiny_config)
    with pytest.raises(ValueError, match="exactly one image of 8 patches per distilled row"):
        eager(**batch, distillation_targets=targets[:, :8], distillation_query_mask=query_mask)
    with pytest.raises(ValueError, match="distillation_query_mask"):
        eager(**batch, distillation_targets=targets)
    with pytest.raises(ValueError, match="per-position distillation_targets cover 3 positions"):
        eager(**batch, distillation_targets=targets[:, None, :].expand(-1, 3, -1), distillation_query_mask=query_mask)
    three_groups = targets[:, None, None, :].expand(-1, batch["input_ids"].shape[1], 3, -1)
    with pytest.raises(ValueError, match="3 head groups, which must divide 4 heads"):
        eager(**batch, distillation_targets=three_groups, distillation_query_mask=query_mask)


def test_distillation_skips_rows_without_query_positions():
    """A row with no distilled position (an audio question batched with image questions) holds no image and adds
    nothing: the loss is the distilled rows' mean, and a batch without any distilled row gives 0."""
    generator = torch.Generator().manual_seed(0)
    attentions = tuple(torch.rand(3, 4, 12, 12, generator=generator).softmax(-1) for _ in range(2))
    image_mask = torch.zeros(3, 12, dtype=torch.bool)
    image_mask[[0, 2], 1:5] = True  # rows 0 and 2 hold a 4-patch image, row 1 (audio) none
    query_mask = torch.zeros(3, 12, dtype=torch.bool)
    query_mask[[0, 2], 8:] = True
    targets = torch.rand(3, 4, generator=generator).softmax(-1)
    loss = attention_distillation_loss(attentions, image_mask, query_mask, targets)
    alone = [
        attention_distillation_loss(
            tuple(a[[row]] for a in attentions), image_mask[[row]], query_mask[[row]], targets[[row]]
        )
        for row in (0, 2)
    ]
    torch.testing.assert_close(loss, (alone[0] + alone[1]) / 2)
    assert loss > 0
    nothing = attention_distillation_loss(attentions, image_mask, torch.zeros_like(query_mask), targets)
    assert nothing == 0


def test_router_and_gates_compute_in_float32_under_autocast(tiny_config):
    model = build_model(tiny_config)
    make_gates_vary(model)
    # their inputs come from bf16 layers under autocast, so each module is compared on one fp32 input
    gate = model.model.layers[0].self_attn.head_gate
    latent = torch.randn(2, 12, tiny_config.kv_lora_rank)
    router = model.model.layers[1].mlp.gate
    hidden = torch.randn(10, tiny_config.hidden_size)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed_gates, (mixed_logits, _, _) = gate(latent, None, 12), router(hidden)
        gates, (logits, _, _) = gate(latent, None, 12), router(hidden)
    assert mixed_gates.dtype == mixed_logits.dtype == torch.float32
    torch.testing.assert_close(mixed_gates, gates, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed_logits, logits, atol=1e-6, rtol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**multimodal_batch(), output_gate_values=True, output_router_logits=True)
    assert out.router_logits[0].dtype == out.gate_values[0].dtype == torch.float32


def test_distillation_weight_scales_the_term_and_zero_removes_it(tiny_config):
    batch, query_mask, targets = distillation_batch()
    inputs = dict(batch, labels=batch["input_ids"], distillation_targets=targets, distillation_query_mask=query_mask)
    outputs = {}
    for weight in (1.0, 2.0, 0.0):
        torch.manual_seed(0)
        model = build_model(
            DeepseekV3MultimodalConfig(**{**tiny_config.to_dict(), "attention_distillation_weight": weight})
        )
        model.train().zero_grad()
        out = model(**inputs)
        out.loss.backward()
        outputs[weight] = (out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[2.0][0].distillation_loss, 2 * outputs[1.0][0].distillation_loss)
    # weight 0: no term at all, and exactly the gradients of the same batch without distillation targets
    assert outputs[0.0][0].distillation_loss is None
    torch.manual_seed(0)
    model = build_model(DeepseekV3MultimodalConfig(**{**tiny_config.to_dict(), "attention_distillation_weight": 0.0}))
    model.train().zero_grad()
    plain = model(**batch, labels=batch["input_ids"])
    plain.loss.backward()
    torch.testing.assert_close(outputs[0.0][0].loss, plain.loss)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(outputs[0.0][1][name], param.grad)
    # and it needs no eager attention: the weight-0 forward computes nothing from the attention probabilities
    sdpa = build_model(
        DeepseekV3MultimodalConfig(**{**tiny_config.to_dict(), "attention_distillation_weight": 0.0}), "sdpa"
    )
    assert sdpa(**inputs).distillation_loss is None
    with pytest.raises(ValueError, match="attention_distillation_weight"):
        DeepseekV3MultimodalConfig(**{**tiny_config.to_dict(), "attention_distillation_weight": -1.0})


def test_conv_stem_patches_see_across_patch_borders(tiny_config):
    def embeddings(config, pixels):
        torch.manual_seed(0)
        with torch.no_grad():
            return build_model(config).model.get_image_embeddings(pixels)

    stem = DeepseekV3MultimodalConfig(**{**tiny_config.to_dict(), "image_conv_stem_channels": 6})
    pixels = torch.randn(1, 3, 16, 16)
    moved = pixels.clone()
    moved[0, :, 1, 5] += 1.0  # a pixel of patch (0, 1), one pixel from patch (0, 0)'s border (patch_size 4)
    for config, reaches_neighbour in ((tiny_config, False), (stem, True)):
        before, after = embeddings(config, pixels), embeddings(config, moved)
        changed = (after - before).abs().amax(dim=-1)[0] > 1e-6  # per patch, row-major
        assert bool(changed[1])
        assert bool(changed[0]) is reaches_neighbour
        assert not bool(changed[-1])  # the far corner is out of every window
    keys = set(build_model(stem).state_dict()) - set(build_model(tiny_config).state_dict())
    assert {key.rsplit(".", 2)[0] for key in keys} == {"model.image_stem"}
    assert build_model(stem).model.image_patch_embedding.kernel_size == (8, 8)
    with pytest.raises(ValueError, match="patch_size .* must be even"):
        DeepseekV3MultimodalConfig(**{**tiny_config.to_dict(), "image_conv_stem_channels": 6, "patch_size": 1})
    with pytest.raises(ValueError, match="image_conv_stem_channels"):
        DeepseekV3MultimodalConfig(**{**tiny_config.to_dict(), "image_conv_stem_channels": -1})
