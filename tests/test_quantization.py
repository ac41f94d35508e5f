"""INT8: post-training quantization through transformers' `TorchAoConfig`, and quantization-aware training through
torchao's QAT API on a `Trainer` stage recipe, of the linear layers and the fused routed experts; both save with
`save_pretrained` and load back."""

import pytest
import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from torch import nn
from torchao.quantization import FqnToConfig, Int8Tensor, quantize_
from torchao.quantization import quant_primitives as torchao_quant_primitives
from torchao.quantization.qat import FakeQuantizedLinear
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.data import build_multimodal_dataset, build_text_corpus
from deepseekv3.quantization import (
    EXPERT_PARAMETERS,
    FP32_MODULES,
    INT8_EXPERTS_IMPLEMENTATION,
    QAT_EXPERTS_IMPLEMENTATION,
    _quantize_rows,
    convert_qat,
    has_int8_experts,
    int8_quantization_config,
    is_int8_quantizable,
    load_int8_model,
    prepare_qat,
    train_qat,
    use_int8_linear_kernel,
)
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.collators import encode_rows
from deepseekv3.training.demo import DemoSettings, build_demo_model
from deepseekv3.training.recipes import build_stage_trainer, select_stage_examples


def linear_weight_types(model: nn.Module) -> dict[str, type]:
    return {name: type(module.weight) for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def is_fp32_module(name: str) -> bool:
    return any(kept in name.split(".") for kept in FP32_MODULES)


def expert_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: parameter
        for name, parameter in model.named_parameters()
        if name.split(".")[-2] == "experts" and name.split(".")[-1] in EXPERT_PARAMETERS
    }


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm())


@pytest.fixture
def saved_fp32(tmp_path):
    config = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, use_attention_gate=True)
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "fp32")
    return model, tmp_path / "fp32"


def test_ptq_quantizes_linear_layers_and_experts_and_keeps_sensitive_modules_fp32(saved_fp32, tmp_path):
    fp32_model, path = saved_fp32
    model = load_int8_model(path).eval()
    weight_types = linear_weight_types(model)
    assert {name for name, kind in weight_types.items() if kind is Int8Tensor} == {
        name for name in weight_types if not is_fp32_module(name)
    }
    assert any(".head_gate." in name for name in weight_types) and "lm_head" in weight_types
    assert all(weight_types[name] is nn.Parameter for name in weight_types if is_fp32_module(name))
    # the routed experts: int8 values, an fp32 scale per expert and output row, on the int8 experts kernel
    experts = expert_weights(model)
    assert set(experts) == {f"model.layers.1.mlp.experts.{name}" for name in EXPERT_PARAMETERS}
    fp32_experts = expert_weights(fp32_model)
    for name, weight in experts.items():
        assert isinstance(weight, Int8Tensor) and weight.qdata.dtype == torch.int8
        assert weight.qdata.shape == fp32_experts[name].shape and weight.scale.shape == (*weight.shape[:2], 1)
        assert ((weight.dequantize() - fp32_experts[name]).abs() <= 0.5001 * weight.scale).all()  # round to nearest
    assert has_int8_experts(model) and model.config._experts_implementation == INT8_EXPERTS_IMPLEMENTATION
    for name, parameter in model.named_parameters():  # the router, norms, embeddings: untouched fp32
        if not isinstance(parameter, Int8Tensor):
            assert parameter.dtype == torch.float32, name

    input_ids = torch.randint(5, 96, (2, 12))
    with torch.no_grad():
        expected = fp32_model(input_ids=input_ids).logits
        quantized = model(input_ids=input_ids).logits
    cosine = torch.nn.functional.cosine_similarity(quantized.flatten(), expected.flatten(), dim=0)
    assert 0.98 < cosine and not torch.equal(quantized, expected)

    model.save_pretrained(tmp_path / "int8")
    reloaded = load_int8_model(tmp_path / "int8").eval()
    assert linear_weight_types(reloaded) == weight_types
    for name, weight in expert_weights(reloaded).items():
        assert isinstance(weight, Int8Tensor) and torch.equal(weight.qdata, experts[name].qdata), name
    assert reloaded.config._experts_implementation == INT8_EXPERTS_IMPLEMENTATION
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, quantized, atol=1e-6, rtol=1e-6)
    generated = reloaded.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, model.generate(input_ids, max_new_tokens=5, do_sample=False))
    assert generated.shape == (2, 17)
    # a plain from_pretrained needs an experts kernel that runs torchao's Int8Tensor: "eager", one expert at a time
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "int8", experts_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=input_ids).logits, quantized, atol=1e-5, rtol=0)


