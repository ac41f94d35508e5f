"""PEFT LoRA on the model: default targets, routed experts under every kernel, training, merging, saving, Trainer."""

import json

import pytest
import torch
from conftest import TINY_MEDIA_KWARGS
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, ParamWrapper
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file
from test_configuration import load_official_config_dict
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.training.lora import (
    DEFAULT_LORA_TARGET_MODULES,
    MEDIA_FRONT_END_LORA_TARGET_MODULES,
    default_lora_config,
    trainable_fraction,
)

# peft 0.21.2 reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecates; the warning is theirs.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

IMAGE_TOKEN, AUDIO_TOKEN = TINY_MEDIA_KWARGS["image_token_id"], TINY_MEDIA_KWARGS["audio_token_id"]
NUM_IMAGE_TOKENS = (TINY_MEDIA_KWARGS["image_size"] // TINY_MEDIA_KWARGS["patch_size"]) ** 2
AUDIO_FRAMES = 12  # 6 audio tokens at stride 2
PREFIX = "base_model.model."


def build_model(config: DeepseekV3MultimodalConfig) -> DeepseekV3MultimodalForConditionalGeneration:
    config._attn_implementation = "eager"
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    for name, param in model.named_parameters():
        if "head_gate.up_proj" in name:  # gates that depend on the input, as after training
            torch.nn.init.normal_(param, std=2.0)
    return model


def multimodal_batch(batch_size: int = 2) -> dict:
    """Per row: text, one image, text, one audio clip, text; labels are the ids. Ids >= 5 are text."""
    rows = [
        torch.randint(5, 96, (3,)).tolist()
        + [IMAGE_TOKEN] * NUM_IMAGE_TOKENS
        + torch.randint(5, 96, (2,)).tolist()
        + [AUDIO_TOKEN] * (AUDIO_FRAMES // 2)
        + torch.randint(5, 96, (6,)).tolist()
        for _ in range(batch_size)
    ]
    input_ids = torch.tensor(rows)
    return {
        "input_ids": input_ids,
        "pixel_values": torch.randn(batch_size, 3, 16, 16),
        "input_features": torch.randn(batch_size, 8, AUDIO_FRAMES),
        "labels": input_ids.clone(),
    }


def adapted_modules(peft_model: PeftModel) -> set[str]:
    """Names (in the unwrapped model) of the modules with a LoRA layer, nested expert wrappers counted once."""
    names = set()
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            names.add(name.removeprefix(PREFIX).split(".base_layer")[0])
    return names


def expected_default_modules(config: DeepseekV3MultimodalConfig) -> set[str]:
    """Written from the architecture, not from DEFAULT_LORA_TARGET_MODULES: MLA projections in every layer, the dense
    MLP in the first `first_k_dense_replace` layers, the shared experts in the others."""
    query = ["q_proj"] if config.q_lora_rank is None else ["q_a_proj", "q_b_proj"]
    names = set()
    for layer in range(config.num_hidden_layers):
        for projection in [*query, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]:
            names.add(f"model.layers.{layer}.self_attn.{projection}")
        mlp = "mlp" if layer < config.first_k_dense_replace else "mlp.shared_experts"
        for projection in ["gate_proj", "up_proj", "down_proj"]:
            names.add(f"model.layers.{layer}.{mlp}.{projection}")
    return names


def expected_lora_parameter_count(config: DeepseekV3MultimodalConfig, r: int, include_routed_experts: bool) -> int:
    """LoRA adds `r * (in + out)` per adapted matrix; a routed-expert stack adds that per expert."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    if config.q_lora_rank is None:
        attention = hidden + heads * qk_head_dim
    else:
        attention = (hidden + config.q_lora_rank) + (config.q_lora_rank + heads * qk_head_dim)
    attention += hidden + config.kv_lora_rank + config.qk_rope_head_dim
    attention += config.kv_lora_rank + heads * (config.qk_nope_head_dim + config.v_head_dim)
    attention += heads * config.v_head_dim + hidden
    dense = 3 * (hidden + config.intermediate_size)
    moe = 3 * (hidden + config.moe_intermediate_size * config.n_shared_experts)
    if include_routed_experts:
        moe += config.n_routed_experts * (
            (hidden + 2 * config.moe_intermediate_size) + (config.moe_intermediate_size + hidden)
        )
    num_dense = config.first_k_dense_replace
    num_moe = config.num_hidden_layers - num_dense
    return r * (config.num_hidden_layers * attention + num_dense * dense + num_moe * moe)


def test_import_registers_the_default_targets_for_our_model_type():
    # `import deepseekv3` (conftest) registers them; importing deepseekv3.training.lora alone does not
    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[DeepseekV3MultimodalConfig.model_type] == list(
        DEFAULT_LORA_TARGET_MODULES
    )


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_lora_config_without_targets_adapts_exactly_attention_dense_mlps_and_shared_experts(tiny_config, q_lora_rank):
    tiny_config.q_lora_rank = q_lora_rank
    peft_model = get_peft_model(build_model(tiny_config), LoraConfig(task_type="CAUSAL_LM"))

    assert adapted_modules(peft_model) == expected_default_modules(tiny_config)
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # frozen and unwrapped: router, head gates, norms, experts, embeddings, projection heads, lm_head
    for name, module in peft_model.named_modules():
        if name.endswith((".mlp.gate", ".head_gate", "layernorm", ".mlp.experts", "embedding", "projection")):
            assert not isinstance(module, LoraLayer), name
    assert not isinstance(peft_model.base_model.model.lm_head, LoraLayer)


@pytest.mark.parametrize(("experts_implementation", "other"), [("eager", "grouped_mm"), ("grouped_mm", "eager")])
def test_routed_experts_are_adapted_under_each_experts_kernel(tiny_config, experts_implementation, other):
    model = build_model(tiny_config)
    model.set_experts_implementation(experts_implementation)
    batch = multimodal_batch()
    with torch.no_grad():
        base_logits = model(**batch).logits
    peft_model = get_peft_model(model, default_lora_config(init_lora_weights=False))

    wrapped = {
        (name.removeprefix(PREFIX).split(".base_layer")[0], module.parameter_name)
        for name, module in peft_model.named_modules()
        if isinstance(module, ParamWrapper)
    }
    moe_layers = range(tiny_config.first_k_dense_replace, tiny_config.num_hidden_layers)
    assert wrapped == {
        (f"model.layers.{layer}.mlp.experts", parameter)
        for layer in moe_layers
        for parameter in ("gate_up_proj", "down_proj")
    }
    with torch.no_grad():
        logits = peft_model(**batch).logits
        model.set_experts_implementation(other)
        other_logits = peft_model(**batch).logits
        model.set_experts_implementation(experts_implementation)
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the adapters act
    torch.testing.assert_close(logits, other_logits, atol=1e-5, rtol=1e-5)  # and act alike under both kernels

    peft_model.train()
    peft_model(**batch).loss.backward()
    for name, param in peft_model.named_parameters():
        if ".mlp.experts." in name and param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_training_steps_change_only_lora_parameters(tiny_config):
    peft_model = get_peft_model(build_model(tiny_config), default_lora_config())
    frozen_before = {
        name: tensor.clone()
        for name, tensor in [*peft_model.named_parameters(), *peft_model.named_buffers()]
        if "lora_" not in name
    }
    lora_before = {name: param.clone() for name, param in peft_model.named_parameters() if "lora_" in name}
    assert {name for name, param in peft_model.named_parameters() if param.requires_grad} == set(lora_before)

    optimizer = torch.optim.AdamW([param for param in peft_model.parameters() if param.requires_grad], lr=1e-2)
    optimizer.param_groups[0]["weight_decay"] = 0.0
    peft_model.train()
    batch = multimodal_batch()
    for _ in range(3):  # lora_B starts at zero, so lora_A first moves at the second step
        optimizer.zero_grad()
        peft_model(**batch).loss.backward()
        optimizer.step()

    after = dict([*peft_model.named_parameters(), *peft_model.named_buffers()])
    assert set(after) == set(frozen_before) | set(lora_before)
    for name, tensor in frozen_before.items():
        assert torch.equal(after[name], tensor), name
    for name, tensor in lora_before.items():
        assert not torch.equal(after[name], tensor), name


@pytest.mark.parametrize("include_routed_experts", [True, False])
def test_merge_and_unload_gives_the_adapter_logits_with_media_and_gates(tiny_config, include_routed_experts):
    tiny_config.use_bidirectional_media_attention = True
    model = build_model(tiny_config)
    batch = multimodal_batch()
    with torch.no_grad():
        base_logits = model(**batch).logits
    config = default_lora_config(include_routed_experts=include_routed_experts, init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():
        adapter = peft_model(**batch, output_gate_values=True)
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(**batch, output_gate_values=True)

    assert not any(isinstance(module, LoraLayer) for module in merged_model.modules())
    assert not torch.allclose(adapter.logits, base_logits, atol=1e-3)
    torch.testing.assert_close(merged.logits, adapter.logits, atol=1e-5, rtol=1e-5)
    for merged_gates, adapter_gates in zip(merged.gate_values, adapter.gate_values, strict=True):
        torch.testing.assert_close(merged_gates, adapter_gates, atol=1e-5, rtol=1e-5)


def test_the_media_front_end_is_adapted_only_when_asked_and_merges_exactly(tiny_config):
    tiny_config.image_conv_stem_channels = 4
    front_end = {
        "model.image_stem.0",
        "model.image_stem.2",
        "model.image_patch_embedding",
        "model.audio_frame_embedding",
    }
    plain = adapted_modules(get_peft_model(build_model(tiny_config), default_lora_config()))
    assert not plain & front_end
    batch = multimodal_batch()
    model = build_model(tiny_config)
    with torch.no_grad():
        base = model(**batch).logits
    # the front end's adapters alone act on the forward: through the image and the clip
    alone = get_peft_model(
        model, LoraConfig(target_modules=list(MEDIA_FRONT_END_LORA_TARGET_MODULES), init_lora_weights=False)
    )
    assert adapted_modules(alone) == front_end
    with torch.no_grad():
        assert not torch.allclose(alone(**batch).logits, base, atol=1e-3)
    peft_model = get_peft_model(
        build_model(tiny_config), default_lora_config(include_media_front_end=True, init_lora_weights=False)
    )
    assert adapted_modules(peft_model) == plain | front_end
    with torch.no_grad():
        adapter = peft_model(**batch).logits
        merged = peft_model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, adapter, atol=1e-5, rtol=1e-5)


def test_head_skipping_with_an_unmerged_adapter_equals_the_merged_model(tiny_config):
    model = build_model(tiny_config)
    with torch.no_grad():
        for layer in model.model.layers:  # heads 0 and 1 closed everywhere
            layer.self_attn.head_gate.up_proj.weight.zero_()
            layer.self_attn.head_gate.up_proj.bias.copy_(torch.tensor([-12.0, -12.0, 4.0, 4.0]))
    tiny_config.attention_gate_skip_threshold = 0.01
    peft_model = get_peft_model(model, default_lora_config(init_lora_weights=False)).eval()
    batch = multimodal_batch()
    with torch.no_grad():
        unmerged = peft_model(**batch).logits
        merged = peft_model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(unmerged, merged, atol=1e-5, rtol=1e-5)


def test_adapter_saves_and_loads_on_a_fresh_base_with_identical_logits(tiny_config, tmp_path):
    model = build_model(tiny_config)
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, default_lora_config(init_lora_weights=False)).eval()
    batch = multimodal_batch()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all(".lora_A." in key or ".lora_B." in key for key in saved)  # the adapter only
    assert any(".mlp.experts." in key for key in saved)
    saved_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(saved_config["target_modules"]) == set(DEFAULT_LORA_TARGET_MODULES)

    fresh_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    with torch.no_grad():
        assert not torch.allclose(fresh_base.eval()(**batch).logits, expected, atol=1e-3)
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("include_routed_experts", [True, False])
def test_trainable_fraction_counts_exactly_the_lora_matrices(tiny_config, include_routed_experts):
    model = build_model(tiny_config)
    base_count = sum(param.numel() for param in model.parameters())
    peft_model = get_peft_model(model, default_lora_config(include_routed_experts=include_routed_experts, r=4))
    lora_count = expected_lora_parameter_count(tiny_config, 4, include_routed_experts)
    assert trainable_fraction(peft_model) == lora_count / (base_count + lora_count)


def test_trainable_fraction_of_the_official_671b_config_is_small_on_the_meta_device():
    config = DeepseekV3MultimodalConfig.from_dict(load_official_config_dict())
    with torch.device("meta"):
        model = DeepseekV3MultimodalForConditionalGeneration(config)
    base_count = sum(param.numel() for param in model.parameters())
    peft_model = get_peft_model(model, default_lora_config(), low_cpu_mem_usage=True)
    lora_count = expected_lora_parameter_count(config, 8, include_routed_experts=True)
    fraction = trainable_fraction(peft_model)
    assert fraction == lora_count / (base_count + lora_count)
    assert fraction < 0.005


def test_routed_experts_refuse_dropout_with_a_clear_error():
    with pytest.raises(ValueError, match=r"lora_dropout \(0.1\) must be 0 when the routed experts are adapted"):
        default_lora_config(lora_dropout=0.1)
    assert default_lora_config(include_routed_experts=False, lora_dropout=0.1).lora_dropout == 0.1


def test_trainer_trains_the_peft_model_for_two_steps(tiny_config, tmp_path):
    peft_model = get_peft_model(build_model(tiny_config), default_lora_config())
    lora_before = {name: param.clone() for name, param in peft_model.named_parameters() if param.requires_grad}
    frozen_before = {name: param.clone() for name, param in peft_model.named_parameters() if not param.requires_grad}
    examples = [{key: value[0] for key, value in multimodal_batch(1).items()} for _ in range(4)]
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
    )
    result = Trainer(model=peft_model, args=arguments, train_dataset=examples).train()

    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    parameters = dict(peft_model.named_parameters())
    assert any(not torch.equal(parameters[name], value) for name, value in lora_before.items())
    for name, value in frozen_before.items():
        assert torch.equal(parameters[name], value), name
