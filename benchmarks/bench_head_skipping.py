"""Gated head skipping on the demo model, with the threshold chosen on the validation split: attention compute
saved, agreement of the final hidden states and accuracy on the test split, against the same model trained without
the gate-sparsity penalty, over seeds.

Command (from the repository root; the default, 3 seeds x 2 models of 1,500 steps, 3 rounds of 2 models, takes 24
minutes on 2 CPU cores with the models cached, and about 18 minutes more to train them):

    .venv/bin/python benchmarks/bench_head_skipping.py            # trains and caches the models on first run
    .venv/bin/python benchmarks/bench_head_skipping.py --retrain  # train the cached models again
    .venv/bin/python benchmarks/bench_head_skipping.py --quick    # smoke run, about a minute: not a result

Models (`_efficiency_models.load_head_skipping_model`, cached under `--cache-dir/head_skipping`): per seed, the demo
model (`deepseekv3.training.demo`: hidden 96, 3 layers of 4 heads, MoE, head gates, images and audio) trained by the
instruction recipe for `--train-steps` steps of 32 on the demo's data at `--num-images` and `--num-clips`, with the
gate-sparsity penalty (`penalised`, `attention_gate_sparsity_weight = --gate-penalty`) and without it
(`unpenalised`), from the same initial weights on the same batches. The data set is fixed; the seed sets the initial
weights and the order of the batches.

Each model is measured in its own process (`--workers` at a time, one torch thread each), sdpa attention, on the
conversations as the model was trained on them: one conversation per row (30 to 48 tokens with its answer, 36 on
average), right-padded batches of `--batch-size`. Padding never decides which heads are skipped (a head is skipped
when its gate is below the threshold at every real position of the batch), and only real tokens count below.

1. Calibration, on the validation split only. A pass with every head records each head's largest gate over each
   batch's real tokens; the candidate thresholds (`candidate_thresholds`) are 0, the midpoints between the sorted
   per-head maxima over the split (each skips one more head in every batch of that pass; skipping changes the later
   layers' gates) and `--grid` midpoints between the pooled per-batch maxima at evenly spaced ranks. Every candidate
   is run over the split twice: the whole conversations, for the mean cosine similarity of the final hidden states
   (per real token, skipping on against off, the same model); and the questions asked as users ask them
   (`generated_figures`: greedy `generate` on left-padded batches of 16, where the prompts' prefill and each decoding
   step decide for their own tokens), for the accuracy and the attention compute saved. The threshold is the largest
   whose mean cosine is at least `--min-cosine` and whose accuracy through `generate` keeps `--min-accuracy-ratio` of
   the accuracy with every head (`choose_threshold`). Every candidate's figures are recorded. (Until commit 46c3ce2
   the cosine alone decided; the thresholds it chose broke `generate`, see the README.)
2. Test, at that threshold, read once per reported model: attention FLOPs (`FlopCounterMode` over the `self_attn`
   modules, summed over the batches; sdpa's score and value matmuls counted over the whole query x key rectangle, as
   torch counts sdpa) over the whole conversations and over the `generate` calls, the compute saved by each, how
   often each head is skipped, the cosine (mean and minimum over the real tokens); and the accuracy per question type
   as users get it (greedy `generate`, exact match) beside closed-set scoring, with skipping off and on.
3. Long rows, out of the training range: test conversations back to back in one row of `--long-lengths` tokens
   (`max_position_embeddings`, 256 in training, raised to fit), at the validation threshold: compute saved, heads
   skipped, cosine.

Reported: per model and condition the mean and sd over seeds; the paired differences per seed (penalised with
skipping minus unpenalised; penalised minus unpenalised; each model with skipping minus without) with 95%
t-intervals; the floors of the test split. The claim tested: 37% of the attention compute saved through `generate`
at a cosine of at least 0.98, at no cost in accuracy against the unpenalised model. Nothing is timed: the runs share
the CPU.

Writes `benchmarks/results/bench_head_skipping.json` (settings, every run's figures, the summary, `headline`, the
command, the commit and the machine).
"""

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from _efficiency_models import CACHE_DIR, HEAD_SKIPPING_VARIANTS, load_head_skipping_model
from _harness import benchmark_record, headline_entries, mean_sd, paired_interval, write_results
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop
from tqdm.auto import tqdm

