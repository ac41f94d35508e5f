"""Which files each benchmark measures, and whether each committed result is still fresh.

Every results JSON in `benchmarks/results/` belongs to one entry of `BENCHMARKS`. Its `measures` are the files whose
code the figures depend on: the benchmark script, the helpers it imports, and the package modules it exercises
(directories count as every file under them). A result is fresh when its JSON records the commit it was measured at
(`source.git_commit`, and for a combined result each part's), the tree was unmodified then (`source.tree_modified`
false: no uncommitted change but to the benchmarks' outputs), that commit is in the history of `HEAD`, and no commit
after it changed a measured file. `tests/benchmarks/test_results_fresh.py` fails on any other result, unless the
entry says why it is `stale` (a run too long for `make bench`, waiting to be rerun; the README lists each such
result): then the test fails once the mark is no longer true, so it cannot outlive the rerun.

The pinned library versions (`constraints.txt`) are not in `measures`: each results JSON records the versions it ran
with.

    python benchmarks/manifest.py                 # every result: fresh, or what makes it stale
    python benchmarks/manifest.py --rerun         # `make bench`: rerun every benchmark of minutes, then report
    python benchmarks/manifest.py --rerun --stale-only bench_model bench_http   # only these, only if stale
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _harness import TREE_PATHSPEC

ROOT = Path(__file__).resolve().parent.parent

# the model itself: config, decoder, attention and gate, media embeddings, losses
MODEL = (
    "deepseekv3/configuration_deepseekv3.py",
    "deepseekv3/modeling_deepseekv3.py",
    "deepseekv3/attention_deepseekv3.py",
    "deepseekv3/embeddings_deepseekv3.py",
    "deepseekv3/losses_deepseekv3.py",
)
# text, image and audio preprocessing
PROCESSOR = (
    "deepseekv3/tokenization.py",
    "deepseekv3/processing_deepseekv3.py",
    "deepseekv3/media_deepseekv3.py",
    "deepseekv3/layout_deepseekv3.py",
)
# the data sets, recipes, collators, trainer and evaluation every trained benchmark goes through
TRAINING = ("deepseekv3/training/", "deepseekv3/data/")
SERVING = ("deepseekv3/serving/",)
HARNESS = ("benchmarks/_harness.py",)
TRAINED = MODEL + PROCESSOR + TRAINING + HARNESS

STALE_ALIGNMENT = (
    "the alignment runs take 35-90 min each on 2 cores (`bench_alignment.py`; the settings sweeps ran once to choose "
    "the demo's settings); their parts predate results that record a commit"
)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script: its results files, what it measures, how `make bench` reruns it."""

    results: tuple[str, ...]
    measures: tuple[str, ...]
    # the arguments that produce the committed result (the first results file), and the minutes that took
    args: tuple[str, ...] = ()
    minutes: float = 0.0
    # rerun by `make bench` (a run of minutes); the others are rerun by hand
    make_bench: bool = True
    # why the committed result is known to be stale (None: it must be fresh)
    stale: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    "bench_model": Benchmark(("bench_model.json",), MODEL + HARNESS, minutes=2),
    "bench_precision": Benchmark(
        ("bench_precision.json",), MODEL + ("deepseekv3/training/precision.py",) + HARNESS, minutes=1.5
    ),
    "bench_checkpointing": Benchmark(
        ("bench_checkpointing.json",), MODEL + HARNESS, args=("--repeats", "8", "--budget-s", "240"), minutes=1.5
    ),
    "bench_packing": Benchmark(
        ("bench_packing.json",),
        MODEL + ("deepseekv3/training/packing.py", "deepseekv3/training/collators.py") + HARNESS,
        minutes=1,
    ),
    "bench_processor": Benchmark(("bench_processor.json",), PROCESSOR + HARNESS, minutes=0.5),
    "bench_gate_state": Benchmark(("bench_gate_state.json",), MODEL + HARNESS, args=("--threads", "1"), minutes=2),
    "bench_long_context": Benchmark(
        ("bench_long_context.json",),
        MODEL + ("deepseekv3/tokenization.py", "deepseekv3/training/demo.py") + HARNESS,
        minutes=1.5,
    ),
    "bench_prefix_cache": Benchmark(("bench_prefix_cache.json",), MODEL + SERVING + HARNESS, minutes=5),
    "bench_http": Benchmark(("bench_http.json",), MODEL + PROCESSOR + SERVING + HARNESS, minutes=3),
    "bench_balancing": Benchmark(("bench_balancing.json",), TRAINED, minutes=4),
    "bench_comm": Benchmark(
        ("bench_comm.json",),
        ("deepseekv3/distributed/", "benchmarks/_netns.py") + HARNESS,
        args=("--rounds", "7"),
        minutes=4,
    ),
    "bench_int8": Benchmark(
        ("bench_int8_experts.json",),
        TRAINED + ("deepseekv3/quantization.py", "benchmarks/_efficiency_models.py"),
        args=(
            "--compile-int8",
            "--train-steps",
            "1500",
            "--qat-steps",
            "150",
            "--num-images",
            "4000",
            "--num-clips",
            "2000",
            "--output",
            "benchmarks/results/bench_int8_experts.json",
        ),  # fmt: skip
        minutes=8,
    ),
    "bench_serving": Benchmark(("bench_serving.json",), TRAINED + SERVING, minutes=12),
    "bench_head_skipping": Benchmark(
        ("bench_head_skipping.json",), TRAINED + ("benchmarks/_efficiency_models.py",), minutes=24, make_bench=False
    ),
    "bench_rl": Benchmark(
        ("bench_rl.json",),
        TRAINED,
        args=("--base", "outputs/demo/model"),
        minutes=12,
        make_bench=False,  # needs the demo model (`make demo`, 9 min)
    ),
    "bench_shape_reading": Benchmark(
        ("bench_shape_reading.json",),
        TRAINED,
        args=("--steps", "1200", "--seeds", "0", "1", "2"),
        minutes=13,
        make_bench=False,
    ),
    "bench_lora": Benchmark(
        ("bench_lora.json",),
        TRAINED,
        args=("--lora-learning-rates", "1e-3", "3e-3", "1e-2", "3e-2"),
        minutes=33,
        make_bench=False,
    ),
    "bench_own_data": Benchmark(
        ("bench_own_data.json",),
        TRAINED,
        minutes=59,
        make_bench=False,  # needs the demo model (`make demo`, 9 min)
    ),
    "bench_alignment": Benchmark(
        (
            "bench_alignment.json",
            "bench_alignment_AB.json",
            "bench_alignment_CD.json",
            "bench_alignment_A_distill1600_instruct800.json",
            "bench_alignment_A_distill1800_instruct600.json",
            "bench_alignment_A_images20000_clips4000.json",
            "bench_alignment_A_images20000_steps3400.json",
            "bench_alignment_images9400_steps2600.json",
        ),
        TRAINED,
        minutes=90,
        make_bench=False,
        stale=STALE_ALIGNMENT,
    ),
}


