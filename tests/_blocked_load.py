"""Load a checkpoint with `trust_remote_code=True` in a process where `import deepseekv3` raises ImportError.

Run as a script by the portability and Hub tests:

    python _blocked_load.py MODEL_ID_OR_DIR AUTO_CLASS INPUT_IDS_JSON OUTPUT.safetensors [--revision REV]

It writes the model's output (`logits`, or `last_hidden_state` for a base model) for `INPUT_IDS_JSON` to
`OUTPUT.safetensors`, and the loaded class's module and name to `OUTPUT.json`, so the test can check that the code
came from the checkpoint (a `transformers_modules` module) and compare the numbers.
"""

import argparse
import importlib.abc
import json
import os
import subprocess
import sys
from pathlib import Path

LOAD_TIMEOUT_S = 120


class BlockDeepseekv3(importlib.abc.MetaPathFinder):
    """Makes `import deepseekv3` (and any submodule) fail, as on a machine where the package is not installed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "deepseekv3" or fullname.startswith("deepseekv3."):
            raise ImportError(f"import of {fullname!r} is blocked: the checkpoint must carry its own code")
        return None


def main() -> None:
    sys.meta_path.insert(0, BlockDeepseekv3())
    try:
        import deepseekv3  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import block does not work: deepseekv3 was imported")

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("auto_class")
    parser.add_argument("input_ids")
    parser.add_argument("output")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args()

    import torch
    import transformers
    from safetensors.torch import save_file

    auto_class = getattr(transformers, args.auto_class)
    model = auto_class.from_pretrained(args.model, trust_remote_code=True, revision=args.revision).eval()
    with torch.no_grad():
        outputs = model(input_ids=torch.tensor(json.loads(args.input_ids)))
    values = outputs.logits if getattr(outputs, "logits", None) is not None else outputs.last_hidden_state
    save_file({"output": values.contiguous()}, args.output)
    loaded = {
        "module": type(model).__module__,
        "name": type(model).__name__,
        "deepseekv3_modules": sorted(name for name in sys.modules if name.split(".")[0] == "deepseekv3"),
    }
    with open(args.output.removesuffix(".safetensors") + ".json", "w", encoding="utf-8") as file:
        json.dump(loaded, file)


def load_without_deepseekv3(
    model: str | Path,
    auto_class: str,
    input_ids: list[list[int]],
    work_dir: Path,
    env: dict[str, str],
    revision: str | None = None,
):
    """Run this script in a subprocess (cwd `work_dir`, environment `env`); return its output tensor and info."""
    from safetensors.torch import load_file

    output = work_dir / f"{auto_class}.safetensors"
    command = [sys.executable, os.path.abspath(__file__), str(model), auto_class, json.dumps(input_ids), str(output)]
    if revision is not None:
        command += ["--revision", revision]
    result = subprocess.run(
        command, cwd=work_dir, env=env, capture_output=True, text=True, timeout=LOAD_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        # the last lines, each cut short: transformers' "Unrecognized configuration class" lists every config class
        stderr = "\n".join(line[:500] for line in result.stderr.splitlines()[-40:])
        raise AssertionError(f"{auto_class}.from_pretrained({model}) without deepseekv3 failed:\n{stderr}")
    info = json.loads(output.with_suffix(".json").read_text(encoding="utf-8"))
    return load_file(output)["output"], info


if __name__ == "__main__":
    main()
