"""`deepseekv3 convert`: a transformers DeepSeek-V3 checkpoint becomes ours with the same text logits."""

import errno
import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _blocked_load import load_without_deepseekv3
from conftest import TINY_TEXT_KWARGS
from huggingface_hub import ModelCard
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
CODE_FILES = ("configuration_deepseekv3.py", "modeling_deepseekv3.py")
HUB_ID = "deepseek-ai/DeepSeek-V3"
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")

# About 300 MB of float32 weights (6 layers, 16 experts of 512x512), written as 100 MB shards.
LARGE_TEXT_KWARGS = {
    **TINY_TEXT_KWARGS,
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 6,
    "n_routed_experts": 16,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "kv_lora_rank": 64,
    "q_lora_rank": 128,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
}
LARGE_SHARD_SIZE = "100MB"
# Imports, the meta-device model and the safetensors headers; measured at about 10 MiB.
RSS_ALLOWANCE_MIB = 48
# The peak resident set of the conversion alone: ru_maxrss (KiB on Linux) after it, minus after the imports.
PEAK_RSS_SCRIPT = """
import resource, sys
from deepseekv3.convert import convert_checkpoint
baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
convert_checkpoint(sys.argv[1], sys.argv[2])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) * 1024)
"""


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=INPUT_IDS).logits


def _package_env() -> dict[str, str]:
    """The environment for a subprocess that imports the `deepseekv3` under test, not another installed copy."""
    python_path = os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path}


def _weight_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.endswith(WEIGHT_SUFFIXES))


