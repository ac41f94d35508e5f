"""Hub round trip on 127.0.0.1: push with `push_to_hub`, pull with `from_pretrained(..., trust_remote_code=True)`.

The Hub is `olah` (a Hugging Face Hub mirror) serving git repositories, plus a small commit endpoint for uploads
(see `hub_server.py`). The pulls run where `import deepseekv3` is blocked, so they work only from the code files the
checkpoint carries.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _blocked_load import load_without_deepseekv3
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from hub_server import CommitEndpoint, OlahHub, hub_env

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration

pytestmark = pytest.mark.hub

INPUT_IDS = [[1, 5, 9, 17, 33, 2, 60, 61], [1, 7, 8, 40, 41, 42, 43, 95]]
PUSH_TIMEOUT_S = 120
PUSH_SCRIPT = """
import sys
import deepseekv3  # registers the Auto classes and the code files to upload
from transformers import AutoModelForCausalLM

AutoModelForCausalLM.from_pretrained(sys.argv[1]).push_to_hub(sys.argv[2], max_shard_size=sys.argv[3])
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """`olah` and the commit endpoint, both on 127.0.0.1, for the tests of this module."""
    olah = OlahHub(tmp_path_factory.mktemp("hub"))
    olah.start()
    uploads = CommitEndpoint(olah)
    uploads.start()
    yield olah, uploads
    uploads.stop()
    olah.stop()


@pytest.fixture
def model() -> DeepseekV3MultimodalForConditionalGeneration:
    config = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS, use_attention_gate=True)
    return DeepseekV3MultimodalForConditionalGeneration(config).eval()


def _expected_outputs(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        input_ids = torch.tensor(INPUT_IDS)
        return {
            "AutoModelForCausalLM": model(input_ids=input_ids).logits,
            "AutoModel": model.model(input_ids=input_ids).last_hidden_state,
        }


def _pull_and_compare(olah: OlahHub, repo_id: str, expected: dict[str, torch.Tensor], work_dir: Path) -> None:
    for auto_class, expected_output in expected.items():
        # revision="main": olah's offline mirror resolves only explicit revisions (see hub_server.py)
        output, loaded = load_without_deepseekv3(
            repo_id, auto_class, INPUT_IDS, work_dir, hub_env(work_dir / "hf_home", olah.endpoint), revision="main"
        )
        assert loaded["module"].startswith("transformers_modules."), loaded
        assert loaded["deepseekv3_modules"] == []
        torch.testing.assert_close(output, expected_output, atol=1e-5, rtol=0)


def test_pull_from_hub_where_deepseekv3_is_blocked(hub, model, tmp_path):
    olah, _ = hub
    model.save_pretrained(tmp_path / "checkpoint")
    olah.publish(tmp_path / "checkpoint", "org/name")
    _pull_and_compare(olah, "org/name", _expected_outputs(model), tmp_path)


def test_push_to_hub_uploads_exactly_what_pull_needs(hub, model, tmp_path):
    olah, uploads = hub
    shard_size = "60KB"
    local_dir = tmp_path / "local"
    model.save_pretrained(local_dir, max_shard_size=shard_size)
    result = subprocess.run(
        [sys.executable, "-c", PUSH_SCRIPT, str(local_dir), "org/pushed", shard_size],
        cwd=tmp_path,
        env=hub_env(tmp_path / "push_home", uploads.endpoint),
        capture_output=True,
        text=True,
        timeout=PUSH_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"push_to_hub failed:\n{result.stderr[-4000:]}\nrequests: {uploads.requests}"

    # What save_pretrained writes (code files, config with auto_map, sharded safetensors and their index, generation
    # config) plus the model card; nothing pickled, nothing else.
    pushed = set(uploads.pushed_files)
    assert len(uploads.pushed_files) == len(pushed)
    assert pushed == {path.name for path in local_dir.iterdir()} | {"README.md"}
    assert {"configuration_deepseekv3.py", "modeling_deepseekv3.py", "model.safetensors.index.json"} <= pushed
    assert sum(name.endswith(".safetensors") for name in pushed) > 1
    config = json.loads((olah.repo_dir("org/pushed") / "config.json").read_text(encoding="utf-8"))
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(config["auto_map"])

    _pull_and_compare(olah, "org/pushed", _expected_outputs(model), tmp_path)
