"""Shared fixtures: one tiny configuration for every test (CPU, float32, seeded, seconds per test)."""

import pytest
import torch

from deepseekv3.configuration_deepseekv3 import DeepseekV3MultimodalConfig

# 2 layers (one dense, one MoE), hidden 32, 4 heads, 8 routed experts in 4 groups, MLA ranks 16/16.
TINY_TEXT_KWARGS = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Media switched on: 16x16 images in 4x4 patches (16 tokens each); 8-bin log-mel audio, 2 frames per token.
TINY_MEDIA_KWARGS = {
    "use_image_input": True,
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,
    "image_token_id": 3,
    "use_audio_input": True,
    "num_mel_bins": 8,
    "audio_conv_stride": 2,
    "audio_max_frames": 32,
    "audio_token_id": 4,
    "num_modality_types": 3,
    "contrastive_projection_dim": 16,
}


@pytest.fixture(autouse=True)
def _seeded_float32():
    """Every test starts seeded, in float32, and leaves the default dtype as it found it."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def tiny_text_config() -> DeepseekV3MultimodalConfig:
    """Plain DeepSeek-V3 (every new feature off)."""
    return DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS)


@pytest.fixture
def tiny_config() -> DeepseekV3MultimodalConfig:
    """Every new feature on: attention gate, images with position values, audio, modality types, projection heads."""
    return DeepseekV3MultimodalConfig(
        **TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, use_attention_gate=True, use_image_position_values=True
    )
