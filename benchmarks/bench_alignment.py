"""What each alignment stage buys, at equal compute, on held-out test questions, over seeds.

Command (from the repository root; the default, 4 variants x 3 seeds, took 89 minutes on 2 CPU cores, in two sittings
of two variants combined with `--combine`):

    .venv/bin/python benchmarks/bench_alignment.py
    .venv/bin/python benchmarks/bench_alignment.py --seeds 0 --variants A B     # one pair, a few minutes
    # another schedule, to compare on the validation split (`validation_after` of each run)
    .venv/bin/python benchmarks/bench_alignment.py --variants A --stage_steps distill=1800,instruct=600 --output a.json
    # runs done in two sittings (the same settings), summarised together without training anything
    .venv/bin/python benchmarks/bench_alignment.py --combine ab.json cd.json

The demo's data, tokenizer, model and schedule (`deepseekv3.training.demo`, `DemoSettings()`), every variant of
`deepseekv3.training.ablations` from the same initial weights per seed, for the same total optimizer steps:

- `A`: contrastive -> attention distillation -> instruction tuning (the seed's recipe, the demo's model);
- `B`: instruction tuning only, as many steps (it sees every question-answer example A sees, and more);
- `C`: A without stage 1 (its steps go to distillation);
- `D`: A with `attention_distillation_weight=0` in stage 2: the same batches and answer labels, no distillation.

The data set is fixed (`data_seed` 0); the seed sets the initial weights and the order of the batches. Each run is
evaluated once on every test question of the seen types (at least 400 per type), by closed-set scoring (the most
likely allowed answer) and by greedy `generate` with exact match of the reply (what users get), and on the held-out
task's 3-object test scenes (`color_by_side`, never trained on here). Reported: per variant and question type the
mean and sd over seeds; the paired differences A - B, A - C and A - D (per seed, same initial weights and batches)
with a 95% t-interval; the floors (`floor_accuracies`: chance, majority answer, picture guess; the strongest is the
one to beat). The validation accuracy after each stage is recorded too; nothing here is chosen on the test split.
Runs go two at a time in spawned processes of one torch thread each.

Writes `benchmarks/results/bench_alignment.json` (every run's figures, the summary, the command and the commit).
`--combine` reads finished results files instead of training: their settings must be equal and no variant may appear
twice at one seed (every run is deterministic given its settings, variant and seed); the combined file keeps each
part's command, seconds and source.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import torch
from _harness import machine_info, mean_sd, paired_interval, source_info
from tqdm.auto import tqdm

from deepseekv3.training.ablations import VARIANTS
from deepseekv3.training.demo import QUESTION_TYPES, DemoSettings, evaluate_split, prepare_demo_data, train_variant
from deepseekv3.training.pipeline import _split_steps

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_alignment.json"


# two-sided 95% quantiles of Student's t by degrees of freedom
def run_one(variant: str, seed: int, settings: dict, threads: int) -> dict:
    """Train and evaluate one variant at one seed (in a worker process)."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    settings = DemoSettings(**{**settings, "seed": seed})
    data = prepare_demo_data(settings, progress=False)
    with tempfile.TemporaryDirectory() as output_dir:
        model, result = train_variant(variant, settings, data, Path(output_dir))
    trained = time.perf_counter()
    result["test"] = evaluate_split(model, data)
    result["held_out_test"] = evaluate_split(model, data, "held_out_test")
    result["test_rows_per_type"] = {q: data.rows["test"]["question_type"].count(q) for q in QUESTION_TYPES}
    result["held_out_test_rows"] = len(data.rows["held_out_test"])
    result["floors"] = data.floors
    result["seconds"] = {"train": round(trained - started, 1), "total": round(time.perf_counter() - started, 1)}
    return {"variant": variant, "seed": seed, **result}


def run_metrics(run: dict, measure: str) -> dict[str, float]:
    """One run's accuracy per question type, their mean, and the held-out task, by `measure` (scored/generated)."""
    metrics = dict(run["test"][measure])
    metrics["mean of types"] = statistics.fmean(run["test"][measure][q] for q in QUESTION_TYPES)
    metrics["held-out color_by_side"] = run["held_out_test"][measure]["color"]
    return metrics


def summarize(runs: list[dict]) -> dict:
    metrics = {(run["variant"], run["seed"], m): run_metrics(run, m) for run in runs for m in ("scored", "generated")}
    variants = sorted({run["variant"] for run in runs})
    seeds = sorted({run["seed"] for run in runs})
    summary = {"variants": {}, "differences": {}}
    for measure in ("scored", "generated"):
        for variant in variants:
            mine = [metrics[variant, seed, measure] for seed in seeds if (variant, seed, measure) in metrics]
            summary["variants"].setdefault(variant, {})[measure] = {
                name: mean_sd([m[name] for m in mine]) for name in mine[0]
            }
        for other in [v for v in variants if v != "A"]:
            paired = [s for s in seeds if ("A", s, measure) in metrics and (other, s, measure) in metrics]
            if paired:
                summary["differences"].setdefault(f"A-{other}", {})[measure] = {
                    name: paired_interval(
                        [metrics["A", s, measure][name] - metrics[other, s, measure][name] for s in paired]
                    )
                    for name in metrics["A", paired[0], measure]
                }
    return summary


