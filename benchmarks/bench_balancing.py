"""DeepSeek-V3's auxiliary-loss-free load balancing on the demo model: expert load, accuracy and step time, on vs off.

Command (from the repository root; no argument runs in about 4.5 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/bench_balancing.py            # 1 seed, 500 steps, variants on, off, on_seq_loss
    .venv/bin/python benchmarks/bench_balancing.py --full     # 3 seeds, every variant, mean ± sd (about 14 min)
    .venv/bin/python benchmarks/bench_balancing.py --device cuda

The demo's tokenizer, data (`--num-images`, `--num-clips`: half the demo's rows, the same rows for every seed) and
model (`deepseekv3.training.demo`: 3 layers, the last 2 MoE with 8 routed experts, 2 per token). Per seed, every
variant starts from the same initial weights (`set_seed(seed)`) and runs the demo's `instruct` stage
(`build_stage_trainer`: batch 32, the demo's learning rate and cosine schedule) for the same `--steps` steps over the
same batches in the same order (the seed is also the data seed). Variants:

- `on`: `router_bias_update_rate=0.001` (V3's gamma): `DeepseekV3Trainer` moves each router's
  `e_score_correction_bias` by `gamma * sign(mean load - load)` after every optimizer step.
- `off`: `router_bias_update_rate=0.0`: the bias stays at zero.
- `on_seq_loss`: `on` plus V3's complementary sequence-wise balance loss, `sequence_balance_loss_weight=1e-4`.
- `on_gamma_0.01` (with `--full` or `--variants`): an extra, not V3's setting: ten times V3's gamma. The bias moves
  at most `gamma * steps` (0.5 at V3's gamma over 500 steps) against sigmoid router scores in (0, 1); this shows
  whether a bias allowed to move further in the same steps balances better.

The runs take turns step by step: each variant trains in its own process (spawned; threads of one process would
slow each other's OpenMP down), and each hands the turn to the next at the end of every optimizer step, so exactly
one trains at a time. Step i is the same batch in every variant, so the step-time ratio is the median over steps of
the paired ratio `time(variant, step i) / time(off, step i)`, over steps 10 to 3/4 of the run (before the load
counting below), keeping the steps where no variant ran contended (on CPU, its torch threads at least 80% busy, as
in `_harness.py`). Reported per variant, for each MoE layer:

- expert load on the validation split after training (the seen question types, every row): tokens per expert from
  the routers' own top-k choice over real tokens, in training mode under `torch.no_grad()` (nothing trains),
  summed over the split; `max/mean` and the coefficient of variation (`load_statistics`), and the worst layer's
  `max/mean` (`valid worst`, the headline);
- the same summed over the last quarter of training, and the median over those steps of each step's `max/mean`
  (V3's MaxVio + 1, per batch of 32). These counts come from forward hooks on the routers, for every variant alike
  (the model returns `expert_load` only when its bias update is on); on the validation pass they are checked equal
  to the model's own `expert_load` wherever it returns one. For the balanced variants, the mean over the last
  quarter of the trainer's logged `expert_load_max_over_mean/layer_i` (each over a logging interval of steps/20);
- the bias after training: the largest |bias| against the bound `gamma * steps`;
- test accuracy per question type (`evaluate_accuracy`, every seen test row), its mean over the question types,
  and chance (a uniform guess among each question's allowed answers).

The figures differ by what they sum over. The bias rule integrates `sign(mean load - load)`, so it corrects the
accumulated load: summed over many steps (`train last 1/4`, `trainer log`) the load comes out close to 1.0 even when
each step's is not, and those two flatter the balance. What one fixed bias gives, as at inference, is `valid`;
`per step` adds each batch's own mix of images, audio and text, and the bias's movement from step to step.

Writes `benchmarks/results/bench_balancing.json` with every figure and a `headline`: the worst layer's validation
`max/mean` with balancing (target 1.3) and without (no target), the paired step-time ratio on/off (target 1.05), and
the mean test accuracy on - off (no target; one seed does not support a claim about accuracy, `--full` gives three).
Nothing is chosen on the test rows.
"""

import argparse
import dataclasses
import json
import multiprocessing
import queue
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _harness import MIN_CPU_UTILIZATION, machine_info, source_info, synchronize
from transformers import TrainerCallback, set_seed
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.trainer_callback import PrinterCallback

