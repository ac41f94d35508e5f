"""Data, fully-sharded, tensor-parallel and DeepSpeed ZeRO-2 runs in real processes (gloo on CPU) against one process.

Every multi-process run trains the tiny model for 3 SGD steps on a global batch of 4 sequences split evenly over the
ranks; the reference trains the same weights on the whole batch in this process. Each rank's loss is the mean over
its equally long sequences, so the averaged gradient equals the whole batch's.
"""

import pytest
import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from distributed_helpers import read_json, read_weights, run_accelerate, run_torchrun
from safetensors.torch import load_file
from workers import synthetic_tokens

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.training.balancing import ExpertLoadBalancer

pytestmark = pytest.mark.distributed

STEPS, GLOBAL_BATCH, SEQ_LEN, LEARNING_RATE = 3, 4, 16, 0.1
# fp32; only the order of the reductions differs from the single process
LOSS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
WEIGHT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture
def model_dir(tmp_path):
    config = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, use_attention_gate=True)
    DeepseekV3MultimodalForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def _single_process_run(model_dir) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(model_dir).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    balancer = ExpertLoadBalancer(model)
    losses = []
    for input_ids in synthetic_tokens(model.config.vocab_size, STEPS, GLOBAL_BATCH, SEQ_LEN):
        outputs = model(input_ids=input_ids, labels=input_ids)
        balancer.observe(outputs.expert_load)
        outputs.loss.backward()
        optimizer.step()
        balancer.step()
        optimizer.zero_grad()
        losses.append(outputs.loss.item())
    return losses, {name: value.detach() for name, value in model.state_dict().items()}


def _assert_same_run(out_dir, model_dir, weight_tolerance=WEIGHT_TOLERANCE, loss_tolerance=LOSS_TOLERANCE):
    losses, weights = _single_process_run(model_dir)
    metrics = read_json(out_dir / "metrics.json")
    torch.testing.assert_close(torch.tensor(metrics["losses"]), torch.tensor(losses), **loss_tolerance)
    assert losses[-1] < losses[0]
    trained = load_file(str(out_dir / "model.safetensors"))
    assert trained.keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(trained[name], value, **weight_tolerance, msg=name)
    return metrics


def test_ddp_with_accelerate_launch_matches_one_process(tmp_path, model_dir):
    out_dir = tmp_path / "ddp"
    run_accelerate(
        "ddp.yaml",
        *("--model_name_or_path", str(model_dir), "--output_dir", str(out_dir), "--optimizer", "sgd"),
        *("--learning_rate", str(LEARNING_RATE), "--max_steps", str(STEPS)),
        *("--global_batch_size", str(GLOBAL_BATCH), "--seq_len", str(SEQ_LEN)),
        ACCELERATE_USE_CPU="1",
    )
    metrics = _assert_same_run(out_dir, model_dir)
    assert metrics["num_processes"] == 2
    assert metrics["wrapped_model"] == "DistributedDataParallel"


def test_fsdp2_matches_one_process(tmp_path, model_dir):
    run_torchrun(2, "fsdp", str(model_dir), str(tmp_path))
    metrics = _assert_same_run(tmp_path, model_dir)
    # the balancer moved the MoE bias, identically on both ranks (FSDP2 leaves buffers unsynchronised)
    biases = [read_weights(tmp_path / f"bias{rank}.safetensors") for rank in (0, 1)]
    assert biases[0].keys() == {"model.layers.1.mlp.gate.e_score_correction_bias"}
    for name, bias in biases[0].items():
        assert bias.abs().sum() > 0
        torch.testing.assert_close(biases[1][name], bias, rtol=0, atol=0)
    # FSDP2 swaps each sharded module's class for an `FSDP<class>` subclass
    assert metrics["decoder_layer_class"] == "FSDPDeepseekV3MultimodalDecoderLayer"


def test_fsdp2_times_tensor_parallel_matches_one_process(tmp_path, model_dir):
    # 4 processes: FSDP2 over 2 data-parallel groups of 2 tensor-parallel ranks (sharded weights, sharded again)
    run_torchrun(4, "fsdp_tensor_parallel", str(model_dir), str(tmp_path))
    metrics = _assert_same_run(tmp_path, model_dir)
    assert metrics["decoder_layer_class"] == "FSDPDeepseekV3MultimodalDecoderLayer"


