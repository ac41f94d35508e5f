"""DeepseekV3MultimodalConfig: upstream text fields unchanged, new fields validated, official config loads."""

import pytest
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from fixture_files import load_official_config_dict
from transformers import AutoConfig, DeepseekV3Config

import deepseekv3  # noqa: F401  (registers the Auto classes)
from deepseekv3.configuration_deepseekv3 import DeepseekV3MultimodalConfig

TEXT_FIELDS = list(DeepseekV3Config.__annotations__)  # the fields DeepseekV3Config itself declares


def test_text_fields_keep_upstream_names_and_defaults():
    ours, upstream = DeepseekV3MultimodalConfig(), DeepseekV3Config()
    assert len(TEXT_FIELDS) > 30
    for name in TEXT_FIELDS:
        assert getattr(ours, name) == getattr(upstream, name), name


def test_new_features_default_to_off():
    config = DeepseekV3MultimodalConfig()
    assert not config.use_attention_gate
    assert not config.use_image_input and not config.use_audio_input
    assert config.num_modality_types == 0
    assert not config.use_bidirectional_media_attention
    assert config.contrastive_projection_dim is None
    assert config.attention_gate_skip_threshold == 0.0


def test_official_deepseek_v3_config_loads():
    config = DeepseekV3MultimodalConfig.from_dict(load_official_config_dict())
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (7168, 61, 129280)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_group, config.topk_group) == (256, 8, 8, 4)
    assert (config.q_lora_rank, config.kv_lora_rank, config.qk_rope_head_dim) == (1536, 512, 64)
    assert config.rope_parameters["rope_type"] == "yarn"
    assert config.rope_parameters["factor"] == 40
    assert config.first_k_dense_replace == 3
    assert config.model_type == "deepseekv3_multimodal"
    assert config.to_dict()["model_type"] == "deepseekv3_multimodal"


def test_from_text_config_copies_every_text_field():
    text_config = DeepseekV3Config.from_dict(load_official_config_dict())
    config = DeepseekV3MultimodalConfig.from_text_config(text_config, use_attention_gate=True)
    for name in TEXT_FIELDS:
        assert getattr(config, name) == getattr(text_config, name), name
    assert config.use_attention_gate
    assert config.rope_parameters == text_config.rope_parameters


def test_round_trip_through_auto_config(tmp_path):
    config = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, use_attention_gate=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DeepseekV3MultimodalConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.model_type == "deepseekv3_multimodal"


def test_derived_head_sizes_follow_the_fields_they_derive_from():
    saved = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS).to_dict()
    changed = DeepseekV3MultimodalConfig(**{**saved, "qk_rope_head_dim": 16, "qk_nope_head_dim": 4})
    assert (changed.head_dim, changed.qk_head_dim) == (16, 20)


def test_derived_sizes():
    config = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS)
    assert config.num_image_tokens == (16 // 4) ** 2
    assert config.get_num_audio_tokens(9) == 4
    assert config.attention_gate_hidden_size == 32 // 16


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_attention_heads"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts"),
        ({"topk_group": 5, "n_group": 4}, "topk_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # more than the 8 routed experts
        ({"attention_gate_ratio": 0}, "attention_gate_ratio"),
        ({"attention_gate_skip_threshold": 1.0}, "attention_gate_skip_threshold"),
        ({"patch_size": 5}, "patch_size"),
        ({"audio_max_frames": 33}, "audio_conv_stride"),
        ({"use_image_input": True, "image_token_id": None}, "image_token_id"),
        ({"use_audio_input": True, "audio_token_id": 96}, "audio_token_id"),
        ({"image_token_id": 4, "audio_token_id": 4}, "image_token_id and audio_token_id"),
        ({"num_modality_types": 2}, "num_modality_types"),
        ({"contrastive_projection_dim": 0}, "contrastive_projection_dim"),
        ({"use_image_position_values": True, "v_head_dim": 1}, "use_image_position_values"),
        ({"use_image_position_values": True, "use_image_input": False}, "use_image_position_values"),
        ({"contrastive_temperature_init": 0.0}, "contrastive_temperature_init"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, field):
    kwargs = {**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, **overrides}
    with pytest.raises(ValueError, match=field):
        DeepseekV3MultimodalConfig(**kwargs)
