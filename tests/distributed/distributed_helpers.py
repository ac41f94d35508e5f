"""Starting real multi-process runs for the distributed tests: torchrun and `accelerate launch` on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers.py"
TRAIN_SCRIPT = REPO / "examples" / "accelerate" / "train.py"
ACCELERATE_CONFIGS = REPO / "examples" / "accelerate"
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    # one thread per process: the test machine has 2 cores for 2-4 processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _run(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=REPO)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"


def run_script(num_processes: int, script: str | Path, *args: str) -> None:
    """Runs `SCRIPT ARGS...` (a path from the repository root) in `num_processes` gloo processes under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_processes}"]
    command += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / script), *args]
    _run(command, _env())


def run_torchrun(num_processes: int, worker: str, *args: str) -> None:
    """Runs `workers.py WORKER ARGS...` in `num_processes` gloo processes."""
    run_script(num_processes, WORKERS, worker, *args)


def run_accelerate(config: str, *args: str, **env: str) -> None:
    """`accelerate launch --config_file examples/accelerate/CONFIG examples/accelerate/train.py ARGS...`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config)]
    command += ["--main_process_port", str(free_port()), str(TRAIN_SCRIPT), *args]
    _run(command, _env(**env))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
