"""Portability (DESIGN.md invariant 4): a saved checkpoint carries its code and loads where `deepseekv3` is missing.

Two proofs: a real load in a subprocess whose `import deepseekv3` raises ImportError, and a scan of the core
modules' import statements against the dependency rule (STYLE.md section 2).
"""

import ast
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from _blocked_load import load_without_deepseekv3
from transformers import AutoModelForCausalLM

import deepseekv3
from deepseekv3 import DeepseekV3MultimodalForConditionalGeneration

PACKAGE_DIR = Path(deepseekv3.__file__).parent
REQUIRED_CORE_MODULES = (
    "configuration_deepseekv3",
    "modeling_deepseekv3",
    "attention_deepseekv3",
    "embeddings_deepseekv3",
    "losses_deepseekv3",
)
OPTIONAL_CORE_MODULES = ("processing_deepseekv3", "media_deepseekv3", "layout_deepseekv3")
ALLOWED_THIRD_PARTY = {"torch", "numpy", "PIL", "transformers", "huggingface_hub", "tokenizers", "safetensors"}
INPUT_IDS = [[1, 5, 9, 17, 33, 2, 60, 61], [1, 7, 8, 40, 41, 42, 43, 95]]
# `save_pretrained` must write these Auto classes into `auto_map` so each loads with trust_remote_code alone.
REQUIRED_AUTO_MAP = {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForMultimodalLM"}


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A tiny model with every new feature on, saved; its reference outputs for INPUT_IDS."""
    from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS

    torch.manual_seed(0)
    config = deepseekv3.DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, use_attention_gate=True)
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    checkpoint_dir = tmp_path_factory.mktemp("portability") / "checkpoint"
    model.save_pretrained(checkpoint_dir)
    with torch.no_grad():
        input_ids = torch.tensor(INPUT_IDS)
        logits = model(input_ids=input_ids).logits
        expected = {
            "AutoModelForCausalLM": logits,
            "AutoModelForMultimodalLM": logits,
            "AutoModel": model.model(input_ids=input_ids).last_hidden_state,
        }
    return checkpoint_dir, expected


def test_save_pretrained_writes_code_files_and_auto_map(saved_checkpoint):
    checkpoint_dir, _ = saved_checkpoint
    files = {path.name for path in checkpoint_dir.iterdir()}
    # the model file and every core module it imports with `from .name import ...`, next to the weights
    assert {"config.json", "model.safetensors", *(f"{name}.py" for name in REQUIRED_CORE_MODULES)} <= files
    config = json.loads((checkpoint_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "deepseekv3_multimodal"
    missing = REQUIRED_AUTO_MAP - set(config.get("auto_map", {}))
    assert not missing, f"auto_map {config.get('auto_map')} lacks {sorted(missing)}"


def test_loads_with_auto_class_after_import(saved_checkpoint):
    checkpoint_dir, expected = saved_checkpoint
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir).eval()
    assert type(model) is DeepseekV3MultimodalForConditionalGeneration
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(INPUT_IDS)).logits
    torch.testing.assert_close(logits, expected["AutoModelForCausalLM"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("auto_class", ["AutoModelForCausalLM", "AutoModelForMultimodalLM", "AutoModel"])
def test_loads_with_trust_remote_code_where_deepseekv3_is_blocked(saved_checkpoint, tmp_path, auto_class):
    checkpoint_dir, expected = saved_checkpoint
    output, loaded = load_without_deepseekv3(checkpoint_dir, auto_class, INPUT_IDS, tmp_path, _offline_env(tmp_path))
    # The class came from the code files next to the weights, and nothing of the package was imported.
    assert loaded["module"].startswith("transformers_modules."), loaded
    assert loaded["deepseekv3_modules"] == []
    torch.testing.assert_close(output, expected[auto_class], atol=1e-5, rtol=0)


def _core_import_violations(source: str, core_modules: set[str]) -> tuple[list[str], set[str]]:
    """Check one core module's imports against the dependency rule.

    Returns the violations (one message each) and the sibling modules it imports with `from .name import ...`.
    """
    allowed = ALLOWED_THIRD_PARTY | set(sys.stdlib_module_names)
    violations, siblings = [], set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in allowed:
                    violations.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            where = f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import ..."
            if node.level == 0:
                if node.module.split(".")[0] not in allowed:
                    violations.append(where)
            elif node.level > 1 or node.module is None or "." in node.module:
                # `from . import x` is not followed by save_pretrained; `from ..` leaves the flat code folder
                violations.append(where)
            elif node.module not in core_modules:
                violations.append(f"{where} (not a flat module of the package)")
            else:
                siblings.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).split(".")[0] not in allowed
        ):
            violations.append(f"line {node.lineno}: dynamic import of {node.args[0].value!r}")
    return violations, siblings


def test_core_modules_import_only_allowed_packages():
    flat_modules = {path.stem for path in PACKAGE_DIR.glob("*.py")}
    for name in REQUIRED_CORE_MODULES:
        assert name in flat_modules, f"core module {name}.py is missing"
    to_scan = [*REQUIRED_CORE_MODULES, *(name for name in OPTIONAL_CORE_MODULES if name in flat_modules)]
    scanned, violations = set(), []
    while to_scan:
        name = to_scan.pop()
        if name in scanned:
            continue
        scanned.add(name)
        # A sibling a core module imports is copied next to the weights too: it is core and obeys the same rule.
        found, siblings = _core_import_violations(
            (PACKAGE_DIR / f"{name}.py").read_text(encoding="utf-8"), flat_modules
        )
        violations += [f"{name}.py {message}" for message in found]
        to_scan += sorted(siblings - scanned)
    assert not violations, "core modules break the dependency rule:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    "source",
    [
        "from . import modeling_deepseekv3",
        "from ..training import recipe",
        "from .training.recipes import align",
        "from .cli import main",
        "import deepseekv3.training",
        "from deepseekv3.configuration_deepseekv3 import DeepseekV3MultimodalConfig",
        "import accelerate",
        "def f():\n    from peft import LoraConfig",
        "import importlib\nimportlib.import_module('deepseekv3.serving')",
    ],
)
def test_import_scan_rejects_forbidden_imports(source):
    violations, _ = _core_import_violations(source, {"configuration_deepseekv3", "modeling_deepseekv3"})
    assert violations, f"the scan accepted {source!r}"


def test_import_scan_accepts_allowed_imports():
    source = (
        "import math\nimport torch.nn.functional as F\nimport numpy as np\nfrom PIL import Image\n"
        "from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention\n"
        "from huggingface_hub.dataclasses import strict\n"
        "from .configuration_deepseekv3 import DeepseekV3MultimodalConfig\n"
    )
    violations, siblings = _core_import_violations(source, {"configuration_deepseekv3"})
    assert violations == []
    assert siblings == {"configuration_deepseekv3"}
