"""LoRA against full fine-tuning on the demo's held-out task, at matched budgets: accuracy, forgetting, step time.

The seed claims LoRA with about 0.1% of the parameters reaches 92% of full fine-tuning. This measures it on the
demo's held-out task (`color_by_side`, never trained on before; evaluated on 3-object scenes, where the picture-based
guess scores 0.5).

Command (from the repository root; the default, 7 configurations x 3 learning rates plus 7 replay runs of 300 steps
each: measured 11.4 minutes on 2 CPU cores with `--base outputs/demo/model`; with a fourth LoRA rate and the base
model trained first, 32.5 minutes beside other jobs):

    .venv/bin/python benchmarks/bench_lora.py
    .venv/bin/python benchmarks/bench_lora.py --base outputs/demo/model     # the model `deepseekv3 demo` saved
    .venv/bin/python benchmarks/bench_lora.py --quick --workers 1 --output /tmp/bench_lora_quick.json   # smoke run

The demo's data, tokenizer and schedule (`deepseekv3.training.demo`, `DemoSettings(baseline=False)`). The base model
is the demo's: variant `A` (contrastive -> distillation -> instruction tuning, `train_variant`), trained once (with
`--workers` torch threads: nothing else runs meanwhile) and kept in `--cache-dir` (reused when it holds a model
trained with the same settings), or a saved model folder given with `--base` (trained on the same data settings: the
tokenizer is checked). Every run starts from those base weights and trains for `--steps` optimizer steps (default the
demo's LoRA stage, 300) with the demo's batch size and cosine schedule (`stage_training_arguments`, only the learning
rate changes):

- LoRA (`default_lora_config`, recipe `lora`) at r = 4, 8, 16 (`lora_alpha = 2r`), each with the routed experts
  (`target_parameters`, PEFT's per-expert parameter wrapper) and without them (the same config with
  `target_parameters=[]`: PEFT skips parameter injection for an empty list as for None);
- full fine-tuning: every parameter (recipe `instruct` on the same examples; unlike an adapter it also moves the
  routers' load-balancing bias, as every full training step of the demo does).

On this model (0.88M parameters) the adapters are 1.8% (r=4 without the experts) to 14.5% (r=16 with them) of the
parameters: the seed's 0.1% is not reachable at this size, so the fractions are reported beside the ratios. The
held-out task has 1,278 training examples, so 300 steps of 32 pass over them 7.5 times (3.75 with replay); its
validation split has 95 three-object scenes, its test split 100, the seen types' test split 100 rows per type.

The learning rate of each configuration is chosen on the held-out task's VALIDATION scenes (closed-set scoring,
`evaluate_accuracy(...)["color"]`; ties go to the rate listed first): LoRA from 1e-3, 3e-3, 1e-2, full fine-tuning
from 3e-4, 1e-3, 3e-3. Every validation figure is recorded. Only the chosen run of each configuration is read on the
test splits, once: the held-out test scenes by closed-set scoring and by greedy `generate` (`evaluate_split`), and
the seen question types' test rows (`evaluate_accuracy`) for forgetting, against the base model's accuracy before
fine-tuning. The chosen configurations are then trained again, at their chosen rates, with replay: the held-out
task's training examples plus as many examples drawn (seeded) from stage 3's `instruct` examples, for the same steps
and batch size, so a step holds about half as many held-out examples as without replay (the learning rate is not
swept again).

Reported per configuration: trainable fraction (PEFT's count, adapters included; 1.0 for full fine-tuning), the
chosen learning rate, held-out test accuracy (scored and generated), the ratio LoRA / full of the scored held-out
test accuracy (full = full fine-tuning without replay) and the ratio of their gains over the floor, the seen types'
test accuracy before and after and the mean difference over types, and the median optimizer step time. The floor to
beat on the held-out task is `floors['held_out_test']['strongest']['color']` (the picture-based guess, 0.5); the
base model's held-out accuracy before fine-tuning is reported beside it. Runs go `--workers` at a time in spawned
processes of one torch thread each; each process rebuilds the data with `prepare_demo_data` (deterministic) and
loads the base weights from disk for every run.

Writes `benchmarks/results/bench_lora.json` (command, machine, seconds, settings, every run with its validation
figure, the summary table and a `headline` list) and prints the tables as markdown. `--quick` (the demo's quick data
and steps, one learning rate per configuration) writes to `/tmp/bench_lora_quick.json` unless `--output` says
otherwise, and never to the results file: its figures are no result.
"""

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from _harness import source_info
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging

from deepseekv3.modeling_deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.training.demo import (
    QUESTION_TYPES,
    DemoData,
    DemoSettings,
    evaluate_split,
    prepare_demo_data,
    stage_training_arguments,
    train_variant,
)
from deepseekv3.training.evaluation import evaluate_accuracy
from deepseekv3.training.lora import default_lora_config, trainable_fraction
from deepseekv3.training.recipes import build_stage_trainer, select_stage_examples

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_lora.json"
QUICK_OUTPUT = Path("/tmp/bench_lora_quick.json")
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "bench_lora_cache"
LORA_LEARNING_RATES = (1e-3, 3e-3, 1e-2)
FULL_LEARNING_RATES = (3e-4, 1e-3, 3e-3)
QUICK_LORA_LEARNING_RATE, QUICK_FULL_LEARNING_RATE = 3e-3, 1e-3
HELD_OUT = "color"  # the question type of the held-out task's rows

_DATA: dict[str, DemoData] = {}  # per worker process: the demo data of each settings, built once


# ----------------------------------------------------------------------------------------------------------------
# in the worker processes


def _worker_setup(settings: dict[str, Any], threads: int) -> tuple[DemoSettings, DemoData]:
    torch.set_num_threads(threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    key = json.dumps(settings, sort_keys=True)
    if key not in _DATA:
        _DATA[key] = prepare_demo_data(DemoSettings(**settings), progress=False)
    return DemoSettings(**settings), _DATA[key]


class _StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, optimizer, the trainer's post-step updates)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _load_base(base_dir: str) -> DeepseekV3MultimodalForConditionalGeneration:
    model = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(base_dir)
    if not torch.cuda.is_available():
        model.set_experts_implementation("eager")  # as build_demo_model: the per-expert loop is faster on CPU
    return model


def _lora_config(config: dict[str, Any]):
    overrides = {"r": config["r"], "lora_alpha": 2 * config["r"]}
    if not config["experts"]:
        overrides["target_parameters"] = []  # the same config without the routed experts
    return default_lora_config(**overrides)


def _build(config: dict[str, Any], base_dir: str):
    """The model a configuration trains: the base itself (full fine-tuning) or a PEFT model around it."""
    model = _load_base(base_dir)
    if config["kind"] == "full":
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(config))


def _task_examples(settings: DemoSettings, data: DemoData, replay: bool) -> list[dict[str, Any]]:
    """The held-out task's training examples, plus as many drawn (seeded) from stage 3's examples with replay."""
    task = select_stage_examples("lora", data.rows["train"], data.examples["train"])
    if not replay:
        return task
    instruct = select_stage_examples("instruct", data.rows["train"], data.examples["train"])
    drawn = random.Random(settings.seed).sample(instruct, min(len(task), len(instruct)))
    return [*task, *drawn]


