"""The `deepseekv3` command: argument parsing and dispatch to the package's modules.

deepseekv3 convert SRC DST [--max-shard-size 5GB]
deepseekv3 demo [--output ./outputs/demo] [--quick]
deepseekv3 train --stage {contrastive,distill,instruct,lora} --output_dir DIR [any TrainingArguments option]
"""

import argparse
import sys
from collections.abc import Sequence


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert_checkpoint

    try:
        dst_dir = convert_checkpoint(args.src, args.dst, max_shard_size=args.max_shard_size)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"deepseekv3 convert: error: {error}") from error
    print(f"converted {args.src} -> {dst_dir}")


def _demo(args: argparse.Namespace) -> None:
    from .training.demo import DemoSettings, format_accuracy_table, run_demo

    settings = DemoSettings(output_dir=args.output, seed=args.seed)
    if args.quick:
        settings = DemoSettings.quick(output_dir=args.output, seed=args.seed)
    report = run_demo(settings)
    print(format_accuracy_table(report))
    for example in report["examples"]:
        print(f"Q: {example['question']}  expected: {example['answer']}  model: {example['generated']!r}")
    print(f"finished in {report['seconds']:.0f} s; report, plots and the Hub-ready model in {args.output}")


def _train(argv: Sequence[str]) -> None:
    from .training.run import parse_train_arguments, run_training

    output_dir = run_training(*parse_train_arguments(argv))
    print(f"model and processor saved to {output_dir}")


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

    demo = commands.add_parser(
        "demo", help="train a small model through the three alignment stages and LoRA on the built-in data (CPU)"
    )
    demo.add_argument("--output", default="./outputs/demo", help="report, plots and model (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke run, not a result")
    demo.set_defaults(handler=_demo)

    commands.add_parser(
        "train",
        help="run one stage (--stage contrastive|distill|instruct|lora) with Trainer; every TrainingArguments option",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `deepseekv3` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # HfArgumentParser owns the train arguments (and its --help)
        _train(argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":  # `accelerate launch -m deepseekv3.cli train ...`
    main()
