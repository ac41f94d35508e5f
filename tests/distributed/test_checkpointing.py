"""Selective activation checkpointing: whole layers or attention only, every k-th layer, same gradients."""

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from deepseekv3 import DeepseekV3MultimodalForConditionalGeneration


def _inputs(config) -> dict[str, torch.Tensor]:
    num_image_tokens = config.num_image_tokens
    input_ids = torch.randint(5, config.vocab_size, (2, num_image_tokens + 10))
    input_ids[0, 1 : 1 + num_image_tokens] = config.image_token_id
    return {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, config.image_size, config.image_size)}


def _gradients_and_calls(model, inputs) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Gradients of one backward, and how often each layer's attention and feed-forward ran (a recompute runs a
    checkpointed part a second time)."""
    calls = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for part, module in (
            ("attention", layer.self_attn.kv_a_proj_with_mqa),
            ("mlp", layer.post_attention_layernorm),
        ):
            key = f"{index}.{part}"
            calls[key] = 0
            handles.append(module.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1)))
    model.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for handle in handles:
        handle.remove()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}, calls


@pytest.mark.parametrize(
    ("checkpoint_kwargs", "every_n_layers", "recomputed"),
    [
        ({}, 1, {"0.attention", "0.mlp", "1.attention", "1.mlp"}),
        ({}, 2, {"0.attention", "0.mlp"}),
        ({"checkpoint_scope": "attention"}, 1, {"0.attention", "1.attention"}),
        ({"checkpoint_scope": "attention", "use_reentrant": False}, 2, {"0.attention"}),
    ],
)
def test_checkpointing_recomputes_the_chosen_parts_with_identical_gradients(
    tiny_config, checkpoint_kwargs, every_n_layers, recomputed
):
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_config).train()
    inputs = _inputs(tiny_config)
    reference, reference_calls = _gradients_and_calls(model, inputs)
    assert set(reference_calls.values()) == {1}

    model.activation_checkpointing_enable(checkpoint_kwargs, every_n_layers=every_n_layers)
    gradients, calls = _gradients_and_calls(model, inputs)
    assert {key for key, count in calls.items() if count == 2} == recomputed
    assert gradients.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(gradients[name], grad, rtol=0, atol=1e-7, msg=name)

    model.activation_checkpointing_disable()
    _, calls = _gradients_and_calls(model, inputs)
    assert set(calls.values()) == {1}


def test_training_arguments_select_attention_of_every_second_layer(tiny_text_config, tmp_path):
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_text_config)
    tokens = torch.randint(5, tiny_text_config.vocab_size, (4, 12)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"every_n_layers": 2, "checkpoint_scope": "attention"},
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": tokens, "labels": tokens}))
    trainer.train()
    assert "forward" in vars(model.model.layers[0].self_attn)  # checkpointed attention
    assert "forward" not in vars(model.model.layers[1].self_attn)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    assert trainer.state.log_history[-1]["train_loss"] > 0


@pytest.mark.parametrize(
    ("checkpoint_kwargs", "every_n_layers", "message"),
    [
        ({"checkpoint_scope": "mlp"}, 1, r"checkpoint_scope \('mlp'\) must be one of"),
        ({}, 0, r"every_n_layers \(0\) must be at least 1"),
        ({"checkpoint_scope": "attention", "use_reentrant": True}, 1, "needs use_reentrant=False"),
    ],
)
def test_bad_checkpointing_options_raise(tiny_text_config, checkpoint_kwargs, every_n_layers, message):
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_text_config)
    with pytest.raises(ValueError, match=message):
        model.activation_checkpointing_enable(checkpoint_kwargs, every_n_layers=every_n_layers)
