"""`deepseekv3 convert`: a transformers DeepSeek-V3 checkpoint becomes ours with the same text logits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT_KWARGS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import deepseekv3
from deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.convert import convert_checkpoint

CONSOLE_SCRIPT = Path(sys.executable).parent / "deepseekv3"
SCRIPT_TIMEOUT_S = 120
PACKAGE_DIR = Path(deepseekv3.__file__).parent
INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 60, 61], [1, 7, 8, 40, 41, 42, 43, 95]])
CODE_FILES = {"configuration_deepseekv3.py", "modeling_deepseekv3.py"}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=INPUT_IDS).logits


def _package_env() -> dict[str, str]:
    """The environment for a subprocess that imports the `deepseekv3` under test, not another installed copy."""
    python_path = os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path}


@pytest.fixture
def source(tmp_path) -> tuple[Path, torch.Tensor]:
    """A transformers DeepseekV3ForCausalLM (with a tokenizer) saved to disk, and its logits on INPUT_IDS."""
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_TEXT_KWARGS))
    # Non-zero router bias: its key has to arrive too, or the routing (and so the logits) changes.
    for layer in model.model.layers[TINY_TEXT_KWARGS["first_k_dense_replace"] :]:
        layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    source_dir = tmp_path / "source"
    model.save_pretrained(source_dir)
    vocab = {f"t{i}": i for i in range(TINY_TEXT_KWARGS["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(source_dir)
    return source_dir, _logits(model)


def _assert_converted(dst_dir: Path, expected_logits: torch.Tensor, expect_sharded: bool) -> None:
    files = {path.name for path in dst_dir.iterdir()}
    weights = {name for name in files if name.endswith(".safetensors")}
    pickles = {name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
    assert not pickles, f"pickled weights written: {pickles}"
    assert CODE_FILES <= files
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    if expect_sharded:
        assert len(weights) > 1 and "model.safetensors.index.json" in files, files
        index = json.loads((dst_dir / "model.safetensors.index.json").read_text(encoding="utf-8"))
        assert set(index["weight_map"].values()) == weights
    else:
        assert weights == {"model.safetensors"}, files

    config = json.loads((dst_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "deepseekv3_multimodal"
    assert {"AutoConfig", "AutoModelForCausalLM"} <= set(config["auto_map"])
    assert not config["use_attention_gate"] and not config["use_image_input"] and not config["use_audio_input"]

    model = AutoModelForCausalLM.from_pretrained(dst_dir)
    assert type(model) is DeepseekV3MultimodalForConditionalGeneration
    torch.testing.assert_close(_logits(model), expected_logits, atol=1e-5, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(dst_dir)
    assert tokenizer("t5 t9 t17")["input_ids"] == [5, 9, 17]


def test_convert_checkpoint_keeps_logits_and_shards(source, tmp_path):
    source_dir, expected_logits = source
    dst_dir = tmp_path / "nested" / "converted"
    assert convert_checkpoint(source_dir, dst_dir, max_shard_size="40KB") == dst_dir
    _assert_converted(dst_dir, expected_logits, expect_sharded=True)
    # the staging directory was renamed into place: nothing else is left next to the destination
    assert [path.name for path in dst_dir.parent.iterdir()] == ["converted"]


def test_console_script_converts(source, tmp_path):
    source_dir, expected_logits = source
    assert CONSOLE_SCRIPT.is_file(), f"console script {CONSOLE_SCRIPT} is not installed (pip install -e .)"
    dst_dir = tmp_path / "converted"
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "convert", str(source_dir), str(dst_dir)],
        cwd=tmp_path,
        env=_package_env(),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert str(dst_dir) in result.stdout
    _assert_converted(dst_dir, expected_logits, expect_sharded=False)


def test_console_script_reports_bad_input_without_traceback(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "convert", str(missing), str(tmp_path / "out")],
        cwd=tmp_path,
        env=_package_env(),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode != 0
    assert "error" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_convert_rejects_a_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "missing", tmp_path / "out")


def test_convert_rejects_a_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert_checkpoint(tmp_path / "empty", tmp_path / "out")


def test_convert_rejects_another_model_type(tmp_path):
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="model_type 'llama'.*'deepseek_v3'"):
        convert_checkpoint(tmp_path / "llama", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_non_empty_destination(source, tmp_path):
    source_dir, _ = source
    dst_dir = tmp_path / "taken"
    dst_dir.mkdir()
    (dst_dir / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        convert_checkpoint(source_dir, dst_dir)
    assert [path.name for path in dst_dir.iterdir()] == ["keep.txt"]


def test_convert_refuses_overrides_that_need_weights_the_source_lacks(source, tmp_path):
    source_dir, _ = source
    with pytest.raises(ValueError, match=r"missing from the source: .*head_gate"):
        convert_checkpoint(source_dir, tmp_path / "out", use_attention_gate=True)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_pickled_weights(source, tmp_path):
    source_dir, _ = source
    for path in source_dir.glob("*.safetensors"):
        path.unlink()
    torch.save({}, source_dir / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        convert_checkpoint(source_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_no_destination(source, tmp_path):
    source_dir, _ = source
    dst_dir = tmp_path / "out"
    # An unparsable shard size fails inside save_pretrained, after the staging directory exists.
    with pytest.raises(ValueError):
        convert_checkpoint(source_dir, dst_dir, max_shard_size="forty kilobytes")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))
