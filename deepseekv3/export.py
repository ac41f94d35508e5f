"""Export a `deepseekv3_multimodal` checkpoint with the new features off as a plain transformers `deepseek_v3` one.

The reverse of `deepseekv3.convert`. With every feature that adds parameters or changes the forward off, the model is
transformers' `DeepseekV3ForCausalLM` with the same state-dict keys, and the export is a `DeepseekV3Config` (model_type
`deepseek_v3`, no `auto_map`, no code files) next to the source's safetensors files, hard-linked or copied unchanged.
That is the format vLLM and SGLang serve natively (MLA, expert, tensor and pipeline parallelism). A field upstream
cannot represent is refused by name (`REFUSED_FIELDS`); the others our configuration adds only configure training or
modules that are not built, and are left out (`DROPPED_FIELDS`). As in convert, no tensor is read: the safetensors
headers are checked against a meta-device `DeepseekV3ForCausalLM`.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GenerationConfig
from transformers.utils import CONFIG_NAME, GENERATION_CONFIG_NAME

from .configuration_deepseekv3 import _NON_ARCHITECTURE_KEYS, DeepseekV3MultimodalConfig
from .convert import (
    _TOKENIZER_FILES,
    _check_destination,
    _link_or_copy,
    _model_type_of,
    _source_weight_files,
    _staging_directory,
    _stored_shapes,
    _weight_mismatches,
)
from .model_card import build_model_card

__all__ = ["DROPPED_FIELDS", "EXPORT_TARGETS", "REFUSED_FIELDS", "export_checkpoint"]

EXPORT_TARGETS = (DeepseekV3Config.model_type,)

# What upstream cannot represent: export refuses a checkpoint where any of these differs from its default (off).
REFUSED_FIELDS = {
    "use_attention_gate": "the per-head attention gate: head_gate weights upstream lacks, scaling each head's output",
    "attention_gate_skip_threshold": "head skipping: heads whose gate stays below it are not computed",
    "use_image_input": "the image front end: patch-embedding weights upstream lacks",
    "use_audio_input": "the audio front end: frame-embedding weights upstream lacks",
    "use_image_position_values": "image patch positions written into the attention values",
    "use_bidirectional_media_attention": "media spans attending both ways, where upstream attends causally",
    "num_modality_types": "the modality-type embedding, added to every position's embedding (text too)",
    "contrastive_projection_dim": "the contrastive projection heads and logit_scale, weights upstream lacks",
    "attention_block_size": "blockwise local attention, a mask upstream does not apply",
    "attention_num_sink_tokens": "the sink tokens of blockwise local attention",
    "quantization_config": "quantized weights (deepseekv3.quantization's torchao int8), which are not upstream's "
    "tensors and whose int8 experts need this package's kernel; export the unquantized model",
}
# Not written: with the refused fields off these only configure training or modules that are not built, so the
# exported model computes the same logits without them.
DROPPED_FIELDS = {
    "attention_gate_ratio": "the width of the gate, which is not built",
    "attention_gate_sparsity_weight": "a training loss on the gate (needs the gate)",
    "router_bias_update_rate": "the training-time update of the router bias (the bias itself is a weight, exported)",
    "sequence_balance_loss_weight": "a training loss",
    "attention_distillation_weight": "a training loss",
    "image_size": "the image front end, which is not built",
    "patch_size": "the image front end, which is not built",
    "num_channels": "the image front end, which is not built",
    "image_conv_stem_channels": "the image front end, which is not built",
    "image_token_id": "the image front end, which is not built",
    "num_mel_bins": "the audio front end, which is not built",
    "audio_conv_stride": "the audio front end, which is not built",
    "audio_max_frames": "the audio front end, which is not built",
    "audio_token_id": "the audio front end, which is not built",
    "contrastive_temperature_init": "the initial logit_scale of the projection heads, which are not built",
}
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(DeepseekV3MultimodalConfig)}
# Derived by DeepseekV3Config from the head sizes: a value passed in would be set on top of the derived one.
_DERIVED_KEYS = ("head_dim", "qk_head_dim")
# Keys of a processor's tokenizer_config.json that point at this package's processor code.
_PROCESSOR_KEYS = ("auto_map", "processor_class")


def _read_our_config(src_dir: Path) -> DeepseekV3MultimodalConfig:
    model_type = _model_type_of(src_dir)
    if model_type != DeepseekV3MultimodalConfig.model_type:
        raise ValueError(
            f"{src_dir / CONFIG_NAME} has model_type {model_type!r}; export expects a "
            f"{DeepseekV3MultimodalConfig.model_type!r} checkpoint"
        )
    return DeepseekV3MultimodalConfig.from_pretrained(src_dir)


def _refused_settings(config: DeepseekV3MultimodalConfig) -> list[str]:
    """Each field of `REFUSED_FIELDS` that `config` switches on, with its value and why upstream cannot take it."""
    refused = []
    for name, reason in REFUSED_FIELDS.items():
        value = getattr(config, name, None)
        if value != _DEFAULTS.get(name):
            shown = f"quant_method {value.get('quant_method')!r}" if name == "quantization_config" else repr(value)
            refused.append(f"{name}={shown} ({reason})")
    return refused


def _upstream_config(config: DeepseekV3MultimodalConfig) -> DeepseekV3Config:
    """The text fields of `config` as transformers' `DeepseekV3Config`: what `from_text_config` reads, reversed."""
    left_out = {*_NON_ARCHITECTURE_KEYS, *_DERIVED_KEYS, *REFUSED_FIELDS, *DROPPED_FIELDS}
    return DeepseekV3Config(**{key: value for key, value in config.to_dict().items() if key not in left_out})


