"""Gated head skipping at inference (`set_head_skip_threshold`, the per-layer report) and the gate-sparsity penalty
that teaches gates to close (`attention_gate_sparsity_weight`, logged by `Trainer`)."""

import pytest
import torch
from conftest import TINY_TEXT_KWARGS
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainingArguments

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.modeling_deepseekv3 import gate_sparsity_loss
from deepseekv3.training.trainer import DeepseekV3Trainer

NUM_HEADS = TINY_TEXT_KWARGS["num_attention_heads"]
OPEN, CLOSED = 4.0, -12.0  # gate biases: sigmoid(4) = 0.98, sigmoid(-12) = 6e-6


def gated_model(**overrides) -> DeepseekV3MultimodalForConditionalGeneration:
    config = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, use_attention_gate=True, **overrides)
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    # eager attention: its score and value matmuls are plain matmuls that `FlopCounterMode` counts
    model.set_attn_implementation("eager")
    # the gate's last layer starts at zero weight: give it some, so the gates differ across positions
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.head_gate.up_proj.weight.normal_(std=0.5)
    return model


def set_gate_biases(model, biases: dict[int, list[float]]) -> None:
    with torch.no_grad():
        for layer_idx, layer_biases in biases.items():
            model.model.layers[layer_idx].self_attn.head_gate.up_proj.bias.copy_(torch.tensor(layer_biases))


def run(model, input_ids, **kwargs):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        outputs = model(input_ids=input_ids, **kwargs)
    return outputs, counter.get_total_flops()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(5, TINY_TEXT_KWARGS["vocab_size"], (2, 20))


def test_threshold_zero_equals_no_skipping_exactly(input_ids):
    model = gated_model()
    set_gate_biases(model, {0: [-1e4, OPEN, OPEN, OPEN], 1: [OPEN] * NUM_HEADS})  # head 0 of layer 0: gate exactly 0
    reference, reference_flops = run(model, input_ids)
    model.set_head_skip_threshold(0.0)
    outputs, flops = run(model, input_ids)
    assert torch.equal(outputs.logits, reference.logits)
    assert flops == reference_flops
    assert model.get_skipped_heads() == {0: [], 1: []}  # a gate of exactly 0 is not below a threshold of 0


def test_skipped_heads_save_their_share_of_work_and_equal_zeroed_gates(input_ids):
    model = gated_model()
    set_gate_biases(model, {0: [OPEN] * NUM_HEADS, 1: [OPEN] * NUM_HEADS})
    _, all_flops = run(model, input_ids)
    model.set_head_skip_threshold(0.01)

    set_gate_biases(model, {0: [CLOSED, OPEN, OPEN, OPEN]})
    _, one_skipped_flops = run(model, input_ids)
    assert model.get_skipped_heads() == {0: [0], 1: []}
    per_head = all_flops - one_skipped_flops
    assert per_head > 0

    biases = {0: [CLOSED, OPEN, CLOSED, OPEN], 1: [OPEN, OPEN, OPEN, CLOSED]}
    set_gate_biases(model, biases)
    skipped, three_skipped_flops = run(model, input_ids, output_gate_values=True)
    assert model.get_skipped_heads() == {0: [0, 2], 1: [3]}
    # every head of these layers costs the same: three skipped heads save exactly three heads' work
    assert three_skipped_flops == all_flops - 3 * per_head
    assert skipped.gate_values[0].shape[-1] == NUM_HEADS  # the recorded gates still cover every head

    model.set_head_skip_threshold(0.0)
    forced = {0: [-1e4, OPEN, -1e4, OPEN], 1: [OPEN, OPEN, OPEN, -1e4]}  # sigmoid(-1e4) is exactly 0
    set_gate_biases(model, forced)
    zeroed, _ = run(model, input_ids)
    assert model.get_skipped_heads() == {0: [], 1: []}
    torch.testing.assert_close(skipped.logits, zeroed.logits, atol=1e-5, rtol=1e-5)


def test_a_head_open_in_any_row_is_computed_for_the_whole_batch():
    model = gated_model()
    set_gate_biases(model, {0: [OPEN] * NUM_HEADS, 1: [OPEN] * NUM_HEADS})
    # rows of one repeated token: layer 0's latent, and so its gates, are the same at every position of a row
    # (the rotary part is not in the latent); head 1 of layer 0 is made closed for token 7 and open for token 9
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        embeddings = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([7, 9])))
        latent = attention.kv_a_layernorm(attention.kv_a_proj_with_mqa(embeddings)[:, : model.config.kv_lora_rank])
        gate = attention.head_gate
        hidden = gate.act_fn(gate.down_proj(latent))  # (2, gate_hidden)
        difference = hidden[1] - hidden[0]
        weight = (OPEN - CLOSED) * difference / difference.dot(difference)
        gate.up_proj.weight[1] = weight
        gate.up_proj.bias[1] = CLOSED - weight.dot(hidden[0])
    closed_row, open_row = torch.full((1, 12), 7), torch.full((1, 12), 9)
    mixed = torch.cat([closed_row, open_row])
    reference, _ = run(model, mixed)

    model.set_head_skip_threshold(0.01)
    outputs, _ = run(model, mixed, output_gate_values=True)
    row_gates = outputs.gate_values[0][..., 1]
    assert row_gates[0].max() < 0.01 and row_gates[1].min() > 0.9
    assert model.get_skipped_heads() == {0: [], 1: []}  # open in row 1: computed for the batch
    assert torch.equal(outputs.logits, reference.logits)

    alone, _ = run(model, closed_row)
    assert model.get_skipped_heads() == {0: [1], 1: []}  # closed at every position of the batch: skipped
    torch.testing.assert_close(alone.logits[0], reference.logits[0], atol=1e-4, rtol=1e-4)