def print_tables(summary: dict, floors: dict) -> None:
    columns = [*QUESTION_TYPES, "mean of types", "held-out color_by_side"]
    print("| test accuracy | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    strongest = floors["test"]["strongest"]
    cells = [f"{strongest[q]:.2f}" for q in QUESTION_TYPES]
    cells += [f"{statistics.fmean(strongest[q] for q in QUESTION_TYPES):.2f}"]
    cells += [f"{floors['held_out_test']['strongest']['color']:.2f}"]
    print("| strongest floor | " + " | ".join(cells) + " |")
    for variant, measures in summary["variants"].items():
        for measure, per_type in measures.items():
            cells = [f"{per_type[c]['mean']:.2f} ± {per_type[c]['sd']:.2f}" for c in columns]
            print(f"| {variant} ({measure}) | " + " | ".join(cells) + " |")
    print()
    print("| paired difference, 95% interval | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, measures in summary["differences"].items():
        for measure, per_type in measures.items():
            cells = [
                f"{per_type[c]['mean']:+.2f} [{per_type[c]['low']:+.2f}, {per_type[c]['high']:+.2f}]" for c in columns
            ]
            print(f"| {name} ({measure}) | " + " | ".join(cells) + " |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one torch thread each")
    parser.add_argument(
        "--initializer_range", type=float, default=DemoSettings.initializer_range, help="std of the initial weights"
    )
    parser.add_argument(
        "--stage_steps",
        default="",
        help="A's steps per stage instead of the demo's, e.g. distill=1800,instruct=600 (variants keep its total)",
    )
    parser.add_argument("--num_images", type=int, default=DemoSettings.num_images, help="images over all splits")
    parser.add_argument("--num_clips", type=int, default=DemoSettings.num_clips, help="audio clips over all splits")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="RESULTS",
        help="summarise these results files together; no training",
    )
    args = parser.parse_args(argv)
    if args.combine:
        return write_result(combine_results(args.combine), args.output)
    stage_steps = DemoSettings().stage_steps | _split_steps(args.stage_steps, ("contrastive", "distill", "instruct"))
    settings = asdict(
        DemoSettings(
            eval_per_type=None,
            baseline=False,
            initializer_range=args.initializer_range,
            stage_steps=stage_steps,
            num_images=args.num_images,
            num_clips=args.num_clips,
        )
    )
    started = time.perf_counter()
    runs = []
    jobs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, variant, seed, settings, 1) for variant, seed in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc="runs"):
            runs.append(future.result())
    runs.sort(key=lambda run: (run["seed"], run["variant"]))
    floors = runs[0]["floors"]
    result = {
        "command": "python benchmarks/bench_alignment.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info("cuda" if torch.cuda.is_available() else "cpu"),
        "source": source_info(),
        "seconds": round(time.perf_counter() - started, 1),
        "settings": settings,
        "floors": floors,
        "summary": summarize(runs),
        "runs": [{key: value for key, value in run.items() if key != "floors"} for run in runs],
    }
    return write_result(result, args.output)


def combine_results(paths: list[Path]) -> dict:
    """One result from several results files of the same settings (runs done in separate sittings)."""
    parts = [(path, json.loads(path.read_text())) for path in paths]
    first_path, first = parts[0]
    runs, seen = [], {}
    for path, part in parts:
        if part["settings"] != first["settings"]:
            changed = sorted(
                k
                for k in first["settings"].keys() | part["settings"].keys()
                if first["settings"].get(k) != part["settings"].get(k)
            )
            raise ValueError(f"{path} was run with other settings than {first_path}: {', '.join(changed)} differ")
        for run in part["runs"]:
            key = (run["variant"], run["seed"])
            if key in seen:
                raise ValueError(f"variant {key[0]} at seed {key[1]} is in both {seen[key]} and {path}")
            seen[key] = path
            runs.append(run)
    runs.sort(key=lambda run: (run["seed"], run["variant"]))
    return {
        "command": "python benchmarks/bench_alignment.py --combine " + " ".join(str(path) for path in paths),
        "parts": [{key: part.get(key) for key in ("command", "machine", "source", "seconds")} for _, part in parts],
        "seconds": round(sum(part["seconds"] for _, part in parts), 1),
        "settings": first["settings"],
        "floors": first["floors"],
        "summary": summarize(runs),
        "runs": runs,
    }


def write_result(result: dict, output: Path) -> dict:
    print_tables(result["summary"], result["floors"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"{len(result['runs'])} runs in {result['seconds'] / 60:.1f} min; written to {output}")
    return result


if __name__ == "__main__":
    main()
