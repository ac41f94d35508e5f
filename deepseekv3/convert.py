"""Convert a transformers DeepSeek-V3 checkpoint into a `deepseekv3_multimodal` one.

The text path of [`DeepseekV3MultimodalForConditionalGeneration`] has the same state-dict keys as transformers'
`DeepseekV3ForCausalLM` (both store the routed experts one per expert on disk), so a conversion is a new configuration
(every new feature off) next to the source's safetensors files, hard-linked or copied unchanged. No tensor is read:
the check that the files fit the converted model compares their headers with a meta-device model, so memory stays
flat whatever the checkpoint's size. `config.json` (with `auto_map`), `generation_config.json` and the code files that
let the result load with `trust_remote_code=True` anywhere are written by the model's own `save_pretrained`; the model
card (`README.md`) names the source, as `base_model` where that is a Hub id.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import DeepseekV3Config, GenerationConfig, PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .configuration_deepseekv3 import DeepseekV3MultimodalConfig
from .model_card import build_model_card
from .modeling_deepseekv3 import DeepseekV3MultimodalForConditionalGeneration

__all__ = ["convert_checkpoint"]

_SOURCE_MODEL_TYPE = DeepseekV3Config.model_type
# Tokenizer files travel unchanged: the vocabulary is the source model's.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _model_type_of(src_dir: Path) -> str | None:
    """The `model_type` in the source's `config.json`, once the directory and the file are known to exist."""
    if not src_dir.is_dir():
        raise FileNotFoundError(f"source checkpoint directory {src_dir} does not exist or is not a directory")
    config_file = src_dir / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{src_dir} has no {CONFIG_NAME}: it is not a transformers checkpoint directory")
    return json.loads(config_file.read_text(encoding="utf-8")).get("model_type")


def _read_source_config(src_dir: Path) -> DeepseekV3Config:
    model_type = _model_type_of(src_dir)
    if model_type != _SOURCE_MODEL_TYPE:
        raise ValueError(
            f"{src_dir / CONFIG_NAME} has model_type {model_type!r}; convert expects a transformers DeepSeek-V3 "
            f"checkpoint (model_type {_SOURCE_MODEL_TYPE!r})"
        )
    return DeepseekV3Config.from_pretrained(src_dir)


def _check_destination(dst_dir: Path) -> None:
    if dst_dir.exists() and (not dst_dir.is_dir() or any(dst_dir.iterdir())):
        raise FileExistsError(f"destination {dst_dir} already exists and is not an empty directory")


def _source_weight_files(src_dir: Path) -> list[Path]:
    """The files that hold the source's weights: the index and the shards it names, or one `model.safetensors`."""
    index_file = src_dir / SAFE_WEIGHTS_INDEX_NAME
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shards = [src_dir / name for name in sorted(set(weight_map.values()))]
        absent = [shard.name for shard in shards if not shard.is_file()]
        if absent:
            raise FileNotFoundError(f"{index_file} names shard(s) that do not exist: {', '.join(absent)}")
        return [index_file, *shards]
    if (src_dir / SAFE_WEIGHTS_NAME).is_file():
        return [src_dir / SAFE_WEIGHTS_NAME]
    raise FileNotFoundError(
        f"{src_dir} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}: only safetensors weights are "
        "taken (pickled .bin files are never unpickled)"
    )


