"""The `deepseekv3` command: argument parsing and dispatch to the package's modules.

deepseekv3 convert SRC DST [--base-model HUB_ID]
deepseekv3 export --to deepseek_v3 SRC DST
deepseekv3 demo [--output ./outputs/demo] [--quick]
deepseekv3 train --stage {contrastive,distill,instruct,lora,grpo,dpo} --output_dir DIR [any TrainingArguments option]
deepseekv3 train --stages contrastive,distill,instruct,grpo --output_dir DIR [--stage_steps contrastive=200,...] [...]
deepseekv3 serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--device cuda] [--dtype auto] [--api-key KEY] ...
deepseekv3 serve MODEL_DIR --ray-replicas N [--ray-address auto] [--ray-gpus-per-replica 0.5] ...
"""

import argparse
import os
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


def _export(args: argparse.Namespace) -> None:
    from .export import export_checkpoint

    try:
        dst_dir = export_checkpoint(args.src, args.dst, to=args.to)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"deepseekv3 export: error: {error}") from error
    print(f"exported {args.src} -> {dst_dir} ({args.to})")


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
    print(f"chat with it: deepseekv3 serve {Path(args.output) / 'model'}, then open http://127.0.0.1:8000")


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
    from .serving.launch import build_server, resolve_device, resolve_dtype
    from .serving.server import ServerConfig

    try:
        server_config = ServerConfig(
            host=args.host,
            port=args.port,
            model_name=args.model_name or Path(args.model_dir).name,
            max_request_bytes=args.max_request_bytes,
            max_tokens=args.max_tokens,
            default_max_tokens=args.default_max_tokens,
            request_timeout_s=args.request_timeout,
            drain_timeout_s=args.drain_timeout,
            api_key=args.api_key or os.environ.get("DEEPSEEKV3_API_KEY") or None,
            socket_timeout_s=args.socket_timeout,
            max_connections=args.max_connections,
            max_images_per_request=args.max_images_per_request,
            max_clips_per_request=args.max_clips_per_request,
            max_image_pixels=args.max_image_pixels,
            image_formats=tuple(name for name in args.image_formats.split(",") if name),
        )
        engine_config = EngineConfig(
            max_batch_size=args.max_batch_size,
            max_batch_tokens=args.max_batch_tokens,
            max_queue_size=args.max_queue_size,
            prefix_cache_bytes=args.prefix_cache_bytes,
            prefill_chunk_tokens=args.prefill_chunk_tokens or None,
            log_size=args.log_size,
            log_prompt_tokens=args.log_prompt_tokens,
            max_consecutive_faults=args.max_consecutive_faults,
        )
    except ValueError as error:
        raise SystemExit(f"deepseekv3 serve: error: {error}") from error
    if args.ray_replicas is not None:
        _serve_on_ray(args, server_config, engine_config)
        return
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        server = build_server(
            args.model_dir,
            server_config,
            engine_config,
            args.lite_model,
            args.engine_state,
            args.warm_up_system,
            device=device,
            dtype=dtype,
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"deepseekv3 serve: error: {error}") from error
    _stop_on_signals()
    routes, dtype_name = "POST /v1/chat/completions, GET /health", str(dtype).removeprefix("torch.")
    print(f"serving {server_config.model_name} on {server.url} ({routes}; {device}, {dtype_name})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def _stop_on_signals() -> None:
    """Ctrl-C and a process manager's SIGTERM both stop the server cleanly (`KeyboardInterrupt`), also where the parent
    started this process with SIGINT ignored (a background job of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _serve_on_ray(args: argparse.Namespace, server_config, engine_config) -> None:
    """`deepseekv3 serve --ray-replicas N`: N engine replicas behind Ray Serve's HTTP proxy (`ray_deployment`)."""
    try:
        from .serving.ray_deployment import build_app, serve_forever

        app = build_app(
            args.model_dir,
            server_config,
            engine_config,
            args.ray_replicas,
            args.lite_model,
            args.engine_state,
            args.warm_up_system,
            device=args.device,
            dtype=args.dtype,
            ray_actor_options={"num_gpus": args.ray_gpus_per_replica} if args.ray_gpus_per_replica else None,
        )
    except (ImportError, OSError, ValueError) as error:
        raise SystemExit(f"deepseekv3 serve: error: {error}") from error
    _stop_on_signals()
    url = f"http://{server_config.host}:{server_config.port}"
    routes = "POST /v1/chat/completions, GET /health"

    def report() -> None:
        print(
            f"serving {server_config.model_name} on {url} ({routes}; {args.ray_replicas} replicas on Ray)", flush=True
        )

    try:
        serve_forever(app, server_config, args.ray_address, on_ready=report)
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

    export = commands.add_parser(
        "export",
        help="export a checkpoint with the new features off as a plain transformers checkpoint (vLLM, SGLang)",
    )
    export.add_argument(
        "--to",
        default="deepseek_v3",
        choices=["deepseek_v3"],
        help="the target: transformers' DeepseekV3ForCausalLM (default: %(default)s)",
    )
    export.add_argument("src", help="directory written by this model's save_pretrained, every new feature off")
    export.add_argument("dst", help="directory to write (must not exist, or be empty)")
    export.set_defaults(handler=_export)

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
    serve.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda when available, else cpu)"
    )
    serve.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the weights' dtype; auto is bfloat16 on CUDA, float32 elsewhere (default: %(default)s)",
    )
    serve.add_argument("--max-batch-size", type=int, default=16, help="(default: %(default)s)")
    serve.add_argument("--max-batch-tokens", type=int, default=4096, help="(default: %(default)s)")
    serve.add_argument("--max-queue-size", type=int, default=256, help="(default: %(default)s)")
    serve.add_argument("--prefix-cache-bytes", type=int, default=64 * 2**20, help="(default: %(default)s)")
    serve.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=512,
        help="most positions one step's prefill computes; 0 turns chunked prefill off (default: %(default)s)",
    )
    serve.add_argument(
        "--log-size", type=int, default=10_000, help="requests kept in the length log (default: %(default)s)"
    )
    serve.add_argument(
        "--log-prompt-tokens",
        type=int,
        default=0,
        help="last prompt tokens each length-log record keeps, in memory only; 0 keeps lengths only "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--max-consecutive-faults",
        type=int,
        default=3,
        help="failed engine steps in a row after which /health answers 503 (default: %(default)s)",
    )
    serve.add_argument("--max-request-bytes", type=int, default=16 * 2**20, help="(default: %(default)s)")
    serve.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens (default: %(default)s)")
    serve.add_argument(
        "--default-max-tokens",
        type=int,
        default=64,
        help="max_tokens of a request that names none (default: %(default)s)",
    )
    serve.add_argument("--request-timeout", type=float, default=120.0, help="seconds (default: %(default)s)")
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="on stop, seconds accepted requests have to finish while new ones get 503 (default: %(default)s)",
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but GET /health (default: the environment "
        "variable DEEPSEEKV3_API_KEY, which keeps the key out of the process list; none: no authentication)",
    )
    serve.add_argument(
        "--socket-timeout",
        type=float,
        default=30.0,
        help="seconds a connection has to send a whole request (head and body), and the bound on each write; "
        "slow or idle connections are closed past it (default: %(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="connections served at once; further ones get 503 and are closed (default: %(default)s)",
    )
    serve.add_argument(
        "--max-images-per-request", type=int, default=8, help="images one request may carry (default: %(default)s)"
    )
    serve.add_argument(
        "--max-clips-per-request", type=int, default=8, help="audio clips one request may carry (default: %(default)s)"
    )
    serve.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="largest width x height of an image, read from its header before decoding (default: %(default)s)",
    )
    serve.add_argument(
        "--image-formats",
        default="PNG,JPEG,WEBP,GIF,BMP",
        help="comma-separated Pillow image formats accepted (default: %(default)s)",
    )
    serve.add_argument("--engine-state", default=None, help="directory written by Engine.save_state")
    serve.add_argument(
        "--warm-up-system", action="append", default=[], help="a system prompt to prefill ahead (repeatable)"
    )
    serve.add_argument(
        "--ray-replicas",
        type=int,
        default=None,
        help="serve N engine replicas behind Ray Serve's HTTP proxy on --host/--port, requests with the same first "
        "message on the same replica (needs the ray extra: pip install 'deepseekv3[ray]')",
    )
    serve.add_argument(
        "--ray-address",
        default=None,
        help="with --ray-replicas: the Ray cluster to join, e.g. auto (default: $RAY_ADDRESS, or a cluster started "
        "with `ray start` on this machine, else a new local one)",
    )
    serve.add_argument(
        "--ray-gpus-per-replica",
        type=float,
        default=0,
        help="with --ray-replicas: GPUs each replica reserves; 0.5 puts two replicas on a GPU (default: %(default)s)",
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