def test_deepspeed_zero2_smoke_matches_one_process(tmp_path, model_dir):
    run_torchrun(2, "deepspeed_zero2", str(model_dir), str(tmp_path))
    metrics = _assert_same_run(tmp_path, model_dir)
    assert metrics["optimizer"] == "DeepSpeedZeroOptimizer" and metrics["zero_stage"] == 2


def test_tensor_parallel_logits_and_gradients_match_one_process(tmp_path):
    config = DeepseekV3MultimodalConfig(
        **TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, use_attention_gate=True, use_image_position_values=True
    )
    model = DeepseekV3MultimodalForConditionalGeneration(config)
    model.save_pretrained(tmp_path / "model")
    num_image_tokens = config.num_image_tokens
    input_ids = torch.randint(5, config.vocab_size, (2, num_image_tokens + 8))
    input_ids[0, 1 : 1 + num_image_tokens] = config.image_token_id
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, config.image_size, config.image_size)}
    torch.save(inputs, tmp_path / "inputs.pt")

    run_torchrun(2, "tensor_parallel", str(tmp_path / "model"), str(tmp_path))
    tp = read_weights(tmp_path / "tp.safetensors")
    outputs = model(**inputs, labels=input_ids)
    outputs.loss.backward()
    torch.testing.assert_close(tp["logits"], outputs.logits.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tp["loss"], outputs.loss.detach(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(
            tp["text_features"],
            model.model.get_text_features(input_ids=input_ids[1:]).pooler_output,
            rtol=1e-5,
            atol=1e-5,
        )
    with torch.no_grad():  # with a skip threshold set, the sharded model computes every head (gates at 0.982)
        every_head = model.eval()(**inputs).logits
        model.set_head_skip_threshold(0.99)
        skipped = model(**inputs).logits
        model.train().set_head_skip_threshold(0.0)
    torch.testing.assert_close(tp["eval_logits_with_skip_threshold"], every_head, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(skipped, every_head, atol=1e-3)
    reference_grads = {
        f"grad.{name}": param.grad for name, param in model.named_parameters() if param.grad is not None
    }
    assert reference_grads.keys() == {key for key in tp if key.startswith("grad.")}
    for name, grad in reference_grads.items():
        torch.testing.assert_close(tp[name], grad, rtol=1e-4, atol=1e-5, msg=name)

    sharded = set(read_json(tmp_path / "sharded.json"))
    for name in (
        "model.layers.0.self_attn.q_b_proj.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.self_attn.head_gate.up_proj.weight",
        "model.layers.0.self_attn.head_gate.up_proj.bias",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.text_projection.weight",
        "model.image_projection.weight",
        "model.audio_projection.weight",
        "lm_head.weight",
    ):
        assert name in sharded, f"{name} is not sharded"
    # replicated by design: the latent the gate reads, and the media embeddings (see `base_model_tp_plan`)
    assert "model.layers.0.self_attn.head_gate.down_proj.weight" not in sharded
    assert "model.image_patch_embedding.weight" not in sharded


def test_trainer_callback_registers_fourbit_hook_under_ddp(tmp_path, model_dir):
    run_torchrun(2, "trainer_callback", str(model_dir), str(tmp_path))
    logs = read_json(tmp_path / "trainer.json")
    assert logs["wrapped"] == "DistributedDataParallel"
    step_logs = [entry for entry in logs["log_history"] if "loss" in entry]
    assert len(step_logs) == STEPS
    assert all(entry["comm_compression_ratio"] >= 7.5 for entry in step_logs)
    assert step_logs[-1]["comm_bytes_sent"] > step_logs[0]["comm_bytes_sent"] > 0
    rank_weights = [read_weights(tmp_path / f"trainer_weights{rank}.safetensors")["weights"] for rank in (0, 1)]
    assert torch.equal(*rank_weights), "replicas drifted apart"
