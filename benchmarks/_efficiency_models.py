"""The trained models that `bench_head_skipping.py` and `bench_int8.py` measure, cached under `--cache-dir`.

The demo model (`deepseekv3.training.demo.build_demo_model`: hidden 96, 3 layers of 4 heads, MoE, head gates, images
and audio) is trained by the instruction stage recipe (`build_stage_trainer("instruct", ...)`) for `--train-steps`
steps with the gate-sparsity penalty (`attention_gate_sparsity_weight = --gate-penalty`), saving a `Trainer`
checkpoint `--qat-steps` steps before the end. QAT (`deepseekv3.quantization.train_qat`) resumes that checkpoint
fake-quantized: the same run's last `--qat-steps` steps (optimizer state, learning-rate schedule and data order
continued) are trained again with fake quantization, so QAT and fp32 differ by fake quantization alone. (Fine-tuning
the finished model again, 40 steps of a fresh optimizer and schedule at a learning rate of 3e-5 or 3e-4, moved its
accuracy by -4.6 to +1.0 points with the data order, with or without fake quantization.) Training both takes 15
minutes on 2 busy CPU cores; later runs of `bench_int8.py` reuse the cache until `--retrain`.

`bench_head_skipping.py` measures its own pairs of models (`load_head_skipping_model`): per seed, the demo model
trained by the same instruction recipe with the gate-sparsity penalty (`penalised`) and without it (`unpenalised`,
`attention_gate_sparsity_weight = 0`), from the same initial weights and on the same batches, on the demo's data and
splits (`prepare_demo_data`, every validation and test row of the seen question types), cached under
`--cache-dir/head_skipping/seed{n}/{penalised,unpenalised}` with a `training.json` record; a cached model whose
record holds other settings is trained again.
"""

import argparse
import functools
import json
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoProcessor, set_seed

from deepseekv3.data import build_multimodal_dataset, build_text_corpus, split_held_out
from deepseekv3.quantization import load_int8_model, train_qat
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.collators import encode_rows
from deepseekv3.training.demo import (
    DemoData,
    DemoSettings,
    build_demo_model,
    prepare_demo_data,
    stage_training_arguments,
)
from deepseekv3.training.recipes import build_stage_trainer, select_stage_examples

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / "outputs" / "efficiency_models"
MODEL_VARIANTS = ("fp32", "int8_ptq", "int8_qat")
# bench_head_skipping's twins: their `attention_gate_sparsity_weight` is the given penalty, or 0
HEAD_SKIPPING_VARIANTS = ("penalised", "unpenalised")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say which models to train, and where they are cached."""
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    parser.add_argument("--retrain", action="store_true", help="train the cached models again")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--qat-steps", type=int, default=40, help="last steps of the training run redone with QAT")
    parser.add_argument("--gate-penalty", type=float, default=0.1, help="attention_gate_sparsity_weight")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--num-clips", type=int, default=500)


def check_training_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits through `parser.error` when QAT would not redo a part of the training run."""
    if not 0 < args.qat_steps < args.train_steps:
        parser.error(f"--qat-steps ({args.qat_steps}) must be between 0 and --train-steps ({args.train_steps})")


def demo_settings(args: argparse.Namespace) -> DemoSettings:
    return DemoSettings(
        output_dir=str(args.cache_dir),
        num_images=args.num_images,
        num_clips=args.num_clips,
        stage_steps={"instruct": args.train_steps},
    )


def _demo_data(settings: DemoSettings):
    data = build_multimodal_dataset(
        settings.num_images, settings.num_clips, seed=settings.seed, image_size=settings.image_size
    )
    seen, _ = split_held_out(data)
    return data["train"], seen["test"]


def train_models(args: argparse.Namespace) -> dict:
    """Train the gate-penalised demo model, and its last `--qat-steps` steps again with QAT, into the cache; returns
    the training record."""
    settings = demo_settings(args)
    started = time.perf_counter()
    set_seed(settings.seed)
    corpus = build_text_corpus(settings.num_images, settings.num_clips, settings.seed)
    tokenizer = train_tokenizer(corpus, vocab_size=settings.vocab_size)
    train_rows, _ = _demo_data(settings)
    model, processor = build_demo_model(tokenizer, settings)
    model.config.attention_gate_sparsity_weight = args.gate_penalty
    examples = encode_rows(processor, train_rows, model.config.patch_size, progress=False)
    examples = select_stage_examples("instruct", train_rows, examples)
    training = stage_training_arguments(settings, "instruct", args.cache_dir, args.train_steps)
    qat_from_step = args.train_steps - args.qat_steps
    training.set_save(strategy="steps", steps=qat_from_step)  # Trainer also saves at the end
    trainer = build_stage_trainer("instruct", model, examples, training)
    trainer.train()
    model.save_pretrained(args.cache_dir / "fp32")
    processor.save_pretrained(args.cache_dir / "fp32")
    fp32_seconds = time.perf_counter() - started

    # QAT: the same run from its checkpoint at `qat_from_step`, fake-quantized (same arguments, no checkpoints)
    checkpoint = Path(training.output_dir) / f"checkpoint-{qat_from_step}"
    qat_model = AutoModelForCausalLM.from_pretrained(checkpoint)
    qat_model.set_experts_implementation("eager")
    qat_training = stage_training_arguments(settings, "instruct", args.cache_dir / "qat", args.train_steps)
    qat_int8 = train_qat(
        qat_model, examples, qat_training, args.cache_dir / "qat_trained", resume_from_checkpoint=checkpoint
    )
    qat_int8.save_pretrained(args.cache_dir / "qat_int8")
    record = {
        "train_steps": args.train_steps,
        "qat_steps": args.qat_steps,
        "gate_penalty": args.gate_penalty,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "num_images": settings.num_images,
        "num_clips": settings.num_clips,
        "fp32_train_seconds": round(fp32_seconds, 1),
        "total_train_seconds": round(time.perf_counter() - started, 1),
        "log_history": [entry for entry in trainer.state.log_history if "loss" in entry],
    }
    (args.cache_dir / "training.json").write_text(json.dumps(record, indent=2))
    return record