from deepseekv3.data import build_multimodal_dataset, build_text_corpus, split_held_out
from deepseekv3.modeling_deepseekv3 import expert_load
from deepseekv3.tokenization import train_tokenizer
from deepseekv3.training.balancing import load_statistics
from deepseekv3.training.collators import InstructionCollator, encode_rows
from deepseekv3.training.demo import DemoSettings, build_demo_model, stage_training_arguments
from deepseekv3.training.evaluation import chance_accuracy, evaluate_accuracy
from deepseekv3.training.recipes import build_stage_trainer, select_stage_examples

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_balancing.json"
# config fields per variant: (router_bias_update_rate, sequence_balance_loss_weight)
VARIANTS = {
    "on": (0.001, 0.0),
    "off": (0.0, 0.0),
    "on_seq_loss": (0.001, 1e-4),
    "on_gamma_0.01": (0.01, 0.0),
}
DEFAULT_VARIANTS = ("on", "off", "on_seq_loss")
WARMUP_STEPS = 10
LOAD_TARGET = 1.3
TIME_RATIO_TARGET = 1.05
VALIDATION_BATCH_SIZE = 32
TURN_TIMEOUT_S = 600


class _Turns:
    """Lets one variant's process train at a time, in a fixed rotation: each hands the turn to the next after every
    optimizer step (one semaphore per variant, the first released by the parent)."""

    def __init__(self, semaphores: list, index: int):
        self.semaphores, self.index = semaphores, index

    def wait(self) -> None:
        if not self.semaphores[self.index].acquire(timeout=TURN_TIMEOUT_S):
            raise TimeoutError(f"no turn within {TURN_TIMEOUT_S} s: did another variant's process fail?")

    def hand_on(self) -> None:
        self.semaphores[(self.index + 1) % len(self.semaphores)].release()


class _LoadCounter:
    """Tokens per expert of each MoE layer and forward pass while `is_counting`: the routers' top-k choice over real
    tokens, the count of the model's own `expert_load` (which the model returns only when its bias update is on)."""

    def __init__(self, model: torch.nn.Module):
        routers = [
            (name, module) for name, module in model.named_modules() if isinstance(module, DeepseekV3TopkRouter)
        ]
        # "model.layers.1.mlp.gate" -> "layer_1", as the trainer's logs name them
        self.layer_names = [f"layer_{name.split('layers.')[-1].split('.')[0]}" for name, _ in routers]
        self.num_experts = model.config.n_routed_experts
        self.is_counting = False
        self.loads: list[torch.Tensor] = []  # one (num_moe_layers, num_experts) per counted forward
        self._indices: list[torch.Tensor] = []
        self._attention_mask: torch.Tensor | None = None
        model.register_forward_pre_hook(self._begin, with_kwargs=True)
        model.register_forward_hook(self._end)
        for _, router in routers:
            router.register_forward_hook(self._record)

    def _begin(self, module, args, kwargs):
        self._indices, self._attention_mask = [], kwargs.get("attention_mask")

    def _record(self, module, inputs, outputs):
        if self.is_counting:
            self._indices.append(outputs[2].detach())  # (batch * seq_len, num_experts_per_tok)

    def _end(self, module, args, outputs):
        if not (self.is_counting and self._indices):
            return
        mask = self._attention_mask
        batch_size = mask.shape[0]
        seq_len = self._indices[0].shape[0] // batch_size
        load = expert_load(tuple(self._indices), mask[:, -seq_len:].float(), self.num_experts)
        self.loads.append(load.cpu())


class _TakeTurns(TrainerCallback):
    """Times each optimizer step (wall and CPU time of this process), counts the experts' load from step
    `count_from` on, and hands the turn to the next variant at the end of every step."""

    def __init__(self, turns: _Turns, counter: _LoadCounter, count_from: int):
        self.turns, self.counter, self.count_from = turns, counter, count_from
        self.times: list[float] = []
        self.cpu_utilization: list[float] = []
        self._start = self._cpu_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter.is_counting = state.global_step >= self.count_from
        synchronize(args.device.type)
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(args.device.type)
        elapsed = time.perf_counter() - self._start
        self.times.append(elapsed)
        self.cpu_utilization.append((time.process_time() - self._cpu_start) / elapsed / torch.get_num_threads())
        self.counter.is_counting = False
        self.turns.hand_on()
        if state.global_step < state.max_steps:
            self.turns.wait()


