"""Reinforcement learning on output quality (GRPO, DPO) against the same number of extra instruction-tuning steps.

The seed's flow ends with reinforcement learning that optimises output quality. This measures what TRL's
`GRPOTrainer` and `DPOTrainer` (`deepseekv3.training.rl`, the recipes `deepseekv3 train --stage grpo / dpo` run) add
to an instruction-tuned model, against the fair control: the same model trained for the same number of extra
optimizer steps by instruction tuning (recipe `instruct`) on the same questions.

Command (from the repository root, after `make demo`; the default took 7 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/bench_rl.py --base outputs/demo/model
    .venv/bin/python benchmarks/bench_rl.py --base outputs/demo/model --quick --output /tmp/bench_rl.json  # smoke

- **Base**: a model `deepseekv3 demo` saved (trained on the demo's data settings: the tokenizer is checked), run
  with the current processor code.
- **Questions**: the image questions of the seen types in the demo's training split (colour, shape, count,
  spatial); GRPO passes images, not audio, to the processor, so both arms train on these alone.
- **GRPO**: `--steps` steps of 32 completions, `num_generations` 8 (4 questions a step), replies of at most 6 tokens,
  sampled at temperature 1, no KL term (TRL's default `beta` 0).
- **DPO**: `--steps` steps of 32 preference pairs (`preference_pairs`: the training questions the base model answers
  wrong by greedy `generate`, the reference answer preferred to its reply), TRL's default sigmoid loss at `beta` 0.1,
  the base checkpoint as the frozen reference.
- **Control**: `--steps` steps of 32 questions (the demo's batch; 8 times the questions GRPO sees a step, with their
  reference answers as labels).
- All three use the demo's schedule otherwise (cosine, 5% warm-up, weight decay 0.01), in fp32 without gradient
  checkpointing (TRL's configs default to bf16 autocast and checkpointing; both are switched off here).

The learning rate of each arm is chosen on the VALIDATION split at seed 0 (mean over the five question types of the
exact match of greedy `generate`, what users get; ties to the rate listed first). Each arm is then trained at its rate
for every seed (the seed sets the sampling and the batch order; the base is the same) and read once on the test split:
all its questions (at least 400 per type) by greedy `generate` with exact match and by closed-set scoring, and the
hardest scenes, the 3-object ones among them (reported as `three_objects`; the issue's full edge-case split is not
built yet). Reported: per arm and type the mean and sd over seeds, the paired differences GRPO - control and DPO -
control (same seed) with a 95% t-interval, the base model's accuracy, the mean reward per logging step (plotted to
`docs/bench_rl_reward.png`) and the seconds per optimizer step of each arm (two runs at a time, one torch thread
each, so step times include that sharing).

Writes `benchmarks/results/bench_rl.json`.
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from _harness import machine_info
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

from deepseekv3.data import load_conversations
from deepseekv3.modeling_deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.training.demo import DemoSettings, prepare_demo_data, stage_training_arguments
from deepseekv3.training.evaluation import evaluate_accuracy, generate_answers, reply_accuracy
from deepseekv3.training.recipes import build_stage_trainer
from deepseekv3.training.rl import build_dpo_trainer, build_grpo_trainer, grpo_dataset, preference_pairs

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_rl.json"
PLOT_PATH = Path(__file__).resolve().parent.parent / "docs" / "bench_rl_reward.png"
ARMS = ("grpo", "dpo", "instruct")
LEARNING_RATES = {arm: (1e-4, 3e-4, 1e-3) for arm in ARMS}
NUM_GENERATIONS = 8
MAX_COMPLETION_LENGTH = 6
# two-sided 95% quantiles of Student's t by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
_DATA: dict[str, Any] = {}


def _setup(settings: dict[str, Any], threads: int):
    torch.set_num_threads(threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    # TRL 1.16 and PEFT read the names transformers 5.24 deprecates for activation checkpointing
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    key = json.dumps(settings, sort_keys=True)
    if key not in _DATA:
        _DATA[key] = prepare_demo_data(DemoSettings(**settings), progress=False)
    return DemoSettings(**settings), _DATA[key]


def _load_base(base_dir: str) -> DeepseekV3MultimodalForConditionalGeneration:
    model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(base_dir)
    if not torch.cuda.is_available():
        model.set_experts_implementation("eager")  # as build_demo_model: the per-expert loop is faster on CPU
    return model


def _seen_image_indices(rows) -> list[int]:
    return [index for index, (held_out, modality) in enumerate(zip(rows["held_out"], rows["modality"], strict=True))
            if not held_out and modality == "image"]  # fmt: skip


def _train(arm: str, learning_rate: float, seed: int, steps: int, settings: DemoSettings, data, base_dir: str):
    """One arm from the base weights; returns the model, the reward log (GRPO) and the seconds per step."""
    model = _load_base(base_dir)
    train_rows = data.rows["train"]
    indices = _seen_image_indices(train_rows)
    output_dir = tempfile.mkdtemp(prefix=f"bench_rl_{arm}_")
    # the control's arguments (the demo's schedule); the TRL arms take the same, in fp32 without checkpointing (TRL's
    # configs default to bf16 autocast and gradient checkpointing)
    args = stage_training_arguments(settings, "instruct", Path(output_dir), steps)
    args.learning_rate, args.seed, args.data_seed, args.disable_tqdm = learning_rate, seed, seed, True
    shared = ("output_dir", "max_steps", "per_device_train_batch_size", "learning_rate", "lr_scheduler_type",
              "warmup_steps", "weight_decay", "logging_steps", "save_strategy", "report_to", "use_cpu", "seed",
              "data_seed", "disable_tqdm")  # fmt: skip
    trl_arguments = {name: getattr(args, name) for name in shared} | {"gradient_checkpointing": False, "bf16": False}
    if arm == "grpo":
        from trl import GRPOConfig

        args = GRPOConfig(
            **trl_arguments, num_generations=NUM_GENERATIONS, max_completion_length=MAX_COMPLETION_LENGTH
        )
        prompts = grpo_dataset(load_conversations(train_rows.select(indices)))
        trainer = build_grpo_trainer(model, data.processor, prompts, args)
    elif arm == "dpo":
        from trl import DPOConfig

        if "pairs" not in _DATA:  # the base model's wrong replies: the same in every run
            _DATA["pairs"] = preference_pairs(model, data.processor, load_conversations(train_rows.select(indices)))
        trainer = build_dpo_trainer(model, data.processor, _DATA["pairs"], DPOConfig(**trl_arguments),
                                    _load_base(base_dir))  # fmt: skip
    else:
        trainer = build_stage_trainer("instruct", model, [data.examples["train"][index] for index in indices], args)
    started = time.perf_counter()
    trainer.train()
    seconds_per_step = (time.perf_counter() - started) / steps
    rewards = [(entry["step"], entry["reward"]) for entry in trainer.state.log_history if "reward" in entry]
    model.eval()
    return model, rewards, seconds_per_step


def _generated(model, data, split: str) -> dict[str, float]:
    rows = data.rows[split]
    return reply_accuracy(rows, generate_answers(model, data.processor, rows, progress=False))


def _mean(accuracy: dict[str, float]) -> float:
    return sum(accuracy.values()) / len(accuracy)


def _three_objects(rows):
    return [index for index, objects in enumerate(rows["objects"]) if objects is not None and len(objects) == 3]


def _test(model, data) -> dict[str, Any]:
    rows = data.rows["test"]
    replies = generate_answers(model, data.processor, rows, progress=False)
    three = _three_objects(rows)
    return {
        "generated": reply_accuracy(rows, replies),
        "scored": evaluate_accuracy(model, data.processor, rows, data.examples["test"], progress=False),
        "three_objects_generated": reply_accuracy(rows.select(three), [replies[index] for index in three]),
    }


def sweep_run(arm, learning_rate, steps, settings, base_dir, state_path, threads) -> dict[str, Any]:
    """Seed 0 of one arm at one rate: trained, read on validation, weights kept for the test read if chosen."""
    demo_settings, data = _setup(settings, threads)
    model, rewards, seconds_per_step = _train(arm, learning_rate, 0, steps, demo_settings, data, base_dir)
    torch.save(model.state_dict(), state_path)
    validation = _generated(model, data, "validation")
    return {
        "arm": arm,
        "learning_rate": learning_rate,
        "seed": 0,
        "validation_generated": validation,
        "validation_mean": _mean(validation),
        "rewards": rewards,
        "seconds_per_step": seconds_per_step,
    }


def seed_run(arm, learning_rate, seed, steps, settings, base_dir, state_path, threads) -> dict[str, Any]:
    """One seed of an arm at its chosen rate, read on the test split (seed 0: the sweep's saved weights)."""
    demo_settings, data = _setup(settings, threads)
    run: dict[str, Any] = {"arm": arm, "learning_rate": learning_rate, "seed": seed}
    if seed == 0:
        model = _load_base(base_dir)
        model.load_state_dict(torch.load(state_path, weights_only=True), strict=True)
        model.eval()
    else:
        model, run["rewards"], run["seconds_per_step"] = _train(
            arm, learning_rate, seed, steps, demo_settings, data, base_dir
        )
    run["test"] = _test(model, data)
    return run


def base_run(settings, base_dir, threads) -> dict[str, Any]:
    """The base model before either arm: validation and test."""
    _, data = _setup(settings, threads)
    model = _load_base(base_dir).eval()
    return {"validation_generated": _generated(model, data, "validation"), "test": _test(model, data)}


def _interval(differences: list[float]) -> dict[str, float]:
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return {"mean": mean}
    half = _T95[len(differences) - 1] * statistics.stdev(differences) / math.sqrt(len(differences))
    return {"mean": mean, "low": mean - half, "high": mean + half}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm, measure and type: mean and sd over seeds; GRPO - control and DPO - control per seed with a 95%
    interval."""
    measures = ("generated", "scored", "three_objects_generated")
    summary: dict[str, Any] = {"arms": {}, "grpo_minus_instruct": {}, "dpo_minus_instruct": {}}
    by_arm = {arm: sorted((run for run in runs if run["arm"] == arm), key=lambda run: run["seed"]) for arm in ARMS}
    for arm, arm_runs in by_arm.items():
        summary["arms"][arm] = {}
        for measure in measures:
            table = {}
            for question_type in arm_runs[0]["test"][measure]:
                values = [run["test"][measure][question_type] for run in arm_runs]
                table[question_type] = {"mean": statistics.mean(values),
                                        "sd": statistics.stdev(values) if len(values) > 1 else 0.0}  # fmt: skip
            table["mean"] = {"mean": statistics.mean(_mean(run["test"][measure]) for run in arm_runs)}
            summary["arms"][arm][measure] = table
    for arm in ("grpo", "dpo"):
        pairs = list(zip(by_arm[arm], by_arm["instruct"], strict=True))
        for measure in measures:
            differences = {
                question_type: _interval(
                    [
                        run["test"][measure][question_type] - control["test"][measure][question_type]
                        for run, control in pairs
                    ]
                )  # fmt: skip
                for question_type in pairs[0][0]["test"][measure]
            }
            differences["mean"] = _interval(
                [_mean(run["test"][measure]) - _mean(control["test"][measure]) for run, control in pairs]
            )
            summary[f"{arm}_minus_instruct"][measure] = differences
    return summary


def _plot(sweep: list[dict[str, Any]], seeds: list[dict[str, Any]], chosen_rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    curves = [run["rewards"] for run in sweep if run["arm"] == "grpo" and run["learning_rate"] == chosen_rate]
    curves += [run["rewards"] for run in seeds if run["arm"] == "grpo" and run.get("rewards")]
    for index, curve in enumerate(curves):
        axis.plot([step for step, _ in curve], [reward for _, reward in curve], marker=".", label=f"seed {index}")
    axis.set_xlabel("GRPO step")
    axis.set_ylabel("mean reward (exact match + one word)")
    axis.set_title(f"GRPO on the demo model, learning rate {chosen_rate:g}")
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _check_tokenizer(base_dir: Path, settings: DemoSettings) -> None:
    data = prepare_demo_data(settings, progress=False)
    if PreTrainedTokenizerFast.from_pretrained(base_dir).get_vocab() != data.tokenizer.get_vocab():
        raise ValueError(f"the tokenizer in {base_dir} is not the one of these data settings: train it on them")


def _print_tables(summary: dict[str, Any], base: dict[str, Any]) -> None:
    types = list(base["test"]["generated"])
    print("| test, greedy generate | " + " | ".join(types) + " | mean | 3-object scenes (mean) |")
    print("| --- |" + " ---: |" * (len(types) + 2))
    base_three = _mean(base["test"]["three_objects_generated"])
    cells = [f"{base['test']['generated'][t]:.2f}" for t in types]
    print(f"| base | {' | '.join(cells)} | {_mean(base['test']['generated']):.2f} | {base_three:.2f} |")
    for arm in ARMS:
        table = summary["arms"][arm]
        cells = [f"{table['generated'][t]['mean']:.2f} ± {table['generated'][t]['sd']:.2f}" for t in types]
        three = table["three_objects_generated"]["mean"]["mean"]
        print(f"| {arm} | {' | '.join(cells)} | {table['generated']['mean']['mean']:.2f} | {three:.2f} |")
    for arm in ("grpo", "dpo"):
        for measure in ("generated", "three_objects_generated"):
            cells = []
            for key, value in summary[f"{arm}_minus_instruct"][measure].items():
                cells.append(f"{key} {value['mean']:+.2f} [{value.get('low', float('nan')):+.2f}, "
                             f"{value.get('high', float('nan')):+.2f}]")  # fmt: skip
            print(f"{arm} - instruct ({measure}): " + "; ".join(cells))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("outputs/demo/model"), help="a model deepseekv3 demo saved")
    parser.add_argument("--steps", type=int, default=100, help="extra optimizer steps per arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, one rate per arm, 8 rows per type")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    if args.quick and args.output.resolve() == RESULTS_PATH:
        parser.error(f"--quick figures are no result: write them elsewhere than {RESULTS_PATH}")
    if not (args.base / "config.json").exists():
        parser.error(f"--base {args.base}: no saved model there (run `make demo` first)")
    if 0 not in args.seeds:
        parser.error("--seeds must include 0: the learning rates are chosen at seed 0")
    demo_settings = DemoSettings(baseline=False, eval_per_type=8 if args.quick else None)
    _check_tokenizer(args.base, demo_settings)
    settings = asdict(demo_settings)
    steps = 4 if args.quick else args.steps
    rates = {arm: LEARNING_RATES[arm][1:2] if args.quick else LEARNING_RATES[arm] for arm in ARMS}
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory() as states,
        ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool,
    ):
        state = {(arm, rate): str(Path(states) / f"{arm}-{rate:g}.pt") for arm in ARMS for rate in rates[arm]}
        base_future = pool.submit(base_run, settings, str(args.base), 1)
        sweep_futures = [pool.submit(sweep_run, arm, rate, steps, settings, str(args.base), state[arm, rate], 1)
                         for arm in ARMS for rate in rates[arm]]  # fmt: skip
        sweep = [future.result() for future in sweep_futures]
        chosen = {arm: max((run for run in sweep if run["arm"] == arm), key=lambda run: run["validation_mean"])
                  for arm in ARMS}  # fmt: skip
        chosen_rates = {arm: run["learning_rate"] for arm, run in chosen.items()}
        seed_futures = [pool.submit(seed_run, arm, chosen_rates[arm], seed, steps, settings, str(args.base),
                                    state[arm, chosen_rates[arm]], 1)
                        for seed in args.seeds for arm in ARMS]  # fmt: skip
        seeds = [future.result() for future in seed_futures]
        base = base_future.result()
    for arm in ARMS:  # seed 0 is the sweep's chosen run
        for run in seeds:
            if run["arm"] == arm and run["seed"] == 0:
                run["rewards"] = chosen[arm]["rewards"]
                run["seconds_per_step"] = chosen[arm]["seconds_per_step"]
    summary = summarize(seeds)
    _print_tables(summary, base)
    seconds_per_step = {arm: statistics.median(run["seconds_per_step"] for run in seeds if run["arm"] == arm)
                        for arm in ARMS}  # fmt: skip
    print("seconds per step (median over seeds, two runs at a time): "
          + ", ".join(f"{arm} {value:.2f}" for arm, value in seconds_per_step.items()))  # fmt: skip
    if not args.quick:
        _plot(sweep, [run for run in seeds if run["seed"] != 0], chosen_rates["grpo"], PLOT_PATH)
    result = {
        "command": "python benchmarks/bench_rl.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info("cuda" if torch.cuda.is_available() else "cpu"),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": {
            **settings,
            "steps": steps,
            "num_generations": NUM_GENERATIONS,
            "max_completion_length": MAX_COMPLETION_LENGTH,
            "learning_rates": rates,
        },  # fmt: skip
        "chosen_learning_rates": chosen_rates,
        "seconds_per_step": seconds_per_step,
        "base": base,
        "summary": summary,
        "sweep": sweep,
        "runs": seeds,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"{len(sweep) + len(seeds)} runs in {result['seconds'] / 60:.1f} min; written to {args.output}")
    return result


if __name__ == "__main__":
    main()
