"""INT8: post-training quantization through transformers' `TorchAoConfig`, and quantization-aware training through
torchao's QAT API on a `Trainer` stage recipe; both save and load with `save_pretrained`/`from_pretrained`."""

import pytest
import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from torch import nn
from torchao.quantization import Int8Tensor
from torchao.quantization.qat import FakeQuantizedLinear
from transformers import AutoModelForCausalLM, TrainingArguments

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.data import build_multimodal_dataset, build_text_corpus
from deepseekv3.quantization import (
    FP32_MODULES,
    convert_qat,
    is_int8_quantizable,
    load_int8_model,
    prepare_qat,
    train_qat,
)
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.collators import encode_rows
from deepseekv3.training.demo import DemoSettings, build_demo_model
from deepseekv3.training.recipes import build_stage_trainer, select_stage_examples


def linear_weight_types(model: nn.Module) -> dict[str, type]:
    return {name: type(module.weight) for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def is_fp32_module(name: str) -> bool:
    return any(kept in name.split(".") for kept in FP32_MODULES)


@pytest.fixture
def saved_fp32(tmp_path):
    config = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, use_attention_gate=True)
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "fp32")
    return model, tmp_path / "fp32"


def test_ptq_quantizes_linear_layers_and_keeps_sensitive_modules_fp32(saved_fp32, tmp_path):
    fp32_model, path = saved_fp32
    model = load_int8_model(path).eval()
    weight_types = linear_weight_types(model)
    assert {name for name, kind in weight_types.items() if kind is Int8Tensor} == {
        name for name in weight_types if not is_fp32_module(name)
    }
    assert any(".head_gate." in name for name in weight_types) and "lm_head" in weight_types
    assert all(weight_types[name] is nn.Parameter for name in weight_types if is_fp32_module(name))
    for name, parameter in model.named_parameters():  # the router, norms, embeddings, experts: untouched fp32
        if not isinstance(parameter, Int8Tensor):
            assert parameter.dtype == torch.float32, name

    input_ids = torch.randint(5, 96, (2, 12))
    with torch.no_grad():
        expected = fp32_model(input_ids=input_ids).logits
        quantized = model(input_ids=input_ids).logits
    cosine = torch.nn.functional.cosine_similarity(quantized.flatten(), expected.flatten(), dim=0)
    assert 0.98 < cosine and not torch.equal(quantized, expected)

    model.save_pretrained(tmp_path / "int8")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8").eval()
    assert linear_weight_types(reloaded) == weight_types
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, quantized, atol=1e-6, rtol=1e-6)
    generated = reloaded.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, model.generate(input_ids, max_new_tokens=5, do_sample=False))
    assert generated.shape == (2, 17)


def test_head_skipping_leaves_int8_projections_whole(saved_fp32):
    _, path = saved_fp32
    model = load_int8_model(path).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.head_gate.up_proj.bias[0] = -1e4  # head 0 closed everywhere
    input_ids = torch.randint(5, 96, (1, 10))
    with torch.no_grad():
        computed = model(input_ids=input_ids).logits
        model.set_head_skip_threshold(0.5)
        skipping = model(input_ids=input_ids).logits
    # slicing an int8 weight's rows would drop its per-row scales: every head is computed, the gate zeroes head 0
    assert model.get_skipped_heads() == {0: [], 1: []}
    assert torch.equal(skipping, computed)


def test_quantize_filter_and_errors(saved_fp32, tmp_path):
    model, path = saved_fp32
    assert is_int8_quantizable(model.model.layers[0].self_attn.o_proj, "model.layers.0.self_attn.o_proj")
    assert not is_int8_quantizable(model.lm_head, "lm_head")
    gate = model.model.layers[0].self_attn.head_gate
    assert not is_int8_quantizable(gate.up_proj, "model.layers.0.self_attn.head_gate.up_proj")
    assert not is_int8_quantizable(model.model.norm, "model.norm")
    with pytest.raises(ValueError, match="sets quantization_config itself"):
        load_int8_model(path, quantization_config=None)
    with pytest.raises(ValueError, match="needs a model prepared with prepare_qat"):
        convert_qat(model, tmp_path / "never")
    with pytest.raises(ValueError, match="stage 'lora' trains adapters only"):
        train_qat(model, [], TrainingArguments(output_dir=str(tmp_path)), tmp_path / "never", stage="lora")