from deepseekv3.training.collators import InstructionCollator
from deepseekv3.training.demo import QUESTION_TYPES
from deepseekv3.training.evaluation import evaluate_accuracy, generate_answers, reply_accuracy

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_head_skipping.json"
# the options whose default depends on --quick
DEFAULTS = {
    "seeds": [0, 1, 2],
    "train_steps": 1500,
    "num_images": 4000,
    "num_clips": 2000,
    "long_lengths": [4096, 16384],
    "cache_dir": CACHE_DIR,
    "output": RESULTS_PATH,
}
QUICK = {
    "seeds": [0],
    "train_steps": 80,  # a smoke run: the models barely learn, and calibration may well keep every head
    "num_images": 240,
    "num_clips": 100,
    "long_lengths": [512],
    "cache_dir": Path("/tmp/bench_head_skipping_quick/models"),
    "output": Path("/tmp/bench_head_skipping_quick/bench_head_skipping.json"),
}
# the four ways a seed's models are measured: each variant with every head, and with skipping at its threshold
CONDITIONS = ("unpenalised", "unpenalised_skipping", "penalised", "penalised_skipping")
DIFFERENCES = {
    "penalised_skipping - unpenalised": ("penalised_skipping", "unpenalised"),
    "penalised - unpenalised": ("penalised", "unpenalised"),
    "penalised_skipping - penalised": ("penalised_skipping", "penalised"),
    "unpenalised_skipping - unpenalised": ("unpenalised_skipping", "unpenalised"),
}
MEASURES = ("scored", "generated")

# torch's FLOP counter knows the CUDA sdpa kernels but not the CPU flash kernel that sdpa runs here; count it the way
# torch counts every sdpa kernel (the whole query x key rectangle: the causal half is not subtracted)
register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(sdpa_flop)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--workers", type=int, default=2, help="models measured at a time, one torch thread each")
    parser.add_argument("--train-steps", type=int, help=f"default: {DEFAULTS['train_steps']}")
    parser.add_argument("--gate-penalty", type=float, default=0.1, help="the penalised model's sparsity weight")
    parser.add_argument("--num-images", type=int, help=f"images over all splits, default: {DEFAULTS['num_images']}")
    parser.add_argument("--num-clips", type=int, help=f"clips over all splits, default: {DEFAULTS['num_clips']}")
    parser.add_argument("--cache-dir", type=Path, help=f"default: {CACHE_DIR}")
    parser.add_argument("--retrain", action="store_true", help="train the cached models again")
    parser.add_argument("--batch-size", type=int, default=16, help="conversations per padded batch")
    parser.add_argument("--min-cosine", type=float, default=0.98, help="the validation cosine a threshold must keep")
    parser.add_argument(
        "--min-accuracy-ratio",
        type=float,
        default=0.98,
        help="the share of the validation accuracy through `generate` (every head) a threshold must keep",
    )
    parser.add_argument("--grid", type=int, default=24, help="candidate thresholds from the per-batch gate maxima")
    parser.add_argument("--long-lengths", type=int, nargs="+", help="default: 4096 16384 (--quick: 512)")
    parser.add_argument("--quick", action="store_true", help="tiny data, 80 steps, one seed, output under /tmp")
    parser.add_argument("--output", type=Path, help=f"default: {RESULTS_PATH}")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def candidate_thresholds(batch_maxima: torch.Tensor, grid: int) -> list[float]:
    """The thresholds calibration tries, sorted: 0 (every head computed); the midpoints between consecutive sorted
    per-head maxima over all batches (each skips one more head in every batch); and `grid` of the midpoints between
    consecutive distinct per-batch maxima, at evenly spaced ranks.

    Args:
        batch_maxima (`torch.Tensor` of shape `(batches, heads)`): each gated head's largest gate over the real
            tokens of each calibration batch, the heads of every layer side by side.
        grid (`int`): how many midpoints of the per-batch maxima to take (fewer when there are fewer).
    """

    def midpoints(values: torch.Tensor) -> torch.Tensor:
        values = values.double().unique()  # sorted
        return (values[1:] + values[:-1]) / 2

    pooled = midpoints(batch_maxima.flatten())
    ranks = torch.linspace(0, len(pooled) - 1, min(grid, len(pooled))).round().long()
    return sorted({0.0, *midpoints(batch_maxima.amax(dim=0)).tolist(), *pooled[ranks].tolist()})


