"""LoRA against full fine-tuning on the demo's held-out task: trainable fraction, accuracy, forgetting, step time.

Command (from the repository root; no argument runs in about 3 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/bench_lora.py            # the demo model, instruction-tuned, then each variant
    .venv/bin/python benchmarks/bench_lora.py --device cuda

One process: the demo's data, tokenizer and model (`deepseekv3.training.demo`), instruction-tuned once
(`--instruct-steps`) on everything but the held-out `color_by_side` task; then, from that same state, (a) LoRA
(`default_lora_config`, r=8, routed experts included, merged afterwards) and (b) full fine-tuning, each for
`--steps` steps of the held-out task's training rows with the same schedule. Reported per variant: trainable
fraction, held-out test accuracy (the task learned), accuracy on the other question types (what was forgotten),
and the median training step time. Writes `benchmarks/results/bench_lora.json` with a `headline` (no targets: the
issue asks for the comparison, not a threshold).
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback, set_seed

from deepseekv3.data import build_multimodal_dataset, build_text_corpus, split_held_out
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.collators import encode_rows
from deepseekv3.training.demo import DemoSettings, build_demo_model, stage_training_arguments
from deepseekv3.training.evaluation import evaluate_accuracy
from deepseekv3.training.lora import default_lora_config, trainable_fraction
from deepseekv3.training.recipes import build_stage_trainer, select_stage_examples

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_lora.json"


class _StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instruct-steps", type=int, default=800)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    settings = DemoSettings(output_dir="/tmp/bench_lora", stage_steps={"instruct": args.instruct_steps})
    set_seed(settings.seed)
    tokenizer = train_tokenizer(build_text_corpus(settings.num_images, settings.num_clips), settings.vocab_size)
    data = build_multimodal_dataset(settings.num_images, settings.num_clips, seed=settings.seed)
    seen, held_out = split_held_out(data)
    model, processor = build_demo_model(tokenizer, settings)
    model.to(args.device)
    examples = encode_rows(processor, data["train"], model.config.patch_size)
    test = seen["test"].select(range(min(settings.eval_rows, seen["test"].num_rows)))
    test_examples = encode_rows(processor, test, model.config.patch_size)
    held_out_examples = encode_rows(processor, held_out["test"], model.config.patch_size)
    output_dir = Path(settings.output_dir)

    instruct = select_stage_examples("instruct", data["train"], examples)
    build_stage_trainer(
        "instruct", model, instruct, stage_training_arguments(settings, "instruct", output_dir, args.instruct_steps)
    ).train()
    tuned_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    before = evaluate_accuracy(model, processor, held_out["test"], held_out_examples)["color"]
    task = select_stage_examples("lora", data["train"], examples)

    results = {}
    for variant in ("lora", "full"):
        model.load_state_dict(tuned_state)
        trained = model
        if variant == "lora":
            from peft import get_peft_model

            trained = get_peft_model(model, default_lora_config(r=8, lora_alpha=16))
            fraction = trainable_fraction(trained)
        else:
            model.requires_grad_(True)  # PEFT froze the base weights of the model the LoRA run merged into
            fraction = 1.0
        timer = _StepTimer()
        trainer = build_stage_trainer(
            "lora" if variant == "lora" else "instruct",
            trained,
            task,
            stage_training_arguments(settings, variant, output_dir, args.steps),
            callbacks=[timer],
        )
        trainer.train()
        if variant == "lora":
            model = trained.merge_and_unload()
        results[variant] = {
            "trainable_fraction": fraction,
            "held_out_accuracy": evaluate_accuracy(model, processor, held_out["test"], held_out_examples)["color"],
            "other_accuracy": evaluate_accuracy(model, processor, test, test_examples),
            "median_step_ms": 1000 * statistics.median(timer.times[1:]),
        }

    print(f"held-out task accuracy after instruction tuning: {before:.2f}")
    print(f"{'variant':8} {'trainable':>10} {'held-out acc':>13} {'step ms':>8}  accuracy on the other questions")
    for variant, result in results.items():
        others = ", ".join(f"{k} {v:.2f}" for k, v in result["other_accuracy"].items())
        print(
            f"{variant:8} {result['trainable_fraction']:>10.2%} {result['held_out_accuracy']:>13.2f}"
            f" {result['median_step_ms']:>8.0f}  {others}"
        )
    summary = {
        "benchmark": "bench_lora",
        "command": "python benchmarks/bench_lora.py",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "instruct_steps": args.instruct_steps,
        "steps": args.steps,
        "held_out_accuracy_before": before,
        "variants": results,
        "headline": [
            {
                "name": "lora_trainable_fraction",
                "value": results["lora"]["trainable_fraction"],
                "target": None,
                "higher_is_better": False,
            },
            {
                "name": "lora_held_out_accuracy",
                "value": results["lora"]["held_out_accuracy"],
                "target": None,
                "higher_is_better": True,
            },
            {
                "name": "full_held_out_accuracy",
                "value": results["full"]["held_out_accuracy"],
                "target": None,
                "higher_is_better": True,
            },
        ],
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(summary, indent=2))
    print(f"Wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
