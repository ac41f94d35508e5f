"""Mixed-precision policy: fp32 sensitive modules, weight-decay groups, adaptive fp16 loss scaler, log-space loss."""

import math

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer

from deepseekv3.modeling_deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.training.precision import (
    AdaptiveGradScaler,
    PrecisionTrainer,
    PrecisionTrainingArguments,
    apply_precision_policy,
    get_decay_parameter_names,
    get_parameter_groups,
    log_space_loss,
)

FP16_MAX = torch.finfo(torch.float16).max
# The sensitive tensors of the tiny config, by name fragment (one of each kind must be fp32 after the policy).
SENSITIVE = ("layernorm.weight", "model.norm.weight", "mlp.gate.weight", "e_score_correction_bias", "head_gate.")
SENSITIVE += ("modality_type_embedding.",)


def _batch(num_rows: int = 4, seq_len: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 96, (num_rows, seq_len), generator=generator)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def _dataset(num_rows: int = 8) -> Dataset:
    batch = _batch(num_rows)
    return Dataset.from_dict({key: value.tolist() for key, value in batch.items()})


def _args(tmp_path, **kwargs) -> PrecisionTrainingArguments:
    defaults = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
    }
    return PrecisionTrainingArguments(**{**defaults, **kwargs})


def _is_sensitive(name: str) -> bool:
    return any(part in name for part in SENSITIVE)


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: tensor.dtype for name, tensor in tensors.items()}


# ---- precision policy ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_matches_from_pretrained_dtypes(tiny_config, tmp_path, dtype):
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_config)
    model.save_pretrained(tmp_path)
    loaded = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    inv_freq = model.model.rotary_emb.inv_freq.clone()

    apply_precision_policy(model, dtype)

    assert _dtypes(model) == _dtypes(loaded)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            expected = torch.float32 if _is_sensitive(name) else dtype
            assert tensor.dtype == expected, name
            torch.testing.assert_close(tensor, original[name].to(expected), rtol=0, atol=0)
    assert all(any(part in name for name in original) for part in SENSITIVE)
    # a non-persistent buffer keeps its fp32 values: `model.to(dtype)` would round the rotary frequencies
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv_freq, rtol=0, atol=0)


def test_policy_to_float32_restores_every_tensor(tiny_config):
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_config)
    parameters = dict(model.named_parameters())
    apply_precision_policy(apply_precision_policy(model, torch.bfloat16), torch.float32)
    assert set(_dtypes(model).values()) == {torch.float32}
    assert all(param is parameters[name] for name, param in model.named_parameters())  # optimizer refs stay valid


def test_policy_rejects_other_dtypes(tiny_config):
    with pytest.raises(ValueError, match="torch.int8"):
        apply_precision_policy(DeepseekV3MultimodalForConditionalGeneration(tiny_config), torch.int8)


def test_bf16_trainer_steps_keep_sensitive_modules_fp32(tiny_config, tmp_path):
    model = apply_precision_policy(DeepseekV3MultimodalForConditionalGeneration(tiny_config), torch.bfloat16)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    autocast_seen = []
    router = model.model.layers[1].mlp.gate
    router.register_forward_pre_hook(lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    trainer = Trainer(model=model, args=_args(tmp_path, bf16=True), train_dataset=_dataset())

    trainer.train()

    assert autocast_seen and all(autocast_seen)  # Accelerate's bf16 autocast was on around the forward
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if _is_sensitive(name) else torch.bfloat16), name
        assert torch.isfinite(param).all(), name
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    changed = [name for name, param in model.named_parameters() if not torch.equal(param, before[name])]
    assert any(_is_sensitive(name) for name in changed) and any(not _is_sensitive(name) for name in changed)


# ---- weight-decay groups ----


def _expected_no_decay(name: str) -> bool:
    """The rule, written independently of the implementation: norms, biases, router, head gates, lookup
    embeddings (tokens, modality types, image patch positions) and the contrastive temperature; conv patch/frame
    embedding weights and `lm_head` decay."""
    return (
        name.endswith(".bias")
        or "layernorm" in name
        or name == "model.norm.weight"
        or name.endswith(".mlp.gate.weight")
        or ".head_gate." in name
        or name
        in (
            "model.embed_tokens.weight",
            "model.modality_type_embedding.weight",
            "model.image_position_embedding.weight",
            "model.logit_scale",
        )
    )