def choose_threshold(candidates: list[dict], min_cosine: float, min_accuracy: float | None = None) -> float:
    """The largest candidate `threshold` whose `cosine_mean` is at least `min_cosine` and, given `min_accuracy`, whose
    `generated_accuracy` is at least that; 0 (every head computed, the output unchanged) when none is."""
    return max(
        (
            c["threshold"]
            for c in candidates
            if c["cosine_mean"] >= min_cosine and (min_accuracy is None or c["generated_accuracy"] >= min_accuracy)
        ),
        default=0.0,
    )


def attention_flops(counter: FlopCounterMode) -> int:
    """The FLOPs `counter` counted in the attention modules (`self_attn`)."""
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("self_attn"))


@torch.no_grad()
def generated_figures(model, data, split: str, threshold: float) -> dict:
    """The split's questions asked as users ask them (`generate_answers`: left-padded batches, greedy `generate`, each
    prefill and decoding step deciding for its own tokens) at `threshold`: the accuracy per question type
    (`accuracy`), their mean (`mean`) and the attention FLOPs of every `generate` call (`attention_flops`)."""
    rows = data.rows[split]
    model.set_head_skip_threshold(threshold)
    with FlopCounterMode(display=False) as counter:
        replies = generate_answers(model, data.processor, rows, progress=False)
    model.set_head_skip_threshold(0.0)
    accuracy = reply_accuracy(rows, replies)
    mean = statistics.fmean(accuracy.values())
    return {"accuracy": accuracy, "mean": mean, "attention_flops": attention_flops(counter)}


def padded_batches(model, examples: list[dict], batch_size: int) -> list[dict]:
    """The encoded conversations as the model trained on them (`InstructionCollator`: right padding), no labels."""
    collator = InstructionCollator(model.config)
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size])
        batch.pop("labels")
        batches.append(batch)
    return batches


def long_row(examples: list[dict], length: int) -> dict[str, torch.Tensor]:
    """Test conversations back to back in one row of at most `length` tokens, with their images and clips."""
    chosen, total = [], 0
    for example in examples * (1 + length // sum(len(e["input_ids"]) for e in examples)):
        if total + len(example["input_ids"]) > length:
            break
        chosen.append(example)
        total += len(example["input_ids"])
    input_ids = torch.cat([e["input_ids"] for e in chosen])[None]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": torch.cat([e["mm_token_type_ids"] for e in chosen])[None],
        "pixel_values": torch.cat([e["pixel_values"] for e in chosen if "pixel_values" in e]),
    }
    clips = [e for e in chosen if "input_features" in e]
    frames = max(e["input_features"].shape[-1] for e in clips)
    for key in ("input_features", "input_features_mask"):
        batch[key] = torch.cat([F.pad(e[key], (0, frames - e[key].shape[-1])) for e in clips])
    return batch


