"""PEFT LoRA defaults for the model: which modules and expert weights a `LoraConfig` adapts when none are named.

`register_lora_target_modules` adds our `model_type` to the table PEFT consults when `target_modules` is None
(`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`), so `get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))`
adapts the MLA projections, the dense MLPs and the shared experts; `import deepseekv3` calls it when peft is
installed. That table holds module names only, so the routed experts (3-D `nn.Parameter`s, not modules) come through
`LoraConfig.target_parameters`, which `default_lora_config` sets. Left frozen on purpose: the MoE router (fp32,
load balancing depends on it), the attention head gates (a few hundred weights per layer, in fp32, deciding which
heads are skipped; train them fully with `modules_to_save=["head_gate"]` if a task needs it), every norm, the token,
patch, frame and modality-type embeddings, the projection heads and `lm_head`.

Head skipping (`attention_gate_skip_threshold > 0`, eval mode) slices the weights of `q_b_proj`, `kv_b_proj` and
`o_proj`; while those are unmerged LoRA layers the model computes every head instead, so merge the adapter
(`merge_and_unload()`) to get the savings of head skipping at inference.
"""

try:
    from peft import LoraConfig, PeftModel
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
except ImportError as error:
    raise ImportError("deepseekv3.training.lora needs peft: pip install 'deepseekv3[train]'") from error

from ..configuration_deepseekv3 import DeepseekV3MultimodalConfig

__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "DEFAULT_LORA_TARGET_PARAMETERS",
    "MEDIA_FRONT_END_LORA_TARGET_MODULES",
    "default_lora_config",
    "register_lora_target_modules",
    "trainable_fraction",
]

# Suffixes of module names (PEFT matches `name == target or name.endswith("." + target)`). The MLP names carry their
# parent because `self_attn.head_gate.{down_proj,up_proj}` would match a bare `down_proj`/`up_proj`; `mlp.gate`
# (the router) matches none of them. `q_proj` exists only when `q_lora_rank` is None, `q_a_proj`/`q_b_proj` otherwise.
DEFAULT_LORA_TARGET_MODULES = (
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "shared_experts.gate_proj",
    "shared_experts.up_proj",
    "shared_experts.down_proj",
)

# The routed experts' stacked weights, `(n_routed_experts, out_features, in_features)`: PEFT's `ParamWrapper` gives
# each expert its own rank-r pair and adds `B @ A` to the weight for the duration of the experts' forward, so every
# experts kernel (`eager`, `grouped_mm`, ...) reads the adapted weight.
DEFAULT_LORA_TARGET_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

# The media front end: the image stem's convolutions, the patch embedding and the audio frame embedding (PEFT's
# Conv2d / Conv1d LoRA layers). Off by default; a task whose pictures or sounds the base model's front end does not
# resolve needs them (benchmarks/bench_own_data.py measures both on letters from unseen fonts).
MEDIA_FRONT_END_LORA_TARGET_MODULES = (
    "image_stem.0",
    "image_stem.2",
    "image_patch_embedding",
    "audio_frame_embedding",
)


def register_lora_target_modules() -> None:
    """Make `DEFAULT_LORA_TARGET_MODULES` PEFT's LoRA default for `model_type="deepseekv3_multimodal"`.

    Idempotent. `import deepseekv3` calls it when peft is installed; a model loaded with `trust_remote_code=True`
    where this package is not installed has no default, and `LoraConfig` needs `target_modules` there.
    """
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[DeepseekV3MultimodalConfig.model_type] = list(
        DEFAULT_LORA_TARGET_MODULES
    )


def default_lora_config(
    include_routed_experts: bool = True, include_media_front_end: bool = False, **overrides
) -> LoraConfig:
    """A causal-LM `LoraConfig` on the default targets, routed experts included unless told otherwise.

    Args:
        include_routed_experts (`bool`, *optional*, defaults to `True`): also adapt every routed expert's
            `gate_up_proj` and `down_proj` through `target_parameters`. PEFT's parameter wrapper supports neither
            `lora_dropout`, DoRA, `lora_bias` nor mixed-adapter batches.
        include_media_front_end (`bool`, *optional*, defaults to `False`): also adapt the convolutions that turn
            pixels and log-mel frames into tokens (`MEDIA_FRONT_END_LORA_TARGET_MODULES`), for pictures or sounds
            unlike the base model's.
        overrides: any `LoraConfig` argument (`r`, `lora_alpha`, `target_modules`, `modules_to_save`, ...); each
            replaces the default.

    Returns:
        `LoraConfig` with `task_type="CAUSAL_LM"`, `r=8`, `lora_alpha=16`, `target_modules=DEFAULT_LORA_TARGET_MODULES`
        (plus the front end's when asked) and, with routed experts, `target_parameters=DEFAULT_LORA_TARGET_PARAMETERS`.
    """
    lora_dropout = overrides.get("lora_dropout", 0.0)
    if include_routed_experts and lora_dropout:
        raise ValueError(
            f"lora_dropout ({lora_dropout}) must be 0 when the routed experts are adapted: PEFT adds their LoRA "
            "update to the stacked weights, where no dropout can act on the inputs; pass include_routed_experts=False "
            "to use dropout on the other targets"
        )
    targets = list(DEFAULT_LORA_TARGET_MODULES)
    if include_media_front_end:
        targets += MEDIA_FRONT_END_LORA_TARGET_MODULES
    # PEFT's own default is lora_alpha = r (scale 1); the demo, the CLI and bench_lora use 2r
    arguments = {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": targets}
    if include_routed_experts:
        arguments["target_parameters"] = list(DEFAULT_LORA_TARGET_PARAMETERS)
    return LoraConfig(**{**arguments, **overrides})


def trainable_fraction(model: PeftModel) -> float:
    """Trainable parameters over all parameters (adapters included), as PEFT's `print_trainable_parameters` counts.

    Args:
        model (`PeftModel`): the wrapped model; works on the meta device (it counts shapes only).

    Returns:
        `float` in `[0, 1]`.
    """
    trainable, total = model.get_nb_trainable_parameters()
    return trainable / total
