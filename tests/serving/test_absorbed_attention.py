"""Absorbed MLA decoding: a decoding step attends to the cached latent without expanding it through `kv_b_proj`, and
gives the logits of the model's own attention (gate, head skipping, image position values, padding, eager and sdpa);
every other forward is left to the model."""

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from serving_helpers import IMAGE_ID, NUM_IMAGE_TOKENS, generate_one, text_ids, tiny_media_model

from deepseekv3.attention_deepseekv3 import DeepseekV3MultimodalAttention
from deepseekv3.serving import Engine, EngineConfig, absorbed_attention, absorbed_decoding
from deepseekv3.serving.absorbed_attention import absorbed_forward_applies

# peft 0.21.2 reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecates; the warning is theirs.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def attention_modules(model) -> list[DeepseekV3MultimodalAttention]:
    return [module for module in model.modules() if isinstance(module, DeepseekV3MultimodalAttention)]


@contextlib.contextmanager
def kv_b_proj_calls(model):
    """How many times any layer's `kv_b_proj` module ran inside the block (the model's own expansion of the
    latent; the absorbed path reads its weight instead)."""
    calls = []
    hooks = [module.kv_b_proj.register_forward_hook(lambda *_: calls.append(1)) for module in attention_modules(model)]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def gated_model(seed: int):
    """The tiny media model with random gate weights: a fresh gate gives every head the same value (its bias)."""
    model = tiny_media_model(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in attention_modules(model):
            for parameter in module.head_gate.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def padded_batch(seed: int = 5):
    """Three text prompts of 20, 15 and 18 tokens, left-padded, and an image prompt's inputs."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 96, (3, 20), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = attention_mask[2, :2] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def decoding_logits(model, inputs: dict, absorbed: bool, steps: int = 6) -> tuple[torch.Tensor, int]:
    """The logits of `steps` greedy decoding steps after the prefill of `inputs` `(steps, batch, vocab)`, and how many
    times `kv_b_proj` ran in those steps."""
    with torch.no_grad():
        outputs = model(**inputs, use_cache=True)
    cache, mask = outputs.cache, inputs["attention_mask"]
    positions = mask.sum(dim=1, keepdim=True)
    tokens, logits = outputs.logits[:, -1].argmax(-1, keepdim=True), []
    context = absorbed_decoding(model) if absorbed else contextlib.nullcontext()
    with context, kv_b_proj_calls(model) as calls, torch.no_grad():
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
            step = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            logits.append(step.logits[:, -1])
            tokens, positions = step.logits[:, -1].argmax(-1, keepdim=True), positions + 1
    return torch.stack(logits), len(calls)


@pytest.fixture
def applied(monkeypatch) -> list[bool]:
    """Whether each attention forward run under `absorbed_decoding` attended in the latent space."""
    decisions = []

    def recorded(*args) -> bool:
        decisions.append(absorbed_forward_applies(*args))
        return decisions[-1]

    monkeypatch.setattr(absorbed_attention, "absorbed_forward_applies", recorded)
    return decisions


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("skip", [False, True])
def test_absorbed_decoding_gives_the_logits_of_the_models_attention(implementation, skip, applied):
    model = gated_model(seed=3)
    model.config._attn_implementation = implementation
    inputs = padded_batch()
    if skip:
        # the median over heads of each head's largest gate in the decoding steps: some heads are skipped, some kept
        gates = []
        hooks = [
            module.head_gate.register_forward_hook(lambda _, args, output: gates.append(output.amax(dim=(0, 1))))
            for module in attention_modules(model)
        ]
        decoding_logits(model, inputs, absorbed=False)
        for hook in hooks:
            hook.remove()
        model.set_head_skip_threshold(float(torch.cat(gates).median()))
    expected, expanded_calls = decoding_logits(model, inputs, absorbed=False)
    skipped = [module.skipped_heads() for module in attention_modules(model)]
    got, absorbed_calls = decoding_logits(model, inputs, absorbed=True)
    assert [module.skipped_heads() for module in attention_modules(model)] == skipped
    assert any(skipped) == skip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert absorbed_calls == 0 and applied == [True] * (6 * model.config.num_hidden_layers)
    if not skip:  # with every head computed, the model's attention expands the latent in every layer at every step
        assert expanded_calls == 6 * model.config.num_hidden_layers


def test_absorbed_decoding_carries_the_image_positions_in_the_values():
    model = gated_model(seed=4)
    assert model.config.use_image_position_values
    generator = torch.Generator().manual_seed(6)
    input_ids = torch.tensor([[1, 9, 10] + [IMAGE_ID] * NUM_IMAGE_TOKENS + [11, 12]])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(1, 3, 16, 16, generator=generator),
    }
    expected, _ = decoding_logits(model, inputs, absorbed=False)
    got, calls = decoding_logits(model, inputs, absorbed=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls == 0
    # without the coordinates' term the logits would differ: the check above can fail
    model.config.use_image_position_values = False
    assert not torch.allclose(decoding_logits(model, inputs, absorbed=False)[0], expected, atol=1e-4)


def test_other_forwards_run_the_models_attention_and_the_forward_is_restored():
    model = tiny_media_model(seed=3)
    inputs = padded_batch()
    with absorbed_decoding(model), kv_b_proj_calls(model) as calls, torch.no_grad():
        model(**inputs, use_cache=True)  # a prefill: 20 new positions per row
    assert len(calls) == model.config.num_hidden_layers
    model.train()
    with absorbed_decoding(model):
        assert decoding_logits(model, inputs, absorbed=False, steps=2)[1] == 2 * model.config.num_hidden_layers
    model.eval()
    with pytest.raises(RuntimeError, match="inside"), absorbed_decoding(model):
        raise RuntimeError("inside")
    assert not any("forward" in vars(module) for module in attention_modules(model))
    assert decoding_logits(model, inputs, absorbed=False, steps=2)[1] == 2 * model.config.num_hidden_layers


def test_a_lora_adapter_on_kv_b_proj_keeps_the_models_attention():
    model = tiny_media_model(seed=3)
    config = LoraConfig(r=4, target_modules=["kv_b_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    inputs = padded_batch()
    expected, _ = decoding_logits(peft_model, inputs, absorbed=False)
    got, calls = decoding_logits(peft_model, inputs, absorbed=True)
    assert calls == 6 * model.config.num_hidden_layers  # the adapter's term needs the module itself
    torch.testing.assert_close(got, expected)


def test_the_engine_decodes_absorbed_by_default_with_the_tokens_of_generate():
    model = tiny_media_model(seed=2)
    generator = torch.Generator().manual_seed(7)
    prompts = [text_ids(generator, length) for length in (12, 30, 7)]
    expected = [generate_one(model, {"input_ids": torch.tensor([prompt])}, 10) for prompt in prompts]
    for absorbed, expected_calls in ((True, 0), (False, None)):
        engine = Engine(model, EngineConfig(absorbed_decoding=absorbed, prefill_chunk_tokens=None))
        handles = [engine.submit(prompt, max_new_tokens=10) for prompt in prompts]
        engine.step()  # the prefill forward, then the first decoding step
        with kv_b_proj_calls(model) as calls:
            engine.step()  # a decoding step only
        engine.run_until_idle()
        assert [handle.result().token_ids for handle in handles] == expected
        assert len(calls) == (model.config.num_hidden_layers if expected_calls is None else expected_calls)
