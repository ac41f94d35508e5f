"""Convert a transformers DeepSeek-V3 checkpoint into a `deepseekv3_multimodal` one.

The text path of [`DeepseekV3MultimodalForConditionalGeneration`] has the same state-dict keys as transformers'
`DeepseekV3ForCausalLM`, so a conversion is a new configuration (every new feature off) plus the same tensors. The
weights are loaded and written by transformers itself (`from_pretrained` / `save_pretrained`): sharded safetensors,
no pickle, with `auto_map` and the code files that let the result load with `trust_remote_code=True` anywhere.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import DeepseekV3Config

from .configuration_deepseekv3 import DeepseekV3MultimodalConfig
from .modeling_deepseekv3 import DeepseekV3MultimodalForConditionalGeneration

__all__ = ["convert_checkpoint"]

_SOURCE_MODEL_TYPE = DeepseekV3Config.model_type
# Tokenizer files travel unchanged: the vocabulary is the source model's.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _read_source_config(src_dir: Path) -> DeepseekV3Config:
    if not src_dir.is_dir():
        raise FileNotFoundError(f"source checkpoint directory {src_dir} does not exist or is not a directory")
    config_file = src_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{src_dir} has no config.json: it is not a transformers checkpoint directory")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type != _SOURCE_MODEL_TYPE:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; convert expects a transformers DeepSeek-V3 checkpoint "
            f"(model_type {_SOURCE_MODEL_TYPE!r})"
        )
    return DeepseekV3Config.from_pretrained(src_dir)


def _check_destination(dst_dir: Path) -> None:
    if dst_dir.exists() and (not dst_dir.is_dir() or any(dst_dir.iterdir())):
        raise FileExistsError(f"destination {dst_dir} already exists and is not an empty directory")


def convert_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    **config_overrides: Any,
) -> Path:
    """Convert a transformers `DeepseekV3ForCausalLM` checkpoint directory into a `deepseekv3_multimodal` one.

    The destination is written into a temporary directory next to it and renamed at the end, so an interrupted
    conversion never leaves a half-written `dst_dir`.

    Args:
        src_dir (`str` or `os.PathLike`):
            A directory written by `DeepseekV3ForCausalLM.save_pretrained` (`config.json` with model_type
            `deepseek_v3` and safetensors weights).
        dst_dir (`str` or `os.PathLike`):
            Where to write the converted checkpoint. Must not exist, or be an empty directory.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`):
            Largest safetensors shard, in bytes or as a string such as `"500MB"`.
        **config_overrides:
            Fields of [`DeepseekV3MultimodalConfig`] set on top of the source text configuration. A field that adds
            parameters (e.g. `use_attention_gate=True`) has no weights in the source and makes the conversion fail.

    Returns:
        `Path`: `dst_dir`.

    Raises:
        `FileNotFoundError`: `src_dir` is missing or has no `config.json`.
        `ValueError`: the source is not a DeepSeek-V3 checkpoint, or its weights do not match the converted model
            exactly (missing, unexpected or mismatched keys).
        `FileExistsError`: `dst_dir` exists and is not empty.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    text_config = _read_source_config(src_dir)
    _check_destination(dst_dir)
    config = DeepseekV3MultimodalConfig.from_text_config(text_config, **config_overrides)

    # `use_safetensors=True`: a pickled (.bin) source is refused rather than unpickled.
    model, loading_info = DeepseekV3MultimodalForConditionalGeneration.from_pretrained(
        src_dir, config=config, dtype="auto", use_safetensors=True, output_loading_info=True
    )
    problems = {
        "missing from the source": sorted(loading_info["missing_keys"]),
        "not used by the converted model": sorted(loading_info["unexpected_keys"]),
        "with a different shape": sorted(str(key) for key in loading_info["mismatched_keys"]),
    }
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        details = "; ".join(f"{len(keys)} key(s) {what}: {', '.join(keys[:5])}" for what, keys in problems.items())
        raise ValueError(f"the weights in {src_dir} do not match the converted model exactly: {details}")

    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{dst_dir.name}.", suffix=".partial", dir=dst_dir.parent))
    try:
        staging_dir.chmod(0o755)  # mkdtemp creates 0700; the checkpoint is meant to be shared
        model.save_pretrained(staging_dir, max_shard_size=max_shard_size)
        for name in _TOKENIZER_FILES:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, staging_dir / name)
        # rename(2) is atomic on one file system and replaces an empty directory.
        os.replace(staging_dir, dst_dir)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    return dst_dir