def test_ptq_of_the_linear_layers_only_keeps_the_experts_fp32_and_the_checkpoint_larger(saved_fp32, tmp_path):
    fp32_model, path = saved_fp32
    linear_only = load_int8_model(path, include_experts=False)
    assert not has_int8_experts(linear_only)
    assert all(type(weight) is nn.Parameter for weight in expert_weights(linear_only).values())
    assert {name for name, kind in linear_weight_types(linear_only).items() if kind is Int8Tensor} == {
        name for name in linear_weight_types(linear_only) if not is_fp32_module(name)
    }
    sizes = {}
    for name, model in (("linear_only", linear_only), ("with_experts", load_int8_model(path))):
        model.save_pretrained(tmp_path / name)
        sizes[name] = (tmp_path / name / "model.safetensors").stat().st_size
    # 1 byte per expert weight instead of 4, plus an fp32 scale and an int8 zero point per row
    experts = expert_weights(fp32_model).values()
    expert_bytes = sum(4 * weight.numel() for weight in experts)
    row_bytes = sum(5 * weight.shape[0] * weight.shape[1] for weight in experts)
    saved = sizes["linear_only"] - sizes["with_experts"]
    assert 0.75 * expert_bytes - row_bytes - 4096 < saved <= 0.75 * expert_bytes - row_bytes + 4096
    assert sizes["with_experts"] < sizes["linear_only"] < (path / "model.safetensors").stat().st_size


