"""Train the model with Accelerate on synthetic tokens: the script behind the config files of this folder.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate/ddp.yaml examples/accelerate/train.py \
        --output_dir out/ddp                           # 2 CPU processes (gloo); on GPUs leave out ACCELERATE_USE_CPU
    ACCELERATE_USE_CPU=1 accelerate launch --config_file examples/accelerate/ddp.yaml examples/accelerate/train.py \
        --output_dir out/ddp4bit --fourbit_compression  # DDP with the 4-bit gradient hook
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/accelerate/train.py --output_dir out/fsdp
    accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml examples/accelerate/train.py \
        --output_dir out/zero2                         # and deepspeed_zero3.yaml; FSDP and DeepSpeed need GPUs

Without `--model_name_or_path` it trains a small random model (hidden 64, 2 layers, 8 routed experts, head gates).
Each step takes `--global_batch_size` sequences, split evenly over the processes, so the result does not depend on
how many processes share the batch. After every optimizer step DeepSeek-V3's bias rule balances the experts
(`ExpertLoadBalancer`: loads all-reduced over the processes, so every rank keeps the same bias). It writes the weights
(`model.safetensors`) and `metrics.json` (the loss of every step, averaged over the global batch, the experts' load
statistics over the run, and, with `--fourbit_compression`, the bytes the hook sent).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.distributed import register_fourbit_hook
from deepseekv3.training.balancing import ExpertLoadBalancer

SMALL_CONFIG = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "use_attention_gate": True,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", default=None, help="a saved model; default: a small random one")
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--global_batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fourbit_compression", action="store_true", help="DDP only: 4-bit gradient all-reduce")
    parser.add_argument(
        "--activation_checkpointing",
        choices=("layer", "attention"),
        default=None,
        help="recompute whole decoder layers or only their attention in the backward pass",
    )
    return parser.parse_args()


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.model_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    return DeepseekV3MultimodalForConditionalGeneration(DeepseekV3MultimodalConfig(**SMALL_CONFIG))


def main() -> None:
    args = parse_args()
    accelerator = Accelerator()
    model = load_model(args)
    if args.activation_checkpointing is not None:
        model.activation_checkpointing_enable({"checkpoint_scope": args.activation_checkpointing})

    if args.global_batch_size % accelerator.num_processes != 0:
        raise ValueError(
            f"--global_batch_size ({args.global_batch_size}) must be a multiple of the number of processes "
            f"({accelerator.num_processes})"
        )
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.max_steps * args.global_batch_size, args.seq_len)
    tokens = torch.randint(3, model.config.vocab_size, shape, generator=generator)
    loader = DataLoader(TensorDataset(tokens), batch_size=args.global_batch_size // accelerator.num_processes)

    optimizer_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
    optimizer = optimizer_class(model.parameters(), lr=args.learning_rate)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    compression = register_fourbit_hook(model) if args.fourbit_compression else None
    balancer = ExpertLoadBalancer(model)

    model.train()
    losses = []
    for (input_ids,) in loader:
        outputs = model(input_ids=input_ids, labels=input_ids)
        balancer.observe(outputs.expert_load)
        loss = outputs.loss
        accelerator.backward(loss)
        optimizer.step()
        balancer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())

    load_statistics = balancer.statistics()
    accelerator.wait_for_everyone()
    accelerator.save_model(model, args.output_dir)
    if accelerator.is_main_process:
        metrics = {
            "losses": losses,
            "num_processes": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "wrapped_model": type(model).__name__,
            "expert_load": load_statistics,
        }
        if compression is not None:
            metrics["bytes_sent"] = compression.bytes_sent
            metrics["fp32_bytes"] = compression.fp32_bytes
        Path(args.output_dir, "metrics.json").write_text(json.dumps(metrics, indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    main()
    # Exit without finalizing the interpreter: FSDP2's device meshes (kept by DTensor's caches) and the 4-bit hook's
    # groups outlive destroy_process_group, and a gloo thread that releases a finished collective's tensors while the
    # interpreter finalizes aborts the process ("terminate called without an active exception";
    # tests/distributed/teardown.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