def _stored_shapes(weight_files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor in the safetensors files, read from their headers (no tensor data is read)."""
    shapes = {}
    for path in weight_files:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as file:
                shapes.update({key: tuple(file.get_slice(key).get_shape()) for key in file.keys()})
    return shapes


def _expected_shapes(model: PreTrainedModel) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor `model.save_pretrained` writes: experts one per expert, tied weights once."""
    state_dict = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return {key: tuple(tensor.shape) for key, tensor in revert_weight_conversion(model, state_dict).items()}


def _without(keys: set[str], patterns: Iterable[str] | None) -> list[str]:
    """The `keys` that no regular expression of `patterns` matches (`re.search`), sorted."""
    return sorted(key for key in keys if not any(re.search(pattern, key) for pattern in patterns or ()))


def _weight_mismatches(model: PreTrainedModel, stored: dict[str, tuple[int, ...]], written: str) -> str | None:
    """How the stored tensors differ from those `model` loads (`written`: "converted", "exported"); `None` if they
    do not."""
    expected = _expected_shapes(model)
    # from_pretrained's exceptions, e.g. DeepSeek-V3's multi-token-prediction layer 61 is skipped without a word
    problems = {
        "missing from the source": _without(expected.keys() - stored.keys(), model._keys_to_ignore_on_load_missing),
        f"not used by the {written} model": _without(
            stored.keys() - expected.keys(), model._keys_to_ignore_on_load_unexpected
        ),
        "with a different shape": [
            f"{key} {list(stored[key])} in the source, {list(expected[key])} {written}"
            for key in sorted(expected.keys() & stored.keys())
            if stored[key] != expected[key]
        ],
    }
    problems = {what: keys for what, keys in problems.items() if keys}
    if not problems:
        return None
    return "; ".join(f"{len(keys)} key(s) {what}: {', '.join(keys[:5])}" for what, keys in problems.items())


def _check_weights_match(
    model: DeepseekV3MultimodalForConditionalGeneration,
    stored: dict[str, tuple[int, ...]],
    src_dir: Path,
    changed_fields: dict[str, Any],
) -> None:
    details = _weight_mismatches(model, stored, "converted")
    if details is None:
        return
    message = f"the weights in {src_dir} do not match the converted model exactly: {details}"
    if changed_fields:
        fields = ", ".join(f"{name}={value!r}" for name, value in changed_fields.items())
        message += (
            f". Overrides given: {fields}; one that adds or reshapes parameters has no weights in the source: "
            "convert without it and pass it to from_pretrained instead, which initialises the new modules and lists "
            "their keys as missing"
        )
    raise ValueError(message)


def _hub_id_of(src_dir: Path) -> str | None:
    """The Hub id of a checkpoint in the Hugging Face cache (`.../models--{owner}--{name}/snapshots/{revision}`)."""
    snapshot = src_dir.resolve()
    # the cache spells "/" as "--", which a Hub id cannot contain
    if snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith("models--"):
        return snapshot.parent.parent.name.removeprefix("models--").replace("--", "/")
    return None


def _converted_model_card(
    config: DeepseekV3MultimodalConfig,
    src_dir: Path,
    dst_dir: Path,
    base_model: str | None,
    changed_fields: dict[str, Any],
) -> ModelCard:
    """The converted checkpoint's card: its source (`base_model` where that is a Hub id) and how to load it."""
    source = f"`{base_model}`" if base_model else f"The checkpoint in `{src_dir}`"
    if changed_fields:
        settings = "with " + ", ".join(f"`{name}={value!r}`" for name, value in changed_fields.items())
    else:
        settings = "with every new feature off, so it computes what transformers' `DeepseekV3ForCausalLM` computes"
    return build_model_card(
        config,
        model_name=dst_dir.resolve().name,
        description=(
            f"{source}, a transformers DeepSeek-V3 checkpoint, converted by `deepseekv3 convert` into "
            f"`deepseekv3_multimodal`: its safetensors files unchanged, under a `DeepseekV3MultimodalConfig` built "
            f"from its text configuration {settings}.\n\n"
            "Load it with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. A feature with "
            "parameters of its own is switched on by passing its field to `from_pretrained` (for example "
            "`use_attention_gate=True`), which initialises the new modules."
        ),
        base_model=base_model,
    )


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another file system (EXDEV), or one without hard links
        shutil.copy2(source, destination)


@contextmanager
def _staging_directory(dst_dir: Path) -> Iterator[Path]:
    """A temporary directory next to `dst_dir` to write the checkpoint into: renamed to `dst_dir` when the block
    ends, removed (with all it holds) when the block raises, so an interrupted write never leaves a half-written
    `dst_dir`."""
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{dst_dir.name}.", suffix=".partial", dir=dst_dir.parent))
    try:
        staging_dir.chmod(0o755)  # mkdtemp creates 0700; the checkpoint is meant to be shared
        yield staging_dir
        # rename(2) is atomic on one file system and replaces an empty directory.
        os.replace(staging_dir, dst_dir)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise


def convert_checkpoint(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *, base_model: str | None = None, **config_overrides: Any
) -> Path:
    """Convert a transformers `DeepseekV3ForCausalLM` checkpoint directory into a `deepseekv3_multimodal` one.

    The safetensors files (shards and `model.safetensors.index.json`, or one `model.safetensors`) are hard-linked
    into `dst_dir`, or copied where `src_dir` is on another file system, byte for byte: the shard layout is the
    source's, and no tensor is loaded. A hard link shares its data with the source, so a program that rewrites a
    shard of `dst_dir` in place (rather than replacing the file) rewrites the source's too.

    The destination is written into a temporary directory next to it and renamed at the end, so an interrupted
    conversion never leaves a half-written `dst_dir`.

    Args:
        src_dir (`str` or `os.PathLike`):
            A directory written by `DeepseekV3ForCausalLM.save_pretrained` (`config.json` with model_type
            `deepseek_v3` and safetensors weights).
        dst_dir (`str` or `os.PathLike`):
            Where to write the converted checkpoint. Must not exist, or be an empty directory.
        base_model (`str`, *optional*):
            The source's Hub id, written as `base_model` in the model card (`README.md`). Defaults to the id in the
            path of a Hugging Face cache snapshot (`.../models--deepseek-ai--DeepSeek-V3/snapshots/...`); for another
            directory the card names its path in the text only, as `base_model` must be a Hub id.
        **config_overrides:
            Fields of [`DeepseekV3MultimodalConfig`] set on top of the source text configuration. One that adds or
            reshapes parameters (e.g. `use_attention_gate=True`) has no weights in the source and is refused; pass it
            to `from_pretrained` on the converted checkpoint instead, which initialises the new modules.

    Returns:
        `Path`: `dst_dir`.

    Raises:
        `FileNotFoundError`: `src_dir` is missing, or has no `config.json`, no safetensors weights, or not every
            shard its index names.
        `ValueError`: the source is not a DeepSeek-V3 checkpoint, an override is not a config field, or the stored
            tensors do not match the converted model exactly (missing, unexpected or different-shape keys).
        `FileExistsError`: `dst_dir` exists and is not empty.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    text_config = _read_source_config(src_dir)
    _check_destination(dst_dir)
    weight_files = _source_weight_files(src_dir)
    plain_config = DeepseekV3MultimodalConfig.from_text_config(text_config)
    # PretrainedConfig keeps any keyword as an attribute: a misspelt field would be saved and do nothing.
    unknown = sorted(name for name in config_overrides if not hasattr(plain_config, name))
    if unknown:
        raise ValueError(f"config_overrides {unknown} are not fields of DeepseekV3MultimodalConfig")
    config = DeepseekV3MultimodalConfig.from_text_config(text_config, **config_overrides)
    # runs under the meta device: shapes only, no memory, whatever the checkpoint's size
    with torch.device("meta"):
        model = DeepseekV3MultimodalForConditionalGeneration._from_config(config)
    changed_fields = {name: value for name, value in config_overrides.items() if getattr(plain_config, name) != value}
    _check_weights_match(model, _stored_shapes(weight_files), src_dir, changed_fields)
    if (src_dir / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(src_dir)

    with _staging_directory(dst_dir) as staging_dir:
        # An empty state dict: save_pretrained writes config.json (architectures, dtype, auto_map),
        # generation_config.json and the code files, and no weights. It runs before the weights arrive, as it
        # deletes shard-named files it did not write itself.
        model.save_pretrained(staging_dir, state_dict={})
        for path in weight_files:
            _link_or_copy(path, staging_dir / path.name)
        # copies, not links: small files a user may edit in place (the chat template)
        for name in _TOKENIZER_FILES:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, staging_dir / name)
        _converted_model_card(config, src_dir, dst_dir, base_model or _hub_id_of(src_dir), changed_fields).save(
            staging_dir / "README.md"
        )
    return dst_dir