def test_trainer_optimizer_has_exact_decay_split(tiny_config, tmp_path):
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_config)
    model.model.text_projection.weight.requires_grad_(False)  # frozen: in no group
    names = {param: name for name, param in model.named_parameters()}
    trainer = PrecisionTrainer(model=model, args=_args(tmp_path, weight_decay=0.1), train_dataset=_dataset())

    optimizer = trainer.create_optimizer()

    decay_group, no_decay_group = optimizer.param_groups
    assert (decay_group["weight_decay"], no_decay_group["weight_decay"]) == (0.1, 0.0)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {names[param] for param in decay_group["params"]} == {n for n in trainable if not _expected_no_decay(n)}
    assert {names[param] for param in no_decay_group["params"]} == {n for n in trainable if _expected_no_decay(n)}
    for name in ("model.image_patch_embedding.weight", "model.audio_frame_embedding.weight", "lm_head.weight"):
        assert name in get_decay_parameter_names(model)
    # the router's correction bias is a buffer (updated by the balancing rule, not by the optimizer)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in dict(model.named_buffers())
    assert not any("e_score_correction_bias" in name for name in names.values())
    # the standalone function gives the same groups, and only adds exclusions to Trainer's default
    groups = get_parameter_groups(model, 0.1)
    assert [[id(p) for p in g["params"]] for g in groups] == [
        [id(p) for p in g["params"]] for g in optimizer.param_groups
    ]
    assert set(get_decay_parameter_names(model)) < set(Trainer.get_decay_parameter_names(trainer, model))


def test_tied_lm_head_follows_the_embedding(tiny_config):
    tiny_config.tie_word_embeddings = True
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "model.embed_tokens.weight" not in get_decay_parameter_names(model)
    assert "lm_head.weight" not in get_decay_parameter_names(model)


# ---- log-space loss ----


def test_log_space_loss_gradient_is_gradient_over_one_plus_loss(tiny_config):
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_config)
    batch = _batch()
    loss = model(**batch).loss
    gradients = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    log_gradients = torch.autograd.grad(
        log_space_loss(model(**batch).loss), list(model.parameters()), allow_unused=True
    )
    checked = 0
    for gradient, log_gradient in zip(gradients, log_gradients):
        if gradient is not None:
            torch.testing.assert_close(log_gradient, gradient / (1 + loss.detach()), rtol=1e-5, atol=1e-8)
            checked += 1
    assert checked > 10 and loss.item() > 1.0  # a loss far from 0, where the shrink 1/(1+L) is visible


def test_log_space_loss_is_off_by_default(tmp_path):
    assert not PrecisionTrainingArguments(output_dir=str(tmp_path)).log_space_loss


# ---- fp16 and the adaptive loss scaler ----


def test_fp16_on_cpu_is_refused_because_accelerate_would_train_in_fp32(tiny_config, tmp_path):
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_config)
    # what plain Trainer does on CPU with fp16=True (the reason for the refusal): no autocast, no scaler
    plain = Trainer(model=model, args=_args(tmp_path, fp16=True))
    assert plain.accelerator.mixed_precision == "fp16"
    assert not plain.accelerator.native_amp and plain.accelerator.scaler is None
    with pytest.raises(ValueError, match="fp16=True on CPU"):
        PrecisionTrainer(model=model, args=_args(tmp_path, fp16=True))


def _one_parameter_step(scaler: AdaptiveGradScaler, gradient: torch.Tensor) -> tuple[nn.Parameter, torch.Tensor]:
    """One scaled SGD(lr=1) step of a parameter whose gradient is exactly `gradient`; returns it and its start."""
    param = nn.Parameter(torch.ones_like(gradient))
    optimizer = torch.optim.SGD([param], lr=1.0)
    loss = (param * gradient).sum()
    scaler.scale(loss).backward()  # an inf entry in `gradient` is the overflow a fp16 backward produces
    scaler.step(optimizer)
    scaler.update()
    return param, torch.ones_like(gradient)


# (initial scale, largest |gradient|, next scale, skipped): headroom = log2(65504 / (scale * 8)) bits, target 4.
SCALER_RULE_CASES = [
    (2.0**10, 8.0, 2.0**8, 0),  # 2.9993 bits < 4: back off by ceil(4 - 2.9993) = 2 bits, step applied
    (2.0**6, 8.0, 2.0**8, 0),  # 6.9986 bits: grow by floor(2.9986) = 2 bits
    (2.0**4, 8.0, 2.0**8, 0),  # 8.9986 bits: grow by floor(4.9986) = 4 bits (the cap, max_growth_bits=4)
    (2.0**0, 8.0, 2.0**4, 0),  # 12.998 bits: still capped at 4 bits
    (2.0**10, math.inf, 2.0**9, 1),  # overflow: step skipped, back off by 0.5
]


