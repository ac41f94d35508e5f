"""Committed benchmark results are fresh: each was measured on a clean tree at a commit that no later commit changed
the measured files of (`benchmarks/manifest.py`), or is marked stale with its reason and listed in the README."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import manifest  # noqa: E402
from manifest import BENCHMARKS, Benchmark, staleness  # noqa: E402

ENTRIES = [(name, file) for name, entry in BENCHMARKS.items() for file in entry.results]
FRESH = [(name, file) for name, file in ENTRIES if BENCHMARKS[name].stale is None]
MARKED_STALE = [(name, file) for name, file in ENTRIES if BENCHMARKS[name].stale is not None]
STALE_LIST = re.compile(r"<!-- stale results -->\n(.*?)<!-- /stale results -->", re.S)


def test_every_results_file_belongs_to_one_benchmark():
    committed = sorted(path.name for path in (ROOT / "benchmarks" / "results").glob("*.json"))
    claimed = [file for _, file in ENTRIES]
    assert sorted(claimed) == committed, (
        f"in benchmarks/results/ but not in the manifest: {sorted(set(committed) - set(claimed))}; "
        f"in the manifest but not committed: {sorted(set(claimed) - set(committed))}"
    )
    for name, entry in BENCHMARKS.items():
        assert (ROOT / "benchmarks" / f"{name}.py").is_file(), name
        for path in entry.measures:
            assert (ROOT / path).exists(), f"{name} measures {path}, which does not exist"


@pytest.mark.parametrize(("name", "results_file"), FRESH, ids=[file for _, file in FRESH])
def test_committed_result_is_fresh(name, results_file):
    problems = staleness(name, results_file)
    assert not problems, (
        f"benchmarks/results/{results_file} is stale: " + "; ".join(problems)
        + f". Rerun it on a clean tree: {manifest.rerun_command(name)}"
    )  # fmt: skip


@pytest.mark.parametrize(("name", "results_file"), MARKED_STALE, ids=[file for _, file in MARKED_STALE])
def test_stale_mark_is_true_and_listed_in_the_readme(name, results_file):
    assert staleness(name, results_file), f"{results_file} is fresh: remove its `stale` mark from the manifest"
    listed = STALE_LIST.search((ROOT / "README.md").read_text())
    assert listed, "README.md has no stale-results list"
    assert f"`{results_file}`" in listed.group(1), f"README's stale-results list does not name {results_file}"


def test_readme_lists_only_results_marked_stale():
    listed = STALE_LIST.search((ROOT / "README.md").read_text()).group(1)
    named = set(re.findall(r"`(bench_[a-z0-9_A-Z]+\.json)`", listed))
    assert named == {file for _, file in MARKED_STALE}


def _git(root: Path, *command: str) -> str:
    return subprocess.run(["git", *command], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def test_staleness_finds_each_cause(tmp_path):
    """A repository of its own: a result goes stale when a measured file changes after its commit, and for each other
    cause; a change to a file it does not measure leaves it fresh."""
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "pkg").mkdir()
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "t@example.com")
    _git(root, "config", "user.name", "t")
    (root / "pkg" / "measured.py").write_text("x = 1\n")
    (root / "pkg" / "other.py").write_text("y = 1\n")
    (root / "benchmarks" / "bench_x.py").write_text("print(1)\n")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "code")
    measured_at = _git(root, "rev-parse", "HEAD")
    benchmarks = {"bench_x": Benchmark(("bench_x.json",), ("pkg/measured.py",))}

    def record(source: dict | None, message: str) -> list[str]:
        (root / "benchmarks" / "results" / "bench_x.json").write_text(json.dumps({"source": source}))
        _git(root, "add", "-A")
        _git(root, "commit", "-qm", message)
        return staleness("bench_x", "bench_x.json", root=root, benchmarks=benchmarks)

    assert record({"git_commit": measured_at, "tree_modified": False}, "result") == []
    assert "uncommitted" in record({"git_commit": measured_at, "tree_modified": True}, "modified")[0]
    assert "no commit" in record(None, "unrecorded")[0]
    assert "not in the history" in record({"git_commit": "0" * 40, "tree_modified": False}, "elsewhere")[0]
    assert record({"git_commit": measured_at, "tree_modified": False}, "result again") == []

    (root / "pkg" / "other.py").write_text("y = 2\n")
    _git(root, "commit", "-qam", "unmeasured change")
    assert staleness("bench_x", "bench_x.json", root=root, benchmarks=benchmarks) == []

    (root / "benchmarks" / "bench_x.py").write_text("print(2)\n")
    _git(root, "commit", "-qam", "script change")
    (root / "pkg" / "measured.py").write_text("x = 2\n")
    _git(root, "commit", "-qam", "measured change")
    problems = staleness("bench_x", "bench_x.json", root=root, benchmarks=benchmarks)
    assert len(problems) == 1 and "2 commit(s)" in problems[0] and "measured change" in problems[0]

    part = {"source": {"git_commit": measured_at, "tree_modified": False}}
    combined = {"parts": [part, {"source": None}]}
    (root / "benchmarks" / "results" / "bench_x.json").write_text(json.dumps(combined))
    problems = staleness("bench_x", "bench_x.json", root=root, benchmarks=benchmarks)
    assert any("no commit" in problem for problem in problems)


def test_every_benchmark_script_imports():
    """Each benchmark and the manifest's report run from a clean checkout (a benchmark that cannot start cannot be
    rerun)."""
    modules = ", ".join(BENCHMARKS)
    done = subprocess.run(
        [sys.executable, "-c", f"import {modules}; import manifest; manifest.main()"],
        cwd=ROOT / "benchmarks",
        env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reported = {line.split()[-1] for line in done.stdout.splitlines() if line and not line.startswith(" ")}
    assert reported == {file for _, file in ENTRIES}