def model_with_head_closed_for_its_tokens_and_open_at_padding():
    """Head 1 of layer 0 closed for token 7 and open at a left pad; every other head open."""
    model = gated_model()
    set_gate_biases(model, {0: [OPEN] * NUM_HEADS, 1: [OPEN] * NUM_HEADS})
    # a row of one repeated token gives layer 0 the same latent, so the same gates, at every real position; a pad
    # position's running mean is over nothing (zero), so its gates are a constant: head 1 of layer 0 is made closed
    # for the token and open for padding
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        embeddings = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([7])))
        latent = attention.kv_a_layernorm(attention.kv_a_proj_with_mqa(embeddings)[:, : model.config.kv_lora_rank])
        gate = attention.head_gate
        hidden = gate.act_fn(gate.down_proj(torch.cat([latent, torch.zeros_like(latent)])))  # token, padding
        difference = hidden[1] - hidden[0]
        weight = (OPEN - CLOSED) * difference / difference.dot(difference)
        gate.up_proj.weight[1] = weight
        gate.up_proj.bias[1] = CLOSED - weight.dot(hidden[0])
    return model


def test_padding_positions_never_keep_a_head_open():
    model = model_with_head_closed_for_its_tokens_and_open_at_padding()
    model.set_head_skip_threshold(0.01)
    long_row, short_row = torch.full((1, 12), 7), torch.full((1, 8), 7)
    input_ids = torch.cat([long_row, torch.cat([torch.zeros(1, 4, dtype=torch.long), short_row], dim=1)])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0

    batched, _ = run(model, input_ids, attention_mask=attention_mask, output_gate_values=True)
    assert batched.gate_values[0][1, :4, 1].min() > 0.9  # open at the pads: counted, they would keep head 1
    assert model.get_skipped_heads() == {0: [1], 1: []}
    for row, real in ((0, long_row), (1, short_row)):
        alone, _ = run(model, real)
        assert model.get_skipped_heads() == {0: [1], 1: []}
        torch.testing.assert_close(batched.logits[row, -real.shape[1] :], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_skipping_never_happens_in_training_mode(input_ids):
    model = gated_model()
    set_gate_biases(model, {0: [CLOSED] * NUM_HEADS, 1: [CLOSED] * NUM_HEADS})
    model.set_head_skip_threshold(0.5)
    model.train()
    model(input_ids=input_ids)
    assert model.get_skipped_heads() == {0: [], 1: []}
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)
    assert model.get_skipped_heads() == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}


def test_set_head_skip_threshold_validates_and_saves_with_the_config(tmp_path):
    model = gated_model()
    model.set_head_skip_threshold(0.25)
    model.save_pretrained(tmp_path)
    reloaded = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.attention_gate_skip_threshold == 0.25
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=rf"head skip threshold \({bad}\) must be in \[0, 1\)"):
            model.set_head_skip_threshold(bad)
    ungated = DeepseekV3MultimodalForConditionalGeneration(DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS))
    with pytest.raises(ValueError, match="needs a model with use_attention_gate=True"):
        ungated.set_head_skip_threshold(0.1)
    assert ungated.get_skipped_heads() == {}


def test_gate_sparsity_loss_is_the_weighted_mean_gate_over_real_positions(input_ids):
    weight = 0.3
    model = gated_model(attention_gate_sparsity_weight=weight)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :6] = 0  # left padding: not penalised
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    gates = torch.stack(outputs.gate_values).mean(dim=(0, -1))  # (batch, seq)
    expected = weight * gates[attention_mask.bool()].mean()
    torch.testing.assert_close(outputs.gate_sparsity_loss, expected)
    torch.testing.assert_close(outputs.loss, outputs.lm_loss + outputs.gate_sparsity_loss)
    outputs.gate_sparsity_loss.backward()
    assert model.model.layers[1].self_attn.head_gate.up_proj.bias.grad.abs().min() > 0

    without_labels = model(input_ids=input_ids)
    assert without_labels.gate_sparsity_loss is None and without_labels.loss is None
    off = gated_model()
    assert off(input_ids=input_ids, labels=input_ids).gate_sparsity_loss is None
    assert gate_sparsity_loss((torch.full((1, 3, 2), 0.5),), None) == 0.5


def test_trainer_logs_the_penalty_and_it_closes_gates(tmp_path):
    model = gated_model(attention_gate_sparsity_weight=1.0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(5, 96, (16, 12))]
    probe = torch.randint(5, 96, (4, 12))

    def mean_gate() -> float:
        with torch.no_grad():
            return torch.stack(model(input_ids=probe, output_gate_values=True).gate_values).mean().item()

    before = mean_gate()
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        # the gates start saturated open (sigmoid(4)): Adam moves their bias by about the learning rate a step
        learning_rate=0.3,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DeepseekV3Trainer(model=model, args=arguments, train_dataset=rows)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all("gate_sparsity_loss" in entry and "lm_loss" in entry for entry in logged)
    assert logged[-1]["gate_sparsity_loss"] < logged[0]["gate_sparsity_loss"]
    model.eval()
    assert mean_gate() < before - 0.05


def test_gate_sparsity_weight_is_validated():
    with pytest.raises(ValueError, match=r"attention_gate_sparsity_weight \(-1.0\) must be non-negative"):
        DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, use_attention_gate=True, attention_gate_sparsity_weight=-1.0)
    with pytest.raises(ValueError, match=r"attention_gate_sparsity_weight \(0.1\) needs use_attention_gate=True"):
        DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, attention_gate_sparsity_weight=0.1)