def _git(*command: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *command], cwd=root, capture_output=True, text=True, check=False)


def sources(result: dict) -> list[dict | None]:
    """The `source` records of a results JSON: its own, and each part's for a combined result."""
    found = [result.get("source")] if "parts" not in result or "source" in result else []
    return found + [part.get("source") for part in result.get("parts", [])]


def staleness(name: str, results_file: str, root: Path = ROOT, benchmarks: dict | None = None) -> list[str]:
    """Why `results_file` of benchmark `name` is not fresh (an empty list: it is fresh), in the repository at
    `root` with the manifest `benchmarks` (default: this one)."""
    entry = (BENCHMARKS if benchmarks is None else benchmarks)[name]
    path = root / "benchmarks" / "results" / results_file
    if not path.is_file():
        return [f"benchmarks/results/{results_file} does not exist"]
    problems = []
    for source in sources(json.loads(path.read_text())):
        if not source or not source.get("git_commit"):
            problems.append("no commit recorded (`source.git_commit`)")
            continue
        commit = source["git_commit"]
        if source.get("tree_modified") is not False:
            problems.append(f"measured with uncommitted changes (or unrecorded) on top of {commit[:9]}")
        if _git("merge-base", "--is-ancestor", commit, "HEAD", root=root).returncode != 0:
            problems.append(f"commit {commit[:9]} is not in the history of HEAD")
            continue
        paths = [*entry.measures, f"benchmarks/{name}.py"]
        changed = _git("log", "--format=%h %s", f"{commit}..HEAD", "--", *paths, root=root).stdout.splitlines()
        if changed:
            listed = "; ".join(line[:90] for line in changed[:3]) + ("; ..." if len(changed) > 3 else "")
            problems.append(f"{len(changed)} commit(s) after {commit[:9]} changed files it measures: {listed}")
    return problems


def rerun_command(name: str) -> str:
    return " ".join(["python", f"benchmarks/{name}.py", *BENCHMARKS[name].args])


def report() -> list[tuple[str, str, list[str]]]:
    """`(benchmark, results file, problems)` for every results file of the manifest."""
    return [(name, file, staleness(name, file)) for name, entry in BENCHMARKS.items() for file in entry.results]


def rerun(names: list[str], stale_only: bool) -> None:
    """Runs each benchmark of `names` (from the repository root, with its manifest arguments), one at a time."""
    if _git("status", "--porcelain", "--", *TREE_PATHSPEC).stdout.strip():
        print("warning: the tree has uncommitted changes; the results will record `tree_modified` and stay stale")
    todo = [n for n in names if not stale_only or any(staleness(n, f) for f in BENCHMARKS[n].results)]
    print(f"{len(todo)} benchmark(s), about {sum(BENCHMARKS[n].minutes for n in todo):.0f} min: {', '.join(todo)}")
    for number, name in enumerate(todo, 1):
        print(f"\n[{number}/{len(todo)}] {rerun_command(name)}", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, f"benchmarks/{name}.py", *BENCHMARKS[name].args], cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"{name} failed (exit {done.returncode}); the results of the benchmarks before it are written")
        print(f"[{number}/{len(todo)}] {name}: {(time.perf_counter() - started) / 60:.1f} min", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"of: {', '.join(BENCHMARKS)} (default: every benchmark of minutes)")
    parser.add_argument("--rerun", action="store_true", help="run the benchmarks, then report")
    parser.add_argument("--stale-only", action="store_true", help="with --rerun: only those with a stale result")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; the manifest has {', '.join(BENCHMARKS)}")
    if _git("rev-parse", "HEAD").returncode != 0:
        sys.exit("manifest: needs the repository's git history (a clone, not an archive)")
    if args.rerun:
        rerun(args.names or [name for name, entry in BENCHMARKS.items() if entry.make_bench], args.stale_only)
        print()
    for name, file, problems in report():
        marked = BENCHMARKS[name].stale
        status = "fresh" if not problems else ("stale (known)" if marked else "STALE")
        print(f"{status:14} {file}")
        for problem in problems:
            print(f"{'':14}   {problem}")
        if problems:
            print(f"{'':14}   rerun: {rerun_command(name)}")


if __name__ == "__main__":
    main()