def eval_model(model):
    """`model` in eval mode with the demo's CPU expert kernel (the per-expert loop: measured faster at these sizes)."""
    model.eval()
    model.set_experts_implementation("eager")
    return model


def load_models(args: argparse.Namespace, variants: tuple[str, ...]) -> tuple[dict, object, dict]:
    """The `variants` (of `MODEL_VARIANTS`) in eval mode, training them first when the cache lacks them; their
    processor; and the training figures for the results JSON (`training`, `training_last_log`)."""
    if args.retrain or not (args.cache_dir / "training.json").is_file():
        print(f"Training the demo model ({args.train_steps} steps), its last {args.qat_steps} steps again with QAT")
        train_models(args)
    record = json.loads((args.cache_dir / "training.json").read_text())
    loaders = {
        "fp32": lambda: AutoModelForCausalLM.from_pretrained(args.cache_dir / "fp32"),
        "int8_ptq": lambda: load_int8_model(args.cache_dir / "fp32"),
        "int8_qat": lambda: load_int8_model(args.cache_dir / "qat_int8"),
    }
    models = {name: eval_model(loaders[name]()) for name in variants}
    processor = AutoProcessor.from_pretrained(args.cache_dir / "fp32")
    figures = {
        "training": {key: value for key, value in record.items() if key != "log_history"},
        "training_last_log": record["log_history"][-1],
    }
    return models, processor, figures


def encoded_test_split(processor, args: argparse.Namespace, patch_size: int) -> list[dict]:
    """The encoded test split of the training data (every row but the held-out task's)."""
    _, test_rows = _demo_data(demo_settings(args))
    return encode_rows(processor, test_rows, patch_size, progress=False)


@functools.cache
def head_skipping_data(num_images: int, num_clips: int) -> DemoData:
    """The demo's data at these sizes (`prepare_demo_data` with the demo's splits and data seed, every validation and
    test row of the seen question types, the floors of the test split); built once per process."""
    settings = DemoSettings(num_images=num_images, num_clips=num_clips, eval_per_type=None, baseline=False)
    return prepare_demo_data(settings, progress=False)


def load_head_skipping_model(args: argparse.Namespace, seed: int, variant: str) -> tuple[object, DemoData, dict]:
    """One of `HEAD_SKIPPING_VARIANTS` at `seed` (`args`: `cache_dir`, `retrain`, `train_steps`, `gate_penalty`,
    `num_images`, `num_clips`) in eval mode, trained first when the cache lacks it or holds it with other settings;
    the data (`head_skipping_data`); and the training record.

    Both variants of a seed start from the same initial weights and see the same batches (`set_seed(seed)`, the
    `Trainer`'s seeds): they differ by the penalty alone.
    """
    penalty = {"penalised": args.gate_penalty, "unpenalised": 0.0}[variant]
    data = head_skipping_data(args.num_images, args.num_clips)
    settings = DemoSettings(seed=seed)  # the demo's model and instruction recipe
    directory = args.cache_dir / "head_skipping" / f"seed{seed}" / variant
    wanted = {
        "seed": seed,
        "variant": variant,
        "gate_penalty": penalty,
        "train_steps": args.train_steps,
        "num_images": args.num_images,
        "num_clips": args.num_clips,
        "batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "initializer_range": settings.initializer_range,
    }
    record_path = directory / "training.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if args.retrain or {key: record.get(key) for key in wanted} != wanted:
        started = time.perf_counter()
        set_seed(seed)
        model, _ = build_demo_model(data.tokenizer, settings)
        model.config.attention_gate_sparsity_weight = penalty
        examples = select_stage_examples("instruct", data.rows["train"], data.examples["train"])
        training = stage_training_arguments(settings, "instruct", directory, args.train_steps)
        trainer = build_stage_trainer("instruct", model, examples, training)
        trainer.train()
        model.save_pretrained(directory)
        record = {
            **wanted,
            "split_sizes": settings.split_sizes,
            "train_seconds": round(time.perf_counter() - started, 1),
            "log_history": [entry for entry in trainer.state.log_history if "loss" in entry],
        }
        record_path.write_text(json.dumps(record, indent=2))
    return eval_model(AutoModelForCausalLM.from_pretrained(directory)), data, record
