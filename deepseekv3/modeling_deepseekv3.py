"""The DeepSeek-V3 multimodal model: one decoder shared by text, images and audio.

A layer on transformers' own DeepSeek-V3, inheriting as transformers' modular models do. `DeepseekV3MultimodalModel`
subclasses `DeepseekV3Model` (upstream's embeddings, decoder loop, norm and rotary embedding) and adds the media
scatter and the attention mask; `DeepseekV3MultimodalForConditionalGeneration` subclasses `DeepseekV3ForCausalLM`
(tied weights, parallel plans) and adds the loss terms. MLA, DeepSeekMoE with the auxiliary-loss-free router and
RMSNorm are upstream's modules, so the state-dict keys are those of `DeepseekV3ForCausalLM` and, with every new
feature off, the logits are identical. The new parts, each behind a config field, live in sibling core modules: the
gated attention (`.attention_deepseekv3`), the media embeddings and contrastive features (`.embeddings_deepseekv3`)
and the loss terms (`.losses_deepseekv3`, re-exported here).

This file is part of the hub-portable core: it imports only the standard library, torch, transformers and its
sibling core modules, which `save_pretrained` copies next to the weights with it.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
from transformers.modeling_outputs import BaseModelOutputWithPooling, MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3DecoderLayer,
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
    DeepseekV3PreTrainedModel,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
    DeepseekV3TopkRouter,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder

from .attention_deepseekv3 import (
    DeepseekV3MultimodalAttention,
    DeepseekV3MultimodalGateOutput,
    DeepseekV3MultimodalHeadGate,
    attach_gate_state,
    gate_inputs,
    is_prepared_mask,
    open_media_spans,
    padding_mask,
)
from .configuration_deepseekv3 import DeepseekV3MultimodalConfig
from .embeddings_deepseekv3 import DeepseekV3MultimodalEmbeddingsMixin, DeepseekV3MultimodalFeaturesMixin
from .losses_deepseekv3 import (
    attention_distillation_loss,
    contrastive_loss,
    expert_load,
    gate_sparsity_loss,
    sequence_balance_loss,
)

__all__ = [
    "DeepseekV3MultimodalPreTrainedModel",
    "DeepseekV3MultimodalModel",
    "DeepseekV3MultimodalForConditionalGeneration",
    "DeepseekV3MultimodalModelOutputWithPast",
    "DeepseekV3MultimodalCausalLMOutputWithPast",
    "attention_distillation_loss",
    "block_local_mask_function",
    "contrastive_loss",
    "expert_load",
    "gate_sparsity_loss",
    "open_media_spans",
    "sequence_balance_loss",
]

logger = logging.get_logger(__name__)

# transformers stores DeepSeek-V3 experts per expert on disk (`experts.N.gate_proj.weight`, as the official checkpoint
# does) and fuses them into 3-D tensors on load, through a conversion mapping looked up by `model_type`. Ours shares
# upstream's on-disk layout, so it registers the same mapping; it lives here, not in `__init__`, because a checkpoint
# loaded with `trust_remote_code=True` only imports this file.
register_checkpoint_conversion_mapping(
    DeepseekV3MultimodalConfig.model_type, get_checkpoint_conversion_mapping("deepseek_v3"), overwrite=True
)

# The gate's last layer starts at zero weight and this bias: every head starts open (sigmoid(4) = 0.982), so
# switching the gate on in a pretrained model barely moves its outputs at step 0.
_GATE_BIAS_INIT = 4.0


@dataclass
class DeepseekV3MultimodalModelOutputWithPast(MoeModelOutputWithPast):
    """Output of [`DeepseekV3MultimodalModel`]: transformers' `MoeModelOutputWithPast` (`last_hidden_state`, `cache`,
    `hidden_states`, `attentions`, and `router_logits` of shape `(batch * seq_len, n_routed_experts)` per MoE layer),
    plus:

    Args:
        router_indices (`tuple(torch.LongTensor)`, *optional*): per MoE layer, the experts each position is routed
            to, `(batch * seq_len, num_experts_per_tok)`, with `output_router_indices=True`.
        gate_values (`tuple(torch.FloatTensor)`, *optional*): per gated layer, `(batch, seq_len, num_heads)` in
            `[0, 1]`, with `output_gate_values=True`.
    """

    router_indices: tuple[torch.LongTensor, ...] | None = None
    gate_values: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DeepseekV3MultimodalCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """Output of [`DeepseekV3MultimodalForConditionalGeneration`]: transformers' `MoeCausalLMOutputWithPast`, with
    `loss` the sum of the loss terms computed (`aux_loss` stays `None`: the router bias balances the experts, as
    upstream) and `logits` absent for a contrastive-only batch, plus each term by name:

    Args:
        lm_loss (`torch.FloatTensor` of shape `()`, *optional*): next-token cross-entropy, when `labels` are given.
        contrastive_loss (`torch.FloatTensor` of shape `()`, *optional*): symmetric InfoNCE between texts and media,
            when `contrastive_input_ids` are given.
        distillation_loss (`torch.FloatTensor` of shape `()`, *optional*): KL divergence of the text-to-image
            attention from `distillation_targets`, when given.
        gate_sparsity_loss (`torch.FloatTensor` of shape `()`, *optional*): `attention_gate_sparsity_weight` times
            the mean gate value, when that weight is positive and another loss term is computed.
        balance_loss (`torch.FloatTensor` of shape `()`, *optional*): `sequence_balance_loss_weight` times the
            sequence-wise balance loss, in training mode when that weight is positive and another loss term is
            computed.
        expert_load (`torch.FloatTensor` of shape `(num_moe_layers, n_routed_experts)`, *optional*): how many real
            tokens each expert of each MoE layer received, in training mode when `router_bias_update_rate` is
            positive (`deepseekv3.training.balancing.ExpertLoadBalancer` turns it into the bias update).
        gate_values: as in [`DeepseekV3MultimodalModelOutputWithPast`].
    """

    lm_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    distillation_loss: torch.FloatTensor | None = None
    gate_sparsity_loss: torch.FloatTensor | None = None
    balance_loss: torch.FloatTensor | None = None
    expert_load: torch.FloatTensor | None = None
    gate_values: tuple[torch.FloatTensor, ...] | None = None


class DeepseekV3MultimodalRMSNorm(DeepseekV3RMSNorm):
    """Upstream RMSNorm whose output keeps the input's dtype.

    The norms are kept in fp32 when the model is loaded in bf16/fp16 (`_keep_in_fp32_modules_strict`); upstream's
    `weight * hidden_states` would then promote the activations to fp32 and the next bf16 linear layer would fail.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states).to(hidden_states.dtype)


