"""`deepseekv3 export`: our checkpoint with the new features off becomes a plain transformers `deepseek_v3` one that
loads in `DeepseekV3ForCausalLM` without this package and computes the same logits, bit for bit."""

import dataclasses
import errno
import filecmp
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerFast

import deepseekv3
from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.convert import convert_checkpoint
from deepseekv3.export import DROPPED_FIELDS, REFUSED_FIELDS, export_checkpoint
from deepseekv3.processing_deepseekv3 import DeepseekV3MultimodalProcessor
from deepseekv3.tokenization import load_default_tokenizer

TESTS_DIR = Path(__file__).parent
PACKAGE_DIR = Path(deepseekv3.__file__).parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "deepseekv3"
SCRIPT_TIMEOUT_S = 120
INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 60, 61], [1, 7, 8, 40, 41, 42, 43, 95]])
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
UPSTREAM_CLASS = "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3ForCausalLM"
# Fields export leaves out set away from their defaults: the export must still compute the same logits.
DROPPED_SETTINGS = {
    "attention_gate_ratio": 8,
    "router_bias_update_rate": 0.0,
    "sequence_balance_loss_weight": 1e-4,
    "attention_distillation_weight": 0.5,
    "image_size": 32,
    "patch_size": 8,
    "image_conv_stem_channels": 4,
    "num_mel_bins": 8,
    "audio_conv_stride": 2,
    "audio_max_frames": 32,
    "contrastive_temperature_init": 0.1,
}

# Loads a checkpoint the way a machine without this package does: `import deepseekv3` fails, no trust_remote_code.
LOAD_WITHOUT_DEEPSEEKV3_SCRIPT = """
import json, sys
from _blocked_load import BlockDeepseekv3

sys.meta_path.insert(0, BlockDeepseekv3())
try:
    import deepseekv3
except ImportError:
    pass
else:
    raise SystemExit("the import block does not work: deepseekv3 was imported")
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, input_ids, output = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
torch.set_num_threads(int(sys.argv[4]))  # the parent's: another split of the matmuls rounds differently
model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(input_ids)).logits
save_file({"logits": logits.contiguous()}, output)
print(json.dumps({
    "class": f"{type(model).__module__}.{type(model).__name__}",
    "deepseekv3_modules": sorted(name for name in sys.modules if name.split(".")[0] == "deepseekv3"),
    "token_ids": AutoTokenizer.from_pretrained(model_dir)("t5 t9 t17")["input_ids"],
}))
"""


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=INPUT_IDS).logits


def _clean_env(tmp_path: Path, python_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_") and key != "PYTHONPATH"}
    return {
        **env,
        "PYTHONPATH": str(python_path),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def _load_without_deepseekv3(model_dir: Path, tmp_path: Path) -> tuple[torch.Tensor, dict]:
    """Logits on INPUT_IDS of `AutoModelForCausalLM.from_pretrained(model_dir)` in a process that cannot import us."""
    output = tmp_path / "upstream_logits.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_DEEPSEEKV3_SCRIPT,
            str(model_dir),
            json.dumps(INPUT_IDS.tolist()),
            output,
            str(torch.get_num_threads()),
        ],
        cwd=tmp_path,
        env=_clean_env(tmp_path, TESTS_DIR),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(output)["logits"], json.loads(result.stdout.splitlines()[-1])


def _run_console_script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    assert CONSOLE_SCRIPT.is_file(), f"console script {CONSOLE_SCRIPT} is not installed (pip install -e .)"
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        cwd=tmp_path,
        env=_clean_env(tmp_path, PACKAGE_DIR.parent),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )


def _weight_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.endswith(WEIGHT_SUFFIXES))