def tiny_experts(seed: int) -> tuple[DeepseekV3Experts, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """transformers' routed experts (8 experts, hidden 64, intermediate 32) at std 0.1, and a routed batch of 40
    tokens (2 experts each)."""
    torch.manual_seed(seed)
    config = DeepseekV3MultimodalConfig(**{**TINY_TEXT_KWARGS, "hidden_size": 64, "moe_intermediate_size": 32})
    experts = DeepseekV3Experts(config)
    for weight in (experts.gate_up_proj, experts.down_proj):
        nn.init.normal_(weight, std=0.1)
    top_k_index = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
    return experts, (torch.randn(40, 64), top_k_index, torch.rand(40, 2))


def int8_scheme():
    """The torchao config `int8_quantization_config` gives every name it quantizes."""
    return next(iter(int8_quantization_config().quant_type.fqn_to_config.values()))


def quantize_experts(experts: DeepseekV3Experts) -> None:
    """PTQ of a bare experts module, with the scheme `int8_quantization_config` gives the experts."""
    quantize_(experts, FqnToConfig(dict.fromkeys(EXPERT_PARAMETERS, int8_scheme())), filter_fn=None)


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_experts_kernel_matches_torchao_int8_linear_and_stays_close_to_fp32(seed):
    experts, routed = tiny_experts(seed)
    experts.config._experts_implementation = "eager"
    with torch.no_grad():
        expected = experts(*routed)
    quantize_experts(experts)
    outputs = {}
    for implementation in (INT8_EXPERTS_IMPLEMENTATION, "eager"):  # "eager": torchao's int8 linear per expert
        experts.config._experts_implementation = implementation
        with torch.no_grad():
            outputs[implementation] = experts(*routed)
    quantized = outputs[INT8_EXPERTS_IMPLEMENTATION]
    # the same int8 values, scales and zero points: equal to float rounding
    torch.testing.assert_close(quantized, outputs["eager"], atol=1e-5, rtol=0)
    # int8 rounding of two projections' weights and activations: about 1.4% of the output's norm at these sizes
    assert 0.005 < relative_error(quantized, expected) < 0.03


def test_quantize_rows_gives_torchao_values_scales_and_zero_points_bit_for_bit():
    torch.manual_seed(0)
    rows = torch.randn(64, 300) * torch.logspace(-3, 2, 64)[:, None]
    rows[1] = rows[1].abs() + 0.5  # all positive: the range still includes 0
    rows[2] = -rows[2].abs() - 0.5  # all negative
    rows[3] = 0.0  # the smallest scale, eps
    primitives = torchao_quant_primitives
    block_size = [1, rows.shape[-1]]
    scale, zero_point = primitives.choose_qparams_affine(
        rows,
        primitives.MappingType.ASYMMETRIC,
        block_size,
        torch.uint8,
        0,
        255,
        eps=torch.finfo(torch.float32).eps,
        scale_dtype=torch.float32,
        zero_point_dtype=torch.int32,
        keepdim=True,
    )
    values = primitives.quantize_affine(rows, block_size, scale, zero_point, torch.uint8, 0, 255)
    mine = _quantize_rows(rows)
    assert mine[0].dtype == torch.uint8 and mine[2].dtype == torch.int32
    for expected, got in zip((values, scale, zero_point), mine, strict=True):
        assert torch.equal(expected, got)
    assert mine[2][1] == 0 and mine[2][2] == 255  # all positive: zero at 0; all negative: zero at the top


def test_int8_linear_kernel_matches_torchao_linear_and_is_exact_where_it_is_not():
    torch.manual_seed(0)
    layer = nn.Linear(64, 24)
    quantize_(layer, int8_scheme())
    inputs = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = layer(inputs)  # torchao's linear
        assert use_int8_linear_kernel(layer) == 1
        got = layer(inputs)
    assert got.shape == expected.shape == (3, 5, 24)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)

    # a wide input with large values: the int32 dot products pass 2**24, where torchao's linear subtracts the zero
    # points' term after converting to float and loses digits; the kernel subtracts it in int32 first
    wide = nn.Linear(8192, 4, bias=False)
    quantize_(wide, int8_scheme())
    inputs = torch.rand(6, 8192) * 10 + 5  # all positive, far from 0: zero points at 0, values near 255
    inputs[:, 0] = -100.0  # a negative minimum moves the zero points up, making their term large
    values, scale, zero_point = _quantize_rows(inputs)
    exact = ((values.double() - zero_point.double()) @ wide.weight.qdata.double().t()) * scale.double()
    exact = exact * wide.weight.scale.double().t()
    with torch.no_grad():
        torchao_error = (wide(inputs).double() - exact).abs().max()
        use_int8_linear_kernel(wide)
        kernel_error = (wide(inputs).double() - exact).abs().max()
    assert kernel_error < 1e-4 * exact.abs().max() and kernel_error < torchao_error


def test_load_int8_model_runs_every_int8_linear_layer_on_the_kernel(saved_fp32):
    fp32_model, path = saved_fp32
    model = load_int8_model(path).eval()
    on_kernel = {name for name, module in model.named_modules() if "forward" in module.__dict__}
    assert on_kernel == {name for name, kind in linear_weight_types(model).items() if kind is Int8Tensor}
    input_ids = torch.randint(5, 96, (2, 12))
    with torch.no_grad():
        kernel = model(input_ids=input_ids).logits
        for name in on_kernel:
            del model.get_submodule(name).forward  # back to torchao's linear
        torchao = model(input_ids=input_ids).logits
    torch.testing.assert_close(kernel, torchao, atol=1e-5, rtol=0)


