"""Worker processes of the distributed tests, started by torchrun (gloo on CPU): `workers.py NAME ARGS...`.

Each worker does its run and writes what it measured (losses, weights, logits, gradients, byte counts) to files;
the tests compare those with single-process references and make every assertion themselves.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from teardown import exit_process
from torch import nn
from torch.nn.parallel import DistributedDataParallel

torch.set_num_threads(1)


def synthetic_tokens(vocab_size: int, steps: int, global_batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`(steps, global_batch, seq_len)` token ids, the same data as `examples/accelerate/train.py`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (steps * global_batch, seq_len), generator=generator).view(
        steps, global_batch, -1
    )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _train_sharded(model_dir: str, out_dir: str, distributed_config_kwargs: dict, data_parallel_rank, dp_size) -> None:
    from transformers.distributed import DistributedConfig

    from deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
    from deepseekv3.training.balancing import ExpertLoadBalancer

    model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(
        model_dir, distributed_config=DistributedConfig(**distributed_config_kwargs)
    ).train()  # training mode: the forward counts the experts' loads
    balancer = ExpertLoadBalancer(model)
    tokens = synthetic_tokens(model.config.vocab_size, steps=3, global_batch=4, seq_len=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rank = dist.get_rank()
    local_batch = tokens.shape[1] // dp_size
    dp_rank = data_parallel_rank(rank)
    losses = []
    for batch in tokens:
        input_ids = batch[dp_rank * local_batch : (dp_rank + 1) * local_batch]
        outputs = model(input_ids=input_ids, labels=input_ids)
        balancer.observe(outputs.expert_load)
        loss = outputs.loss
        loss.backward()
        optimizer.step()
        balancer.step()
        optimizer.zero_grad()
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        losses.append(summed.item() / dist.get_world_size())
    weights = {name: _full(value).detach().contiguous() for name, value in model.state_dict().items()}
    biases = {name: value for name, value in weights.items() if name.endswith("e_score_correction_bias")}
    save_file(biases, str(Path(out_dir, f"bias{rank}.safetensors")))
    if rank == 0:
        save_file(weights, str(Path(out_dir, "model.safetensors")))
        Path(out_dir, "metrics.json").write_text(
            json.dumps({"losses": losses, "decoder_layer_class": type(model.model.layers[0]).__name__})
        )


def fsdp(model_dir: str, out_dir: str) -> None:
    """FSDP2 over every process (transformers' `DistributedConfig(fsdp_size=world)`), SGD, 3 steps."""
    world = dist.get_world_size()
    _train_sharded(model_dir, out_dir, {"fsdp_size": world}, lambda rank: rank, world)


def fsdp_tensor_parallel(model_dir: str, out_dir: str) -> None:
    """2-D: FSDP2 over pairs of tensor-parallel ranks (`DistributedConfig(fsdp_size=2, tp_size=2)`, 4 processes)."""
    tp_size = 2
    fsdp_size = dist.get_world_size() // tp_size
    # transformers lays the mesh out as (fsdp, tp): consecutive ranks share a batch slice
    _train_sharded(
        model_dir, out_dir, {"fsdp_size": fsdp_size, "tp_size": tp_size}, lambda rank: rank // tp_size, fsdp_size
    )


def tensor_parallel(model_dir: str, out_dir: str) -> None:
    """`tp_plan="auto"` over every process: logits, contrastive features, loss and full gradients of one batch."""
    from transformers.distributed import DistributedConfig

    from deepseekv3 import DeepseekV3MultimodalForConditionalGeneration

    model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(
        model_dir, distributed_config=DistributedConfig(tp_plan="auto")
    )
    inputs = torch.load(Path(out_dir, "inputs.pt"))
    sharded = sorted(name for name, param in model.named_parameters() if hasattr(param, "full_tensor"))
    outputs = model(**inputs, labels=inputs["input_ids"])
    outputs.loss.backward()
    with torch.no_grad():
        text_features = model.model.get_text_features(input_ids=inputs["input_ids"][1:]).pooler_output  # text-only row
    grads = {
        f"grad.{name}": _full(param.grad).contiguous()
        for name, param in model.named_parameters()
        if param.grad is not None
    }
    # head skipping slices only dense weights: under tensor parallelism (sharded DTensor weights) every head runs
    model.eval().set_head_skip_threshold(0.99)
    with torch.no_grad():
        eval_logits = model(**inputs).logits
    if dist.get_rank() == 0:
        tensors = {
            "logits": outputs.logits.detach(),
            "loss": outputs.loss.detach(),
            "text_features": text_features,
            "eval_logits_with_skip_threshold": eval_logits,
        }
        save_file({**tensors, **grads}, str(Path(out_dir, "tp.safetensors")))
        Path(out_dir, "sharded.json").write_text(json.dumps(sharded))


def deepspeed_zero2(model_dir: str, out_dir: str) -> None:
    """DeepSpeed ZeRO stage 2 (`deepspeed.initialize`), SGD, 3 steps over an even split of the global batch."""
    import deepspeed

    from deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
    from deepseekv3.training.balancing import ExpertLoadBalancer

    model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(model_dir).train()
    balancer = ExpertLoadBalancer(model)
    world, rank = dist.get_world_size(), dist.get_rank()
    tokens = synthetic_tokens(model.config.vocab_size, steps=3, global_batch=4, seq_len=16)
    local_batch = tokens.shape[1] // world
    config = {
        "train_micro_batch_size_per_gpu": local_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_allow_untested_optimizer": True,
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    losses = []
    for batch in tokens:
        input_ids = batch[rank * local_batch : (rank + 1) * local_batch]
        outputs = engine(input_ids=input_ids, labels=input_ids)
        balancer.observe(outputs.expert_load)
        loss = outputs.loss
        engine.backward(loss)
        engine.step()
        balancer.step()
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        losses.append(summed.item() / world)
    if rank == 0:
        weights = {name: value.detach().contiguous() for name, value in engine.module.state_dict().items()}
        save_file(weights, str(Path(out_dir, "model.safetensors")))
        metrics = {
            "losses": losses,
            "optimizer": type(optimizer).__name__,
            "zero_stage": engine.zero_optimization_stage(),
        }
        Path(out_dir, "metrics.json").write_text(json.dumps(metrics))


def compressed_steps(out_dir: str) -> None:
    """`compressed_allreduce` on per-rank inputs for 30 steps (the first 5 random, then one fixed gradient)."""
    from deepseekv3.distributed import FourBitCompressionState, compressed_allreduce

    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(100 + rank)
    numel = 3000  # not a multiple of world x chunk: exercises the padding
    state = FourBitCompressionState(chunk_size=64)
    fixed = torch.randn(numel, generator=generator) * torch.linspace(0.01, 3.0, numel)
    inputs, outputs = [], []
    for step in range(30):
        grad = torch.randn(numel, generator=generator) * torch.linspace(0.01, 3.0, numel) if step < 5 else fixed
        inputs.append(grad)
        outputs.append(compressed_allreduce(state, 0, grad))
    save_file(
        {"inputs": torch.stack(inputs), "outputs": torch.stack(outputs)},
        str(Path(out_dir, f"steps{rank}.safetensors")),
    )
    metrics = {"bytes_sent": state.bytes_sent, "fp32_bytes": state.fp32_bytes, "num_allreduces": state.num_allreduces}
    Path(out_dir, f"steps{rank}.json").write_text(json.dumps(metrics))


def _toy_data(rank: int, world: int, steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    true_weight = torch.randn(32, 8, generator=generator)
    features = torch.randn(steps, world * batch, 32, generator=generator)
    targets = torch.tanh(features @ true_weight) + 0.3 * torch.randn(steps, world * batch, 8, generator=generator)
    return features[:, rank * batch : (rank + 1) * batch], targets[:, rank * batch : (rank + 1) * batch]


def toy_training(out_dir: str) -> None:
    """The same toy regression trained with plain DDP and with the 4-bit hook: losses, bytes, final weights."""
    from deepseekv3.distributed import register_fourbit_hook

    rank, world = dist.get_rank(), dist.get_world_size()
    steps = 300
    features, targets = _toy_data(rank, world, steps, batch=32)
    results = {}
    for variant in ("fp32", "fourbit"):
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 8)))
        state = register_fourbit_hook(model, chunk_size=256) if variant == "fourbit" else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for step in range(steps):
            loss = nn.functional.mse_loss(model(features[step]), targets[step])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            summed = loss.detach().clone()
            dist.all_reduce(summed)
            losses.append(summed.item() / world)
        results[variant] = {"losses": losses}
        if state is not None:
            results[variant].update(bytes_sent=state.bytes_sent, fp32_bytes=state.fp32_bytes)
        flat = torch.cat([param.detach().reshape(-1) for param in model.module.parameters()])
        save_file({"weights": flat}, str(Path(out_dir, f"{variant}_weights{rank}.safetensors")))
    if rank == 0:
        Path(out_dir, "toy.json").write_text(json.dumps(results))


