"""The `deepseekv3` command: argument parsing and dispatch to the package's modules.

deepseekv3 convert SRC DST [--base-model HUB_ID]
deepseekv3 demo [--output ./outputs/demo] [--quick]
deepseekv3 train --stage {contrastive,distill,instruct,lora,grpo,dpo} --output_dir DIR [any TrainingArguments option]
deepseekv3 train --stages contrastive,distill,instruct,grpo --output_dir DIR [--stage_steps contrastive=200,...] [...]
deepseekv3 serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--lite-model DIR] [--max-batch-size 16] ...
"""

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path


def _convert(args: argparse.Namespace) -> None:
    from .convert import convert_checkpoint

    try:
        dst_dir = convert_checkpoint(args.src, args.dst, base_model=args.base_model)
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
        print(
            f"{example['model']}: Q: {example['question']}  expected: {example['answer']}  "
            f"reply: {example['generated']!r}"
        )
    print(f"finished in {report['seconds']:.0f} s; report, plots and the Hub-ready model in {args.output}")


def _train(argv: Sequence[str]) -> None:
    from .training.run import parse_train_arguments, run_training

    if any(token.split("=", 1)[0] == "--stages" for token in argv):
        from .training.pipeline import run_pipeline

        run_pipeline(argv)
        return
    output_dir = run_training(*parse_train_arguments(argv))
    print(f"model and processor saved to {output_dir}")


def _serve(args: argparse.Namespace) -> None:
    from .serving.engine import EngineConfig
    from .serving.launch import build_server
    from .serving.server import ServerConfig

    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        model_name=args.model_name or Path(args.model_dir).name,
        max_request_bytes=args.max_request_bytes,
        max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout,
    )
    try:
        engine_config = EngineConfig(
            max_batch_size=args.max_batch_size,
            max_batch_tokens=args.max_batch_tokens,
            max_queue_size=args.max_queue_size,
        )
        server = build_server(
            args.model_dir, server_config, engine_config, args.lite_model, args.engine_state, args.warm_up_system
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"deepseekv3 serve: error: {error}") from error
    # Ctrl-C and a process manager's SIGTERM both stop the server cleanly, also where the parent started this
    # process with SIGINT ignored (a background job of a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"serving {server_config.model_name} on {server.url} (POST /v1/chat/completions, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


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
        "--base-model",
        default=None,
        help="the source's Hub id, the model card's base_model (default: read from a Hugging Face cache path)",
    )
    convert.set_defaults(handler=_convert)

    demo = commands.add_parser(
        "demo", help="train a small model through the three alignment stages and LoRA on the built-in data (CPU)"
    )
    demo.add_argument("--output", default="./outputs/demo", help="report, plots and model (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke run, not a result")
    demo.set_defaults(handler=_demo)

    serve = commands.add_parser(
        "serve", help="serve MODEL_DIR over an OpenAI-compatible HTTP API (/v1/chat/completions, /health)"
    )
    serve.add_argument("model_dir", help="directory with the model and its processor (save_pretrained)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    serve.add_argument("--model-name", default=None, help="the name clients use (default: the directory's name)")
    serve.add_argument("--lite-model", default=None, help="a lite model directory: route short text prompts to it")
    serve.add_argument("--max-batch-size", type=int, default=16, help="(default: %(default)s)")
    serve.add_argument("--max-batch-tokens", type=int, default=4096, help="(default: %(default)s)")
    serve.add_argument("--max-queue-size", type=int, default=256, help="(default: %(default)s)")
    serve.add_argument("--max-request-bytes", type=int, default=16 * 2**20, help="(default: %(default)s)")
    serve.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens (default: %(default)s)")
    serve.add_argument("--request-timeout", type=float, default=120.0, help="seconds (default: %(default)s)")
    serve.add_argument("--engine-state", default=None, help="directory written by Engine.save_state")
    serve.add_argument(
        "--warm-up-system", action="append", default=[], help="a system prompt to prefill ahead (repeatable)"
    )
    serve.set_defaults(handler=_serve)

    commands.add_parser(
        "train",
        help="run one stage (--stage contrastive|distill|instruct|lora|grpo|dpo) with Trainer; every "
        "TrainingArguments option",
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