def _copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> None:
    """The tokenizer files, unchanged but for `tokenizer_config.json`'s pointers at this package's processor."""
    for name in _TOKENIZER_FILES:
        if not (src_dir / name).is_file():
            continue
        if name == "tokenizer_config.json":
            settings = json.loads((src_dir / name).read_text(encoding="utf-8"))
            settings = {key: value for key, value in settings.items() if key not in _PROCESSOR_KEYS}
            (dst_dir / name).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            shutil.copy2(src_dir / name, dst_dir / name)


def export_checkpoint(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, to: str = "deepseek_v3") -> Path:
    """Export a `deepseekv3_multimodal` checkpoint with the new features off as a transformers `deepseek_v3` one.

    The result loads with `AutoModelForCausalLM.from_pretrained(dst_dir)` as transformers' `DeepseekV3ForCausalLM`,
    without `trust_remote_code` or this package, and computes the same logits; vLLM and SGLang serve it natively. The
    safetensors files are hard-linked into `dst_dir` (copied across file systems) byte for byte, as in
    `convert_checkpoint`; the generation config and the tokenizer files come along (`tokenizer_config.json` without
    the `auto_map` and `processor_class` of this package's processor; the media processor's files stay behind). The
    destination is written into a temporary directory next to it and renamed at the end.

    Args:
        src_dir (`str` or `os.PathLike`):
            A directory written by [`DeepseekV3MultimodalForConditionalGeneration.save_pretrained`] (model_type
            `deepseekv3_multimodal`, safetensors weights).
        dst_dir (`str` or `os.PathLike`):
            Where to write the exported checkpoint. Must not exist, or be an empty directory.
        to (`str`, *optional*, defaults to `"deepseek_v3"`):
            The target format; `EXPORT_TARGETS` lists those there are.

    Returns:
        `Path`: `dst_dir`.

    Raises:
        `FileNotFoundError`: `src_dir` is missing, or has no `config.json`, no safetensors weights, or not every
            shard its index names.
        `ValueError`: `to` is not a target, the source is not a `deepseekv3_multimodal` checkpoint, it switches on a
            field of `REFUSED_FIELDS` (each one is named), or its stored tensors are not exactly those of
            `DeepseekV3ForCausalLM` (missing, unexpected or different-shape keys).
        `FileExistsError`: `dst_dir` exists and is not empty.
    """
    if to not in EXPORT_TARGETS:
        raise ValueError(f"cannot export to {to!r}: the targets are {', '.join(EXPORT_TARGETS)}")
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    config = _read_our_config(src_dir)
    refused = _refused_settings(config)
    if refused:
        raise ValueError(
            f"{src_dir} cannot be exported to {to!r}, which has no equivalent of: {'; '.join(refused)}. Set each "
            "to its default (off) first, where the model was trained without it"
        )
    _check_destination(dst_dir)
    weight_files = _source_weight_files(src_dir)
    # runs under the meta device: shapes only, no memory, whatever the checkpoint's size
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM._from_config(_upstream_config(config))
    mismatches = _weight_mismatches(model, _stored_shapes(weight_files), "exported")
    if mismatches:
        raise ValueError(
            f"the weights in {src_dir} are not exactly those of transformers' DeepseekV3ForCausalLM, whose files "
            f"export passes on unchanged: {mismatches}"
        )
    if (src_dir / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(src_dir)

    with _staging_directory(dst_dir) as staging_dir:
        # An empty state dict: config.json (architectures, dtype; a transformers class, so no auto_map) and
        # generation_config.json, no weights. It runs first, as it deletes shard-named files it did not write.
        model.save_pretrained(staging_dir, state_dict={})
        for path in weight_files:
            _link_or_copy(path, staging_dir / path.name)
        _copy_tokenizer_files(src_dir, staging_dir)
        build_model_card(
            config,
            model_name=dst_dir.resolve().name,
            description=(
                f"The `deepseekv3_multimodal` checkpoint in `{src_dir}`, exported by `deepseekv3 export` as a plain "
                "transformers DeepSeek-V3 checkpoint (`deepseek_v3`): its safetensors files unchanged, under a "
                "`DeepseekV3Config`.\n\n"
                "Load it with `AutoModelForCausalLM.from_pretrained(path)` (transformers' `DeepseekV3ForCausalLM`, no "
                "`trust_remote_code`), or serve it with `vllm serve path` or "
                "`python -m sglang.launch_server --model-path path`."
            ),
        ).save(staging_dir / "README.md")
    return dst_dir