@torch.no_grad()
def run_batches(model, batches: list[dict], threshold: float) -> dict:
    """Every batch through the decoder at `threshold` (0: every head): the attention FLOPs summed over the batches
    (`flops`), the final hidden states of the real tokens (`hidden`), the heads each batch skipped (`skipped`) and each
    batch's per-head gate maxima over its real tokens (`maxima`, `(batches, layers x heads)`)."""
    model.set_head_skip_threshold(threshold)
    flops, hidden, skipped, maxima = 0, [], [], []
    for batch in batches:
        with FlopCounterMode(display=False) as counter:
            outputs = model.model(**batch, use_cache=False, output_gate_values=True)
        flops += attention_flops(counter)
        real = batch["attention_mask"].bool()
        hidden.append(outputs.last_hidden_state[real])
        skipped.append(model.get_skipped_heads())
        maxima.append(torch.cat([gates[real].amax(dim=0) for gates in outputs.gate_values]))
    model.set_head_skip_threshold(0.0)
    return {"flops": flops, "hidden": torch.cat(hidden), "skipped": skipped, "maxima": torch.stack(maxima)}


def compare(reference: dict, skipping: dict, num_heads: int) -> dict:
    """The `run_batches` figures at a threshold against those with every head (the same model and batches)."""
    cosine = F.cosine_similarity(skipping["hidden"], reference["hidden"], dim=-1)
    batches = skipping["skipped"]
    return {
        "attention_flops": skipping["flops"],
        "attention_compute_saved": 1 - skipping["flops"] / reference["flops"],
        "heads_skipped_fraction": statistics.fmean(
            sum(map(len, heads.values())) / (len(heads) * num_heads) for heads in batches
        ),
        # per layer and head, the fraction of the batches that skipped it
        "skipped_heads_per_layer": {
            str(layer): [sum(head in heads[layer] for heads in batches) / len(batches) for head in range(num_heads)]
            for layer in batches[0]
        },
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
    }


def measure(model, batches: list[dict], threshold: float) -> dict:
    """`compare` at `threshold`, with the attention FLOPs of every head."""
    reference = run_batches(model, batches, 0.0)
    figures = compare(reference, run_batches(model, batches, threshold), model.config.num_attention_heads)
    return {"threshold": threshold, "attention_flops_all_heads": reference["flops"], **figures}


def calibrate(
    model, batches: list[dict], grid: int, min_cosine: float, ask=None, min_accuracy_ratio: float = 0.98
) -> dict:
    """Every candidate threshold's figures on the calibration `batches`, and the one chosen (`threshold`).

    `ask(threshold)` (`generated_figures` on the validation split) adds what users get at each candidate: the accuracy
    through `generate` (`generated_accuracy`, the mean of the types) and the attention compute `generate` saves; the
    chosen threshold must then also keep `min_accuracy_ratio` of the accuracy with every head. Without `ask`, the
    cosine alone decides.
    """
    reference = run_batches(model, batches, 0.0)
    num_heads = model.config.num_attention_heads
    asked = ask(0.0) if ask is not None else None
    candidates = []
    for threshold in tqdm(candidate_thresholds(reference["maxima"], grid), desc="thresholds", leave=False):
        candidate = {"threshold": threshold, **compare(reference, run_batches(model, batches, threshold), num_heads)}
        if ask is not None:
            generated = asked if threshold == 0.0 else ask(threshold)
            candidate["generated_accuracy"] = generated["mean"]
            saved = 1 - generated["attention_flops"] / asked["attention_flops"]
            candidate["generated_attention_compute_saved"] = saved
        candidates.append(candidate)
    min_accuracy = None if asked is None else min_accuracy_ratio * asked["mean"]
    return {
        "batches": len(batches),
        "attention_flops_all_heads": reference["flops"],
        "generated_accuracy_all_heads": None if asked is None else asked["mean"],
        "min_generated_accuracy": min_accuracy,
        "threshold": choose_threshold(candidates, min_cosine, min_accuracy),
        "candidates": candidates,
    }


