"""Train the model pipeline-parallel (torch.distributed.pipelining), alone or with data or tensor parallel.

    torchrun --nproc_per_node 2 examples/pipeline_parallel.py --output_dir out/pp               # 2 stages, 1F1B
    torchrun --nproc_per_node 2 examples/pipeline_parallel.py --output_dir out/pp --schedule gpipe
    torchrun --nproc_per_node 4 examples/pipeline_parallel.py --output_dir out/pp_dp --dp 2     # 2 stages x 2 replicas
    torchrun --nproc_per_node 4 examples/pipeline_parallel.py --output_dir out/pp_tp --tp 2     # 2 stages x 2 TP ranks

On CPU the processes talk over gloo; with one GPU per process (`torchrun` sets `LOCAL_RANK`) over NCCL. Without
`--model_name_or_path` it trains a small random model (hidden 64, 4 layers: one dense, three MoE, head gates) on
synthetic rows (random starts, each next token a fixed function of the last). Ranks are laid out as a mesh
`(dp, pp, tp)`: the `pp` ranks of one replica are the stages in order, and every rank of a replica (all its stages
and tensor-parallel ranks) reads the same slice of the global batch. Each step takes `--global_batch_size` sequences
in `--microbatches` micro-batches per replica; after the optimizer step DeepSeek-V3's bias rule balances each stage's
experts. The first rank of the last stage writes `metrics.json` (the loss of every step, over the global batch).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM

from deepseekv3 import DeepseekV3MultimodalConfig
from deepseekv3.distributed import PipelineParallel

SMALL_CONFIG = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
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
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    parser.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4, help="micro-batches per step and replica")
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--global_batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the weights' dtype")
    return parser.parse_args()


def synthetic_rows(vocab_size: int, rows: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Rows from random starts in which each token is a fixed function of the one before (learnable in few steps)."""
    tokens = [torch.randint(3, vocab_size, (rows,), generator=generator)]
    for _ in range(seq_len - 1):
        tokens.append((tokens[-1] * 5 + 1) % (vocab_size - 3) + 3)
    return torch.stack(tokens, dim=1)


def main() -> None:
    args = parse_args()
    use_cuda = torch.cuda.is_available() and "LOCAL_RANK" in os.environ
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    world = dist.get_world_size()
    if world % (args.dp * args.tp):
        raise ValueError(f"{world} processes cannot be split into dp={args.dp} x tp={args.tp} (x pipeline stages)")
    pp = world // (args.dp * args.tp)
    mesh = init_device_mesh(device.type, (args.dp, pp, args.tp), mesh_dim_names=("dp", "pp", "tp"))
    if args.global_batch_size % args.dp:
        raise ValueError(f"--global_batch_size ({args.global_batch_size}) must divide by --dp ({args.dp})")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    dtype = getattr(torch, args.dtype)  # bf16 keeps the norms, routers and head gates in fp32
    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, trust_remote_code=True, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(DeepseekV3MultimodalConfig(**SMALL_CONFIG), dtype=dtype)
    model.to(device).train()
    pipe = PipelineParallel(
        model,
        n_microbatches=args.microbatches,
        schedule=args.schedule,
        stage_index=mesh["pp"].get_local_rank(),
        num_stages=pp,
        group=mesh.get_group("pp"),
        data_parallel_group=mesh.get_group("dp") if args.dp > 1 else None,
        tensor_parallel_mesh=mesh["tp"] if args.tp > 1 else None,
        device=device,
    )
    optimizer = torch.optim.AdamW(pipe.module.parameters(), lr=args.learning_rate)

    generator = torch.Generator().manual_seed(args.seed)
    local_batch = args.global_batch_size // args.dp
    dp_rank = mesh["dp"].get_local_rank()
    losses = []
    for _ in range(args.max_steps):
        tokens = synthetic_rows(model.config.vocab_size, args.global_batch_size, args.seq_len, generator)
        input_ids = tokens[dp_rank * local_batch : (dp_rank + 1) * local_batch].to(device)
        loss = pipe.step(input_ids=input_ids, labels=input_ids)
        optimizer.step()
        optimizer.zero_grad()
        pipe.balance_experts()
        if pipe.is_last:
            if args.dp > 1:  # each replica's share of the global batch's loss
                dist.all_reduce(loss, group=mesh.get_group("dp"))
            losses.append(loss.item())
    if pipe.is_last and dp_rank == 0 and mesh["tp"].get_local_rank() == 0:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"losses": losses, "stages": pp, "dp": args.dp, "tp": args.tp, "schedule": args.schedule}
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"stages {pp} x dp {args.dp} x tp {args.tp}, {args.schedule}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Exit without finalizing the interpreter: DTensor's caches keep the device mesh's gloo groups alive past
    # destroy_process_group, and a gloo thread that releases a finished collective's tensors while the interpreter
    # finalizes aborts the process ("terminate called without an active exception"; tests/distributed/teardown.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