class DeepseekV3MultimodalTopkRouter(DeepseekV3TopkRouter):
    """Upstream's auxiliary-loss-free top-k router, computed in fp32 even under autocast.

    Upstream casts its inputs to fp32, but autocast would still run the routing matmul in bf16/fp16; expert choice is
    sensitive to rounding, so autocast is switched off here (the weights are kept in fp32 for the same reason).
    """

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            return super().forward(hidden_states)


class DeepseekV3MultimodalDecoderLayer(DeepseekV3DecoderLayer):
    """Upstream decoder layer (MLA + dense MLP or DeepSeekMoE); with `use_attention_gate` or
    `use_image_position_values` its attention is [`DeepseekV3MultimodalAttention`], whose state-dict keys extend
    upstream's by `self_attn.head_gate.*` (gate only)."""

    def __init__(self, config: DeepseekV3MultimodalConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.use_attention_gate or config.use_image_position_values:
            self.self_attn = DeepseekV3MultimodalAttention(config, layer_idx)


_CHECKPOINT_SCOPES = ("layer", "attention")


def _checkpointed_attention_forward(attention: nn.Module, checkpoint_func: Callable, *args, **kwargs):
    """An attention module's forward run under `checkpoint_func` while training with gradients (the
    `checkpoint_scope="attention"` mode of `activation_checkpointing_enable`): its activations are recomputed in the
    backward pass while the rest of the decoder layer keeps its own."""
    if not (attention.training and torch.is_grad_enabled()):
        return type(attention).forward(attention, *args, **kwargs)
    if kwargs.get("cache") is not None:
        # the recompute would write the step's keys and values into the cache a second time
        logger.warning_once("Caching is incompatible with checkpointing attention. Setting `cache=None`.")
        kwargs["cache"] = None
    return checkpoint_func(type(attention).forward, attention, *args, **kwargs)


class DeepseekV3MultimodalPreTrainedModel(DeepseekV3PreTrainedModel):
    """Upstream's pre-trained base (router and expert initialisation, attention backends) with our modules."""

    config: DeepseekV3MultimodalConfig
    config_class = DeepseekV3MultimodalConfig
    _no_split_modules = ["DeepseekV3MultimodalDecoderLayer"]
    _can_compile_fullgraph = False  # data-dependent media scatter and head skipping
    _can_record_outputs = {
        "hidden_states": DeepseekV3MultimodalDecoderLayer,
        "attentions": DeepseekV3Attention,
        "router_logits": OutputRecorder(DeepseekV3TopkRouter, index=0),
        "router_indices": OutputRecorder(DeepseekV3TopkRouter, index=2),
        "gate_values": DeepseekV3MultimodalHeadGate,
    }
    # Set per model from the modules its config builds (`DeepseekV3MultimodalModel._keep_sensitive_modules_in_fp32`)
    _keep_in_fp32_modules_strict = None

    @property
    def input_modalities(self) -> list[str]:
        """What the model reads, as transformers' pipelines and `generate` ask: images and audio only where the config
        turns them on (`pipeline("any-to-any")` needs torchvision whenever images are among them)."""
        switches = (("image", self.config.use_image_input), ("audio", self.config.use_audio_input))
        return [modality for modality, is_on in switches if is_on] + ["text"]

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides by searching the model's source file for `@use_experts_implementation`; the experts
        # here are upstream's `DeepseekV3Experts`, which carry that decorator, so every kernel
        # (`experts_implementation="grouped_mm"` by default, "eager", ...) applies to them as it does upstream.
        return True

    def init_parallel_plans(self) -> None:
        """transformers' parallel plans, without the entries for parts this config does not build.

        `base_model_tp_plan` lists every optional part (head gates, projection heads, `q_proj` or `q_b_proj`, ...);
        a plan entry must name a module or parameter of the built model.
        """
        super().init_parallel_plans()
        # `layers.0.self_attn.q_b_proj` -> `layers.*.self_attn.q_b_proj`, the plans' form
        built = {
            ".".join("*" if part.isdigit() else part for part in name.split("."))
            for name, _ in chain(self.named_modules(), self.named_parameters())
        }
        self._tp_plan = {pattern: style for pattern, style in self._tp_plan.items() if pattern in built}
        self._ep_plan = {pattern: style for pattern, style in self._ep_plan.items() if pattern in built}

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """transformers' activation checkpointing, with a choice of what a checkpointed layer recomputes.

        `activation_checkpointing_kwargs` may hold `checkpoint_scope`, popped before the rest reaches
        `torch.utils.checkpoint.checkpoint`: `"layer"` (default) recomputes whole decoder layers; `"attention"`
        recomputes only their attention (MLA projections, scores, head gate) and keeps the MoE activations.
        `every_n_layers` picks the layers either way, so `TrainingArguments(activation_checkpointing=True,
        activation_checkpointing_kwargs={"every_n_layers": 2, "checkpoint_scope": "attention"})` checkpoints the
        attention of every second layer. Gradients equal those without checkpointing.
        """
        checkpoint_kwargs = dict(activation_checkpointing_kwargs or {})
        scope = checkpoint_kwargs.pop("checkpoint_scope", "layer")
        if scope not in _CHECKPOINT_SCOPES:
            raise ValueError(f"checkpoint_scope ({scope!r}) must be one of {_CHECKPOINT_SCOPES}")
        if every_n_layers < 1:
            raise ValueError(f"every_n_layers ({every_n_layers}) must be at least 1")
        if scope == "attention" and checkpoint_kwargs.get("use_reentrant", False):
            raise ValueError("checkpoint_scope='attention' needs use_reentrant=False (attention takes keyword inputs)")
        self._restore_attention_forwards()
        super().activation_checkpointing_enable(checkpoint_kwargs or None, every_n_layers, offload)
        if scope == "attention":
            for layer in self.modules():
                if isinstance(layer, DeepseekV3MultimodalDecoderLayer) and layer.gradient_checkpointing:
                    layer.gradient_checkpointing = False
                    attention = layer.self_attn
                    # an instance attribute: module hooks stay outside the checkpoint, as for whole layers
                    attention.forward = partial(
                        _checkpointed_attention_forward, attention, layer._gradient_checkpointing_func
                    )

    def activation_checkpointing_disable(self) -> None:
        """transformers' `activation_checkpointing_disable`, also undoing `checkpoint_scope="attention"`."""
        self._restore_attention_forwards()
        super().activation_checkpointing_disable()

    def _restore_attention_forwards(self) -> None:
        for layer in self.modules():
            if isinstance(layer, DeepseekV3MultimodalDecoderLayer):
                layer.self_attn.__dict__.pop("forward", None)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, listing every model class of this file in `auto_map`.

        transformers records only the saving class there; with the siblings listed, `AutoModel`,
        `AutoModelForCausalLM`, `AutoModelForImageTextToText` and `AutoModelForMultimodalLM` all load the checkpoint
        with `trust_remote_code=True`.
        """
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": f"{module}.DeepseekV3MultimodalModel",
                "AutoModelForCausalLM": f"{module}.DeepseekV3MultimodalForConditionalGeneration",
                "AutoModelForImageTextToText": f"{module}.DeepseekV3MultimodalForConditionalGeneration",
                "AutoModelForMultimodalLM": f"{module}.DeepseekV3MultimodalForConditionalGeneration",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers counts every model outside its own package as custom code, and for custom code it skips a
        # module whose own parameters are all loaded, or that has none: the shortcut protects `_init_weights` that
        # write tensors in place. Every branch here goes through `transformers.initialization`, which leaves loaded
        # tensors alone, and the model's branch initialises its children (image stem, modality-type embedding); with
        # the shortcut, a model without `logit_scale` (or whose `logit_scale` was loaded) would never run that branch,
        # and those children would keep the plain Conv2d / Embedding initialisation.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DeepseekV3MultimodalGateOutput):
            init.zeros_(module.weight)
            init.constant_(module.bias, _GATE_BIAS_INIT)
        elif isinstance(module, DeepseekV3MultimodalModel):
            if module.modality_type_embedding is not None:
                # zero rows: a text-only model with type embeddings switched on starts with unchanged logits
                init.zeros_(module.modality_type_embedding.weight)
            if module.logit_scale is not None:
                init.constant_(module.logit_scale, self.config.contrastive_logit_scale_init)
            if module.image_stem is not None:
                # fan-in scaled (He) like a conv net's: at the decoder's std 0.02 the stem would pass almost nothing on
                # (patch-to-patch variation 0.005 against the position embeddings' 0.02, measured)
                for conv in module.image_stem:
                    if isinstance(conv, nn.Conv2d):
                        init.kaiming_normal_(conv.weight, nonlinearity="relu")
                        init.zeros_(conv.bias)

    def set_head_skip_threshold(self, threshold: float) -> None:
        """Skip, at inference, the heads whose gate is below `threshold` at every position of the batch.

        Sets `config.attention_gate_skip_threshold` (saved with the model); `0.0` computes every head. The skipped
        heads' query, key/value and output projection rows are left out of the matmuls, which gives the same output
        as those heads' gates forced to zero. `get_skipped_heads` reports what the last forward skipped.

        Args:
            threshold (`float`): in `[0, 1)`.
        """
        if not self.config.use_attention_gate:
            raise ValueError("set_head_skip_threshold needs a model with use_attention_gate=True")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"head skip threshold ({threshold}) must be in [0, 1)")
        self.config.attention_gate_skip_threshold = threshold

    def get_skipped_heads(self) -> dict[int, list[int]]:
        """Per decoder layer index, the heads the last forward pass skipped (an empty list: every head computed).

        Returns:
            `dict[int, list[int]]`, one entry per gated attention layer.
        """
        return {
            module.layer_idx: module.skipped_heads()
            for module in self.modules()
            if isinstance(module, DeepseekV3MultimodalAttention)
        }


def _replace_sensitive_modules(root: nn.Module, config: DeepseekV3MultimodalConfig) -> None:
    """Swap every upstream RMSNorm and router under `root` for the subclasses that keep their computation in fp32
    under mixed precision (same parameters, same state-dict keys; runs before the weights are initialised)."""
    for name, module in list(root.named_modules()):
        if type(module) is DeepseekV3RMSNorm:
            replacement = DeepseekV3MultimodalRMSNorm(module.weight.shape[0], eps=module.variance_epsilon)
        elif type(module) is DeepseekV3TopkRouter:
            replacement = DeepseekV3MultimodalTopkRouter(config)
        else:
            continue
        parent_name, _, child_name = name.rpartition(".")
        setattr(root.get_submodule(parent_name), child_name, replacement)


class DeepseekV3MultimodalModel(
    DeepseekV3MultimodalEmbeddingsMixin,
    DeepseekV3MultimodalFeaturesMixin,
    DeepseekV3MultimodalPreTrainedModel,
    DeepseekV3Model,
):
    """The shared decoder: upstream's `DeepseekV3Model` with token, image-patch and audio-frame embeddings in."""

    # `AutoModel` on a saved `ForConditionalGeneration` checkpoint: the LM head is expected to be left out.
    _keys_to_ignore_on_load_unexpected = [*DeepseekV3PreTrainedModel._keys_to_ignore_on_load_unexpected, r"lm_head\."]

    # `DeepseekV3Model.__init__` (transformers 5.24.0) with our decoder layer, then the media modules. Upstream's own
    # is skipped: it builds and initialises (`post_init`) upstream's layers, which would be thrown away, and the random
    # draws they take would change every seeded initialisation of this model.
    def __init__(self, config: DeepseekV3MultimodalConfig):
        super(DeepseekV3Model, self).__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DeepseekV3MultimodalDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekV3RotaryEmbedding(config=config)
        _replace_sensitive_modules(self, config)

        self._build_media_embeddings(config)
        self._build_projection_heads(config)
        self.gradient_checkpointing = False
        self._keep_sensitive_modules_in_fp32()
        self.post_init()

    def _keep_sensitive_modules_in_fp32(self) -> None:
        """Put the modules sensitive to rounding in fp32, whatever the default dtype, and name them in
        `_keep_in_fp32_modules_strict` (which `from_pretrained` honours for bf16 and fp16 alike): every RMSNorm, the
        MoE routers, the head gates and the modality-type embeddings, those the config builds."""
        names = set()
        for name, module in self.named_modules():
            if isinstance(module, DeepseekV3RMSNorm | DeepseekV3MultimodalHeadGate | DeepseekV3TopkRouter):
                module.float()
                # the router by upstream's entries, its weight and bias (a bare `gate` would match `gate_proj` too)
                is_router = isinstance(module, DeepseekV3TopkRouter)
                names.update(
                    DeepseekV3PreTrainedModel._keep_in_fp32_modules_strict if is_router else [name.split(".")[-1]]
                )
        if self.modality_type_embedding is not None:
            self.modality_type_embedding.float()
            names.add("modality_type_embedding")
        self._keep_in_fp32_modules_strict = sorted(names)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DeepseekV3MultimodalModelOutputWithPast:
        r"""Upstream's `forward` on the embeddings of `embed_inputs`, with our mask and the attention's extra inputs.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): token ids; each image occupies
                `config.num_image_tokens` `image_token_id` positions, each audio clip `frames // audio_conv_stride`
                `audio_token_id` positions.
            attention_mask (`torch.Tensor`, *optional*): a `(batch, kv_len)` padding mask, or, as upstream takes it,
                a prepared 4-D mask `(batch, 1, q_len, kv_len)`, bool or float (added to the scores), used as given
                (packed rows, shared prefixes): each media span is opened both ways in it
                (`use_bidirectional_media_attention`), the head gate averages over the keys it shows (with a
                cache: over every real cached position and the new keys it shows), and `attention_block_size`'s
                window is not added (warned once).
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, image_size, image_size)`): every
                image of the batch, in order of appearance.
            input_features (`torch.FloatTensor` of shape `(num_clips, num_mel_bins, frames)`): log-mel features of
                every clip, padded to the longest.
            input_features_mask (`torch.Tensor` of shape `(num_clips, frames)`): 1 for real frames (a prefix).
            mm_token_type_ids (`torch.LongTensor` of shape `(batch, seq_len)`): modality of each position (0 text,
                1 image, 2 audio); derived from `input_ids` when omitted.
        """
        if (input_ids is None) == (inputs_embeds is None):
            state = "both" if input_ids is not None else "neither"
            raise ValueError(f"Pass exactly one of `input_ids` or `inputs_embeds` (got {state})")
        inputs_embeds, block_sequence_ids = self.embed_inputs(
            input_ids, inputs_embeds, pixel_values, input_features, input_features_mask, mm_token_type_ids
        )
        return self.decode(
            inputs_embeds, input_ids, attention_mask, position_ids, cache, use_cache, block_sequence_ids, **kwargs
        )

    def decode(
        self,
        inputs_embeds: torch.FloatTensor,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        block_sequence_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DeepseekV3MultimodalModelOutputWithPast:
        """The decoder layers and final norm on embeddings already made: what `forward` runs after `embed_inputs`,
        and what a pipeline stage after the first (`deepseekv3.distributed.pipeline`) runs on the hidden states it
        receives. `input_ids` place the image patches (position values), `block_sequence_ids` (`media_span_ids`)
        the media spans opened both ways; the other arguments are `forward`'s."""
        packed_sequence_ids = _packed_sequence_ids(position_ids, attention_mask, cache, inputs_embeds.shape[0])
        past_length = cache.get_seq_length() if cache is not None else 0
        if not torch.compiler.is_compiling():
            # a static cache's length is a tensor: reading it for a warning would break a compiled decoding step
            self._check_length(past_length + inputs_embeds.shape[1])
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0)
        if self.config.use_image_position_values:
            kwargs["image_coordinates"] = self.get_image_coordinates(input_ids, inputs_embeds)
        if self.config.use_attention_gate:
            kwargs.update(gate_inputs(attention_mask, packed_sequence_ids))
        if is_prepared_mask(attention_mask):
            attention_mask = self._overlay_prepared_mask(attention_mask, block_sequence_ids, past_length)
        elif self.config.attention_block_size is not None or block_sequence_ids is not None:
            # prepared here; upstream's `create_causal_mask` passes a prepared mask on as it is
            attention_mask = self._block_mask(inputs_embeds, attention_mask, cache, position_ids, block_sequence_ids)
        outputs = super().forward(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=False if packed_sequence_ids is not None else use_cache,  # packed rows cannot be continued
            return_dict=True,
            **kwargs,
        )
        return DeepseekV3MultimodalModelOutputWithPast(**outputs)

    def _overlay_prepared_mask(
        self, attention_mask: torch.Tensor, block_sequence_ids: torch.LongTensor | None, past_length: int
    ) -> torch.Tensor:
        """A prepared 4-D `attention_mask` (a tensor or flex-attention `BlockMask`), which upstream's
        `create_causal_mask` passes on as it is, with what ours adds where it can: each media span opened both ways
        (`open_media_spans`, on a tensor). The block-local window of `attention_block_size` is not added: the given
        mask decides which keys each query sees."""
        if self.config.attention_block_size is not None:
            logger.warning_once(
                "A prepared 4-D attention_mask is used as given: attention_block_size's local window is not added to "
                "it (build the window into the mask, or pass a 2-D padding mask)"
            )
        if block_sequence_ids is None:
            return attention_mask
        if not isinstance(attention_mask, torch.Tensor):
            logger.warning_once(
                "A BlockMask attention_mask is used as given: the bidirectional attention inside each image and "
                "audio clip (use_bidirectional_media_attention) is not added to it"
            )
            return attention_mask
        return open_media_spans(attention_mask, block_sequence_ids, past_length)

    def _block_mask(
        self,
        inputs_embeds: torch.FloatTensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.LongTensor,
        block_sequence_ids: torch.LongTensor | None,
    ) -> torch.Tensor | None:
        """The causal (padding, packing) mask intersected with the blockwise local attention of
        `attention_block_size` and opened both ways inside each media span (`block_sequence_ids`). Blocks and sink
        tokens count from each row's first real token: the left padding is read from the 2-D `attention_mask`,
        which covers the cached positions too, so the offset holds at every decoding step."""
        and_mask_function = None
        if self.config.attention_block_size is not None:
            implementation = self.config._attn_implementation
            if implementation not in ("eager", "sdpa", "flex_attention"):
                # flash-attention kernels take no mask beyond padding: the blocks would be silently dropped
                raise ValueError(
                    f"attention_block_size needs an attention implementation that takes a mask (eager, sdpa, "
                    f"flex_attention), not {implementation!r}"
                )
            left_padding = None if attention_mask is None else _left_padding(attention_mask.to(inputs_embeds.device))
            and_mask_function = block_local_mask_function(
                self.config.attention_block_size, self.config.attention_num_sink_tokens, left_padding
            )
        past_length = cache.get_seq_length() if cache is not None else 0
        if block_sequence_ids is not None and past_length > 0:
            block_sequence_ids = F.pad(block_sequence_ids, (past_length, 0), value=-1)
        return create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            and_mask_function=and_mask_function,
            block_sequence_ids=block_sequence_ids,
        )

    def _check_length(self, total_length: int) -> None:
        limit = self.config.max_position_embeddings
        if total_length > limit:
            # upstream runs it too: RoPE has no hard limit, and rope scaling (YaRN, dynamic, linear) exists for this
            logger.warning_once(
                f"Sequence length {total_length} (cached + new tokens) is longer than max_position_embeddings "
                f"({limit}), the length the model is configured for: it runs, as in transformers' DeepSeek-V3, but "
                "quality past it is unknown unless rope_parameters scale the positions (e.g. YaRN)"
            )


