"""A quiet start: `import deepseekv3` and the console script print nothing but the package's own output.

transformers imports torchao (the `quantization` extra) with its model code; `quiet_torchao_import` drops the two
known lines that import logs on a torch build without CUDA, and nothing else.
"""

import enum
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import deepseekv3
from deepseekv3._quiet_import import quiet_torchao_import

CONSOLE_SCRIPT = Path(sys.executable).parent / "deepseekv3"
PACKAGE_DIR = Path(deepseekv3.__file__).parent
KERNEL_LIBRARY_WARNING = (
    f"Failed to load {os.path.join('site-packages', 'torchao', '_C_mxfp8.so')}: Could not load this library"
)
PYTREE_NOTICE = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."


def _run(command: list[str]) -> subprocess.CompletedProcess:
    """`command` in a fresh process that imports the `deepseekv3` under test, not another installed copy."""
    python_path = os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


@contextmanager
def _records(*logger_names: str) -> Iterator[list[logging.LogRecord]]:
    """Every record the named loggers pass on to their handlers while the block runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_import_prints_nothing():
    result = _run([sys.executable, "-c", "import deepseekv3"])
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")


def test_console_script_help_prints_only_the_help():
    assert CONSOLE_SCRIPT.is_file(), f"console script {CONSOLE_SCRIPT} is not installed (pip install -e .)"
    result = _run([str(CONSOLE_SCRIPT), "demo", "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: deepseekv3 demo") and result.stderr == ""


def test_only_the_known_lines_are_dropped_and_only_inside_the_block():
    torchao_logger, pytree_logger = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    torchao_enum = enum.Enum("KernelPreference", "AUTO", module="torchao.quantization.quantize_.common")
    other_enum = enum.Enum("Mode", "ON", module="elsewhere")
    with _records("torchao", "torch.utils._pytree") as records:
        with quiet_torchao_import():
            torchao_logger.warning(KERNEL_LIBRARY_WARNING)
            pytree_logger.warning(PYTREE_NOTICE, torchao_enum)
            torchao_logger.warning("Skipping import of cpp extensions due to incompatible torch version.")
            torchao_logger.error("Failed to load a checkpoint")
            torchao_logger.error(KERNEL_LIBRARY_WARNING)
            pytree_logger.warning(PYTREE_NOTICE, other_enum)
        torchao_logger.warning(KERNEL_LIBRARY_WARNING)
    assert [record.getMessage() for record in records] == [
        "Skipping import of cpp extensions due to incompatible torch version.",
        "Failed to load a checkpoint",
        KERNEL_LIBRARY_WARNING,
        PYTREE_NOTICE % other_enum,
        KERNEL_LIBRARY_WARNING,
    ]
    assert not torchao_logger.filters and not pytree_logger.filters


def test_the_filters_are_removed_when_the_import_fails():
    with pytest.raises(ImportError), quiet_torchao_import():
        raise ImportError("no such module")
    assert not logging.getLogger("torchao").filters and not logging.getLogger("torch.utils._pytree").filters