@torch.no_grad()
def _validation_load(model, counter: _LoadCounter, examples: list, device: str) -> torch.Tensor:
    """Summed expert load over `examples`, in training mode (as the balancer sees it) without any update."""
    collator = InstructionCollator(model.config)
    model.train()
    counter.loads, counter.is_counting = [], True
    for start in range(0, len(examples), VALIDATION_BATCH_SIZE):
        batch = collator(examples[start : start + VALIDATION_BATCH_SIZE])
        batch.pop("labels")
        outputs = model(**{key: value.to(device) for key, value in batch.items()})
        if outputs.expert_load is not None and not torch.equal(outputs.expert_load.cpu(), counter.loads[-1]):
            raise RuntimeError("the hook count differs from the model's expert_load")
    counter.is_counting = False
    return torch.stack(counter.loads).sum(dim=0)


def _per_layer(stats: dict, names: list[str], key: str) -> list[float]:
    return [stats[f"{key}/{name}"] for name in names]


def _run_seed(seed: int, variants: list[str], args, data_path: Path) -> dict:
    """Trains `variants` from the same initial weights, one process each, taking turns step by step; returns each
    variant's figures."""
    # Fresh interpreters: no OpenMP pool or CUDA state inherited. Threads of one process cannot take the turns: with
    # two OpenMP teams in a process libgomp counts more threads than cores and throttles its spin-waiting, which
    # made the demo's training step 2.3x slower on 2 cores (measured).
    context = multiprocessing.get_context("spawn")
    semaphores = [context.Semaphore(0) for _ in variants]
    results_queue = context.Queue()
    processes = [
        context.Process(
            target=_train_variant,
            args=(name, index, seed, vars(args), data_path, semaphores, results_queue),
            name=f"bench_balancing-{name}",
        )
        for index, name in enumerate(variants)
    ]
    print(f"seed {seed}: {len(variants)} variants x {args.steps} steps, one process each, taking turns every step")
    started = time.perf_counter()
    for process in processes:
        process.start()
    semaphores[0].release()
    results = {}
    try:
        while len(results) < len(variants):
            try:
                name, result = results_queue.get(timeout=5)
            except queue.Empty:
                failed = [p.name for p in processes if p.exitcode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"{', '.join(failed)} exited without a result") from None
                continue
            if isinstance(result, str):
                raise RuntimeError(f"variant {name} failed:\n{result}")
            results[name] = result
    finally:
        for process in processes:
            if process.is_alive() and len(results) < len(variants):
                process.terminate()
            process.join()
    print(f"  trained and evaluated in {time.perf_counter() - started:.0f} s")
    results = {name: results[name] for name in variants}
    _add_step_timing(results, args.steps - args.steps // 4, args.device)
    return results


def _train_variant(name, index, seed, options, data_path, semaphores, results_queue) -> None:
    """A variant's process: train when it has the turn, then measure; puts `(name, figures)` (or the traceback)."""
    try:
        turns = _Turns(semaphores, index)
        results_queue.put((name, _measure_variant(name, seed, argparse.Namespace(**options), data_path, turns)))
    except BaseException:
        results_queue.put((name, traceback.format_exc()))
        raise


def _measure_variant(name: str, seed: int, args, data_path: Path, turns: _Turns) -> dict:
    """Builds the variant from the seed's initial weights, trains it in its turns, and returns its figures."""
    data = torch.load(data_path, weights_only=False)
    steps, count_from = args.steps, args.steps - args.steps // 4
    update_rate, sequence_weight = VARIANTS[name]
    settings = DemoSettings(
        output_dir=f"/tmp/bench_balancing/{name}", seed=seed, num_images=args.num_images, num_clips=args.num_clips
    )
    set_seed(seed)
    model, processor = build_demo_model(data["tokenizer"], settings)
    model.load_state_dict(data["initial_states"][seed])
    model.config.router_bias_update_rate = update_rate
    model.config.sequence_balance_loss_weight = sequence_weight
    if args.device == "cpu":
        model.set_experts_implementation("eager")  # as build_demo_model does on a machine without a GPU
    training_args = stage_training_arguments(settings, "instruct", Path(settings.output_dir), steps)
    training_args = dataclasses.replace(training_args, use_cpu=args.device == "cpu", disable_tqdm=True)
    counter = _LoadCounter(model)
    timer = _TakeTurns(turns, counter, count_from)
    trainer = build_stage_trainer("instruct", model, data["train_examples"], training_args, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    turns.wait()
    trainer.train()

    layers = counter.layer_names
    training_loads = torch.stack(counter.loads)  # (counted steps, num_moe_layers, num_experts)
    if training_loads.shape[0] != steps - count_from:
        raise RuntimeError(f"counted {training_loads.shape[0]} steps, expected {steps - count_from}")
    training_stats = load_statistics(training_loads.sum(dim=0), layers)
    per_step = training_loads.max(dim=-1).values / training_loads.mean(dim=-1)  # (steps, layers)
    validation_load = _validation_load(model, counter, data["validation_examples"], args.device)
    validation_stats = load_statistics(validation_load, layers)
    late_logs = [e for e in trainer.state.log_history if "loss" in e and e["step"] > count_from]
    logged = None  # the trainer logs the load only while it balances
    if update_rate > 0:
        logged = [statistics.mean(e[f"expert_load_max_over_mean/{layer}"] for e in late_logs) for layer in layers]
    biases = [m.e_score_correction_bias.detach().cpu() for m in model.modules() if isinstance(m, DeepseekV3TopkRouter)]
    accuracy = evaluate_accuracy(model, processor, data["test_rows"], data["test_examples"], progress=False)
    return {
        "router_bias_update_rate": update_rate,
        "sequence_balance_loss_weight": sequence_weight,
        "layers": layers,
        "validation_max_over_mean": _per_layer(validation_stats, layers, "expert_load_max_over_mean"),
        "validation_cv": _per_layer(validation_stats, layers, "expert_load_cv"),
        "validation_load": validation_load.tolist(),
        "training_last_quarter_max_over_mean": _per_layer(training_stats, layers, "expert_load_max_over_mean"),
        "training_last_quarter_cv": _per_layer(training_stats, layers, "expert_load_cv"),
        "training_last_quarter_step_max_over_mean_median": per_step.median(dim=0).values.tolist(),
        "trainer_logged_last_quarter_max_over_mean": logged,
        "bias_spread": [float(bias.max() - bias.min()) for bias in biases],
        "bias_max_abs": [float(bias.abs().max()) for bias in biases],
        "bias_bound": update_rate * steps,
        "test_accuracy": accuracy,
        "test_accuracy_mean": statistics.mean(accuracy.values()),
        "last_quarter_lm_loss": statistics.mean(e["lm_loss"] for e in late_logs),
        "step_times_ms": [1000 * t for t in timer.times],
        "step_cpu_utilization": timer.cpu_utilization,
        "torch_threads": torch.get_num_threads(),
    }


def _add_step_timing(results: dict, count_from: int, device: str) -> None:
    """Median step time and the paired ratio against `off` over steps `WARMUP_STEPS` to `count_from` (the steps
    without load counting), keeping the steps that no variant ran contended (on CPU, at least `MIN_CPU_UTILIZATION`
    of its torch threads busy, as in `_harness.py`) when there are at least half of them."""
    indices = range(WARMUP_STEPS, count_from)
    utilization = [result["step_cpu_utilization"] for result in results.values()]
    clean = [i for i in indices if device != "cpu" or min(u[i] for u in utilization) >= MIN_CPU_UTILIZATION]
    kept = clean if len(clean) >= len(indices) / 2 else list(indices)
    reference = results["off"]["step_times_ms"]
    for result in results.values():
        times = result["step_times_ms"]
        result["median_cpu_utilization"] = statistics.median(result["step_cpu_utilization"][i] for i in indices)
        result["timed_steps"] = len(kept)
        result["timed_steps_all_clean"] = len(kept) == len(clean)
        result["median_step_ms"] = statistics.median(times[i] for i in kept)
        result["paired_step_time_ratio_to_off"] = statistics.median(times[i] / reference[i] for i in kept)


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _summarize(per_seed: list[dict]) -> dict:
    """Per variant and figure, the mean and sd over seeds (element-wise for per-layer lists)."""
    summary = {}
    for name in per_seed[0]:
        runs = [seed_results[name] for seed_results in per_seed]
        figures = {}
        for key in (
            "validation_max_over_mean",
            "validation_cv",
            "training_last_quarter_max_over_mean",
            "training_last_quarter_cv",
            "training_last_quarter_step_max_over_mean_median",
            "trainer_logged_last_quarter_max_over_mean",
            "bias_spread",
            "bias_max_abs",
        ):
            if runs[0][key] is None:
                figures[key] = None
                continue
            columns = [_mean_sd([run[key][layer] for run in runs]) for layer in range(len(runs[0][key]))]
            figures[key] = {"mean": [c[0] for c in columns], "sd": [c[1] for c in columns]}
        figures["worst_layer_validation_max_over_mean"] = _figure([max(r["validation_max_over_mean"]) for r in runs])
        for key in ("test_accuracy_mean", "last_quarter_lm_loss", "median_step_ms", "paired_step_time_ratio_to_off"):
            figures[key] = _figure([run[key] for run in runs])
        figures["test_accuracy"] = {
            question: _figure([run["test_accuracy"][question] for run in runs])
            for question in runs[0]["test_accuracy"]
        }
        figures["test_accuracy_mean_minus_off"] = _figure(
            [
                run["test_accuracy_mean"] - seed_results["off"]["test_accuracy_mean"]
                for run, seed_results in zip(runs, per_seed)
            ]
        )
        figures["largest_abs_bias"] = max(max(run["bias_max_abs"]) for run in runs)
        figures["bias_bound"] = runs[0]["bias_bound"]
        summary[name] = figures
    return summary


def _figure(values: list[float]) -> dict:
    mean, sd = _mean_sd(values)
    return {"mean": mean, "sd": sd, "per_seed": values}


def _format(mean: float, sd: float | None, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f}±{sd:.{digits}f}"


def _format_figure(figure: dict, digits: int = 2) -> str:
    return _format(figure["mean"], figure["sd"], digits)


def _format_layers(figure: dict | None, digits: int = 2) -> str:
    if figure is None:
        return "-"
    return " ".join(_format(mean, sd, digits) for mean, sd in zip(figure["mean"], figure["sd"]))


def _print_tables(summary: dict, chance: dict, layers: list[str], seeds: int, steps: int) -> None:
    over = f"mean±sd over {seeds} seeds" if seeds > 1 else "1 seed"
    print(f"\nExpert load per MoE layer ({', '.join(layers)}), max/mean (1.0 = perfect), {over}, {steps} steps")
    rows = []
    for name, figures in summary.items():
        update_rate, sequence_weight = VARIANTS[name]
        rows.append(
            [name, f"{update_rate:g}", f"{sequence_weight:g}"]
            + [_format_figure(figures["worst_layer_validation_max_over_mean"])]
            + [
                _format_layers(figures[key])
                for key in (
                    "validation_max_over_mean",
                    "validation_cv",
                    "training_last_quarter_max_over_mean",
                    "training_last_quarter_step_max_over_mean_median",
                    "trainer_logged_last_quarter_max_over_mean",
                )
            ]
            + [f"{figures['largest_abs_bias']:.3f} / {figures['bias_bound']:.2f}"]
        )
    columns = ["variant", "gamma", "alpha", "valid worst", "valid max/mean", "valid CV", "train last 1/4", "per step"]
    _print_table([*columns, "trainer log", "|bias| max / bound"], rows)

    questions = list(chance)
    print(
        f"\nTest accuracy per question type (chance: uniform guess), lm_loss over the last quarter, step time ({over})"
    )
    rows = [["chance", *(f"{chance[q]:.2f}" for q in questions), f"{statistics.mean(chance.values()):.3f}"]]
    for name, figures in summary.items():
        rows.append(
            [name]
            + [_format_figure(figures["test_accuracy"][q]) for q in questions]
            + [
                _format_figure(figures["test_accuracy_mean"], digits=3),
                _format_figure(figures["test_accuracy_mean_minus_off"], digits=3),
                _format_figure(figures["last_quarter_lm_loss"], digits=3),
                _format_figure(figures["median_step_ms"], digits=1),
                _format_figure(figures["paired_step_time_ratio_to_off"], digits=3),
            ]
        )
    _print_table(["variant", *questions, "mean", "- off", "lm_loss", "step ms", "x off"], rows)


def _print_table(columns: list[str], rows: list[list[str]]) -> None:
    """Left-aligned first column, the others right-aligned, each as wide as its longest cell."""
    widths = [max(len(row[i]) if i < len(row) else 0 for row in [columns, *rows]) for i in range(len(columns))]
    for row in [columns, *rows]:
        cells = [row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))]
        print("  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="instruction-tuning steps per variant")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (initial weights and batch order)")
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--full", action="store_true", help="3 seeds and every variant")
    parser.add_argument("--num-images", type=int, default=4000, help="image rows of the data set (all splits)")
    parser.add_argument("--num-clips", type=int, default=1000, help="audio rows of the data set (all splits)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args()
    seeds = 3 if args.full else args.seeds
    variants = list(VARIANTS) if args.full else args.variants.split(",")
    if not {"on", "off"} <= set(variants) <= set(VARIANTS):
        raise ValueError(f"--variants ({args.variants}) must include on and off, from {', '.join(VARIANTS)}")
    if args.steps < 4 * WARMUP_STEPS:
        raise ValueError(f"--steps ({args.steps}) must be at least {4 * WARMUP_STEPS}")
    started = time.perf_counter()

    settings = DemoSettings(num_images=args.num_images, num_clips=args.num_clips)
    tokenizer = train_tokenizer(build_text_corpus(args.num_images, args.num_clips), settings.vocab_size)
    dataset = build_multimodal_dataset(args.num_images, args.num_clips, seed=0, image_size=settings.image_size)
    seen, _ = split_held_out(dataset)
    initial_states = {}
    for seed in range(seeds):
        set_seed(seed)
        model, processor = build_demo_model(tokenizer, settings)
        initial_states[seed] = model.state_dict()
    patch_size = model.config.patch_size
    data = {
        "tokenizer": tokenizer,
        "initial_states": initial_states,
        "train_examples": select_stage_examples(
            "instruct", dataset["train"], encode_rows(processor, dataset["train"], patch_size, progress=False)
        ),
        "validation_examples": encode_rows(processor, seen["validation"], patch_size, progress=False),
        "test_rows": seen["test"].select_columns(["question_type", "question_template", "answer"]).to_list(),
        "test_examples": encode_rows(processor, seen["test"], patch_size, progress=False),
    }
    print(
        f"data: {len(data['train_examples'])} training, {len(data['validation_examples'])} validation, "
        f"{len(data['test_examples'])} test examples ({time.perf_counter() - started:.0f} s)"
    )
    with tempfile.TemporaryDirectory(prefix="bench_balancing_") as folder:
        data_path = Path(folder) / "data.pt"
        torch.save(data, data_path)
        per_seed = [_run_seed(seed, variants, args, data_path) for seed in range(seeds)]
    summary = _summarize(per_seed)
    chance = chance_accuracy(data["test_rows"])
    _print_tables(summary, chance, per_seed[0]["off"]["layers"], seeds, args.steps)

    headline = [
        {
            "name": "worst_layer_validation_load_max_over_mean_on",
            "value": round(summary["on"]["worst_layer_validation_max_over_mean"]["mean"], 4),
            "target": LOAD_TARGET,
            "higher_is_better": False,
        },
        {
            "name": "worst_layer_validation_load_max_over_mean_off",
            "value": round(summary["off"]["worst_layer_validation_max_over_mean"]["mean"], 4),
            "target": None,
            "higher_is_better": False,
        },
        {
            "name": "step_time_ratio_on_over_off",
            "value": round(summary["on"]["paired_step_time_ratio_to_off"]["mean"], 4),
            "target": TIME_RATIO_TARGET,
            "higher_is_better": False,
        },
        {
            "name": "test_accuracy_mean_on_minus_off",
            "value": round(summary["on"]["test_accuracy_mean_minus_off"]["mean"], 4),
            "target": None,
            "higher_is_better": True,
        },
    ]
    wall_time = time.perf_counter() - started
    result = {
        "benchmark": "bench_balancing",
        "command": " ".join(["python", "benchmarks/bench_balancing.py", *sys.argv[1:]]),
        "machine": machine_info(args.device),
        "source": source_info(),
        "settings": {
            "steps": args.steps,
            "seeds": seeds,
            "num_images": args.num_images,
            "num_clips": args.num_clips,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "variants": {
                name: {"router_bias_update_rate": g, "sequence_balance_loss_weight": a}
                for name, (g, a) in VARIANTS.items()
                if name in variants
            },
            "load_counted_from_step": args.steps - args.steps // 4,
            "timed_steps": f"{WARMUP_STEPS} to {args.steps - args.steps // 4}, uncontended",
        },
        "chance_test_accuracy": chance,
        "summary": summary,
        "per_seed": per_seed,
        "wall_time_s": wall_time,
        "headline": headline,
        "targets_note": (
            "load: worst MoE layer's max/mean tokens per expert on the validation split after training (1.3 asked "
            "with balancing; no target without); step time: median paired per-step ratio, balancing on / off (1.05); "
            "accuracy: mean over question types of the test accuracy, on - off, no target (1 seed cannot support a "
            "claim; --full gives 3 seeds)"
        ),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {args.output} ({wall_time:.0f} s)")


if __name__ == "__main__":
    main()
