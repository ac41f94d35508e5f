"""Reinforcement learning on output quality (GRPO, DPO) against the same number of extra instruction-tuning steps,
and the seed's "core 80% + edge cases 20%" mix against the core alone, on the built-in data's edge cases.

The seed's flow ends with reinforcement learning that optimises output quality, on data that gives the long tail a
fixed share. This measures what TRL's `GRPOTrainer` and `DPOTrainer` (`deepseekv3.training.rl`, the recipes
`deepseekv3 train --stage grpo / dpo` run) add to an instruction-tuned model, against the fair control: the same
model trained for the same number of extra optimizer steps by instruction tuning (recipe `instruct`) on the same
questions; and what the 80/20 mix (`deepseekv3.data.mix_datasets`) does to edge-case accuracy at equal steps.

Command (from the repository root, after `make demo`; the default took 7 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/bench_rl.py --base outputs/demo/model
    .venv/bin/python benchmarks/bench_rl.py --base outputs/demo/model --quick --output /tmp/bench_rl.json  # smoke

- **Base**: a model `deepseekv3 demo` saved (trained on the demo's data settings: the tokenizer is checked), run
  with the current processor code.
- **Edge cases**: `build_edge_cases` (3-object scenes, objects on the image border, 3-tone clips with no silence
  between the tones) with the demo's data seed, `EDGE_IMAGES` images and `EDGE_CLIPS` clips split by `EDGE_SPLITS`:
  their own training, validation and test rows, none of them an image or clip of the core data.
- **Questions**: the image questions of the seen types (colour, shape, count, spatial); GRPO passes images, not
  audio, to the processor, so every arm trains on these alone. The arms `grpo`, `dpo` and `instruct` train on the
  80/20 mix of the demo's training questions (core) and the edge training questions (`mix_datasets`, every core
  question once and a quarter as many edge questions); `instruct_core` on the core questions alone.
- **GRPO**: `--steps` steps of 32 completions, `num_generations` 8 (4 questions a step), replies of at most 6 tokens,
  sampled at temperature 1, no KL term (TRL's default `beta` 0).
- **DPO**: `--steps` steps of 32 preference pairs (`preference_pairs`: the mix's questions the base model answers
  wrong by greedy `generate`, the reference answer preferred to its reply), TRL's default sigmoid loss at `beta` 0.1,
  the base checkpoint as the frozen reference.
- **Control** (`instruct`) and **core only** (`instruct_core`): `--steps` steps of 32 questions (the demo's batch; 8
  times the questions GRPO sees a step, with their reference answers as labels).
- All arms use the demo's schedule otherwise (cosine, 5% warm-up, weight decay 0.01), in fp32 without gradient
  checkpointing (TRL's configs default to bf16 autocast and checkpointing; both are switched off here).

The learning rate of each arm is chosen on the VALIDATION splits at seed 0 (the mean of two means of the exact match
of greedy `generate`, what users get: over the core validation's five question types and over the edge validation's;
ties to the rate listed first). Each arm is then trained at its rate for every seed (the seed sets the sampling and
the batch order; the base is the same) and read once on the test splits: the core test (at least 400 questions per
type) by greedy `generate` with exact match and by closed-set scoring, and the edge test by greedy `generate`.
Reported: per arm and type the mean and sd over seeds; the paired differences GRPO - control, DPO - control and
control - core only (same seed) with a 95% t-interval; the base model's accuracy; the mean reward per logging step
(plotted to `docs/bench_rl_reward.png`) and the seconds per optimizer step of each arm (two runs at a time, one torch
thread each, so step times include that sharing).

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
from _harness import machine_info, source_info
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

from deepseekv3.data import build_edge_cases, load_conversations, mix_datasets
from deepseekv3.modeling_deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.training.collators import encode_rows
from deepseekv3.training.demo import DemoSettings, _first_per_type, prepare_demo_data, stage_training_arguments
from deepseekv3.training.evaluation import evaluate_accuracy, generate_answers, reply_accuracy
from deepseekv3.training.recipes import DEFAULT_EDGE_FRACTION, build_stage_trainer
from deepseekv3.training.rl import (
    build_dpo_trainer,
    build_grpo_trainer,
    grpo_dataset,
    preference_pairs,
    seen_image_indices,
)

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_rl.json"
PLOT_PATH = Path(__file__).resolve().parent.parent / "docs" / "bench_rl_reward.png"
ARMS = ("grpo", "dpo", "instruct", "instruct_core")
# the differences reported: (arm, against)
COMPARISONS = (("grpo", "instruct"), ("dpo", "instruct"), ("instruct", "instruct_core"))
EDGE_IMAGES, EDGE_CLIPS = 4000, 1000
EDGE_SPLITS = {"train": 0.6, "validation": 0.1, "test": 0.3}
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
        demo_settings = DemoSettings(**settings)
        data = prepare_demo_data(demo_settings, progress=False)
        edge = build_edge_cases(EDGE_IMAGES, EDGE_CLIPS, seed=demo_settings.data_seed,
                                image_size=demo_settings.image_size, split_sizes=EDGE_SPLITS)  # fmt: skip
        for split in ("train", "validation", "test"):
            rows = edge[split].select(
                [index for index, held_out in enumerate(edge[split]["held_out"]) if not held_out]
            )
            if split != "train":
                rows = _first_per_type(rows, demo_settings.eval_per_type)
            data.rows[f"edge_{split}"] = rows
        edge_train = data.rows["edge_train"]
        data.examples["edge_train"] = encode_rows(data.processor, edge_train, demo_settings.patch_size, progress=False)
        _DATA[key] = data
    return DemoSettings(**settings), _DATA[key]


def _load_base(base_dir: str) -> DeepseekV3MultimodalForConditionalGeneration:
    model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(base_dir)
    if not torch.cuda.is_available():
        model.set_experts_implementation("eager")  # as build_demo_model: the per-expert loop is faster on CPU
    return model


def _training_questions(arm: str, data, seed: int) -> tuple[Any, list[dict[str, Any]]]:
    """The rows (as `load_conversations` takes them) and encoded examples an arm trains on: the seen image questions
    of the core training split, mixed 80/20 with the edge training split's unless the arm is `instruct_core` (the
    trainers shuffle, so only how often each question comes matters)."""
    picks = {"train": seen_image_indices(data.rows["train"])}
    if arm != "instruct_core":
        picks["edge_train"] = seen_image_indices(data.rows["edge_train"])
        core, edge = (
            Dataset.from_dict({"split": [split] * len(picks[split]), "index": picks[split]}) for split in picks
        )
        mix = mix_datasets(core, edge, edge_fraction=DEFAULT_EDGE_FRACTION, seed=seed)
        picks = {split: [i for s, i in zip(mix["split"], mix["index"], strict=True) if s == split] for split in picks}
    rows = concatenate_datasets([data.rows[split].select(indices) for split, indices in picks.items()])
    examples = [data.examples[split][index] for split, indices in picks.items() for index in indices]
    return rows, examples


def _train(arm: str, learning_rate: float, seed: int, steps: int, settings: DemoSettings, data, base_dir: str):
    """One arm from the base weights; returns the model, the reward log (GRPO) and the seconds per step."""
    model = _load_base(base_dir)
    rows, examples = _training_questions(arm, data, seed)
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
        trainer = build_grpo_trainer(model, data.processor, grpo_dataset(load_conversations(rows)), args)
    elif arm == "dpo":
        from trl import DPOConfig

        if ("pairs", seed) not in _DATA:  # the base model's wrong replies on this seed's mix
            _DATA["pairs", seed] = preference_pairs(model, data.processor, load_conversations(rows))
        trainer = build_dpo_trainer(model, data.processor, _DATA["pairs", seed], DPOConfig(**trl_arguments),
                                    _load_base(base_dir))  # fmt: skip
    else:
        trainer = build_stage_trainer("instruct", model, examples, args)
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


def _validation(model, data) -> dict[str, Any]:
    """Greedy-`generate` accuracy on the core and the edge validation splits, and the score rates are chosen by."""
    core, edge = _generated(model, data, "validation"), _generated(model, data, "edge_validation")
    return {"generated": core, "edge_generated": edge, "score": (_mean(core) + _mean(edge)) / 2}


def _test(model, data) -> dict[str, Any]:
    return {
        "generated": _generated(model, data, "test"),
        "scored": evaluate_accuracy(model, data.processor, data.rows["test"], data.examples["test"], progress=False),
        "edge_generated": _generated(model, data, "edge_test"),
    }


def sweep_run(arm, learning_rate, steps, settings, base_dir, state_path, threads) -> dict[str, Any]:
    """Seed 0 of one arm at one rate: trained, read on validation, weights kept for the test read if chosen."""
    demo_settings, data = _setup(settings, threads)
    model, rewards, seconds_per_step = _train(arm, learning_rate, 0, steps, demo_settings, data, base_dir)
    torch.save(model.state_dict(), state_path)
    return {
        "arm": arm,
        "learning_rate": learning_rate,
        "seed": 0,
        "validation": _validation(model, data),
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
    return {"validation": _validation(model, data), "test": _test(model, data)}


def _interval(differences: list[float]) -> dict[str, float]:
    mean = statistics.mean(differences)
    if len(differences) < 2:
        return {"mean": mean}
    half = _T95[len(differences) - 1] * statistics.stdev(differences) / math.sqrt(len(differences))
    return {"mean": mean, "low": mean - half, "high": mean + half}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm, measure and type: mean and sd over seeds; each of `COMPARISONS` per seed with a 95% interval."""
    measures = ("generated", "scored", "edge_generated")
    summary: dict[str, Any] = {"arms": {}} | {f"{arm}_minus_{against}": {} for arm, against in COMPARISONS}
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
    for arm, against in COMPARISONS:
        pairs = list(zip(by_arm[arm], by_arm[against], strict=True))
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
            summary[f"{arm}_minus_{against}"][measure] = differences
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
    for measure, title in (("generated", "core test"), ("edge_generated", "edge-case test")):
        types = list(base["test"][measure])
        print(f"| {title}, greedy generate | " + " | ".join(types) + " | mean |")
        print("| --- |" + " ---: |" * (len(types) + 1))
        cells = [f"{base['test'][measure][t]:.2f}" for t in types]
        print(f"| base | {' | '.join(cells)} | {_mean(base['test'][measure]):.2f} |")
        for arm in ARMS:
            table = summary["arms"][arm][measure]
            cells = [f"{table[t]['mean']:.2f} ± {table[t]['sd']:.2f}" for t in types]
            print(f"| {arm} | {' | '.join(cells)} | {table['mean']['mean']:.2f} |")
    for arm, against in COMPARISONS:
        for measure in ("generated", "edge_generated"):
            cells = []
            for key, value in summary[f"{arm}_minus_{against}"][measure].items():
                cells.append(f"{key} {value['mean']:+.2f} [{value.get('low', float('nan')):+.2f}, "
                             f"{value.get('high', float('nan')):+.2f}]")  # fmt: skip
            print(f"{arm} - {against} ({measure}): " + "; ".join(cells))


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
        chosen = {arm: max((run for run in sweep if run["arm"] == arm), key=lambda run: run["validation"]["score"])
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
        "source": source_info(),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": {
            **settings,
            "steps": steps,
            "num_generations": NUM_GENERATIONS,
            "max_completion_length": MAX_COMPLETION_LENGTH,
            "learning_rates": rates,
            "edge_images": EDGE_IMAGES,
            "edge_clips": EDGE_CLIPS,
            "edge_splits": EDGE_SPLITS,
            "edge_fraction": DEFAULT_EDGE_FRACTION,
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
