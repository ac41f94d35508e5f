"""Configuration of the DeepSeek-V3 multimodal model.

`DeepseekV3MultimodalConfig` extends transformers' `DeepseekV3Config`: every text field keeps its upstream name,
meaning and default, so the published DeepSeek-V3 `config.json` loads unchanged. The multimodal and gating fields
are added on top; each defaults to "off", which reproduces plain DeepSeek-V3 (no module, no parameter, no
state-dict key is created for a feature that is off).

This file is part of the hub-portable core: it imports only the standard library and transformers.
"""

import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.utils import logging

__all__ = ["DeepseekV3MultimodalConfig"]

logger = logging.get_logger(__name__)

TEXT_MODALITY_ID = 0
IMAGE_MODALITY_ID = 1
AUDIO_MODALITY_ID = 2

# Keys of a saved config that describe the file rather than the architecture; `from_text_config` drops them.
_NON_ARCHITECTURE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


@strict
class DeepseekV3MultimodalConfig(DeepseekV3Config):
    r"""
    Configuration of [`DeepseekV3MultimodalModel`] and [`DeepseekV3MultimodalForConditionalGeneration`].

    All text fields (`vocab_size`, `hidden_size`, `kv_lora_rank`, `n_routed_experts`, `rope_parameters`, ...) are
    those of [`~transformers.DeepseekV3Config`], with the same names, meanings and defaults. The fields below are
    added; each one's default switches its feature off.

    Args:
        use_attention_gate (`bool`, *optional*, defaults to `False`):
            Add a dynamic per-head gate to every attention layer. The gate is a bottleneck MLP
            (`kv_lora_rank -> hidden_size // attention_gate_ratio -> num_attention_heads`, SiLU, sigmoid) that reads
            the causal running mean of the layer's compressed KV latent (position `t` sees positions `<= t` only) and
            scales each head's attention output before `o_proj`.
        attention_gate_ratio (`int`, *optional*, defaults to 16):
            Bottleneck ratio of the gate MLP: its hidden width is `hidden_size // attention_gate_ratio`.
            Must be in `[1, hidden_size]`.
        attention_gate_skip_threshold (`float`, *optional*, defaults to 0.0):
            At inference (`model.eval()`), heads whose gate stays below this value for every position of the batch are
            not computed at all. `0.0` never skips. Must be in `[0, 1)`. Also set by `model.set_head_skip_threshold`.
        attention_gate_sparsity_weight (`float`, *optional*, defaults to 0.0):
            Weight of the gate-sparsity penalty (L1: the mean gate value over layers, heads and real positions) that
            `forward` adds to the loss as `gate_sparsity_loss` whenever it computes a loss; it teaches gates to close
            so that heads can be skipped. `0.0` adds nothing. Must be non-negative; needs `use_attention_gate`.
        router_bias_update_rate (`float`, *optional*, defaults to 0.001):
            DeepSeek-V3's auxiliary-loss-free load balancing, the bias update speed `gamma`: after each optimizer step
            of a training run, every MoE layer's `e_score_correction_bias` moves by `gamma * sign(mean load - load)`
            per expert (the loads counted over the step's real tokens, on every data-parallel rank). `forward` returns
            the loads (`expert_load`) in training mode; the update itself is applied by
            `deepseekv3.training.balancing.ExpertLoadBalancer` (which `DeepseekV3Trainer` runs). Inference never
            changes the bias. `0.0` switches the update off. Must be non-negative; V3 uses 0.001.
        sequence_balance_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight `alpha` of DeepSeek-V3's complementary sequence-wise balance loss, `alpha * sum_i f_i * P_i` per
            sequence and MoE layer (`sequence_balance_loss`), which `forward` adds as `balance_loss` in training mode
            whenever it computes a loss. `0.0` adds nothing. Must be non-negative; V3 uses 0.0001.
        attention_distillation_weight (`float`, *optional*, defaults to 1.0):
            Weight of the attention-distillation term (`distillation_loss`) that `forward` adds when it is given
            `distillation_targets`. `0.0` removes the term: the targets are ignored, nothing is computed and eager
            attention is not needed (the ablation of stage 2 without distillation, same batches and labels). Must be
            non-negative.
        attention_block_size (`int`, *optional*):
            Blockwise local attention for long contexts: the sequence is cut into blocks of this many positions and a
            query attends (causally) to its own block and the one before, so it sees between `attention_block_size`
            and `2 * attention_block_size - 1` positions. Built as a transformers mask function, so every attention
            backend applies it; with `attn_implementation="flex_attention"` the mask is block-sparse and memory grows
            linearly with the context. Blocks (and sink tokens) count from each row's first real token, so a
            left-padded row sees what it sees alone. `None` is dense causal attention. Must be positive.
        attention_num_sink_tokens (`int`, *optional*, defaults to 0):
            With `attention_block_size`, the first positions of every sequence stay visible to all later queries
            (global "sink" tokens). Must be non-negative; needs `attention_block_size`.
        use_image_input (`bool`, *optional*, defaults to `False`):
            Build the image patch embedding (a strided `Conv2d`) and accept `pixel_values`.
        image_size (`int`, *optional*, defaults to 224):
            Height and width, in pixels, of the (square) images the model reads.
        patch_size (`int`, *optional*, defaults to 16):
            Side of one image patch; each image becomes `(image_size // patch_size) ** 2` tokens. Must divide
            `image_size`.
        num_channels (`int`, *optional*, defaults to 3):
            Channels of `pixel_values`.
        image_conv_stem_channels (`int`, *optional*, defaults to 0):
            A small convolutional stem before the patch projection: two 3x3 convolutions (this many channels, GELU,
            full resolution) whose output the patch projection reads through overlapping windows (kernel
            `2 * patch_size`, stride `patch_size`, padding `patch_size // 2`), so an object cut by a patch border is
            still seen whole by some patch token. `0` is the plain strided patch projection (ViT, transformers
            parity). Must be non-negative; with a stem, `patch_size` must be even.
        image_token_id (`int`, *optional*):
            Placeholder token that marks one image patch position in `input_ids`. Required with `use_image_input`.
        use_audio_input (`bool`, *optional*, defaults to `False`):
            Build the audio frame embedding (a strided `Conv1d` over log-mel frames) and accept `input_features`.
        num_mel_bins (`int`, *optional*, defaults to 80):
            Mel bins of `input_features`.
        audio_conv_stride (`int`, *optional*, defaults to 4):
            Log-mel frames per audio token; a clip of `n` frames becomes `n // audio_conv_stride` tokens.
        audio_max_frames (`int`, *optional*, defaults to 3000):
            Longest clip, in log-mel frames, the model accepts. Must be a multiple of `audio_conv_stride`.
        audio_token_id (`int`, *optional*):
            Placeholder token that marks one audio frame position in `input_ids`. Required with `use_audio_input`.
        num_modality_types (`int`, *optional*, defaults to 0):
            Rows of the learned modality-type embedding added to every position (0: text, 1: image, 2: audio).
            `0` builds no embedding; otherwise it must cover every enabled modality (2 with images only, 3 with
            audio).
        use_bidirectional_media_attention (`bool`, *optional*, defaults to `False`):
            Let the tokens of one image or one audio clip attend to each other in both directions; every other
            position stays causal.
        use_image_position_values (`bool`, *optional*, defaults to `False`):
            Add each image patch's row and column, scaled to [-1, 1], to the first two value channels of every
            attention head, so a text position's attention output carries the attention-weighted position of what it
            looks at. MLA values come from the compressed latent the keys share, which does not pass patch positions
            on by itself (spatial questions stay at chance without this; measured in the README). The coordinates
            are cached with the latent: two more numbers per token and layer. Needs `use_image_input` and
            `v_head_dim >= 2`; adds no parameter.
        contrastive_projection_dim (`int`, *optional*):
            Width of the CLIP-style projection heads used by `get_text_features`, `get_image_features` and
            `get_audio_features`. `None` builds no projection head.
        contrastive_temperature_init (`float`, *optional*, defaults to 0.07):
            Initial temperature of the contrastive logits; the model learns `logit_scale = log(1 / temperature)`.
            Must be positive.

    Example:

    ```python
    >>> from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration

    >>> config = DeepseekV3MultimodalConfig(use_attention_gate=True, use_image_input=True, image_token_id=5)
    >>> model = DeepseekV3MultimodalForConditionalGeneration(config)
    ```"""

    model_type = "deepseekv3_multimodal"
    # Tensor parallel (`from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))` under torchrun):
    # upstream's rules for the dense MLPs, shared and routed experts, plus MLA attention split by heads as
    # transformers' DeepSeek-V2 does (`q_proj`/`q_b_proj` and `kv_b_proj` column-wise, `o_proj` row-wise;
    # `mla_kv_a_proj` all-reduces the gradient of the shared rotary key, which bypasses the sharded `kv_b_proj`).
    # The head gate follows its heads: `up_proj` (one output per head) is column-wise, so each rank gates the heads
    # it computes; its `down_proj` reads the replicated latent and stays whole. The projection heads are column-wise
    # with gathered outputs. The media embeddings (convolutions, which no parallel style shards) and the
    # modality-type embeddings are small and stay replicated: their inputs are identical on every rank and the
    # gradient reaching `inputs_embeds` is already summed over the ranks' heads, so their gradients are complete.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.q_b_proj": "colwise",
        "layers.*.self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
        "layers.*.self_attn.kv_b_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.self_attn.head_gate.up_proj": "colwise",
        **DeepseekV3Config.base_model_tp_plan,
        "text_projection": "colwise_gather_output",
        "image_projection": "colwise_gather_output",
        "audio_projection": "colwise_gather_output",
    }
    # Pipeline stages: the media embeddings and modality-type embeddings run inside the embedding step, before the
    # first decoder layer, so they belong to the first stage with `embed_tokens` (`inputs_embeds` carries them); the
    # head gates live inside `layers`; the projection heads serve `get_*_features`, not the decoder's forward.
    base_model_pp_plan = dict(DeepseekV3Config.base_model_pp_plan)

    use_attention_gate: bool = False
    attention_gate_ratio: int = 16
    attention_gate_skip_threshold: float = 0.0
    attention_gate_sparsity_weight: float = 0.0
    router_bias_update_rate: float = 0.001
    sequence_balance_loss_weight: float = 0.0
    attention_distillation_weight: float = 1.0
    attention_block_size: int | None = None
    attention_num_sink_tokens: int = 0
    use_image_input: bool = False
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    image_conv_stem_channels: int = 0
    image_token_id: int | None = None
    use_audio_input: bool = False
    num_mel_bins: int = 80
    audio_conv_stride: int = 4
    audio_max_frames: int = 3000
    audio_token_id: int | None = None
    num_modality_types: int = 0
    use_bidirectional_media_attention: bool = False
    use_image_position_values: bool = False
    contrastive_projection_dim: int | None = None
    contrastive_temperature_init: float = 0.07

    def __post_init__(self, **kwargs):
        # A checkpoint's own `model_type` (e.g. "deepseek_v3" in the official config.json) would otherwise become an
        # instance attribute and be written back by `save_pretrained`; the class decides what this config is.
        kwargs.pop("model_type", None)
        # Derived by `DeepseekV3Config.__post_init__` from the rope and nope head sizes; a saved or copied value would
        # be set back on top of the derived one and go stale when those sizes change.
        kwargs.pop("head_dim", None)
        kwargs.pop("qk_head_dim", None)
        super().__post_init__(**kwargs)
        self._validate_text_fields()
        self._validate_gate_fields()
        self._validate_long_context_fields()
        self._validate_media_fields()

    def _validate_text_fields(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}); MLA attention normally sets them equal"
            )
        if self.qk_rope_head_dim % 2 != 0:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: rotary dims come in pairs")
        if self.n_routed_experts % self.n_group != 0:
            raise ValueError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group ({self.n_group})]")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, n_routed_experts "
                f"({self.n_routed_experts})]"
            )
        experts_in_chosen_groups = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > experts_in_chosen_groups:
            # transformers' DeepseekV3Config accepts it (its own test config does this), and its router computes it
            logger.warning(
                f"num_experts_per_tok ({self.num_experts_per_tok}) is more than the {experts_in_chosen_groups} "
                f"experts of the topk_group ({self.topk_group}) groups a token is routed to: as in transformers' "
                "DeepseekV3TopkRouter, the others are taken from the groups not chosen, whose scores are masked to "
                "-inf, in the order torch.topk returns ties"
            )
        for name in ("router_bias_update_rate", "sequence_balance_loss_weight", "attention_distillation_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be non-negative")

    def _validate_gate_fields(self) -> None:
        if not 1 <= self.attention_gate_ratio <= self.hidden_size:
            raise ValueError(
                f"attention_gate_ratio ({self.attention_gate_ratio}) must be in [1, hidden_size ({self.hidden_size})]"
            )
        if not 0.0 <= self.attention_gate_skip_threshold < 1.0:
            raise ValueError(f"attention_gate_skip_threshold ({self.attention_gate_skip_threshold}) must be in [0, 1)")
        if self.attention_gate_sparsity_weight < 0:
            raise ValueError(
                f"attention_gate_sparsity_weight ({self.attention_gate_sparsity_weight}) must be non-negative"
            )
        if self.attention_gate_sparsity_weight > 0 and not self.use_attention_gate:
            raise ValueError(
                f"attention_gate_sparsity_weight ({self.attention_gate_sparsity_weight}) needs use_attention_gate=True"
            )

    def _validate_long_context_fields(self) -> None:
        if self.attention_block_size is not None and self.attention_block_size < 1:
            raise ValueError(f"attention_block_size ({self.attention_block_size}) must be positive")
        if self.attention_num_sink_tokens < 0:
            raise ValueError(f"attention_num_sink_tokens ({self.attention_num_sink_tokens}) must be non-negative")
        if self.attention_num_sink_tokens > 0 and self.attention_block_size is None:
            raise ValueError(
                f"attention_num_sink_tokens ({self.attention_num_sink_tokens}) needs attention_block_size set"
            )

    def _validate_media_fields(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        if self.image_conv_stem_channels < 0:
            raise ValueError(f"image_conv_stem_channels ({self.image_conv_stem_channels}) must be non-negative")
        if self.image_conv_stem_channels > 0 and self.patch_size % 2 != 0:
            raise ValueError(
                f"patch_size ({self.patch_size}) must be even with image_conv_stem_channels: the overlapping patch "
                "windows are padded by patch_size // 2 on each side"
            )
        if self.audio_max_frames % self.audio_conv_stride != 0:
            raise ValueError(
                f"audio_conv_stride ({self.audio_conv_stride}) must divide audio_max_frames ({self.audio_max_frames})"
            )
        for name, enabled in (("image_token_id", self.use_image_input), ("audio_token_id", self.use_audio_input)):
            token_id = getattr(self, name)
            if enabled and token_id is None:
                raise ValueError(f"{name} is required when use_{name.split('_')[0]}_input=True")
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise ValueError(f"{name} ({token_id}) must be in [0, vocab_size ({self.vocab_size}))")
        if self.use_image_position_values and not (self.use_image_input and self.v_head_dim >= 2):
            raise ValueError(
                f"use_image_position_values needs use_image_input=True (got {self.use_image_input}) and v_head_dim >= "
                f"2 (got {self.v_head_dim}): the patch row and column go into two value channels"
            )
        if self.use_image_input and self.use_audio_input and self.image_token_id == self.audio_token_id:
            raise ValueError(f"image_token_id and audio_token_id must differ (both {self.image_token_id})")
        required_types = 1 + max(
            IMAGE_MODALITY_ID if self.use_image_input else 0, AUDIO_MODALITY_ID if self.use_audio_input else 0
        )
        if self.num_modality_types != 0 and self.num_modality_types < required_types:
            raise ValueError(
                f"num_modality_types ({self.num_modality_types}) must be 0 or at least {required_types} to cover "
                "the enabled modalities"
            )
        if self.contrastive_projection_dim is not None and self.contrastive_projection_dim < 1:
            raise ValueError(f"contrastive_projection_dim ({self.contrastive_projection_dim}) must be positive")
        if not self.contrastive_temperature_init > 0:
            raise ValueError(f"contrastive_temperature_init ({self.contrastive_temperature_init}) must be positive")

    @property
    def num_image_tokens(self) -> int:
        """Number of tokens one image becomes: `(image_size // patch_size) ** 2`."""
        return (self.image_size // self.patch_size) ** 2

    def get_num_audio_tokens(self, num_frames: int) -> int:
        """Number of tokens a clip of `num_frames` log-mel frames becomes (`num_frames // audio_conv_stride`)."""
        return num_frames // self.audio_conv_stride

    @property
    def attention_gate_hidden_size(self) -> int:
        """Hidden width of the gate's bottleneck MLP."""
        return max(1, self.hidden_size // self.attention_gate_ratio)

    @property
    def contrastive_logit_scale_init(self) -> float:
        """Initial value of the learned `logit_scale` (`log(1 / contrastive_temperature_init)`)."""
        return math.log(1.0 / self.contrastive_temperature_init)

    @classmethod
    def from_text_config(cls, text_config: DeepseekV3Config, **kwargs: Any) -> "DeepseekV3MultimodalConfig":
        """Build a multimodal config from a transformers `DeepseekV3Config`.

        Args:
            text_config (`DeepseekV3Config`): the text model's configuration; every text field is copied.
            **kwargs: multimodal fields (or text overrides) to set on top.

        Returns:
            `DeepseekV3MultimodalConfig`: with every new feature off unless switched on through `kwargs`.
        """
        text_fields = {k: v for k, v in text_config.to_dict().items() if k not in _NON_ARCHITECTURE_KEYS}
        return cls(**{**text_fields, **kwargs})