@pytest.fixture
def source(request, tmp_path) -> tuple[Path, torch.Tensor]:
    """A transformers DeepseekV3ForCausalLM (with a tokenizer) saved to disk, and its logits on INPUT_IDS.

    Written as one `model.safetensors`, or in shards of `request.param` (e.g. `"40KB"`) when parametrized.
    """
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_TEXT_KWARGS))
    # Non-zero router bias: its key has to arrive too, or the routing (and so the logits) changes.
    for layer in model.model.layers[TINY_TEXT_KWARGS["first_k_dense_replace"] :]:
        layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    # a generation config of its own, as DeepSeek-V3's: it has to arrive rather than be rebuilt from config.json
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    source_dir = tmp_path / "source"
    max_shard_size = getattr(request, "param", None)
    model.save_pretrained(source_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    vocab = {f"t{i}": i for i in range(TINY_TEXT_KWARGS["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(source_dir)
    return source_dir, _logits(model)


def _assert_converted(dst_dir: Path, source_dir: Path, expected_logits: torch.Tensor, tmp_path: Path) -> None:
    files = {path.name for path in dst_dir.iterdir()}
    pickles = {name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
    assert not pickles, f"pickled weights written: {pickles}"
    # the source's weight files, byte for byte: same shards, same index
    weights = _weight_files(source_dir)
    assert weights and _weight_files(dst_dir) == weights
    assert all(filecmp.cmp(source_dir / name, dst_dir / name, shallow=False) for name in weights)
    for name in CODE_FILES:
        assert (dst_dir / name).read_bytes() == (PACKAGE_DIR / name).read_bytes(), name
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files

    config = json.loads((dst_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "deepseekv3_multimodal"
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(config["auto_map"])
    assert not config["use_attention_gate"] and not config["use_image_input"] and not config["use_audio_input"]
    generation_config = json.loads((dst_dir / "generation_config.json").read_text(encoding="utf-8"))
    assert generation_config == json.loads((source_dir / "generation_config.json").read_text(encoding="utf-8"))

    model = AutoModelForCausalLM.from_pretrained(dst_dir)
    assert type(model) is DeepseekV3MultimodalForConditionalGeneration
    torch.testing.assert_close(_logits(model), expected_logits, atol=1e-5, rtol=0)
    # config.json is the one the loaded model's own save_pretrained writes (auto_map, architectures, dtype)
    model.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text(encoding="utf-8")) == config
    tokenizer = AutoTokenizer.from_pretrained(dst_dir)
    assert tokenizer("t5 t9 t17")["input_ids"] == [5, 9, 17]


@pytest.mark.parametrize("source", ["40KB", None], ids=["sharded", "single-file"], indirect=True)
def test_convert_keeps_logits_and_the_weight_files(source, tmp_path):
    source_dir, expected_logits = source
    dst_dir = tmp_path / "nested" / "converted"
    assert convert_checkpoint(source_dir, dst_dir) == dst_dir
    assert (len(_weight_files(dst_dir)) > 2) == (source_dir / "model.safetensors.index.json").is_file()
    _assert_converted(dst_dir, source_dir, expected_logits, tmp_path)
    # the staging directory was renamed into place: nothing else is left next to the destination
    assert [path.name for path in dst_dir.parent.iterdir()] == ["converted"]


def test_weight_files_are_hard_links_on_one_file_system(source, tmp_path):
    source_dir, _ = source
    dst_dir = convert_checkpoint(source_dir, tmp_path / "converted")
    for name in _weight_files(source_dir):
        assert (dst_dir / name).stat().st_ino == (source_dir / name).stat().st_ino, name


@pytest.mark.parametrize("source", ["40KB"], ids=["sharded"], indirect=True)
def test_saving_into_the_destination_leaves_the_linked_source_alone(source, tmp_path):
    source_dir, _ = source
    before = {name: (source_dir / name).read_bytes() for name in _weight_files(source_dir)}
    dst_dir = convert_checkpoint(source_dir, tmp_path / "converted")
    model = AutoModelForCausalLM.from_pretrained(dst_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    # the same shard names: save_pretrained replaces each file rather than writing through the link
    model.save_pretrained(dst_dir, max_shard_size="40KB")
    assert _weight_files(dst_dir) == sorted(before)
    assert any((dst_dir / name).read_bytes() != data for name, data in before.items())
    assert {name: (source_dir / name).read_bytes() for name in before} == before


def test_weight_files_are_copied_where_hard_links_fail(source, tmp_path, monkeypatch):
    source_dir, expected_logits = source

    def cross_device_link(src, dst, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link", src, None, dst)

    monkeypatch.setattr(os, "link", cross_device_link)
    dst_dir = convert_checkpoint(source_dir, tmp_path / "converted")
    for name in _weight_files(source_dir):
        assert (dst_dir / name).stat().st_ino != (source_dir / name).stat().st_ino, name
    _assert_converted(dst_dir, source_dir, expected_logits, tmp_path)


@pytest.mark.parametrize("source", ["40KB"], ids=["sharded"], indirect=True)
def test_converted_checkpoint_loads_with_trust_remote_code_alone(source, tmp_path):
    source_dir, expected_logits = source
    dst_dir = convert_checkpoint(source_dir, tmp_path / "converted")
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    logits, info = load_without_deepseekv3(dst_dir, "AutoModelForCausalLM", INPUT_IDS.tolist(), tmp_path, env)
    assert info["module"].startswith("transformers_modules.") and not info["deepseekv3_modules"], info
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)


def test_console_script_converts(source, tmp_path):
    source_dir, expected_logits = source
    assert CONSOLE_SCRIPT.is_file(), f"console script {CONSOLE_SCRIPT} is not installed (pip install -e .)"
    dst_dir = tmp_path / "converted"
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "convert", str(source_dir), str(dst_dir), "--base-model", HUB_ID],
        cwd=tmp_path,
        env=_package_env(),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert str(dst_dir) in result.stdout
    _assert_converted(dst_dir, source_dir, expected_logits, tmp_path)
    assert ModelCard.load(dst_dir / "README.md").data.base_model == HUB_ID


@pytest.mark.parametrize(
    ("location", "base_model", "expected"),
    [
        ("source", HUB_ID, HUB_ID),
        ("hub_cache/models--deepseek-ai--DeepSeek-V3/snapshots/0123abc", None, HUB_ID),
        ("source", None, None),
    ],
    ids=["given", "hub-cache-snapshot", "local-directory"],
)
def test_model_card_names_the_source(source, tmp_path, location, base_model, expected):
    source_dir, _ = source
    if location != "source":
        (tmp_path / location).parent.mkdir(parents=True)
        source_dir = source_dir.rename(tmp_path / location)
    dst_dir = convert_checkpoint(source_dir, tmp_path / "converted", base_model=base_model)
    card = ModelCard.load(dst_dir / "README.md")
    assert card.data.base_model == expected
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    # a local directory is no Hub id, which base_model must be: the text names it instead
    assert f"`{expected or source_dir}`" in card.text and "# converted" in card.text
    assert "every new feature off" in card.text


def test_model_card_lists_the_overrides(source, tmp_path):
    source_dir, _ = source
    dst_dir = convert_checkpoint(source_dir, tmp_path / "out", max_position_embeddings=256)
    card = ModelCard.load(dst_dir / "README.md")
    assert "`max_position_embeddings=256`" in card.text and "every new feature off" not in card.text


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


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"use_attention_gate": True}, r"missing from the source: .*head_gate.*given: use_attention_gate=True;"),
        (
            {"hidden_size": 64},
            r"with a different shape: .*\[96, 32\] in the source, \[96, 64\].*given: hidden_size=64;",
        ),
        (
            {"num_hidden_layers": 1},
            r"not used by the converted model: model\.layers\.1\..*given: num_hidden_layers=1;",
        ),
    ],
    ids=["adds-parameters", "reshapes-parameters", "drops-parameters"],
)
def test_convert_refuses_overrides_that_change_the_parameters(source, tmp_path, overrides, match):
    source_dir, _ = source
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(source_dir, tmp_path / "out", **overrides)
    assert not (tmp_path / "out").exists()


def test_convert_writes_overrides_that_keep_the_parameters(source, tmp_path):
    source_dir, expected_logits = source
    dst_dir = convert_checkpoint(source_dir, tmp_path / "out", max_position_embeddings=256)
    model = AutoModelForCausalLM.from_pretrained(dst_dir)
    assert model.config.max_position_embeddings == 256
    torch.testing.assert_close(_logits(model), expected_logits, atol=1e-5, rtol=0)


def test_convert_refuses_an_override_that_is_not_a_config_field(source, tmp_path):
    source_dir, _ = source
    with pytest.raises(ValueError, match=r"\['max_shard_size'\] are not fields"):
        convert_checkpoint(source_dir, tmp_path / "out", max_shard_size="5GB")
    assert not (tmp_path / "out").exists()


def test_new_modules_switched_on_when_loading_are_initialised(source, tmp_path):
    """The route the override error points to: from_pretrained adds the gate to a converted checkpoint."""
    source_dir, _ = source
    dst_dir = convert_checkpoint(source_dir, tmp_path / "out")
    model, loading_info = AutoModelForCausalLM.from_pretrained(
        dst_dir, use_attention_gate=True, output_loading_info=True
    )
    gate_keys = {key for key in model.state_dict() if ".head_gate." in key}
    assert gate_keys and loading_info["missing_keys"] == gate_keys
    assert not loading_info["unexpected_keys"] and not loading_info["mismatched_keys"]
    # initialised as in a freshly built model, not left as uninitialised memory
    fresh = DeepseekV3MultimodalForConditionalGeneration(model.config)
    for layer, fresh_layer in zip(model.model.layers, fresh.model.layers, strict=True):
        gate, fresh_gate = layer.self_attn.head_gate, fresh_layer.self_attn.head_gate
        assert all(torch.isfinite(param).all() for param in gate.parameters())
        torch.testing.assert_close(gate.up_proj.bias, fresh_gate.up_proj.bias, atol=0, rtol=0)
    assert torch.isfinite(_logits(model)).all()


def test_convert_refuses_pickled_weights(source, tmp_path):
    source_dir, _ = source
    for path in source_dir.glob("*.safetensors"):
        path.unlink()
    torch.save({}, source_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        convert_checkpoint(source_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["40KB"], ids=["sharded"], indirect=True)
def test_convert_refuses_an_index_naming_a_missing_shard(source, tmp_path):
    source_dir, _ = source
    (source_dir / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00005.safetensors"):
        convert_checkpoint(source_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_write_leaves_no_destination(source, tmp_path, monkeypatch):
    source_dir, _ = source
    dst_dir = tmp_path / "out"

    def fail(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    # Neither a link nor a copy can be made: the weights fail after the staging directory exists.
    monkeypatch.setattr(os, "link", fail)
    monkeypatch.setattr("shutil.copy2", fail)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(source_dir, dst_dir)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux (bytes on macOS)")
def test_peak_memory_stays_below_one_shard(tmp_path):
    source_dir = tmp_path / "source"
    DeepseekV3ForCausalLM(DeepseekV3Config(**LARGE_TEXT_KWARGS)).save_pretrained(
        source_dir, max_shard_size=LARGE_SHARD_SIZE
    )
    shard_sizes = [path.stat().st_size for path in source_dir.glob("*.safetensors")]
    assert len(shard_sizes) >= 3 and sum(shard_sizes) > 250e6, shard_sizes
    # a fresh process: the pytest process holds the model that wrote the source
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, str(source_dir), str(tmp_path / "out")],
        cwd=tmp_path,
        env=_package_env(),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    peak_mib = int(result.stdout.split()[-1]) / 2**20
    shard_mib = [size / 2**20 for size in shard_sizes]
    assert peak_mib < max(shard_mib) + RSS_ALLOWANCE_MIB, (
        f"converting {sum(shard_mib):.0f} MiB in {len(shard_mib)} shards raised the peak RSS by {peak_mib:.0f} MiB "
        f"(limit: the largest shard, {max(shard_mib):.0f} MiB, + {RSS_ALLOWANCE_MIB:.0f} MiB)"
    )