def test_fake_quantized_experts_compute_the_int8_kernel_and_pass_gradients_straight_through():
    experts, (hidden_states, top_k_index, top_k_weights) = tiny_experts(2)
    hidden_states.requires_grad_(True)
    top_k_weights.requires_grad_(True)
    parameters = (experts.gate_up_proj, experts.down_proj, hidden_states, top_k_weights)

    def forward_and_gradients(implementation: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        experts.config._experts_implementation = implementation
        output = experts(hidden_states, top_k_index, top_k_weights)
        return output.detach(), torch.autograd.grad(output.pow(2).sum(), parameters)

    expected, fp32_gradients = forward_and_gradients("eager")
    fake_quantized, qat_gradients = forward_and_gradients(QAT_EXPERTS_IMPLEMENTATION)
    assert 0.005 < relative_error(fake_quantized, expected) < 0.03
    # straight-through (the rounding passes gradients unchanged): the fp32 gradients, taken at weights and activations
    # about 1% off (cosines 0.97 to 1.0 on seeds 0-2; without straight-through gradients they would be zero)
    for qat_gradient, fp32_gradient in zip(qat_gradients, fp32_gradients, strict=True):
        cosine = torch.nn.functional.cosine_similarity(qat_gradient.flatten(), fp32_gradient.flatten(), dim=0)
        assert 0.95 < cosine and not torch.equal(qat_gradient, fp32_gradient)
    # converted, the int8 experts compute what training simulated
    quantize_experts(experts)
    experts.config._experts_implementation = INT8_EXPERTS_IMPLEMENTATION
    with torch.no_grad():
        torch.testing.assert_close(
            experts(hidden_states, top_k_index, top_k_weights), fake_quantized, atol=1e-5, rtol=0
        )


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
    model.set_experts_implementation(INT8_EXPERTS_IMPLEMENTATION)
    with pytest.raises(ValueError, match="needs int8 expert weights"), torch.no_grad():
        model(input_ids=torch.randint(5, 96, (1, 4)))


# the plain patch projection: these tests quantize the decoder's linear layers, and the int8-vs-fake-quantized
# tolerance below was set on this model (with the demo's conv stem the same seed draws other weights)
# initialised at 0.02: the int8 model then equals its fake-quantized simulation to 1e-7; at the demo's 0.1 they once
# differed by up to 0.013 on the logits, and with the current kernels (int8_linear_forward or torchao's linear) by
# 1e-6 (README, "INT8 (torchao)")
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
    experts_implementation = model.config._experts_implementation
    quantized = train_qat(model, examples, arguments, tmp_path / "trained").eval()
    changed = [name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])]
    assert any(".self_attn.o_proj." in name for name in changed)
    assert set(expert_weights(model)) <= set(changed)
    assert not any(isinstance(module, FakeQuantizedLinear) for module in model.modules())  # converted back
    assert model.config._experts_implementation == experts_implementation

    weight_types = linear_weight_types(quantized)
    assert {name for name, kind in weight_types.items() if kind is Int8Tensor} == expected_int8
    assert all(isinstance(weight, Int8Tensor) for weight in expert_weights(quantized).values())
    assert quantized.config._experts_implementation == INT8_EXPERTS_IMPLEMENTATION
    # the int8 model computes what fake quantization simulated during training, which is not the fp32 model
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        fp32_logits = trained(input_ids=batch).logits
        int8_logits = quantized(input_ids=batch).logits
        fake_quantized = prepare_qat(trained)
        assert {n for n, m in fake_quantized.named_modules() if isinstance(m, FakeQuantizedLinear)} == expected_int8
        assert fake_quantized.config._experts_implementation == QAT_EXPERTS_IMPLEMENTATION
        fake_logits = fake_quantized(input_ids=batch).logits
    assert (fake_logits - fp32_logits).abs().max() > 1e-3
    torch.testing.assert_close(int8_logits, fake_logits, atol=1e-4, rtol=0)

    quantized.save_pretrained(tmp_path / "int8")
    reloaded = load_int8_model(tmp_path / "int8").eval()
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
