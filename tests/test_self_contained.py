"""The repository reads nothing outside itself: no code, test or script names a path above the repository root.

Two checks. A static scan of every tracked file: in Python, each path built from `__file__` (through `parent`,
`parents[k]`, `os.path.dirname` and the names it is assigned to) must stay inside the root, and no string names a
parent directory (a `..` path segment) or `os.pardir`; in the other text files (shell, Makefile, TOML, YAML, Markdown)
no `..` segment leads on to a further path. A dynamic check: a fresh interpreter loads every test fixture with an
audit hook on, and no file beside the repository (under its parent directory, outside it) may be opened or listed.
`.ci/run` adds the third layer: the whole suite runs in a fresh clone alone in an empty directory.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A `..` path segment followed by a separator or the end of the string (written without the two dots side by side,
# so this file does not match itself).
PARENT_SEGMENT = re.compile(r"(?<![\w.])\.{2}(?=[/\\]|$)")
# In shell, Makefile and other text files a trailing `..` may climb to the root (`$(dirname "$0")/..` in `.ci/run`);
# a `..` segment with more path after it leaves the directory it starts from.
PARENT_SEGMENT_THEN_PATH = re.compile(r"(?<![\w.])\.{2}[/\\]")
TEXT_SUFFIXES = {".sh", ".toml", ".cfg", ".ini", ".txt", ".yaml", ".yml", ".md", ".json"}


def tracked_files() -> list[PurePosixPath]:
    done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [PurePosixPath(name) for name in done.stdout.split("\0") if name]


def _is_text_script(path: PurePosixPath) -> bool:
    """Makefiles, the text formats above, and extensionless scripts (`.ci/run`)."""
    if path.name == "Makefile" or path.suffix in TEXT_SUFFIXES:
        return True
    if path.suffix:
        return False
    with open(ROOT / path, "rb") as handle:
        return handle.read(2) == b"#!"


class _PathLevels(ast.NodeVisitor):
    """How far above its file each `__file__`-based path expression of one module climbs.

    A level counts directories climbed: `Path(__file__)` is 0 (the file), `.parent` 1 (its folder), and a file `d`
    path parts deep reaches the repository root at level `d`; a greater level leaves the repository.
    """

    # calls that keep the level of their first argument (or of the object they are called on)
    SAME_LEVEL_CALLS = {"Path", "PurePath", "PosixPath", "abspath", "realpath", "normpath", "fspath", "str"}
    SAME_LEVEL_METHODS = {"resolve", "absolute", "expanduser"}

    def __init__(self, relative_path: PurePosixPath):
        self.depth = len(relative_path.parts)
        self.names: dict[str, int] = {}
        self.escapes: list[tuple[int, str]] = []

    def level(self, node: ast.AST) -> int | None:
        if isinstance(node, ast.Name):
            if node.id == "__file__":
                return 0
            return self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            if node.attr == "__file__" and isinstance(node.value, ast.Name) and node.value.id == "deepseekv3":
                return self.depth - 2  # deepseekv3/__init__.py, two parts below the root
            if node.attr == "parent":
                below = self.level(node.value)
                return None if below is None else below + 1
            return None
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
            below = self.level(node.value.value)
            if below is None or not isinstance(node.slice, ast.Constant) or not isinstance(node.slice.value, int):
                return None
            return below + node.slice.value + 1
        if isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name == "dirname" and node.args:
                below = self.level(node.args[0])
                return None if below is None else below + 1
            if name in self.SAME_LEVEL_CALLS and node.args:
                return self.level(node.args[0])
            if name in self.SAME_LEVEL_METHODS and isinstance(function, ast.Attribute):
                return self.level(function.value)
        return None

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        level = self.level(node.value)
        if level is not None:
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.names[target.id] = level

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._check(node)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        self._check(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        self._check(node)
        self.generic_visit(node)

    def _check(self, node: ast.AST) -> None:
        level = self.level(node)
        if level is not None and level > self.depth:
            self.escapes.append((node.lineno, f"climbs {level - self.depth} folder(s) above the repository root"))


def python_escapes(source: str, relative_path: PurePosixPath) -> list[tuple[int, str]]:
    """(line, reason) for each place in one Python module that names a path outside the repository."""
    tree = ast.parse(source)
    levels = _PathLevels(relative_path)
    levels.visit(tree)
    found = list(levels.escapes)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and PARENT_SEGMENT.search(node.value):
            found.append((node.lineno, f"string names a parent directory: {node.value[:60]!r}"))
        if isinstance(node, ast.Attribute) and node.attr == "pardir":
            found.append((node.lineno, "os.pardir"))
    return sorted(set(found))


def text_escapes(text: str) -> list[tuple[int, str]]:
    """(line, reason) for each line of a shell, Makefile or other text file with a `..` segment leading on."""
    return [
        (number, f"parent directory in {line.strip()[:60]!r}")
        for number, line in enumerate(text.splitlines(), start=1)
        if PARENT_SEGMENT_THEN_PATH.search(line)
    ]


@pytest.mark.parametrize(
    "relative_path, source, escapes",
    [
        # the pattern this test exists for: a fixture read from a folder beside the repository
        ("tests/test_x.py", 'F = Path(__file__).resolve().parents[2] / "shared" / "f.json"\n', True),
        ("tests/test_x.py", 'F = Path(__file__).resolve().parents[1] / "tests" / "f.json"\n', False),
        ("benchmarks/b.py", 'ROOT = Path(__file__).resolve().parents[1]\nF = ROOT.parent / "shared"\n', True),
        ("benchmarks/b.py", "ROOT = Path(__file__).resolve().parent.parent\n", False),
        ("benchmarks/b.py", "ROOT = Path(__file__).resolve().parent.parent.parent\n", True),
        ("tests/d/h.py", "REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))\n", False),
        ("tests/d/h.py", "UP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))\n", True),
        ("tests/test_x.py", "P = Path(deepseekv3.__file__).parent.parent.parent\n", True),
        ("tests/test_x.py", "P = Path(deepseekv3.__file__).parent.parent\n", False),
        ("tests/test_x.py", 'P = ROOT / ".." / "shared"\n', True),
        ("tests/test_x.py", 'P = os.path.join(ROOT, os.pardir, "shared")\n', True),
        ("tests/test_x.py", 'P = "{root}/' + "." + './shared/f.json"\n', True),
        ("tests/test_x.py", "from ..data import x\ndoc = '.../commit/<rev>'\n", False),
    ],
)
def test_the_scan_finds_paths_that_leave_the_repository(relative_path, source, escapes):
    assert bool(python_escapes(source, PurePosixPath(relative_path))) == escapes


def test_no_tracked_file_names_a_path_outside_the_repository():
    found = []
    for path in tracked_files():
        if not (ROOT / path).is_file():  # deleted in the working tree, not yet committed
            continue
        if path.suffix == ".py":
            escapes = python_escapes((ROOT / path).read_text(encoding="utf-8"), path)
        elif _is_text_script(path):
            escapes = text_escapes((ROOT / path).read_text(encoding="utf-8"))
        else:
            continue
        found += [f"{path}:{line}: {reason}" for line, reason in escapes]
    assert not found, "paths outside the repository:\n" + "\n".join(found)


# Runs in a fresh interpreter: records every file opened or folder listed under the repository's parent directory
# but outside the repository (the interpreter's own installation excepted), then loads every test fixture.
_WATCH_FIXTURE_LOADS = """
import json, os, site, sys
root = os.path.realpath(sys.argv[1])
parent = os.path.dirname(root)
installed = {os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()]}
installed |= {os.path.realpath(p) for p in sys.path if p and not root.startswith(os.path.realpath(p) + os.sep)}
outside = []

def inside(path, folder):
    return path == folder or path.startswith(folder + os.sep)

def watch(event, args):
    if event not in ("open", "os.listdir", "os.scandir") or not args or not isinstance(args[0], (str, bytes)):
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    if inside(path, parent) and not inside(path, root) and not any(inside(path, p) for p in installed):
        outside.append(path)

sys.addaudithook(watch)
sys.path.insert(0, os.path.join(root, "tests"))
import fixture_files
loaded = []
for name in sorted(dir(fixture_files)):
    if name.startswith("load_"):
        getattr(fixture_files, name)()
        loaded.append(name)
print(json.dumps({"loaded": loaded, "outside": outside}))
"""


def test_loading_the_fixtures_opens_nothing_beside_the_repository():
    done = subprocess.run(
        [sys.executable, "-c", _WATCH_FIXTURE_LOADS, str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["loaded"], "no fixture loader ran"
    assert report["outside"] == []