# the plain patch projection: these tests quantize the decoder's linear layers, and the int8-vs-fake-quantized
# tolerance below was set on this model (with the demo's conv stem the same seed draws other weights)
# initialised at 0.02: the int8 model then equals its fake-quantized simulation to 1e-7; at the demo's 0.1 they
# differ by up to 0.013 on the logits, not yet explained (README, "INT8 (torchao)")
SETTINGS = DemoSettings(
    hidden_size=48,
    num_hidden_layers=2,
    num_images=24,
    num_clips=12,
    image_conv_stem_channels=0,
    initializer_range=0.02,
)


def demo_model_and_instruct_examples():
    """The tokenizer, a fresh demo model (seed 0) and its encoded instruction examples of the tiny data."""
    data = build_multimodal_dataset(SETTINGS.num_images, SETTINGS.num_clips, seed=0)
    tokenizer = train_tokenizer(build_text_corpus(SETTINGS.num_images, SETTINGS.num_clips, 0), vocab_size=320)
    torch.manual_seed(0)
    model, processor = build_demo_model(tokenizer, SETTINGS)
    examples = encode_rows(processor, data["train"], model.config.patch_size, progress=False)
    return tokenizer, model, select_stage_examples("instruct", data["train"], examples)


def training_arguments(output_dir, **overrides) -> TrainingArguments:
    """A short CPU run: batches of 4, learning rate 1e-3, no checkpoints unless `overrides` ask for them."""
    defaults = {
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "remove_unused_columns": False,
        "disable_tqdm": True,
    }
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **overrides})


def test_qat_runs_end_to_end_on_the_trainer_recipe(tmp_path):
    tokenizer, model, examples = demo_model_and_instruct_examples()

    quantizable = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    expected_int8 = {name for name in quantizable if not is_fp32_module(name)}
    batch = torch.randint(5, len(tokenizer), (2, 16))
    arguments = training_arguments(tmp_path / "run", max_steps=2, logging_steps=1)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    quantized = train_qat(model, examples, arguments, tmp_path / "trained").eval()
    changed = [name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])]
    assert any(".self_attn.o_proj." in name for name in changed)
    assert not any(isinstance(module, FakeQuantizedLinear) for module in model.modules())  # converted back

    weight_types = linear_weight_types(quantized)
    assert {name for name, kind in weight_types.items() if kind is Int8Tensor} == expected_int8
    # the int8 model computes what fake quantization simulated during training, which is not the fp32 model
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        fp32_logits = trained(input_ids=batch).logits
        int8_logits = quantized(input_ids=batch).logits
        fake_quantized = prepare_qat(trained)
        assert {n for n, m in fake_quantized.named_modules() if isinstance(m, FakeQuantizedLinear)} == expected_int8
        fake_logits = fake_quantized(input_ids=batch).logits
    assert (fake_logits - fp32_logits).abs().max() > 1e-3
    torch.testing.assert_close(int8_logits, fake_logits, atol=1e-4, rtol=0)

    quantized.save_pretrained(tmp_path / "int8")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, int8_logits, atol=1e-6, rtol=1e-6)
    assert reloaded.generate(batch, max_new_tokens=3, do_sample=False).shape == (2, 19)


def test_qat_resumed_from_a_checkpoint_continues_that_run(tmp_path):
    tokenizer, model, examples = demo_model_and_instruct_examples()

    def arguments(output_dir):
        return training_arguments(output_dir, max_steps=6, warmup_steps=2, seed=0)

    run = arguments(tmp_path / "run").set_save(strategy="steps", steps=4)
    build_stage_trainer("instruct", model, examples, run).train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    start = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    moves = {}
    for name, resume in (("resumed", checkpoint), ("restarted", None)):
        qat_model = AutoModelForCausalLM.from_pretrained(checkpoint)
        train_qat(
            qat_model, examples, arguments(tmp_path / name), tmp_path / name / "trained", resume_from_checkpoint=resume
        )
        trained = AutoModelForCausalLM.from_pretrained(tmp_path / name / "trained").state_dict()
        moves[name] = torch.cat([(trained[key] - start[key]).flatten() for key in start])
    run_move = torch.cat([(value - start[key]).flatten() for key, value in model.state_dict().items()])

    # resumed: the run's last 2 steps (its optimizer state, schedule and batches), fake-quantized; restarted: 6 steps
    # of a fresh optimizer and schedule from the checkpoint, another trajectory
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(moves["resumed"], run_move, dim=0) > 0.99
    torch.testing.assert_close(moves["resumed"].norm(), run_move.norm(), rtol=0.02, atol=0)
    assert cosine(moves["restarted"], run_move, dim=0) < 0.9 and moves["restarted"].norm() > 2 * run_move.norm()