def _train(
    config: dict[str, Any], replay: bool, learning_rate: float, settings: DemoSettings, data: DemoData, base_dir: str
):
    model = _build(config, base_dir)
    examples = _task_examples(settings, data, replay)
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        stage = "lora" if config["kind"] == "lora" else "instruct"
        arguments = stage_training_arguments(
            replace(settings, learning_rate=learning_rate, lora_learning_rate=learning_rate),
            stage,
            Path(output_dir),
            settings.stage_steps["lora"],
        )
        arguments.disable_tqdm = True
        trainer = build_stage_trainer(stage, model, examples, arguments, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    run = {
        "config": config["name"],
        "replay": replay,
        "learning_rate": learning_rate,
        "train_examples": len(examples),
        "steps": settings.stage_steps["lora"],
        "trainable_fraction": 1.0 if config["kind"] == "full" else trainable_fraction(model),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "median_step_ms": 1000 * statistics.median(timer.times[1:] or timer.times),
        "losses": [entry for entry in trainer.state.log_history if "loss" in entry],
    }
    return model, run


def _held_out_validation(model, data: DemoData) -> float:
    rows, examples = data.rows["held_out_validation"], data.examples["held_out_validation"]
    return evaluate_accuracy(model, data.processor, rows, examples, progress=False)[HELD_OUT]


def _test_figures(model, data: DemoData) -> dict[str, Any]:
    """The test splits, read once per reported model: the held-out task (scored and generated), the seen types."""
    return {
        "held_out_test": evaluate_split(model, data, "held_out_test"),
        "seen_test": evaluate_accuracy(
            model, data.processor, data.rows["test"], data.examples["test"], progress=False
        ),
    }


def train_base(settings: dict[str, Any], cache_dir: str, threads: int) -> dict[str, Any]:
    """Variant A of the demo, trained once and saved to `cache_dir/model`; `cache_dir/base.json` written last."""
    started = time.perf_counter()
    demo_settings, data = _worker_setup(settings, threads)
    with tempfile.TemporaryDirectory() as output_dir:
        model, result = train_variant("A", demo_settings, data, Path(output_dir))
    model.save_pretrained(Path(cache_dir) / "model")
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["stage_steps"] = {k: v for k, v in demo_settings.stage_steps.items() if k != "lora"}
    (Path(cache_dir) / "base.json").write_text(json.dumps({"settings": settings, "training": result}, indent=2))
    return result


def evaluate_base(settings: dict[str, Any], base_dir: str, threads: int) -> dict[str, Any]:
    """The base model before fine-tuning, on the held-out task (validation and test) and the seen types' test rows;
    also the data's sizes and floors."""
    started = time.perf_counter()
    _, data = _worker_setup(settings, threads)
    _check_tokenizer(base_dir, data)
    model = _load_base(base_dir)
    return {
        "held_out_validation": _held_out_validation(model, data),
        **_test_figures(model, data),
        "floors": data.floors,
        "rows": {split: len(rows) for split, rows in data.rows.items()},
        "seen_test_rows_per_type": {q: data.rows["test"]["question_type"].count(q) for q in QUESTION_TYPES},
        "task_train_examples": len(select_stage_examples("lora", data.rows["train"], data.examples["train"])),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _check_tokenizer(base_dir: str, data: DemoData) -> None:
    """A saved folder with a tokenizer (as `deepseekv3 demo` saves it) must share the data's vocabulary."""
    if not (Path(base_dir) / "tokenizer.json").exists():
        return
    from transformers import PreTrainedTokenizerFast

    if PreTrainedTokenizerFast.from_pretrained(base_dir).get_vocab() != data.tokenizer.get_vocab():
        raise ValueError(f"the tokenizer in {base_dir} is not the one of these data settings: train it on them")


def _train_and_validate(config, replay, learning_rate, settings, base_dir, threads):
    """Train one run, score it on the held-out validation scenes, time both."""
    started = time.perf_counter()
    demo_settings, data = _worker_setup(settings, threads)
    model, run = _train(config, replay, learning_rate, demo_settings, data, base_dir)
    trained = time.perf_counter()
    run["held_out_validation"] = _held_out_validation(model, data)
    run["seconds"] = {"train": round(trained - started, 1)}
    return model, data, run, started


def sweep_run(
    config: dict[str, Any],
    learning_rate: float,
    settings: dict[str, Any],
    base_dir: str,
    state_path: str,
    threads: int,
) -> dict[str, Any]:
    """One run of the learning-rate sweep: trained, scored on the held-out validation scenes, weights saved."""
    model, _, run, started = _train_and_validate(config, False, learning_rate, settings, base_dir, threads)
    torch.save(model.state_dict(), state_path)
    run["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return run


def test_chosen(
    config: dict[str, Any], settings: dict[str, Any], base_dir: str, state_path: str, threads: int
) -> dict[str, Any]:
    """The chosen run of a configuration, reloaded from its saved weights, read on the test splits once."""
    started = time.perf_counter()
    _, data = _worker_setup(settings, threads)
    model = _build(config, base_dir)
    model.load_state_dict(torch.load(state_path, weights_only=True), strict=True)
    result = {"held_out_validation_reloaded": _held_out_validation(model, data), **_test_figures(model, data)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def replay_run(
    config: dict[str, Any], learning_rate: float, settings: dict[str, Any], base_dir: str, threads: int
) -> dict[str, Any]:
    """A chosen configuration at its chosen rate, trained with replay, then read on validation and test once."""
    model, data, run, started = _train_and_validate(config, True, learning_rate, settings, base_dir, threads)
    run.update(_test_figures(model, data))
    run["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return run


# ----------------------------------------------------------------------------------------------------------------
# in the main process


def configurations(ranks: list[int]) -> list[dict[str, Any]]:
    configs = [{"name": "full", "kind": "full"}]
    for r in ranks:
        for experts in (True, False):
            name = f"lora r={r} {'+' if experts else '-'}experts"
            configs.append({"name": name, "kind": "lora", "r": r, "experts": experts})
    return configs


def _settings_key(settings: dict[str, Any]) -> str:
    """What the base model depends on: every setting but the output folder, the baseline and the LoRA steps."""
    kept = {k: v for k, v in settings.items() if k not in ("output_dir", "baseline")}
    kept["stage_steps"] = {k: v for k, v in settings["stage_steps"].items() if k != "lora"}
    return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def _base_cache(cache_root: Path, settings: dict[str, Any]) -> tuple[Path, bool]:
    """The cache folder of these settings, and whether it already holds the trained base."""
    folder = cache_root / f"base-{_settings_key(settings)}"
    marker = folder / "base.json"
    if marker.exists() and (folder / "model").is_dir():
        saved = json.loads(marker.read_text())["settings"]
        if _settings_key(saved) == _settings_key(settings):
            return folder, True
    return folder, False


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def _ratio(numerator: float, denominator: float) -> float | None:
    """`numerator / denominator`, None (no ratio) where the denominator is not above 0."""
    return numerator / denominator if denominator > 0 else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarize(configs, chosen_runs, tests, replays, base) -> list[dict[str, Any]]:
    """One row per configuration and replay setting (the chosen runs)."""
    floor = base["floors"]["held_out_test"]["strongest"][HELD_OUT]
    seen_before = base["seen_test"]
    full = tests["full"]["held_out_test"]["scored"][HELD_OUT] if "full" in tests else 0.0
    full_replay = replays["full"]["held_out_test"]["scored"][HELD_OUT] if "full" in replays else 0.0
    rows = []
    for replay in (False, True):
        for config in configs:
            name = config["name"]
            if replay and name not in replays:
                continue
            if not replay and name not in tests:
                continue
            run = replays[name] if replay else {**chosen_runs[name], **tests[name]}
            accuracy = run["held_out_test"]["scored"][HELD_OUT]
            after = run["seen_test"]
            difference = {q: after[q] - seen_before[q] for q in seen_before}
            rows.append(
                {
                    "config": name,
                    "replay": replay,
                    "trainable_fraction": run["trainable_fraction"],
                    "learning_rate": run["learning_rate"],
                    "held_out_validation": run["held_out_validation"],
                    "held_out_test_scored": accuracy,
                    "held_out_test_generated": run["held_out_test"]["generated"][HELD_OUT],
                    "held_out_test_invalid_replies": run["held_out_test"]["invalid_replies"][HELD_OUT],
                    "ratio_to_full": _ratio(accuracy, full),
                    # the gains over the floor, where full fine-tuning beats it
                    "gain_ratio_to_full": _ratio(accuracy - floor, full - floor),
                    "ratio_to_full_with_replay": _ratio(accuracy, full_replay) if replay else None,
                    "seen_test_before": seen_before,
                    "seen_test_after": after,
                    "seen_test_difference": difference,
                    "seen_test_difference_mean": _mean(difference.values()),
                    "median_step_ms": run["median_step_ms"],
                }
            )
    return rows


def headline(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def entry(name, value, higher_is_better):
        return {"name": name, "value": value, "target": None, "higher_is_better": higher_is_better}

    plain = {row["config"]: row for row in rows if not row["replay"]}
    replayed = {row["config"]: row for row in rows if row["replay"]}
    items = []
    if "full" in plain:
        items.append(entry("full_held_out_test_accuracy", plain["full"]["held_out_test_scored"], True))
        items.append(entry("full_seen_types_forgetting", plain["full"]["seen_test_difference_mean"], True))
    loras = [row for row in plain.values() if row["config"] != "full"]
    if loras:
        # chosen on validation (ties: the fewer trainable parameters), like everything else here
        best = max(loras, key=lambda row: (row["held_out_validation"], -row["trainable_fraction"]))
        smallest = min(loras, key=lambda row: row["trainable_fraction"])
        items += [
            entry("best_lora_config (on validation)", best["config"], None),
            entry("best_lora_held_out_test_accuracy", best["held_out_test_scored"], True),
            entry("best_lora_trainable_fraction", best["trainable_fraction"], False),
            entry("best_lora_ratio_to_full", best["ratio_to_full"], True),
            entry("best_lora_seen_types_forgetting", best["seen_test_difference_mean"], True),
            entry("smallest_lora_trainable_fraction", smallest["trainable_fraction"], False),
            entry("smallest_lora_ratio_to_full", smallest["ratio_to_full"], True),
        ]
        if "lora r=8 +experts" in plain:  # the demo's adapter
            items.append(entry("demo_lora_ratio_to_full", plain["lora r=8 +experts"]["ratio_to_full"], True))
    for name, row in replayed.items():
        items.append(entry(f"seen_types_forgetting_with_replay[{name}]", row["seen_test_difference_mean"], True))
        items.append(entry(f"held_out_test_accuracy_with_replay[{name}]", row["held_out_test_scored"], True))
    return items


def markdown(rows, sweeps: dict[str, list[dict[str, Any]]], base) -> str:
    floor = base["floors"]["held_out_test"]["strongest"][HELD_OUT]
    before = base["held_out_test"]
    lines = [
        f"Held-out task (`color_by_side`, 3-object scenes; {base['rows']['held_out_test']} test, "
        f"{base['rows']['held_out_validation']} validation rows): floor (picture guess) {floor:.2f}; base model "
        f"before fine-tuning {before['scored'][HELD_OUT]:.2f} scored, {before['generated'][HELD_OUT]:.2f} "
        f"generated. Seen types' test accuracy before: "
        + ", ".join(f"{q} {v:.2f}" for q, v in base["seen_test"].items())
        + f" (mean {_mean(base['seen_test'].values()):.2f}).",
        "",
        "| configuration | replay | trainable | lr | held-out val | held-out test (scored) | (`generate`) "
        "| / full | gain / full's gain | seen types before -> after (mean) | change | step ms |",
        "| --- | --- |" + " ---: |" * 10,
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {'yes' if row['replay'] else 'no'} | {row['trainable_fraction']:.2%} "
            f"| {row['learning_rate']:g} | {row['held_out_validation']:.2f} | {row['held_out_test_scored']:.2f} "
            f"| {row['held_out_test_generated']:.2f} | {_cell(row['ratio_to_full'])} "
            f"| {_cell(row['gain_ratio_to_full'])} "
            f"| {_mean(row['seen_test_before'].values()):.2f} -> {_mean(row['seen_test_after'].values()):.2f} "
            f"| {row['seen_test_difference_mean']:+.2f} | {row['median_step_ms']:.0f} |"
        )
    rates = sorted({run["learning_rate"] for runs in sweeps.values() for run in runs})
    lines += ["", "| held-out validation accuracy (* chosen) | " + " | ".join(f"lr {r:g}" for r in rates) + " |"]
    lines.append("| --- |" + " ---: |" * len(rates))
    for name, runs in sweeps.items():
        by_rate = {
            run["learning_rate"]: f"{run['held_out_validation']:.2f}{'*' if run['chosen'] else ''}" for run in runs
        }
        cells = [by_rate.get(r, "-") for r in rates]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the demo's LoRA)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--lora-learning-rates", type=float, nargs="+", default=None)
    parser.add_argument("--full-learning-rates", type=float, nargs="+", default=None)
    parser.add_argument("--no-replay", action="store_true", help="skip the runs with replay")
    parser.add_argument("--base", type=Path, default=None, help="a saved model folder to start from")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the trained base is kept")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument("--quick", action="store_true", help="smoke run: quick data and steps, one rate each")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    output = args.output or (QUICK_OUTPUT if args.quick else RESULTS_PATH)
    if args.quick and output.resolve() == RESULTS_PATH:
        parser.error(f"--quick figures are no result: write them elsewhere than {RESULTS_PATH}")
    demo_settings = DemoSettings.quick(baseline=False) if args.quick else DemoSettings(baseline=False)
    if args.steps is not None:
        demo_settings.stage_steps["lora"] = args.steps
    lora_rates = args.lora_learning_rates or ([QUICK_LORA_LEARNING_RATE] if args.quick else list(LORA_LEARNING_RATES))
    full_rates = args.full_learning_rates or ([QUICK_FULL_LEARNING_RATE] if args.quick else list(FULL_LEARNING_RATES))
    configs = configurations(args.ranks)
    by_name = {config["name"]: config for config in configs}
    started = time.perf_counter()

    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        # the base model: trained once (with the pool's threads: nothing else can run meanwhile) or loaded
        base_training = None
        if args.base is not None:
            base_dir = args.base
        else:
            cache, cached = _base_cache(args.cache_dir, asdict(demo_settings))
            demo_settings.output_dir = str(cache)
            settings = asdict(demo_settings)
            if cached:
                print(f"base model from the cache {cache}")
            else:
                print(f"training the base model (variant A) into {cache}")
                cache.mkdir(parents=True, exist_ok=True)
                pool.submit(train_base, settings, str(cache), args.workers).result()
            base_training = json.loads((cache / "base.json").read_text())["training"]
            base_dir = cache / "model"
        settings = asdict(demo_settings)
        base_dir = str(base_dir)

        with tempfile.TemporaryDirectory(prefix="bench_lora_states_") as states:
            jobs = {pool.submit(evaluate_base, settings, base_dir, 1): ("base", None)}
            planned = {config["name"]: full_rates if config["kind"] == "full" else lora_rates for config in configs}
            for config in configs:
                for rate in planned[config["name"]]:
                    path = str(Path(states) / f"{config['name'].replace(' ', '_')}_{rate:g}.pt")
                    future = pool.submit(sweep_run, config, rate, settings, base_dir, path, 1)
                    jobs[future] = ("sweep", (config["name"], rate, path))
            base = None
            sweeps: dict[str, list[dict[str, Any]]] = {name: [] for name in planned}
            chosen_runs, tests, replays = {}, {}, {}
            progress = tqdm(total=len(jobs) + (1 if args.no_replay else 2) * len(configs), desc="runs")
            pending = set(jobs)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    kind, detail = jobs[future]
                    result = future.result()
                    progress.update()
                    if kind == "base":
                        base = result
                    elif kind == "sweep":
                        name, rate, path = detail
                        sweeps[name].append({**result, "state_path": path})
                        if len(sweeps[name]) == len(planned[name]):
                            # every rate is in: choose on validation (ties: the rate listed first), then read the
                            # chosen run on test, and train the configuration again with replay at that rate
                            sweeps[name].sort(key=lambda run: planned[name].index(run["learning_rate"]))
                            chosen = chosen_runs[name] = max(sweeps[name], key=lambda run: run["held_out_validation"])
                            config = by_name[name]
                            new = pool.submit(test_chosen, config, settings, base_dir, chosen["state_path"], 1)
                            jobs[new] = ("test", name)
                            pending.add(new)
                            if not args.no_replay:
                                new = pool.submit(replay_run, config, chosen["learning_rate"], settings, base_dir, 1)
                                jobs[new] = ("replay", name)
                                pending.add(new)
                    elif kind == "test":
                        tests[detail] = result
                    else:
                        replays[detail] = result
            progress.close()

    for name, runs in sweeps.items():
        for run in runs:
            run.pop("state_path")
            run["chosen"] = run is chosen_runs[name]
        reloaded, trained = tests[name]["held_out_validation_reloaded"], chosen_runs[name]["held_out_validation"]
        if reloaded != trained:  # the saved weights must give the model that was chosen
            print(f"warning: {name} scores {reloaded:.3f} on validation reloaded, {trained:.3f} when trained")
    rows = summarize(configs, chosen_runs, tests, replays, base)
    table = markdown(rows, sweeps, base)
    print(table)
    result = {
        "benchmark": "bench_lora",
        "command": "python benchmarks/bench_lora.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "source": source_info(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "workers": args.workers,
            "threads_per_worker": 1,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "seconds": round(time.perf_counter() - started, 1),
        "settings": settings,
        "base": {"path": base_dir if args.base is not None else None, "training": base_training},
        "learning_rates": {"lora": lora_rates, "full": full_rates},
        "configurations": configs,
        "before": base,
        "sweeps": sweeps,  # every run of the learning-rate sweeps, `chosen` marking the one read on test
        "tests": tests,
        "replays": replays,
        "summary": rows,
        "table": table,
        "headline": headline(rows),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"{len(configs)} configurations in {result['seconds'] / 60:.1f} min; written to {output}")
    return result


if __name__ == "__main__":
    main()