def run_one(args: argparse.Namespace, seed: int, variant: str) -> dict:
    """Train (or load) one model, calibrate its threshold on validation, and measure it on test (a worker)."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    model, data, record = load_head_skipping_model(args, seed, variant)
    model.set_attn_implementation("sdpa")
    loaded = time.perf_counter()
    validation = calibrate(
        model,
        padded_batches(model, data.examples["validation"], args.batch_size),
        args.grid,
        args.min_cosine,
        ask=lambda threshold: generated_figures(model, data, "validation", threshold),
        min_accuracy_ratio=args.min_accuracy_ratio,
    )
    threshold = validation["threshold"]
    test = measure(model, padded_batches(model, data.examples["test"], args.batch_size), threshold)
    test["accuracy"], generated_flops = {}, {}
    for name, value in (("all_heads", 0.0), ("skipping", threshold)):
        generated = generated_figures(model, data, "test", value)
        model.set_head_skip_threshold(value)
        scored = evaluate_accuracy(model, data.processor, data.rows["test"], data.examples["test"], progress=False)
        model.set_head_skip_threshold(0.0)
        test["accuracy"][name] = {"scored": scored, "generated": generated["accuracy"]}
        generated_flops[name] = generated["attention_flops"]
    test["generated_attention_flops_all_heads"] = generated_flops["all_heads"]
    test["generated_attention_compute_saved"] = 1 - generated_flops["skipping"] / generated_flops["all_heads"]
    long_rows = {}
    for length in args.long_lengths:
        batch = long_row(data.examples["test"], length)
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, length)
        long_rows[str(length)] = {"tokens": batch["input_ids"].shape[1], **measure(model, [batch], threshold)}
    return {
        "variant": variant,
        "seed": seed,
        "training": {key: value for key, value in record.items() if key != "log_history"},
        "training_last_log": record["log_history"][-1],
        "rows": {split: len(data.rows[split]) for split in ("validation", "test")},
        "test_rows_per_type": {q: data.rows["test"]["question_type"].count(q) for q in QUESTION_TYPES},
        "validation": validation,
        "test": test,
        "long_rows_out_of_training_range": long_rows,
        "floors": data.floors["test"],
        "seconds": {"load_or_train": round(loaded - started, 1), "total": round(time.perf_counter() - started, 1)},
    }


def accuracy_metrics(accuracy: dict[str, float]) -> dict[str, float]:
    """Accuracy per question type and their mean."""
    return {**accuracy, "mean of types": statistics.fmean(accuracy.values())}


def chosen_candidate(run: dict) -> dict:
    """The validation figures of the threshold a run chose."""
    return next(c for c in run["validation"]["candidates"] if c["threshold"] == run["validation"]["threshold"])


def summarize(runs: list[dict]) -> dict:
    """Mean and sd over seeds per model and condition, and the paired differences of `DIFFERENCES` per seed."""
    metrics = {}
    for run in runs:
        for setting, suffix in (("all_heads", ""), ("skipping", "_skipping")):
            for measure in MEASURES:
                accuracy = run["test"]["accuracy"][setting][measure]
                metrics[f"{run['variant']}{suffix}", run["seed"], measure] = accuracy_metrics(accuracy)
    seeds = sorted({run["seed"] for run in runs})
    summary = {"accuracy": {}, "differences": {}, "compute": {}}
    for condition in CONDITIONS:
        summary["accuracy"][condition] = {}
        for measure in MEASURES:
            per_seed = [metrics[condition, seed, measure] for seed in seeds]
            summary["accuracy"][condition][measure] = {
                name: mean_sd([m[name] for m in per_seed]) for name in per_seed[0]
            }
    for difference, (minuend, subtrahend) in DIFFERENCES.items():
        summary["differences"][difference] = {
            measure: {
                name: paired_interval(
                    [metrics[minuend, s, measure][name] - metrics[subtrahend, s, measure][name] for s in seeds]
                )
                for name in metrics[minuend, seeds[0], measure]
            }
            for measure in MEASURES
        }
    for variant in HEAD_SKIPPING_VARIANTS:
        mine = [run for run in runs if run["variant"] == variant]
        compute = {"threshold": mean_sd([run["test"]["threshold"] for run in mine])}
        chosen = [chosen_candidate(run) for run in mine]
        validation_names = ("attention_compute_saved", "cosine_mean", "generated_accuracy")
        for name in (*validation_names, "generated_attention_compute_saved"):
            compute[f"validation_{name}"] = mean_sd([candidate[name] for candidate in chosen])
        for name in (
            "attention_compute_saved",
            "generated_attention_compute_saved",
            "heads_skipped_fraction",
            "cosine_mean",
            "cosine_min",
        ):
            compute[f"test_{name}"] = mean_sd([run["test"][name] for run in mine])
        compute["long_rows_out_of_training_range"] = {
            length: {
                name: mean_sd([run["long_rows_out_of_training_range"][length][name] for run in mine])
                for name in ("tokens", "attention_compute_saved", "cosine_mean", "cosine_min")
            }
            for length in mine[0]["long_rows_out_of_training_range"]
        }
        summary["compute"][variant] = compute
    return summary


def mean_sd_cell(figures: dict[str, float], percent: bool = False, digits: int = 2) -> str:
    if percent:
        return f"{figures['mean']:.1%} ± {figures['sd']:.1%}"
    return f"{figures['mean']:.{digits}f} ± {figures['sd']:.{digits}f}"


def skipped_cell(skipped_heads_per_layer: dict[str, list[float]]) -> str:
    """`layer: head (fraction of the batches that skipped it), ...` for every head skipped at all; `-` for none."""
    layers = []
    for layer, fractions in skipped_heads_per_layer.items():
        heads = [f"{head} ({fraction:.2f})" for head, fraction in enumerate(fractions) if fraction > 0]
        if heads:
            layers.append(f"{layer}: {', '.join(heads)}")
    return "; ".join(layers) or "-"


def print_tables(result: dict) -> None:
    summary, runs = result["summary"], result["runs"]
    print(
        "\n| model (test, threshold from validation) | threshold | heads skipped | attention compute saved "
        "| saved through `generate` | cosine mean | cosine min | validation: compute saved, through `generate`, "
        "cosine, accuracy through `generate` |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant, compute in summary["compute"].items():
        cells = [
            mean_sd_cell(compute["threshold"], digits=5),
            mean_sd_cell(compute["test_heads_skipped_fraction"], percent=True),
            mean_sd_cell(compute["test_attention_compute_saved"], percent=True),
            mean_sd_cell(compute["test_generated_attention_compute_saved"], percent=True),
            mean_sd_cell(compute["test_cosine_mean"], digits=4),
            mean_sd_cell(compute["test_cosine_min"], digits=4),
            f"{mean_sd_cell(compute['validation_attention_compute_saved'], percent=True)}, "
            f"{mean_sd_cell(compute['validation_generated_attention_compute_saved'], percent=True)}, "
            f"{mean_sd_cell(compute['validation_cosine_mean'], digits=4)}, "
            f"{mean_sd_cell(compute['validation_generated_accuracy'], digits=3)}",
        ]
        print(f"| {variant} | " + " | ".join(cells) + " |")

    print(
        "\n| model, long row (out of the training range) | tokens | attention compute saved | cosine mean "
        "| cosine min |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for variant, compute in summary["compute"].items():
        for length, figures in compute["long_rows_out_of_training_range"].items():
            cells = [
                f"{figures['tokens']['mean']:,.0f}",
                mean_sd_cell(figures["attention_compute_saved"], percent=True),
                mean_sd_cell(figures["cosine_mean"], digits=4),
                mean_sd_cell(figures["cosine_min"], digits=4),
            ]
            print(f"| {variant}, {length} | " + " | ".join(cells) + " |")

    columns = [*QUESTION_TYPES, "mean of types"]
    print("\n| test accuracy | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    strongest = accuracy_metrics(result["floors"]["strongest"])
    print("| strongest floor | " + " | ".join(f"{strongest.get(c, float('nan')):.2f}" for c in columns) + " |")
    for condition, measures in summary["accuracy"].items():
        for measure, per_type in measures.items():
            cells = [mean_sd_cell(per_type[c]) if c in per_type else "-" for c in columns]
            print(f"| {condition} ({measure}) | " + " | ".join(cells) + " |")

    print("\n| paired difference, 95% interval | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, measures in summary["differences"].items():
        for measure, per_type in measures.items():
            cells = [
                f"{per_type[c]['mean']:+.3f} [{per_type[c]['low']:+.3f}, {per_type[c]['high']:+.3f}]"
                if c in per_type
                else "-"
                for c in columns
            ]
            print(f"| {name} ({measure}) | " + " | ".join(cells) + " |")

    print(
        "\n| seed | model | threshold | skipped on test (layer: head (fraction of batches)) | compute saved "
        "| cosine mean / min |"
    )
    print("| ---: | --- | ---: | --- | ---: | ---: |")
    for run in runs:
        test = run["test"]
        print(
            f"| {run['seed']} | {run['variant']} | {test['threshold']:.5f} | "
            f"{skipped_cell(test['skipped_heads_per_layer'])} | {test['attention_compute_saved']:.1%} "
            f"({test['generated_attention_compute_saved']:.1%} through `generate`) | "
            f"{test['cosine_mean']:.4f} / {test['cosine_min']:.4f} |"
        )


def headline(summary: dict) -> list[dict]:
    penalised, unpenalised = summary["compute"]["penalised"], summary["compute"]["unpenalised"]
    difference = summary["differences"]["penalised_skipping - unpenalised"]
    return headline_entries(
        [
            ("attention_compute_saved_test_penalised", penalised["test_attention_compute_saved"]["mean"], 0.37, True),
            (
                "attention_compute_saved_through_generate_test_penalised",
                penalised["test_generated_attention_compute_saved"]["mean"],
                0.37,
                True,
            ),
            ("final_hidden_cosine_test_penalised", penalised["test_cosine_mean"]["mean"], 0.98, True),
            (
                "generated_accuracy_penalised_skipping_minus_unpenalised",
                difference["generated"]["mean of types"]["mean"],
                None,
                True,
            ),
            (
                "scored_accuracy_penalised_skipping_minus_unpenalised",
                difference["scored"]["mean of types"]["mean"],
                None,
                True,
            ),
            (
                "attention_compute_saved_test_unpenalised",
                unpenalised["test_attention_compute_saved"]["mean"],
                None,
                True,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    result = benchmark_record(__file__, "cpu")
    result["settings"] = {
        **{key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "threads_per_worker": 1,
    }
    jobs = [(seed, variant) for seed in args.seeds for variant in HEAD_SKIPPING_VARIANTS]
    runs = []
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, args, seed, variant) for seed, variant in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc="models"):
            runs.append(future.result())
    runs.sort(key=lambda run: (run["seed"], HEAD_SKIPPING_VARIANTS.index(run["variant"])))
    result["floors"] = runs[0]["floors"]
    result["summary"] = summarize(runs)
    result["headline"] = headline(result["summary"])
    result["runs"] = [{key: value for key, value in run.items() if key != "floors"} for run in runs]
    print_tables(result)
    penalised = result["summary"]["compute"]["penalised"]
    saved, cosine = penalised["test_generated_attention_compute_saved"]["mean"], penalised["test_cosine_mean"]["mean"]
    met = "met" if saved >= 0.37 and cosine >= 0.98 else "not met"
    claim = ">= 37% attention compute saved through `generate` at a cosine >= 0.98, test, penalised"
    print(f"\nClaim ({claim}): {met}, {saved:.1%} at {cosine:.4f}")
    write_results(result, args.output, started)
    return result


if __name__ == "__main__":
    main()
