"""The `deepseekv3` command: argument parsing and dispatch to the package's modules.

deepseekv3 convert SRC DST [--max-shard-size 5GB]
deepseekv3 demo [--output ./outputs/demo]
"""

import argparse
from collections.abc import Sequence


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert_checkpoint

    try:
        dst_dir = convert_checkpoint(args.src, args.dst, max_shard_size=args.max_shard_size)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"deepseekv3 convert: error: {error}") from error
    print(f"converted {args.src} -> {dst_dir}")


def _demo(args: argparse.Namespace) -> None:
    # Placeholder main job until the training recipe replaces it: a tiny random model, greedy generation, a save and
    # a reload through the Auto classes.
    import torch
    from transformers import AutoModelForCausalLM

    from . import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration

    torch.manual_seed(args.seed)
    config = DeepseekV3MultimodalConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    prompt = torch.tensor([args.prompt_ids])
    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "eos_token_id": None}
    generated = model.generate(prompt, **generate_kwargs)[0, prompt.shape[1] :].tolist()
    print(f"prompt token ids:    {args.prompt_ids}")
    print(f"generated token ids: {generated}")

    model.save_pretrained(args.output)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output).eval()
    regenerated = reloaded.generate(prompt, **generate_kwargs)[0, prompt.shape[1] :].tolist()
    print(f"saved to {args.output}; reloaded as {type(reloaded).__name__}, generates {regenerated}")
    if regenerated != generated:
        raise SystemExit("the reloaded model generates different tokens than the saved one")


def build_parser() -> argparse.ArgumentParser:
    """The `deepseekv3` argument parser, one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="deepseekv3", description="A DeepSeek-V3-style multimodal model for Hugging Face Transformers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert", help="convert a transformers DeepseekV3ForCausalLM checkpoint directory into this model"
    )
    convert.add_argument("src", help="directory written by DeepseekV3ForCausalLM.save_pretrained")
    convert.add_argument("dst", help="directory to write (must not exist, or be empty)")
    convert.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 500MB (default: %(default)s)"
    )
    convert.set_defaults(handler=_convert)

    demo = commands.add_parser("demo", help="build a tiny model, generate, save and reload it (seconds, CPU)")
    demo.add_argument("--output", default="./outputs/demo", help="where to save the model (default: %(default)s)")
    demo.add_argument("--prompt-ids", type=int, nargs="+", default=[1, 5, 6, 7], help="prompt token ids")
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `deepseekv3` console script."""
    args = build_parser().parse_args(argv)
    args.handler(args)