def trainer_callback(model_dir: str, out_dir: str) -> None:
    """`Trainer` under DDP with `FourBitCompressionCallback`: the logs and each rank's final weights."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
    from deepseekv3.distributed import FourBitCompressionCallback

    model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(model_dir)
    tokens = synthetic_tokens(model.config.vocab_size, steps=3, global_batch=4, seq_len=16).view(-1, 16)
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "labels": tokens.tolist()})
    args = TrainingArguments(
        output_dir=str(Path(out_dir, "trainer")),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    callback = FourBitCompressionCallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    rank = dist.get_rank()
    flat = torch.cat([param.detach().reshape(-1) for param in model.parameters()])
    save_file({"weights": flat}, str(Path(out_dir, f"trainer_weights{rank}.safetensors")))
    if rank == 0:
        logs = {"log_history": trainer.state.log_history, "wrapped": type(trainer.model_wrapped).__name__}
        Path(out_dir, "trainer.json").write_text(json.dumps(logs))


def loss_weighting(out_dir: str) -> None:
    """`DeepseekV3Trainer` under DDP on the loss-weighting cases of `tests/training/weighting_case.py`: each rank's
    final weights and rank 0's logs, per (case, per-process batch, accumulation)."""
    tests = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(tests), str(tests / "training")]
    from weighting_case import run

    rank = dist.get_rank()
    logs = {}
    for case, batch_size, accumulation in (("all", 2, 1), ("all", 1, 2), ("all+contrastive", 2, 1)):
        name = f"{case}-{batch_size}-{accumulation}"
        weights, logs[name] = run(case, str(Path(out_dir, name)), batch_size, accumulation)
        save_file(weights, str(Path(out_dir, f"{name}-rank{rank}.safetensors")))
    if rank == 0:
        Path(out_dir, "loss_weighting.json").write_text(json.dumps(logs))


WORKERS = {
    "fsdp": fsdp,
    "fsdp_tensor_parallel": fsdp_tensor_parallel,
    "tensor_parallel": tensor_parallel,
    "deepspeed_zero2": deepspeed_zero2,
    "compressed_steps": compressed_steps,
    "toy_training": toy_training,
    "trainer_callback": trainer_callback,
    "loss_weighting": loss_weighting,
}

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        WORKERS[sys.argv[1]](*sys.argv[2:])
    finally:
        dist.destroy_process_group()
    exit_process(0)  # see teardown.py: gloo threads outlive destroy_process_group
