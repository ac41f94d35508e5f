"""The examples run as their docstrings say (they are the README's code)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs_and_reloads(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--output", str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "logits (1, 19, 1000)" in result.stdout
    assert "reloaded DeepseekV3MultimodalModel" in result.stdout
    assert (tmp_path / "model" / "model.safetensors").exists()