def block_local_mask_function(
    block_size: int, num_sink_tokens: int = 0, left_padding: torch.Tensor | None = None
) -> Callable:
    """Mask function (transformers' `(batch_idx, head_idx, q_idx, kv_idx) -> bool` convention) of blockwise local
    attention: key `kv_idx` is visible to query `q_idx` when it lies in the query's block of `block_size` positions or
    the block before, or among the first `num_sink_tokens` positions. `create_causal_mask` intersects it with the
    causal (and padding, packing) mask; on packed rows the positions restart with every sequence.

    Args:
        block_size (`int`): positions per block.
        num_sink_tokens (`int`, *optional*, defaults to 0): leading positions every later query sees.
        left_padding (`torch.Tensor` of shape `(batch,)`, *optional*): pad positions before each row's first real
            token (as transformers' `chunked_overlay` takes them); blocks and sinks are counted from that token, so a
            left-padded row sees what it sees alone. `None`: counted from index 0.
    """

    def inner_mask(batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        if left_padding is not None:
            # pad keys get negative indices here; the padding mask hides them
            q_idx, kv_idx = q_idx - left_padding[batch_idx], kv_idx - left_padding[batch_idx]
        return (kv_idx // block_size >= q_idx // block_size - 1) | (kv_idx < num_sink_tokens)

    return inner_mask


def _left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(batch,)` number of pad positions before each row's first real token of a `(batch, kv_len)` padding mask
    (past and current positions, as `generate` and the serving engine pass it), counted as transformers'
    `create_chunked_causal_mask` counts them."""
    return (attention_mask.long().cumsum(dim=-1) == 0).sum(dim=-1)


def _packed_sequence_ids(
    position_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None, cache: Cache | None, batch_size: int
) -> torch.LongTensor | None:
    """`(batch, seq_len)` sequence index of each position when rows are packed (position ids restart inside a row,
    no padding mask, no cache: the convention `create_causal_mask` reads as block-diagonal), else None."""
    if position_ids is None or attention_mask is not None or cache is not None:
        return None
    return find_packed_sequence_indices(position_ids.expand(batch_size, -1))


def _token_mask(attention_mask: torch.Tensor | None, batch_size: int, seq_len: int, device) -> torch.Tensor:
    """`(batch, seq_len)` float mask of the real positions of a forward's inputs (all of them without a 2-D mask)."""
    attention_mask = padding_mask(attention_mask)
    if attention_mask is None:
        return torch.ones(batch_size, seq_len, device=device)
    return attention_mask[:, -seq_len:].float()


class DeepseekV3MultimodalForConditionalGeneration(DeepseekV3MultimodalPreTrainedModel, DeepseekV3ForCausalLM):
    """The shared decoder with the language-model head: next-token prediction over text, images and audio.

    Upstream's `DeepseekV3ForCausalLM` (tied embeddings, tensor-, pipeline- and FSDP-parallel plans) whose `forward`
    also takes media and returns each loss term by name.
    """

    # `DeepseekV3ForCausalLM.__init__` (transformers 5.24.0) with our decoder; upstream's own is skipped, as
    # `DeepseekV3MultimodalModel`'s is: it would build and initialise a `DeepseekV3Model` only to replace it.
    def __init__(self, config: DeepseekV3MultimodalConfig):
        super(DeepseekV3ForCausalLM, self).__init__(config)
        self.model = DeepseekV3MultimodalModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        placeholder_ids = [
            getattr(config, f"{modality}_token_id")
            for modality in ("image", "audio")
            if getattr(config, f"use_{modality}_input")
        ]
        if placeholder_ids:
            # a placeholder only stands for media the processor supplies: generated text never contains one
            self.generation_config.suppress_tokens = placeholder_ids

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """`GenerationMixin._prepare_cache_for_generation`, then the head gates' running state attached to the cache
        before any forward (`attach_gate_state`), so that a compiled first step (chunked prefill) keeps it too."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if self.config.use_attention_gate and isinstance(model_kwargs.get("cache"), Cache):
            attach_gate_state(model_kwargs["cache"])

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """See [`DeepseekV3MultimodalModel.get_text_features`]."""
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def get_image_features(
        self, pixel_values: torch.FloatTensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """See [`DeepseekV3MultimodalModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values=pixel_values, **kwargs)

    def get_audio_features(
        self,
        input_features: torch.FloatTensor,
        input_features_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """See [`DeepseekV3MultimodalModel.get_audio_features`]."""
        return self.model.get_audio_features(
            input_features=input_features, input_features_mask=input_features_mask, **kwargs
        )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        contrastive_input_ids: torch.LongTensor | None = None,
        contrastive_attention_mask: torch.Tensor | None = None,
        distillation_targets: torch.FloatTensor | None = None,
        distillation_query_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DeepseekV3MultimodalCausalLMOutputWithPast:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): targets for next-token prediction
                (shifted inside the loss); -100 is ignored.
            contrastive_input_ids (`torch.LongTensor` of shape `(num_pairs, text_len)`, *optional*): one text per
                image and audio clip of the call (images first); adds `contrastive_loss`. Without `input_ids` the
                call computes only that loss.
            contrastive_attention_mask (`torch.Tensor` of shape `(num_pairs, text_len)`, *optional*).
            distillation_targets (`torch.FloatTensor` of shape `(batch, num_image_tokens)`, `(batch, seq_len,
                num_image_tokens)` or `(batch, seq_len, num_groups, num_image_tokens)`, *optional*): teacher
                distribution over each row's image patches, per row, per query position, or per query position and
                group of heads (`attention_distillation_loss`); adds `distillation_loss` (needs eager attention).
            distillation_query_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): the text positions
                whose attention to the image is distilled; required with `distillation_targets`.
            logits_to_keep (`int` or `torch.Tensor`): keep only the last `n` positions' logits (0 keeps all).

        The other arguments are those of [`DeepseekV3MultimodalModel.forward`]. `loss` is the sum of the terms
        computed, and each term is returned by name.
        """
        media = {"pixel_values": pixel_values, "input_features": input_features}
        losses = {}
        if contrastive_input_ids is not None:
            losses["contrastive_loss"] = self.model.contrastive_loss(
                contrastive_input_ids, contrastive_attention_mask, **media, input_features_mask=input_features_mask
            )
            if input_ids is None and inputs_embeds is None:
                return DeepseekV3MultimodalCausalLMOutputWithPast(loss=losses["contrastive_loss"], **losses)
        if distillation_targets is not None and self.config.attention_distillation_weight == 0:
            # the ablation of distillation: the same batches train without the term (nothing is computed)
            distillation_targets = distillation_query_mask = None
        if distillation_targets is not None:
            self._check_distillation_inputs(input_ids, distillation_query_mask)
            kwargs["output_attentions"] = True
        has_loss = labels is not None or distillation_targets is not None
        penalize_gates = self.config.attention_gate_sparsity_weight > 0 and has_loss
        if penalize_gates:
            kwargs["output_gate_values"] = True
        count_load, balance_sequences = self._router_statistics_wanted(has_loss)
        if count_load or balance_sequences:
            kwargs["output_router_logits"] = kwargs["output_router_indices"] = True
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **media,
            input_features_mask=input_features_mask,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        if labels is not None:
            losses["lm_loss"] = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        if distillation_targets is not None:
            image_mask = input_ids == self.config.image_token_id
            losses["distillation_loss"] = self.config.attention_distillation_weight * attention_distillation_loss(
                outputs.attentions, image_mask, distillation_query_mask.bool(), distillation_targets
            )
        if penalize_gates:
            losses["gate_sparsity_loss"] = self.config.attention_gate_sparsity_weight * gate_sparsity_loss(
                outputs.gate_values, padding_mask(attention_mask)
            )
        token_mask = _token_mask(attention_mask, *outputs.last_hidden_state.shape[:2], logits.device)
        if balance_sequences:
            losses["balance_loss"] = self.config.sequence_balance_loss_weight * sequence_balance_loss(
                outputs.router_logits, outputs.router_indices, token_mask
            )
        load = expert_load(outputs.router_indices, token_mask, self.config.n_routed_experts) if count_load else None
        if kwargs.get("num_items_in_batch") is not None and len(losses) > 1:
            logger.warning_once(
                "num_items_in_batch normalises lm_loss over the accumulated batch but not the other loss terms, which "
                "plain `Trainer` then over-weights by the accumulation steps times the processes: train with "
                "deepseekv3.training.trainer.DeepseekV3Trainer, which weights every term exactly"
            )
        return DeepseekV3MultimodalCausalLMOutputWithPast(
            loss=sum(losses.values()) if losses else None,
            **losses,
            expert_load=load,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            gate_values=outputs.gate_values,
        )

    def _router_statistics_wanted(self, has_loss: bool) -> tuple[bool, bool]:
        """(count the experts' loads, compute the sequence-wise balance loss): both only while training a model
        with MoE layers, so inference never sees them."""
        has_moe = self.config.num_hidden_layers > self.config.first_k_dense_replace
        if not (self.training and has_moe):
            return False, False
        return self.config.router_bias_update_rate > 0, self.config.sequence_balance_loss_weight > 0 and has_loss

    def _check_distillation_inputs(
        self, input_ids: torch.LongTensor | None, distillation_query_mask: torch.Tensor | None
    ) -> None:
        if self.config._attn_implementation != "eager":
            raise ValueError(
                "distillation_targets need the attention probabilities: load or set the model with "
                f"attn_implementation='eager' (it is {self.config._attn_implementation!r})"
            )
        if input_ids is None or distillation_query_mask is None:
            raise ValueError("distillation_targets need input_ids (to find the image) and distillation_query_mask")
        if not self.config.use_image_input:
            raise ValueError("distillation_targets need use_image_input=True")
