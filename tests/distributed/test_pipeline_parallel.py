"""Pipeline parallel (`deepseekv3.distributed.pipeline` on torch.distributed.pipelining) against one process.

The model has 4 decoder layers (one dense, three MoE), head gates, image position values, images and audio attended
both ways inside each span. Every
run trains for 3 SGD steps on batches whose rows hold 2, 0, 1 and 0 images and 0, 1, 1 and 0 clips, so the
micro-batches carry different numbers of images, clips and label tokens; the reference trains the whole model on the
same batches in this process. Losses, the first step's gradients and the final weights (router biases included,
moved by the auxiliary-loss-free rule on each stage) must match.
"""

import copy
import math

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from distributed_helpers import free_port, read_json, run_script
from pipeline_workers import LEARNING_RATE, ROW_MEDIA, multimodal_batches
from safetensors.torch import load_file

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.distributed import DeepseekV3MultimodalPipelineStage, PipelineParallel, pipeline_inputs, stage_layers
from deepseekv3.training.balancing import ExpertLoadBalancer

WORKERS = "tests/distributed/pipeline_workers.py"
# fp32; only the order of the reductions differs from one process
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
PROJECTION_HEADS = ("model.text_projection", "model.image_projection", "model.audio_projection", "model.logit_scale")


def _config() -> DeepseekV3MultimodalConfig:
    return DeepseekV3MultimodalConfig(
        **{**TINY_TEXT_KWARGS, "num_hidden_layers": 4},
        **TINY_MEDIA_KWARGS,
        use_attention_gate=True,
        use_image_position_values=True,
        use_bidirectional_media_attention=True,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pipeline") / "model"
    DeepseekV3MultimodalForConditionalGeneration(_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """One process: per-step losses, the first step's gradients and the final weights."""
    model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(model_dir).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    balancer = ExpertLoadBalancer(model)
    losses, gradients = [], {}
    for step, batch in enumerate(multimodal_batches(model.config.vocab_size)):
        outputs = model(**batch)
        balancer.observe(outputs.expert_load)
        outputs.loss.backward()
        if step == 0:
            gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        balancer.step()
        losses.append(outputs.loss.item())
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return {"losses": losses, "gradients": gradients, "weights": weights}


def _assert_equals_reference(out_dir, num_processes: int, reference) -> list[dict]:
    """Every rank's gradients and weights equal the reference; together the stages hold every parameter of the
    model but the contrastive projection heads, and replicas (data- or tensor-parallel) agree."""
    metrics = [read_json(out_dir / f"rank{rank}.json") for rank in range(num_processes)]
    seen: dict[str, torch.Tensor] = {}
    for rank in range(num_processes):
        for key, value in load_file(str(out_dir / f"rank{rank}.safetensors")).items():
            kind, name = key.split(".", 1)
            expected = reference["gradients"][name] if kind == "grad" else reference["weights"][name]
            torch.testing.assert_close(value, expected, **TOLERANCE, msg=f"rank {rank}: {key}")
            if key in seen:
                torch.testing.assert_close(value, seen[key], **TOLERANCE, msg=f"replicas differ: {key}")
            seen[key] = value
    held = {key.split(".", 1)[1] for key in seen if key.startswith("weight.")}
    expected_names = {name for name in reference["weights"] if not name.startswith(PROJECTION_HEADS)}
    assert held == expected_names
    trained = {key.split(".", 1)[1] for key in seen if key.startswith("grad.")}
    assert trained == {name for name in reference["gradients"] if not name.startswith(PROJECTION_HEADS)}
    # the router biases moved, and moved as in one process (checked above)
    bias = "model.layers.3.mlp.gate.e_score_correction_bias"
    assert not torch.equal(seen[f"weight.{bias}"], torch.zeros_like(seen[f"weight.{bias}"]))
    return metrics


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("mode", "num_processes"),
    [
        ("1f1b", 2),  # our split, 1F1B, 4 micro-batches of one row
        ("pp_config", 2),  # transformers' DistributedConfig(pp_size=2) split and loading, GPipe, 2 micro-batches
    ],
)
def test_two_stages_equal_one_process(mode, num_processes, model_dir, reference, tmp_path):
    run_script(num_processes, WORKERS, mode, str(model_dir), str(tmp_path))
    metrics = _assert_equals_reference(tmp_path, num_processes, reference)
    assert [m["stage"] for m in metrics] == [0, 1]
    assert metrics[0]["losses"] == []  # only the last stage computes the loss
    torch.testing.assert_close(torch.tensor(metrics[1]["losses"]), torch.tensor(reference["losses"]), **TOLERANCE)


@pytest.mark.distributed
def test_pipeline_times_data_parallel_equals_one_process(model_dir, reference, tmp_path):
    """4 processes: 2 stages x 2 data-parallel replicas (DDP per stage), each replica on half of the batch."""
    run_script(4, WORKERS, "pp_dp", str(model_dir), str(tmp_path))
    metrics = _assert_equals_reference(tmp_path, 4, reference)
    assert [m["stage"] for m in metrics] == [0, 1, 0, 1]  # mesh ("dp", "pp"): rank = 2 * dp + pp
    # each last stage reports its replica's share of the global batch's loss
    shares = torch.tensor([metrics[1]["losses"], metrics[3]["losses"]])
    assert (shares > 0).all()
    torch.testing.assert_close(shares.sum(0), torch.tensor(reference["losses"]), **TOLERANCE)


@pytest.mark.distributed
def test_pipeline_times_tensor_parallel_equals_one_process(model_dir, reference, tmp_path):
    """4 processes: 2 stages, each split over 2 tensor-parallel ranks by the model's tp_plan."""
    run_script(4, WORKERS, "pp_tp", str(model_dir), str(tmp_path))
    metrics = _assert_equals_reference(tmp_path, 4, reference)
    assert [m["stage"] for m in metrics] == [0, 0, 1, 1]  # mesh ("pp", "tp"): rank = 2 * pp + tp
    for rank, rank_metrics in enumerate(metrics):
        sharded = rank_metrics["tensor_parallel_parameters"]
        assert any(".self_attn.kv_b_proj." in name for name in sharded), rank
        assert any(".mlp.experts." in name or ".mlp.up_proj" in name for name in sharded), rank
    assert "model.embed_tokens.weight" in metrics[0]["tensor_parallel_parameters"]
    assert "lm_head.weight" in metrics[2]["tensor_parallel_parameters"]
    for rank in (2, 3):
        torch.testing.assert_close(
            torch.tensor(metrics[rank]["losses"]), torch.tensor(reference["losses"]), **TOLERANCE
        )


def test_stage_layers_split_as_transformers():
    # transformers' DistributedConfig(pp_size=3) on 32 layers: [0, 11), [11, 22), [22, 32)
    assert [stage_layers(32, 3, i) for i in range(3)] == [range(0, 11), range(11, 22), range(22, 32)]
    assert [stage_layers(4, 2, i) for i in range(2)] == [range(0, 2), range(2, 4)]
    with pytest.raises(ValueError, match="cannot be split into 5 pipeline stages"):
        stage_layers(4, 5, 0)
    with pytest.raises(ValueError, match="stage_index"):
        stage_layers(4, 2, 2)


def _microbatches(kwargs: dict, rows_per_microbatch: int) -> list[dict]:
    """torch's split of `pipeline_inputs`: tensors by rows, `media` whole."""
    batch_size = kwargs["input_ids"].shape[0]
    chunks = []
    for start in range(0, batch_size, rows_per_microbatch):
        chunk = {}
        for name, value in kwargs.items():
            chunk[name] = value[start : start + rows_per_microbatch] if isinstance(value, torch.Tensor) else value
        chunks.append(chunk)
    return chunks


@pytest.mark.parametrize("rows_per_microbatch", [1, 2, 4])
def test_stages_chained_equal_the_model_with_media_across_the_boundary(rows_per_microbatch):
    """Two stages in one process: each micro-batch embeds its own rows' images and clips on stage 0, stage 1 reads
    the hidden states with the media spans and image positions of the same rows: the logits equal the model's."""
    model = DeepseekV3MultimodalForConditionalGeneration(_config()).eval()
    batch = multimodal_batches(model.config.vocab_size, steps=1)[0]
    del batch["labels"]
    with torch.no_grad():
        expected = model(**batch).logits
    stages = [DeepseekV3MultimodalPipelineStage(copy.deepcopy(model), i, 2).eval() for i in range(2)]
    kwargs = pipeline_inputs(model.config, **batch)
    assert kwargs["media"].image_rows.tolist() == [row for row, (n, _) in enumerate(ROW_MEDIA) for _ in range(n)]
    logits = []
    with torch.no_grad():
        for chunk in _microbatches(kwargs, rows_per_microbatch):
            logits.append(stages[1](stages[0](**chunk), **chunk))
    torch.testing.assert_close(torch.cat(logits), expected, rtol=1e-5, atol=1e-6)
    # the media spans matter on the second stage: without them its images attend causally, and the logits change
    with torch.no_grad():
        hidden = stages[0](**kwargs)
        without_spans = stages[1](hidden, **{**kwargs, "media_span_ids": None})
    assert not torch.allclose(without_spans, expected, atol=1e-4)


def test_stage_holds_only_its_part_with_the_model_names():
    model = DeepseekV3MultimodalForConditionalGeneration(_config())
    full = set(dict(model.named_parameters()))
    first = DeepseekV3MultimodalPipelineStage(copy.deepcopy(model), 0, 2)
    last = DeepseekV3MultimodalPipelineStage(copy.deepcopy(model), 1, 2)
    first_names, last_names = set(dict(first.named_parameters())), set(dict(last.named_parameters()))
    assert not first_names & last_names
    assert first_names | last_names == {name for name in full if not name.startswith(PROJECTION_HEADS)}
    assert {"model.embed_tokens.weight", "model.image_patch_embedding.weight"} <= first_names
    assert not any(
        name.startswith(("model.layers.2.", "model.layers.3.", "lm_head", "model.norm")) for name in first_names
    )
    assert {"lm_head.weight", "model.norm.weight", "model.layers.3.mlp.gate.weight"} <= last_names
    assert not any(name.startswith(("model.embed_tokens", "model.image_", "model.audio_")) for name in last_names)


def test_clear_errors():
    config = _config()
    model = DeepseekV3MultimodalForConditionalGeneration(config)
    with pytest.raises(ValueError, match="not DeepseekV3MultimodalModel"):
        DeepseekV3MultimodalPipelineStage(model.model, 0, 2)
    tied = DeepseekV3MultimodalForConditionalGeneration(
        DeepseekV3MultimodalConfig(**{**TINY_TEXT_KWARGS, "num_hidden_layers": 4}, tie_word_embeddings=True)
    )
    with pytest.raises(ValueError, match="untie them"):
        DeepseekV3MultimodalPipelineStage(tied, 0, 2)
    batch = multimodal_batches(config.vocab_size, steps=1)[0]
    with pytest.raises(ValueError, match="48 image placeholder tokens but the 2 image"):
        pipeline_inputs(config, batch["input_ids"], pixel_values=batch["pixel_values"][:2])
    with pytest.raises(ValueError, match="audio placeholder tokens but no input_features"):
        pipeline_inputs(config, batch["input_ids"], pixel_values=batch["pixel_values"])
    second = DeepseekV3MultimodalPipelineStage(model, 1, 2)
    kwargs = pipeline_inputs(config, **{k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="needs the hidden states of stage 0"):
        second(**kwargs)


@pytest.fixture
def one_process_group():
    """A gloo group of this process alone (a one-stage pipeline), destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_stage_step_equals_the_model_and_rejects_other_shapes(one_process_group):
    model = DeepseekV3MultimodalForConditionalGeneration(_config()).train()
    reference = copy.deepcopy(model)
    batch = multimodal_batches(model.config.vocab_size, steps=1)[0]
    pipe = PipelineParallel(model, n_microbatches=2, stage_index=0, num_stages=1)
    loss = pipe.step(**batch)
    expected = reference(**batch)
    expected.loss.backward()
    torch.testing.assert_close(loss, expected.loss.detach(), **TOLERANCE)
    reference_gradients = dict(reference.named_parameters())
    for name, param in pipe.module.named_parameters():
        torch.testing.assert_close(param.grad, reference_gradients[name].grad, **TOLERANCE, msg=name)
    # the one forward torch adds on the first step (to infer shapes) is not counted as the batch's expert load
    balanced = pipe.balance_experts()
    torch.testing.assert_close(balanced, expected.expert_load)
    shorter = {
        name: value[:, :40] if name in ("input_ids", "labels", "attention_mask") else value
        for name, value in batch.items()
    }
    with pytest.raises(ValueError, match=r"every batch must have the shape of the first \(4, 48\)"):
        pipe.step(**shorter)
    three_rows = multimodal_batches(model.config.vocab_size, steps=1)[0]
    three_rows = {"input_ids": three_rows["input_ids"][:3], "labels": three_rows["labels"][:3]}
    with pytest.raises(ValueError, match=r"3 rows\) must split into n_microbatches \(2\)"):
        pipe.step(**three_rows)
    with pytest.raises(ValueError, match="schedule"):
        PipelineParallel(reference, n_microbatches=2, schedule="zero-bubble", stage_index=0, num_stages=1)


@pytest.mark.distributed
def test_example_script_trains(tmp_path):
    """`examples/pipeline_parallel.py` as the README runs it: 2 stages x 2 data-parallel replicas, GPipe."""
    run_script(4, "examples/pipeline_parallel.py", "--output_dir", str(tmp_path), "--dp", "2", "--schedule", "gpipe")
    metrics = read_json(tmp_path / "metrics.json")
    assert (metrics["stages"], metrics["dp"], metrics["tp"], metrics["schedule"]) == (2, 2, 1, "gpipe")
    losses = metrics["losses"]
    assert len(losses) == 20 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.7 * losses[0]