@pytest.mark.parametrize(("init_scale", "max_gradient", "next_scale", "skipped"), SCALER_RULE_CASES)
def test_adaptive_scaler_rule(init_scale, max_gradient, next_scale, skipped):
    scaler = AdaptiveGradScaler("cpu", init_scale=init_scale, growth_interval=1)
    gradient = torch.tensor([1.0, -max_gradient, 0.5])
    param, start = _one_parameter_step(scaler, gradient)
    assert scaler.get_scale() == next_scale
    assert scaler.skipped_steps == skipped
    if skipped:
        torch.testing.assert_close(param.detach(), start, rtol=0, atol=0)
        assert math.isnan(scaler.stats()["loss_scale_headroom_bits"])
    else:
        torch.testing.assert_close(param.detach(), start - gradient)  # unscaled exactly (powers of two)
        expected_headroom = math.log2(FP16_MAX / (init_scale * max_gradient))
        assert scaler.stats()["loss_scale_headroom_bits"] == pytest.approx(expected_headroom)


def test_adaptive_scaler_grows_only_after_growth_interval_clean_steps():
    scaler = AdaptiveGradScaler("cpu", init_scale=2.0**4, growth_interval=3)
    gradient = torch.tensor([8.0])  # headroom 8.9986 bits at scale 16: growth of 4 bits when due
    scales = []
    for _ in range(4):
        _one_parameter_step(scaler, gradient)
        scales.append(scaler.get_scale())
    assert scales == [2.0**4, 2.0**4, 2.0**8, 2.0**8]
    assert scaler.clean_steps == 1


def test_adaptive_scaler_state_round_trip():
    scaler = AdaptiveGradScaler("cpu", init_scale=2.0**10, growth_interval=5, target_headroom_bits=3.0)
    _one_parameter_step(scaler, torch.tensor([math.inf]))
    _one_parameter_step(scaler, torch.tensor([1.0]))
    restored = AdaptiveGradScaler("cpu")
    restored.load_state_dict(scaler.state_dict())
    state = restored.state_dict()
    assert state == scaler.state_dict()
    assert (state["scale"], state["skipped_steps"], state["clean_steps"], state["growth_interval"]) == (
        2.0**9,
        1,
        1,
        5,
    )


def test_fp16_autocast_training_survives_an_injected_overflow(tiny_config):
    """A plain loop on CPU (Trainer refuses fp16 there): fp16 autocast, AdamW, the adaptive scaler. At step 3 the
    loss is multiplied by 2**30 before scaling, so the fp16 backward overflows for real."""
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_config).train()
    optimizer = torch.optim.AdamW(get_parameter_groups(model, 0.01), lr=1e-2)
    scaler = AdaptiveGradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    batch = _batch()
    losses, overflow_step = [], 3
    for step in range(10):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch).loss
        losses.append(loss.item())
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        scale = scaler.get_scale()
        scaler.scale(loss * 2.0**30 if step == overflow_step else loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        unchanged = all(torch.equal(param, before[name]) for name, param in model.named_parameters())
        assert unchanged == (step == overflow_step), step  # exactly the overflow step was skipped
        if step == overflow_step:
            assert scaler.get_scale() == scale * 0.5 and scaler.skipped_steps == 1
        assert all(torch.isfinite(param).all() for param in model.parameters())
    assert scaler.skipped_steps == 1
    assert losses[-1] < losses[overflow_step] < losses[0]


def test_trainer_logs_the_adaptive_scaler_and_skips_an_overflowed_step(tiny_config, tmp_path):
    """The Trainer path of the scaler (Accelerate's `backward` and optimizer wrapper). On CPU Accelerate creates no
    scaler, so the test installs one where `PrecisionTrainer` puts it on a GPU with fp16; fp32 otherwise."""
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_config)
    trainer = PrecisionTrainer(
        model=model, args=_args(tmp_path, max_steps=4, max_grad_norm=0), train_dataset=_dataset()
    )
    trainer.accelerator.scaler = AdaptiveGradScaler("cpu", init_scale=2.0**8, growth_interval=100)
    calls = []

    def overflow_on_third_backward(gradient: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.full_like(gradient, math.inf) if len(calls) == 3 else gradient

    model.lm_head.weight.register_hook(overflow_on_third_backward)
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["loss_scale_skipped_steps"] for entry in logs] == [0, 0, 1, 1]
    assert [entry["loss_scale"] for entry in logs] == [2.0**8, 2.0**8, 2.0**7, 2.0**7]
    assert math.isnan(logs[2]["loss_scale_headroom_bits"]) and logs[3]["loss_scale_headroom_bits"] > 4.0
    assert all(torch.isfinite(param).all() for param in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision through Trainer needs a GPU")
def test_fp16_trainer_on_gpu_uses_the_adaptive_scaler(tiny_config, tmp_path):
    model = DeepseekV3MultimodalForConditionalGeneration(tiny_config)
    args = _args(tmp_path, fp16=True, use_cpu=False, loss_scale_growth_interval=1)
    trainer = PrecisionTrainer(model=model, args=args, train_dataset=_dataset())
    assert isinstance(trainer.accelerator.scaler, AdaptiveGradScaler)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("loss_scale" in entry and math.isfinite(entry["loss"]) for entry in logs)