def _save_word_level_tokenizer(directory: Path) -> None:
    vocab = {f"t{i}": i for i in range(TINY_TEXT_KWARGS["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(directory)


def _with_router_bias(model):
    """Non-zero router bias: its key has to arrive too, or the routing (and so the logits) changes."""
    for layer in model.model.layers[TINY_TEXT_KWARGS["first_k_dense_replace"] :]:
        layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model


def _save_ours(directory: Path, **config_kwargs) -> DeepseekV3MultimodalForConditionalGeneration:
    config = DeepseekV3MultimodalConfig(**{**TINY_TEXT_KWARGS, **config_kwargs})
    model = _with_router_bias(DeepseekV3MultimodalForConditionalGeneration(config))
    model.save_pretrained(directory)
    return model


@pytest.fixture
def upstream_source(request, tmp_path) -> tuple[Path, torch.Tensor]:
    """transformers' DeepseekV3ForCausalLM (eager attention, a tokenizer) saved to disk, and its logits on INPUT_IDS;
    in shards of `request.param` (e.g. `"40KB"`) when parametrized."""
    config = DeepseekV3Config(**TINY_TEXT_KWARGS, attn_implementation="eager")
    model = _with_router_bias(DeepseekV3ForCausalLM(config))
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    source_dir = tmp_path / "upstream"
    max_shard_size = getattr(request, "param", None)
    model.save_pretrained(source_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    _save_word_level_tokenizer(source_dir)
    return source_dir, _logits(model)


@pytest.fixture
def our_source(tmp_path) -> tuple[Path, torch.Tensor]:
    """Our model with every refused feature off (the dropped fields set, inert) and our processor, saved to disk, and
    its logits on INPUT_IDS with eager attention."""
    tokenizer = load_default_tokenizer()
    image_token_id, audio_token_id = tokenizer.convert_tokens_to_ids(["<image>", "<audio>"])
    special_ids = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    source_dir = tmp_path / "ours"
    model = _save_ours(
        source_dir,
        **DROPPED_SETTINGS,
        **special_ids,
        vocab_size=len(tokenizer),
        image_token_id=image_token_id,
        audio_token_id=audio_token_id,
    )
    DeepseekV3MultimodalProcessor.from_config(model.config, tokenizer).save_pretrained(source_dir)
    model.set_attn_implementation("eager")
    return source_dir, _logits(model)


def _assert_plain_upstream_checkpoint(dst_dir: Path, source_dir: Path) -> dict:
    """No code, no auto_map, no processor: a `deepseek_v3` config and the source's weight files, byte for byte."""
    files = {path.name for path in dst_dir.iterdir()}
    assert not {name for name in files if name.endswith(".py")}, files
    assert not {"processor_config.json", "preprocessor_config.json"} & files
    weights = _weight_files(source_dir)
    assert weights and _weight_files(dst_dir) == weights
    assert all(filecmp.cmp(source_dir / name, dst_dir / name, shallow=False) for name in weights)
    config = json.loads((dst_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "auto_map" not in config
    assert not (set(REFUSED_FIELDS) | set(DROPPED_FIELDS)) & set(config)
    tokenizer_config = json.loads((dst_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" not in tokenizer_config and "processor_class" not in tokenizer_config
    card = ModelCard.load(dst_dir / "README.md")
    assert card.data.pipeline_tag == "text-generation" and "vllm serve" in card.text
    return config


def _named_fields(error: pytest.ExceptionInfo) -> set[str]:
    return set(re.findall(r"(\w+)=", str(error.value)))


def test_every_field_our_config_adds_is_refused_or_dropped():
    upstream_fields = {field.name for field in dataclasses.fields(DeepseekV3Config)}
    added = {field.name for field in dataclasses.fields(DeepseekV3MultimodalConfig)} - upstream_fields
    assert not set(REFUSED_FIELDS) & set(DROPPED_FIELDS)
    assert set(REFUSED_FIELDS) | set(DROPPED_FIELDS) == added | {"quantization_config"}


@pytest.mark.parametrize("upstream_source", ["40KB", None], ids=["sharded", "single-file"], indirect=True)
def test_upstream_round_trip_through_convert_and_export_keeps_logits_bit_for_bit(upstream_source, tmp_path):
    source_dir, expected_logits = upstream_source
    converted = convert_checkpoint(source_dir, tmp_path / "converted")
    dst_dir = tmp_path / "nested" / "exported"
    assert export_checkpoint(converted, dst_dir) == dst_dir
    config = _assert_plain_upstream_checkpoint(dst_dir, source_dir)
    # the source's own config.json and generation_config.json come back
    assert config == json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    for name in ("generation_config.json", "tokenizer.json"):
        assert json.loads((dst_dir / name).read_text(encoding="utf-8")) == json.loads(
            (source_dir / name).read_text(encoding="utf-8")
        ), name
    for name in _weight_files(source_dir):  # hard links all the way, on one file system
        assert (dst_dir / name).stat().st_ino == (source_dir / name).stat().st_ino, name
    assert [path.name for path in dst_dir.parent.iterdir()] == ["exported"]  # the staging directory was renamed

    logits, info = _load_without_deepseekv3(dst_dir, tmp_path)
    assert info["class"] == UPSTREAM_CLASS and not info["deepseekv3_modules"], info
    assert info["token_ids"] == [5, 9, 17]
    assert torch.equal(logits, expected_logits)


def test_our_model_with_the_features_off_exports_with_identical_logits(our_source, tmp_path):
    source_dir, expected_logits = our_source
    dst_dir = export_checkpoint(source_dir, tmp_path / "exported")
    config = _assert_plain_upstream_checkpoint(dst_dir, source_dir)
    assert not {"image_token_id", "audio_token_id", "router_bias_update_rate"} & set(config)
    generation_config = json.loads((dst_dir / "generation_config.json").read_text(encoding="utf-8"))
    assert generation_config == json.loads((source_dir / "generation_config.json").read_text(encoding="utf-8"))
    assert (dst_dir / "chat_template.jinja").read_bytes() == (source_dir / "chat_template.jinja").read_bytes()

    logits, info = _load_without_deepseekv3(dst_dir, tmp_path)
    assert info["class"] == UPSTREAM_CLASS and not info["deepseekv3_modules"], info
    assert torch.equal(logits, expected_logits)


@pytest.mark.parametrize(
    "settings",
    [
        {"use_attention_gate": True},
        {"attention_gate_skip_threshold": 0.5},
        {"use_attention_gate": True, "attention_gate_skip_threshold": 0.5, "attention_gate_sparsity_weight": 0.1},
        TINY_MEDIA_KWARGS,
        {"use_image_input": True, "image_token_id": 3, "use_image_position_values": True},
        {"use_bidirectional_media_attention": True},
        {"attention_block_size": 4, "attention_num_sink_tokens": 1},
    ],
    ids=["gate", "head-skip-threshold", "gate-with-skipping", "media", "position-values", "bidirectional", "blocks"],
)
def test_export_refuses_each_feature_upstream_lacks(tmp_path, settings):
    _save_ours(tmp_path / "ours", **settings)
    with pytest.raises(ValueError, match="cannot be exported to 'deepseek_v3'") as error:
        export_checkpoint(tmp_path / "ours", tmp_path / "out")
    assert _named_fields(error) == set(settings) & set(REFUSED_FIELDS)
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_int8_checkpoint(tmp_path):
    pytest.importorskip("torchao")
    from deepseekv3.quantization import load_int8_model

    _save_ours(tmp_path / "fp32")
    load_int8_model(tmp_path / "fp32").save_pretrained(tmp_path / "int8")
    with pytest.raises(ValueError, match=r"quantization_config=quant_method 'torchao'"):
        export_checkpoint(tmp_path / "int8", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "extra_keys"),
    [
        ({"use_attention_gate": True}, r"self_attn\.head_gate\."),
        (TINY_MEDIA_KWARGS, r"model\.audio_frame_embedding\."),
    ],
    ids=["gate-weights", "media-weights"],
)
def test_export_refuses_weights_upstream_lacks_under_a_config_that_says_off(tmp_path, settings, extra_keys):
    _save_ours(tmp_path / "ours", **settings)
    config_file = tmp_path / "ours" / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    defaults = DeepseekV3MultimodalConfig()
    config.update({name: getattr(defaults, name) for name in settings})
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"not used by the exported model: [^;]*{extra_keys}"):
        export_checkpoint(tmp_path / "ours", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_destination(our_source, tmp_path):
    source_dir, _ = our_source
    dst_dir = tmp_path / "taken"
    dst_dir.mkdir()
    (dst_dir / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_checkpoint(source_dir, dst_dir)
    assert [path.name for path in dst_dir.iterdir()] == ["keep.txt"]


def test_export_refuses_an_upstream_checkpoint(upstream_source, tmp_path):
    source_dir, _ = upstream_source
    with pytest.raises(ValueError, match="model_type 'deepseek_v3'; export expects a 'deepseekv3_multimodal'"):
        export_checkpoint(source_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_unknown_target(our_source, tmp_path):
    source_dir, _ = our_source
    with pytest.raises(ValueError, match="cannot export to 'llama': the targets are deepseek_v3"):
        export_checkpoint(source_dir, tmp_path / "out", to="llama")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "missing", tmp_path / "out")


def test_failed_write_leaves_no_destination(our_source, tmp_path, monkeypatch):
    source_dir, _ = our_source

    def fail(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    # Neither a link nor a copy can be made: the weights fail after the staging directory exists.
    monkeypatch.setattr(os, "link", fail)
    monkeypatch.setattr("shutil.copy2", fail)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(source_dir, tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ours"]


def test_console_script_exports(our_source, tmp_path):
    source_dir, expected_logits = our_source
    dst_dir = tmp_path / "exported"
    result = _run_console_script("export", "--to", "deepseek_v3", str(source_dir), str(dst_dir), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"exported {source_dir} -> {dst_dir}" in result.stdout
    _assert_plain_upstream_checkpoint(dst_dir, source_dir)
    logits, _ = _load_without_deepseekv3(dst_dir, tmp_path)
    assert torch.equal(logits, expected_logits)


def test_console_script_reports_a_refusal_without_traceback(tmp_path):
    _save_ours(tmp_path / "ours", use_attention_gate=True)
    result = _run_console_script("export", str(tmp_path / "ours"), str(tmp_path / "out"), tmp_path=tmp_path)
    assert result.returncode != 0
    assert "deepseekv3 export: error:" in result.stderr and "use_attention_gate=True" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
