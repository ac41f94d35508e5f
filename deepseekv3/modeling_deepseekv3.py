"""The DeepSeek-V3 multimodal model: one decoder shared by text, images and audio.

The text path is transformers' own DeepSeek-V3 (MLA attention, DeepSeekMoE with the auxiliary-loss-free top-k
router, RMSNorm, YaRN rotary embedding), reused class by class, so its state-dict keys are those of
`DeepseekV3ForCausalLM` and, with every new feature off, the logits are identical. On top, each behind a config
field: a dynamic per-head attention gate, image-patch and audio-frame embeddings scattered into placeholder
positions, learned modality-type embeddings, bidirectional attention inside one media span, and CLIP-style
projection heads.

This file is part of the hub-portable core: it imports only the standard library, torch, transformers and
`.configuration_deepseekv3`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3DecoderLayer,
    DeepseekV3PreTrainedModel,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
    DeepseekV3TopkRouter,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_deepseekv3 import (
    AUDIO_MODALITY_ID,
    IMAGE_MODALITY_ID,
    TEXT_MODALITY_ID,
    DeepseekV3MultimodalConfig,
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
class DeepseekV3MultimodalModelOutputWithPast(ModelOutput):
    """Output of [`DeepseekV3MultimodalModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, seq_len, hidden_size)`): final-norm output.
        cache (`Cache`, *optional*): the MLA latent cache, when `use_cache=True`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*): with `output_attentions=True` (eager attention).
        router_logits (`tuple(torch.FloatTensor)`, *optional*): per MoE layer, `(batch * seq_len, n_routed_experts)`,
            with `output_router_logits=True`.
        router_indices (`tuple(torch.LongTensor)`, *optional*): per MoE layer, the experts each position is routed
            to, `(batch * seq_len, num_experts_per_tok)`, with `output_router_indices=True`.
        gate_values (`tuple(torch.FloatTensor)`, *optional*): per gated layer, `(batch, seq_len, num_heads)` in
            `[0, 1]`, with `output_gate_values=True`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_indices: tuple[torch.LongTensor, ...] | None = None
    gate_values: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DeepseekV3MultimodalCausalLMOutputWithPast(ModelOutput):
    """Output of [`DeepseekV3MultimodalForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): the sum of the loss terms below that were computed.
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
        logits (`torch.FloatTensor` of shape `(batch_size, seq_len, vocab_size)`, *optional*): language-model
            logits (absent for a contrastive-only batch).
        cache, hidden_states, attentions, router_logits, gate_values: as in
            [`DeepseekV3MultimodalModelOutputWithPast`].
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None
    distillation_loss: torch.FloatTensor | None = None
    gate_sparsity_loss: torch.FloatTensor | None = None
    balance_loss: torch.FloatTensor | None = None
    expert_load: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
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


def causal_running_mean(
    values: torch.Tensor,
    padding_mask: torch.Tensor | None,
    num_queries: int,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of `values` over positions `<= t` of the same sequence, for the last `num_queries` positions.

    Args:
        values (`torch.Tensor` of shape `(batch, kv_len, dim)`): per-position vectors (cached past first).
        padding_mask (`torch.Tensor` of shape `(batch, kv_len)`, *optional*): 1 for real tokens, 0 for padding;
            padding positions count for nothing. `None` means every position is real.
        num_queries (`int`): how many trailing positions to return.
        segment_ids (`torch.Tensor` of shape `(batch, kv_len)`, *optional*): for packed rows, the sequence each
            position belongs to (non-decreasing); the mean restarts at every new sequence.

    Returns:
        `torch.Tensor` of shape `(batch, num_queries, dim)`, in fp32.
    """
    values = values.float()
    if padding_mask is None:
        padding_mask = values.new_ones(values.shape[:2])
    weights = padding_mask.to(values.dtype).unsqueeze(-1)  # (batch, kv_len, 1)
    weighted = torch.cat([values * weights, weights], dim=-1)  # sums and counts side by side
    running = torch.cumsum(weighted, dim=1)
    if segment_ids is not None:
        # subtract what the earlier sequences of the row had summed by the start of this one
        positions = torch.arange(segment_ids.shape[1], device=segment_ids.device)
        is_start = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0), value=True)
        start_index = torch.cummax(torch.where(is_start, positions, 0), dim=1).values  # (batch, kv_len)
        before_start = (running - weighted).gather(1, start_index.unsqueeze(-1).expand_as(running))
        running = running - before_start
    running = running[:, -num_queries:]
    running_sum, running_count = running[..., :-1], running[..., -1:]
    return running_sum / running_count.clamp(min=1.0)


class DeepseekV3MultimodalGateOutput(nn.Linear):
    """The head gate's last layer (`up_proj`), a plain `nn.Linear` with its own initialisation in `_init_weights`.

    transformers initialises module by module and skips a module without parameters of its own, as the gate is:
    the initialisation has to be keyed on this layer, not on the gate around it.
    """


class DeepseekV3MultimodalHeadGate(nn.Module):
    """Dynamic per-head attention gate: `sigmoid(W2 silu(W1 mean_{s<=t} c_s))`, one value per head.

    `c_s` is the normalized compressed KV latent of position `s` (`kv_a_layernorm` output), which MLA caches anyway:
    the running mean needs no state beyond the cache, so decoding step by step equals the full forward, and every
    cache operation (crop, reorder, batch select) stays exact.
    """

    def __init__(self, config: DeepseekV3MultimodalConfig):
        super().__init__()
        self.down_proj = nn.Linear(config.kv_lora_rank, config.attention_gate_hidden_size)
        self.act_fn = ACT2FN["silu"]
        self.up_proj = DeepseekV3MultimodalGateOutput(config.attention_gate_hidden_size, config.num_attention_heads)

    def forward(
        self,
        latent: torch.Tensor,
        padding_mask: torch.Tensor | None,
        num_queries: int,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args: latent `(batch, kv_len, kv_lora_rank)`; padding_mask and segment_ids `(batch, kv_len)` or None
        (see `causal_running_mean`). Returns: gate values `(batch, num_queries, num_heads)` in fp32."""
        # fp32 throughout, autocast or not: the gate decides which heads are skipped
        with torch.autocast(device_type=latent.device.type, enabled=False):
            summary = causal_running_mean(latent, padding_mask, num_queries, segment_ids)
            summary = summary.to(self.down_proj.weight.dtype)
            return torch.sigmoid(self.up_proj(self.act_fn(self.down_proj(summary))).float())


def _head_rows(heads: torch.Tensor, rows_per_head: int) -> torch.Tensor:
    """Row indices of a `(num_heads * rows_per_head, ...)` weight that belong to `heads`."""
    return (heads[:, None] * rows_per_head + torch.arange(rows_per_head, device=heads.device)).reshape(-1)


def _is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` computes exactly `F.linear(inputs, module.weight, module.bias)` on a dense weight."""
    return type(module).forward is nn.Linear.forward and type(module.weight.data) is torch.Tensor


class DeepseekV3MultimodalAttention(DeepseekV3Attention):
    """MLA attention with a dynamic per-head output gate and inference-time head skipping (`use_attention_gate`), and
    patch positions in the values of image tokens (`use_image_position_values`)."""

    def __init__(self, config: DeepseekV3MultimodalConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.head_gate = DeepseekV3MultimodalHeadGate(config) if config.use_attention_gate else None
        # heads the last forward computed (None: all of them); read through `skipped_heads`
        self.last_kept_heads: torch.Tensor | None = None

    def skipped_heads(self) -> list[int]:
        """Indices of the heads the last forward pass skipped (empty when it computed every head)."""
        if self.last_kept_heads is None:
            return []
        kept = set(self.last_kept_heads.tolist())
        return [head for head in range(self.config.num_attention_heads) if head not in kept]

    def _kept_heads(self, gate_values: torch.Tensor) -> torch.Tensor | None:
        """Heads to compute, or None for all. Only in eval mode: a head is skipped when its gate is below
        `attention_gate_skip_threshold` at every position of the batch."""
        threshold = self.config.attention_gate_skip_threshold
        if self.training or threshold <= 0.0:
            return None
        q_module = self.q_proj if self.q_lora_rank is None else self.q_b_proj
        projections = (q_module, self.kv_b_proj, self.o_proj)
        if not all(_is_plain_linear(module) for module in projections):
            # slicing `.weight` rows is exact only for a plain linear layer: an unmerged LoRA adds its own term, and a
            # quantized weight (torchao's `Int8Tensor`) would lose its per-row scales
            return None
        is_open = (gate_values >= threshold).flatten(0, 1).any(dim=0)  # (num_heads,)
        if bool(is_open.all()):
            return None
        return is_open.nonzero().squeeze(-1)

    def _project(self, module: nn.Linear, inputs: torch.Tensor, heads: torch.Tensor | None, rows: int):
        if heads is None:
            return module(inputs)
        return F.linear(inputs, module.weight[_head_rows(heads, rows)])

    # Adapted from transformers 5.24.0 `DeepseekV3Attention.forward`: the gate reads the cached latent before the
    # heads are expanded, and skipped heads drop out of the query, key/value expansion and output projections.
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        gate_padding_mask: torch.Tensor | None = None,
        gate_segment_ids: torch.Tensor | None = None,
        image_coordinates: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`image_coordinates` `(batch, seq_len, 2)`: with `use_image_position_values`, each position's patch (row,
        column) in [-1, 1] (zeros for text and audio), cached beside the latent and added to every head's value."""
        batch_size, seq_length = hidden_states.shape[:-1]

        compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
        kv_nope, k_rot = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope).view(batch_size, 1, seq_length, self.kv_lora_rank)
        k_rot = k_rot.view(batch_size, 1, seq_length, self.qk_rope_head_dim)
        q_input = hidden_states if self.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(hidden_states))
        q_module = self.q_proj if self.q_lora_rank is None else self.q_b_proj

        cos, sin = position_embeddings
        # The rotated key is cached (as upstream); rotating the single-head key twice costs next to nothing.
        new_k_rot = self._apply_rotary(k_rot, k_rot, cos, sin)[1]
        k_rot = new_k_rot
        with_coordinates = self.config.use_image_position_values
        if with_coordinates:
            # cached as two more latent channels, so decoding step by step sees the same values as the full forward
            coordinates = image_coordinates.to(kv_nope.dtype).view(batch_size, 1, seq_length, 2)
            kv_nope = torch.cat((kv_nope, coordinates), dim=-1)
        if cache is not None:
            kv_nope, k_rot = cache.update(kv_nope, k_rot, self.layer_idx, kwargs=kwargs)
        if with_coordinates:
            kv_nope, coordinates = torch.split(kv_nope, [self.kv_lora_rank, 2], dim=-1)

        gate_values = heads = None
        if self.head_gate is not None:
            # (batch, seq, heads)
            gate_values = self.head_gate(kv_nope.squeeze(1), gate_padding_mask, seq_length, gate_segment_ids)
            heads = self._kept_heads(gate_values)
            if heads is not None:
                gate_values = gate_values[..., heads]
        self.last_kept_heads = heads

        query_states = self._project(q_module, q_input, heads, self.qk_head_dim)
        query_states = query_states.view(batch_size, seq_length, -1, self.qk_head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(query_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_rot = self._apply_rotary(q_rot, new_k_rot, cos, sin)[0]
        query_states = torch.cat((q_pass, q_rot), dim=-1)  # (batch, kept_heads, seq, qk_head_dim)

        key_states, value_states = self._expand_kv(kv_nope, k_rot, heads)
        if with_coordinates:
            # (batch, 1, kv_len, 2) added to channels 0-1 of every head: the attention output then holds the
            # attention-weighted patch position, which the latent alone does not pass on (README, "The main job")
            value_states = torch.cat((value_states[..., :2] + coordinates, value_states[..., 2:]), dim=-1)
        pad_values = self.config._attn_implementation == "sdpa" and self.v_head_dim < self.qk_head_dim
        if pad_values:
            # torch's fused sdpa kernels (the CPU flash kernel among them) need one head size for keys and values;
            # otherwise sdpa falls back to its math kernel, which materialises the (seq, seq) scores (measured at 8k
            # tokens on CPU: 17x the time, 2.5 GB against 8 MB). Zero columns leave the first v_head_dim unchanged.
            value_states = F.pad(value_states, (0, self.qk_head_dim - self.v_head_dim))

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        if pad_values:
            attn_output = attn_output[..., : self.v_head_dim]
        if gate_values is not None:
            # (batch, seq, kept_heads, v_head_dim) scaled per head, then flattened for o_proj
            attn_output = attn_output * gate_values.unsqueeze(-1).to(attn_output.dtype)
        attn_output = attn_output.reshape(batch_size, seq_length, -1).contiguous()
        if heads is None:
            return self.o_proj(attn_output), attn_weights
        weight = self.o_proj.weight[:, _head_rows(heads, self.v_head_dim)]
        return F.linear(attn_output, weight, self.o_proj.bias), attn_weights

    def _apply_rotary(
        self, q_rot: torch.Tensor, k_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rotate = apply_rotary_pos_emb_interleave if self.config.rope_interleave else apply_rotary_pos_emb
        return rotate(q_rot, k_rot, cos, sin)

    def _expand_kv(
        self, kv_nope: torch.Tensor, k_rot: torch.Tensor, heads: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if heads is None:
            return self.expand_kv(kv_nope, k_rot)
        batch_size, _, kv_length, _ = kv_nope.shape
        rows = _head_rows(heads, self.qk_nope_head_dim + self.v_head_dim)
        kv = F.linear(kv_nope, self.kv_b_proj.weight[rows])
        # (batch, kept_heads, kv_len, qk_nope_head_dim + v_head_dim)
        kv = kv.view(batch_size, kv_length, -1, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, value_states = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key_states = torch.cat((k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        return key_states, value_states


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
    input_modalities = ["image", "audio", "text"]
    _no_split_modules = ["DeepseekV3MultimodalDecoderLayer"]
    _can_compile_fullgraph = False  # data-dependent media scatter and head skipping
    _can_record_outputs = {
        "hidden_states": DeepseekV3MultimodalDecoderLayer,
        "attentions": DeepseekV3Attention,
        "router_logits": OutputRecorder(DeepseekV3TopkRouter, index=0),
        "router_indices": OutputRecorder(DeepseekV3TopkRouter, index=2),
        "gate_values": DeepseekV3MultimodalHeadGate,
    }
    # Sensitive to rounding: the MoE router (upstream's list), every RMSNorm weight, the head gates and the
    # modality-type embeddings. `_strict` is honoured for bf16 and fp16 loads alike.
    _keep_in_fp32_modules_strict = [
        "e_score_correction_bias",
        "gate.weight",
        "norm.weight",
        "head_gate",
        "modality_type_embedding",
    ]
    _keep_in_fp32_modules = _keep_in_fp32_modules_strict

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides by searching the model's source file for `@use_experts_implementation`; the experts
        # here are upstream's `DeepseekV3Experts`, which carry that decorator, so every kernel
        # (`experts_implementation="grouped_mm"` by default, "eager", ...) applies to them as it does upstream.
        return True

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
        `AutoModelForCausalLM` and `AutoModelForImageTextToText` all load the checkpoint with
        `trust_remote_code=True`.
        """
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": f"{module}.DeepseekV3MultimodalModel",
                "AutoModelForCausalLM": f"{module}.DeepseekV3MultimodalForConditionalGeneration",
                "AutoModelForImageTextToText": f"{module}.DeepseekV3MultimodalForConditionalGeneration",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

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


class DeepseekV3MultimodalModel(DeepseekV3MultimodalPreTrainedModel):
    """The shared decoder: token, image-patch and audio-frame embeddings in, final hidden states out."""

    # `AutoModel` on a saved `ForConditionalGeneration` checkpoint: the LM head is expected to be left out.
    _keys_to_ignore_on_load_unexpected = [*DeepseekV3PreTrainedModel._keys_to_ignore_on_load_unexpected, r"lm_head\."]

    def __init__(self, config: DeepseekV3MultimodalConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DeepseekV3MultimodalDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = DeepseekV3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekV3RotaryEmbedding(config=config)
        _replace_sensitive_modules(self, config)

        stem_channels = config.image_conv_stem_channels
        self.image_stem = (
            nn.Sequential(
                nn.Conv2d(config.num_channels, stem_channels, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(stem_channels, stem_channels, 3, padding=1),
                nn.GELU(),
            )
            if config.use_image_input and stem_channels > 0
            else None
        )
        if not config.use_image_input:
            self.image_patch_embedding = None
        elif self.image_stem is None:
            self.image_patch_embedding = nn.Conv2d(
                config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
            )
        else:
            # overlapping windows: each patch token reads its patch and half a patch around it
            self.image_patch_embedding = nn.Conv2d(
                stem_channels,
                config.hidden_size,
                2 * config.patch_size,
                stride=config.patch_size,
                padding=config.patch_size // 2,
            )
        self.image_position_embedding = (
            nn.Embedding(config.num_image_tokens, config.hidden_size) if config.use_image_input else None
        )
        self.audio_frame_embedding = (
            nn.Conv1d(
                config.num_mel_bins, config.hidden_size, config.audio_conv_stride, stride=config.audio_conv_stride
            )
            if config.use_audio_input
            else None
        )
        self.modality_type_embedding = (
            nn.Embedding(config.num_modality_types, config.hidden_size) if config.num_modality_types else None
        )
        projection_dim = config.contrastive_projection_dim
        has_projection = projection_dim is not None
        self.text_projection = nn.Linear(config.hidden_size, projection_dim, bias=False) if has_projection else None
        self.image_projection = (
            nn.Linear(config.hidden_size, projection_dim, bias=False)
            if has_projection and config.use_image_input
            else None
        )
        self.audio_projection = (
            nn.Linear(config.hidden_size, projection_dim, bias=False)
            if has_projection and config.use_audio_input
            else None
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.contrastive_logit_scale_init)) if has_projection else None
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
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
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): token ids; each image occupies
                `config.num_image_tokens` `image_token_id` positions, each audio clip `frames // audio_conv_stride`
                `audio_token_id` positions.
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
        packed_sequence_ids = _packed_sequence_ids(position_ids, attention_mask, cache, inputs_embeds.shape[0])
        if use_cache and cache is None and packed_sequence_ids is None:  # packed rows cannot be continued
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_length(past_length + inputs_embeds.shape[1])
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
            position_ids = position_ids.unsqueeze(0)
        if block_sequence_ids is not None and past_length > 0:
            block_sequence_ids = F.pad(block_sequence_ids, (past_length, 0), value=-1)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            and_mask_function=self._block_local_mask_function(),
            block_sequence_ids=block_sequence_ids,
        )
        if self.config.use_image_position_values:
            kwargs["image_coordinates"] = self.get_image_coordinates(input_ids, inputs_embeds)
        if self.config.use_attention_gate:
            is_padding_mask = attention_mask is not None and attention_mask.ndim == 2
            kwargs["gate_padding_mask"] = attention_mask if is_padding_mask else None
            kwargs["gate_segment_ids"] = packed_sequence_ids

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return DeepseekV3MultimodalModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)

    def _block_local_mask_function(self) -> Callable | None:
        """`block_local_mask_function` of the config's blockwise attention, or None for dense attention."""
        if self.config.attention_block_size is None:
            return None
        implementation = self.config._attn_implementation
        if implementation not in ("eager", "sdpa", "flex_attention"):
            # flash-attention kernels take no mask beyond padding: the blocks would be silently dropped
            raise ValueError(
                f"attention_block_size needs an attention implementation that takes a mask (eager, sdpa, "
                f"flex_attention), not {implementation!r}"
            )
        return block_local_mask_function(self.config.attention_block_size, self.config.attention_num_sink_tokens)

    def _check_length(self, total_length: int) -> None:
        limit = self.config.max_position_embeddings
        if total_length > limit:
            # upstream runs it too: RoPE has no hard limit, and rope scaling (YaRN, dynamic, linear) exists for this
            logger.warning_once(
                f"Sequence length {total_length} (cached + new tokens) is longer than max_position_embeddings "
                f"({limit}), the length the model is configured for: it runs, as in transformers' DeepSeek-V3, but "
                "quality past it is unknown unless rope_parameters scale the positions (e.g. YaRN)"
            )

    def embed_inputs(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        mm_token_type_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.FloatTensor, torch.LongTensor | None]:
        """Token embeddings with media features scattered into their placeholders and modality types added.

        Returns:
            `(inputs_embeds, block_sequence_ids)`: embeddings `(batch, seq_len, hidden_size)`, and, with
            `use_bidirectional_media_attention` and media present, `(batch, seq_len)` span ids (-1 for text) that
            make each media span attend to itself bidirectionally; else `None`.
        """
        has_media = pixel_values is not None or input_features is not None
        if inputs_embeds is not None and has_media:
            raise ValueError("Media inputs need `input_ids` to locate their placeholders, not `inputs_embeds`")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        block_sequence_ids = None
        if input_ids is not None:
            inputs_embeds, block_sequence_ids = self._scatter_media(
                input_ids, inputs_embeds, pixel_values, input_features, input_features_mask
            )
        if self.modality_type_embedding is not None:
            if mm_token_type_ids is None:
                mm_token_type_ids = self.get_modality_ids(input_ids, inputs_embeds)
            inputs_embeds = inputs_embeds + self.modality_type_embedding(mm_token_type_ids).to(inputs_embeds.dtype)
        if not self.config.use_bidirectional_media_attention:
            block_sequence_ids = None
        return inputs_embeds, block_sequence_ids

    def get_modality_ids(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor
    ) -> torch.LongTensor:
        """Modality of each position (0 text, 1 image, 2 audio) read from the placeholder tokens in `input_ids`."""
        if input_ids is None:
            return torch.full(inputs_embeds.shape[:2], TEXT_MODALITY_ID, device=inputs_embeds.device)
        modality_ids = torch.full_like(input_ids, TEXT_MODALITY_ID)
        if self.config.use_image_input:
            modality_ids = modality_ids.masked_fill(input_ids == self.config.image_token_id, IMAGE_MODALITY_ID)
        if self.config.use_audio_input:
            modality_ids = modality_ids.masked_fill(input_ids == self.config.audio_token_id, AUDIO_MODALITY_ID)
        return modality_ids

    def get_image_coordinates(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor
    ) -> torch.FloatTensor:
        """Row and column of each position's image patch, scaled to [-1, 1]; zeros where there is no image patch.

        Returns:
            `torch.FloatTensor` of shape `(batch, seq_len, 2)`, `(row, column)`. Each image fills
            `config.num_image_tokens` consecutive placeholders in row-major patch order.
        """
        if input_ids is None:
            return inputs_embeds.new_zeros(*inputs_embeds.shape[:2], 2)
        config = self.config
        is_image = input_ids == config.image_token_id
        patch_index = (is_image.long().cumsum(dim=-1) - 1) % config.num_image_tokens
        grid = config.image_size // config.patch_size
        scale = 2.0 / (grid - 1) if grid > 1 else 0.0
        coordinates = torch.stack((patch_index // grid, patch_index % grid), dim=-1).to(inputs_embeds.dtype)
        return (coordinates * scale - 1.0).where(is_image.unsqueeze(-1), 0.0)

    def _scatter_media(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.FloatTensor,
        pixel_values: torch.FloatTensor | None,
        input_features: torch.FloatTensor | None,
        input_features_mask: torch.Tensor | None,
    ) -> tuple[torch.FloatTensor, torch.LongTensor]:
        block_sequence_ids = torch.full_like(input_ids, -1)
        num_images = 0
        image_mask = self._placeholder_mask(input_ids, "image", pixel_values is not None)
        if pixel_values is not None:
            image_features = self.get_image_embeddings(pixel_values)  # (num_images, tokens, hidden)
            num_images, tokens_per_image = image_features.shape[:2]
            self._check_placeholder_count("image", image_mask, num_images * tokens_per_image, num_images)
            inputs_embeds = inputs_embeds.masked_scatter(
                image_mask.unsqueeze(-1), image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds)
            )
            image_index = torch.arange(num_images, device=input_ids.device).repeat_interleave(tokens_per_image)
            block_sequence_ids = block_sequence_ids.masked_scatter(image_mask, image_index)
        audio_mask = self._placeholder_mask(input_ids, "audio", input_features is not None)
        if input_features is not None:
            audio_features, tokens_per_clip = self.get_audio_embeddings(input_features, input_features_mask)
            self._check_placeholder_count("audio", audio_mask, audio_features.shape[0], len(tokens_per_clip))
            inputs_embeds = inputs_embeds.masked_scatter(audio_mask.unsqueeze(-1), audio_features.to(inputs_embeds))
            clip_index = torch.arange(len(tokens_per_clip), device=input_ids.device) + num_images
            block_sequence_ids = block_sequence_ids.masked_scatter(
                audio_mask, clip_index.repeat_interleave(tokens_per_clip)
            )
        return inputs_embeds, block_sequence_ids

    def _placeholder_mask(self, input_ids: torch.LongTensor, modality: str, has_media: bool) -> torch.Tensor:
        """Positions of `modality`'s placeholder; a placeholder without media (or media the config lacks) raises."""
        enabled = getattr(self.config, f"use_{modality}_input")
        if not enabled:
            if has_media:
                raise ValueError(f"Got {modality} inputs but the config has use_{modality}_input=False")
            return torch.zeros_like(input_ids, dtype=torch.bool)
        mask = input_ids == getattr(self.config, f"{modality}_token_id")
        if not has_media and bool(mask.any()):
            kind = "pixel_values" if modality == "image" else "input_features"
            raise ValueError(
                f"input_ids contain {int(mask.sum())} {modality} placeholder tokens but no `{kind}` were given"
            )
        return mask

    @staticmethod
    def _check_placeholder_count(modality: str, mask: torch.Tensor, num_tokens: int, num_items: int) -> None:
        num_placeholders = int(mask.sum())
        if num_placeholders != num_tokens:
            raise ValueError(
                f"input_ids contain {num_placeholders} {modality} placeholder tokens but the {num_items} {modality} "
                f"input(s) give {num_tokens} tokens"
            )

    def get_image_embeddings(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Patch embeddings of images.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, image_size, image_size)`).

        Returns:
            `torch.FloatTensor` of shape `(num_images, num_image_tokens, hidden_size)`, patches in row-major order.
        """
        config = self.config
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}"
            )
        pixels = pixel_values.to(self.image_patch_embedding.weight.dtype)
        if self.image_stem is not None:
            pixels = self.image_stem(pixels)
        patches = self.image_patch_embedding(pixels)
        patches = patches.flatten(2).transpose(1, 2)  # (num_images, num_patches, hidden)
        # rotary positions give the decoder the patches' order only; a learned 2-D position per patch (as in ViT)
        # tells it which row and column each patch comes from
        return patches + self.image_position_embedding.weight.to(patches.dtype)

    def get_audio_embeddings(
        self, input_features: torch.FloatTensor, input_features_mask: torch.Tensor | None = None
    ) -> tuple[torch.FloatTensor, torch.LongTensor]:
        """Frame embeddings of audio clips, without the padding frames.

        Args:
            input_features (`torch.FloatTensor` of shape `(num_clips, num_mel_bins, frames)`).
            input_features_mask (`torch.Tensor` of shape `(num_clips, frames)`, *optional*): 1 for real frames.

        Returns:
            `(features, tokens_per_clip)`: `(total_tokens, hidden_size)`, clips concatenated in order, and the
            `(num_clips,)` token count of each clip.
        """
        config = self.config
        if input_features.ndim != 3 or input_features.shape[1] != config.num_mel_bins:
            raise ValueError(
                f"input_features must have shape (num_clips, {config.num_mel_bins}, frames), "
                f"got {tuple(input_features.shape)}"
            )
        num_clips, _, num_frames = input_features.shape
        if not config.audio_conv_stride <= num_frames <= config.audio_max_frames:
            raise ValueError(
                f"input_features have {num_frames} frames; expected between audio_conv_stride "
                f"({config.audio_conv_stride}) and audio_max_frames ({config.audio_max_frames})"
            )
        if input_features_mask is None:
            valid_frames = torch.full((num_clips,), num_frames, device=input_features.device)
        elif tuple(input_features_mask.shape) != (num_clips, num_frames):
            raise ValueError(
                f"input_features_mask must have shape {(num_clips, num_frames)}, "
                f"got {tuple(input_features_mask.shape)}"
            )
        else:
            valid_frames = input_features_mask.long().sum(dim=-1)
        tokens_per_clip = valid_frames // config.audio_conv_stride
        frames = self.audio_frame_embedding(input_features.to(self.audio_frame_embedding.weight.dtype))
        frames = frames.transpose(1, 2)  # (num_clips, frames // stride, hidden)
        is_real = torch.arange(frames.shape[1], device=frames.device) < tokens_per_clip[:, None]
        return frames[is_real], tokens_per_clip

    def contrastive_loss(
        self,
        text_input_ids: torch.LongTensor,
        text_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Symmetric InfoNCE between texts and the media they describe, each encoded alone by the shared decoder.

        Args:
            text_input_ids (`torch.LongTensor` of shape `(num_pairs, text_len)`): one text per image, then one per
                audio clip, in that order; text_attention_mask as usual.
            pixel_values, input_features, input_features_mask: the media, as in `forward`.

        Returns:
            `torch.Tensor` of shape `()`: see [`contrastive_loss`].
        """
        media_features = []
        if pixel_values is not None:
            media_features.append(self.get_image_features(pixel_values))
        if input_features is not None:
            media_features.append(self.get_audio_features(input_features, input_features_mask))
        if not media_features:
            raise ValueError("contrastive_input_ids need media to pair with: pass pixel_values and/or input_features")
        media_features = torch.cat(media_features)
        if media_features.shape[0] != text_input_ids.shape[0]:
            raise ValueError(
                f"contrastive_input_ids has {text_input_ids.shape[0]} texts but there are {media_features.shape[0]} "
                "images and audio clips; pair one text with each"
            )
        text_features = self.get_text_features(text_input_ids, text_attention_mask)
        # two pairs that share a caption, or an image or clip, are no negatives of each other
        same_text = _identical_rows(text_input_ids, text_attention_mask)
        same_media = torch.zeros_like(same_text)
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if pixel_values is not None:
            same_media[:num_images, :num_images] = _identical_rows(pixel_values)
        if input_features is not None:
            same_media[num_images:, num_images:] = _identical_rows(input_features, input_features_mask)
        return contrastive_loss(text_features, media_features, self.logit_scale, same_text | same_media)

    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.FloatTensor:
        """Contrastive text embeddings: the decoder's mean-pooled final states through `text_projection`.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`), attention_mask (`(batch, seq_len)`).

        Returns:
            `torch.FloatTensor` of shape `(batch, contrastive_projection_dim)` (not normalized, as in CLIP).
        """
        self._require_projection(self.text_projection, "text")
        hidden_states = self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.text_projection(_masked_mean(hidden_states, attention_mask))

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Contrastive image embeddings: each image alone through the shared decoder, mean-pooled, projected.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_channels, image_size, image_size)`).

        Returns:
            `torch.FloatTensor` of shape `(num_images, contrastive_projection_dim)`.
        """
        self._require_projection(self.image_projection, "image")
        input_ids = torch.full(
            (pixel_values.shape[0], self.config.num_image_tokens), self.config.image_token_id, device=self.device
        )
        hidden_states = self(input_ids=input_ids, pixel_values=pixel_values, use_cache=False).last_hidden_state
        return self.image_projection(hidden_states.mean(dim=1))

    def get_audio_features(
        self, input_features: torch.FloatTensor, input_features_mask: torch.Tensor | None = None
    ) -> torch.FloatTensor:
        """Contrastive audio embeddings: each clip alone through the shared decoder, mean-pooled, projected.

        Args:
            input_features (`torch.FloatTensor` of shape `(num_clips, num_mel_bins, frames)`).
            input_features_mask (`torch.Tensor` of shape `(num_clips, frames)`, *optional*).

        Returns:
            `torch.FloatTensor` of shape `(num_clips, contrastive_projection_dim)`.
        """
        self._require_projection(self.audio_projection, "audio")
        num_clips, _, num_frames = input_features.shape
        if input_features_mask is None:
            input_features_mask = torch.ones(num_clips, num_frames, dtype=torch.long, device=input_features.device)
        tokens_per_clip = self.config.get_num_audio_tokens(input_features_mask.long().sum(dim=-1))
        positions = torch.arange(int(tokens_per_clip.max()), device=input_features.device)
        attention_mask = (positions < tokens_per_clip[:, None]).long()  # right padding
        input_ids = torch.where(attention_mask.bool(), self.config.audio_token_id, self.config.pad_token_id or 0)
        hidden_states = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            input_features=input_features,
            input_features_mask=input_features_mask,
            use_cache=False,
        ).last_hidden_state
        return self.audio_projection(_masked_mean(hidden_states, attention_mask))

    @staticmethod
    def _require_projection(projection: nn.Module | None, modality: str) -> None:
        if projection is None:
            raise ValueError(
                f"get_{modality}_features needs contrastive_projection_dim set"
                + ("" if modality == "text" else f" and use_{modality}_input=True")
            )


def block_local_mask_function(block_size: int, num_sink_tokens: int = 0) -> Callable:
    """Mask function (transformers' `(batch_idx, head_idx, q_idx, kv_idx) -> bool` convention) of blockwise local
    attention: key `kv_idx` is visible to query `q_idx` when it lies in the query's block of `block_size` positions or
    the block before, or among the first `num_sink_tokens` positions. `create_causal_mask` intersects it with the
    causal (and padding, packing) mask; on packed rows the positions restart with every sequence."""

    def inner_mask(batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        return (kv_idx // block_size >= q_idx // block_size - 1) | (kv_idx < num_sink_tokens)

    return inner_mask


def _packed_sequence_ids(
    position_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None, cache: Cache | None, batch_size: int
) -> torch.LongTensor | None:
    """`(batch, seq_len)` sequence index of each position when rows are packed (position ids restart inside a row,
    no padding mask, no cache: the convention `create_causal_mask` reads as block-diagonal), else None."""
    if position_ids is None or attention_mask is not None or cache is not None:
        return None
    return find_packed_sequence_indices(position_ids.expand(batch_size, -1))


def _masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence of `(batch, seq_len, hidden)` states, padding positions excluded."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def gate_sparsity_loss(gate_values: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
    """L1 penalty on the head gates (non-negative, so L1 is their mean): the mean over layers, heads and the real
    positions.

    Args:
        gate_values (`tuple` of `torch.Tensor` of shape `(batch, seq_len, num_heads)`): one per gated layer.
        attention_mask (`torch.Tensor` of shape `(batch, kv_len)`, *optional*): 1 for real tokens; any other shape
            (a prepared 4-D mask) or `None` counts every position.

    Returns:
        `torch.Tensor` of shape `()`, in fp32.
    """
    gates = torch.stack([values.float() for values in gate_values]).mean(dim=(0, -1))  # (batch, seq_len)
    if attention_mask is None or attention_mask.ndim != 2:
        return gates.mean()
    weights = attention_mask[:, -gates.shape[1] :].to(gates.dtype)
    return (gates * weights).sum() / weights.sum().clamp(min=1.0)


def contrastive_loss(
    text_features: torch.Tensor,
    media_features: torch.Tensor,
    logit_scale: torch.Tensor,
    is_false_negative: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): row `i` of `text_features` and row `i` of `media_features` are a pair.

    Args:
        text_features, media_features (`torch.Tensor` of shape `(batch, dim)`): projected embeddings.
        logit_scale (`torch.Tensor` of shape `()`): log of the inverse temperature, used as it is (as in CLIP, the
            training loop keeps it in `[0, log 100]` by clamping the parameter after each step, so its gradient never
            vanishes; `deepseekv3.training.trainer.DeepseekV3Trainer` does).
        is_false_negative (`torch.Tensor` of shape `(batch, batch)`, *optional*): True where pair `j` is no negative
            for pair `i` (the same caption, or the same image or clip): those logits are left out of both softmaxes.
            The diagonal is ignored.

    Returns:
        `torch.Tensor` of shape `()`, in fp32.
    """
    text_features = F.normalize(text_features.float(), dim=-1)
    media_features = F.normalize(media_features.float(), dim=-1)
    logits = logit_scale.float().exp() * text_features @ media_features.T  # (text, media)
    targets = torch.arange(logits.shape[0], device=logits.device)
    if is_false_negative is not None:
        is_false_negative = is_false_negative.bool() & (targets[:, None] != targets[None, :])
        logits = logits.masked_fill(is_false_negative, float("-inf"))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _identical_rows(*tensors: torch.Tensor | None) -> torch.Tensor:
    """`(batch, batch)` True where two rows are equal in every given tensor (each `(batch, ...)`)."""
    rows = torch.cat([tensor.flatten(1).float() for tensor in tensors if tensor is not None], dim=1)
    row_ids = torch.unique(rows, dim=0, return_inverse=True)[1]
    return row_ids[:, None] == row_ids[None, :]


def _token_mask(attention_mask: torch.Tensor | None, batch_size: int, seq_len: int, device) -> torch.Tensor:
    """`(batch, seq_len)` float mask of the real positions of a forward's inputs (all of them without a 2-D mask)."""
    if attention_mask is None or attention_mask.ndim != 2:
        return torch.ones(batch_size, seq_len, device=device)
    return attention_mask[:, -seq_len:].float()


def _expert_token_counts(router_indices: torch.Tensor, token_mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`(batch, num_experts)`: how many real tokens of each row each expert received (`router_indices` is
    `(batch * seq_len, top_k)`)."""
    batch_size, seq_len = token_mask.shape
    top_k = router_indices.shape[-1]
    weights = token_mask[:, :, None].expand(batch_size, seq_len, top_k).reshape(batch_size, -1)
    counts = torch.zeros(batch_size, num_experts, device=token_mask.device)
    return counts.scatter_add_(1, router_indices.reshape(batch_size, -1), weights)


def expert_load(router_indices: tuple[torch.Tensor, ...], token_mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert of each MoE layer, padding excluded: what DeepSeek-V3's bias rule balances.

    Args:
        router_indices (`tuple` of `torch.LongTensor` of shape `(batch * seq_len, num_experts_per_tok)`): one per
            MoE layer.
        token_mask (`torch.Tensor` of shape `(batch, seq_len)`): 1 for real positions.
        num_experts (`int`): routed experts per layer.

    Returns:
        `torch.Tensor` of shape `(num_moe_layers, num_experts)`, in fp32.
    """
    return torch.stack([_expert_token_counts(indices, token_mask, num_experts).sum(0) for indices in router_indices])


def sequence_balance_loss(
    router_logits: tuple[torch.Tensor, ...], router_indices: tuple[torch.Tensor, ...], token_mask: torch.Tensor
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (eqs. 17-20 of the V3 report), unweighted.

    Per sequence and MoE layer, `sum_i f_i * P_i` with `f_i = N_r / (K_r T) * #(real tokens routed to expert i)` and
    `P_i` the mean over the sequence's `T` real tokens of expert `i`'s normalised affinity `s_i / sum_j s_j`
    (`s = sigmoid(router logits)`); summed over layers (as DeepSeek's code adds each layer's term) and averaged over
    sequences. A perfectly balanced sequence scores 1 per layer. Each row counts as one sequence.

    Args:
        router_logits (`tuple` of `torch.Tensor` of shape `(batch * seq_len, num_experts)`): one per MoE layer.
        router_indices (`tuple` of `torch.LongTensor` of shape `(batch * seq_len, num_experts_per_tok)`): likewise.
        token_mask (`torch.Tensor` of shape `(batch, seq_len)`): 1 for real positions.

    Returns:
        `torch.Tensor` of shape `()`, in fp32.
    """
    batch_size, seq_len = token_mask.shape
    real_tokens = token_mask.sum(dim=1).clamp(min=1.0)[:, None]  # (batch, 1)
    per_layer = []
    for logits, indices in zip(router_logits, router_indices):
        num_experts, top_k = logits.shape[-1], indices.shape[-1]
        affinities = logits.float().sigmoid().view(batch_size, seq_len, num_experts)
        affinities = affinities / affinities.sum(dim=-1, keepdim=True)
        mean_affinity = (affinities * token_mask[..., None]).sum(dim=1) / real_tokens  # (batch, num_experts)
        fractions = _expert_token_counts(indices, token_mask, num_experts) * num_experts / (top_k * real_tokens)
        per_layer.append((fractions * mean_affinity).sum(dim=-1))  # (batch,)
    return torch.stack(per_layer).sum(dim=0).mean()


def attention_distillation_loss(
    attentions: tuple[torch.Tensor, ...],
    image_mask: torch.Tensor,
    query_mask: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """KL(target || student) per query position, averaged over query positions and layers; the student is a layer's
    text-to-image attention.

    For each layer, the attention of every query position in `query_mask` is restricted to the row's image tokens,
    renormalised to a distribution over the image's patches and averaged over heads (or over each group of heads, with
    per-group targets); its KL divergence from the position's target is averaged over the row's query positions (and
    head groups), then over the distilled rows (those with a query position) and layers. A row without a query
    position (an audio or text example batched with image examples) adds nothing and need not hold an image.

    Args:
        attentions (`tuple` of `torch.Tensor` of shape `(batch, num_heads, seq_len, seq_len)`): attention
            probabilities of the layers to distil.
        image_mask (`torch.Tensor` of shape `(batch, seq_len)`): the image placeholder positions; every distilled
            row holds exactly one image (`num_patches` positions).
        query_mask (`torch.Tensor` of shape `(batch, seq_len)`): the text positions whose attention is distilled
            (none at all: the loss is 0).
        targets (`torch.Tensor`): the teacher distribution over patches (summing to 1) of shape
            `(batch, num_patches)`, one per row (shared by the row's query positions); `(batch, seq_len,
            num_patches)`, one per position (read at the query positions only): a teacher model's attention, or the
            region of the object a position names; or `(batch, seq_len, num_groups, num_patches)`, one per position
            and group of heads: the heads are split into `num_groups` consecutive equal groups (which must divide
            `num_heads`), each distilled to its own target, so that a question about a relation can send some heads
            to each of the two objects.

    Returns:
        `torch.Tensor` of shape `()`, in fp32.
    """
    num_patches = targets.shape[-1]
    if targets.ndim >= 3 and targets.shape[1] != query_mask.shape[1]:
        raise ValueError(
            f"per-position distillation_targets cover {targets.shape[1]} positions, the inputs have "
            f"{query_mask.shape[1]}"
        )
    num_groups = targets.shape[2] if targets.ndim == 4 else 1
    num_heads = attentions[0].shape[1]
    if num_heads % num_groups != 0:
        raise ValueError(f"distillation_targets have {num_groups} head groups, which must divide {num_heads} heads")
    distilled = query_mask.any(dim=-1)
    if not bool(distilled.any()):
        # nothing to distil in this batch (say, audio rows only): a zero that keeps the graph
        return sum(attention.float().sum() for attention in attentions) * 0.0
    # only the distilled rows from here on
    attentions = [attention[distilled] for attention in attentions]
    image_mask, query_mask, targets = image_mask[distilled], query_mask[distilled], targets[distilled]
    batch_size = targets.shape[0]
    patches_per_row = image_mask.sum(dim=-1)
    if not bool((patches_per_row == num_patches).all()):
        raise ValueError(
            f"distillation needs exactly one image of {num_patches} patches per distilled row; rows have "
            f"{patches_per_row.tolist()} image tokens"
        )
    queries_per_row = query_mask.sum(dim=-1)
    image_positions = image_mask.nonzero()[:, 1].view(batch_size, 1, 1, num_patches)
    query_weights = query_mask.float() / queries_per_row[:, None]  # (batch, seq_len)
    # (batch, num_groups, seq_len or 1, num_patches)
    if targets.ndim == 4:
        targets = targets.float().transpose(1, 2)
    else:
        targets = targets.float().view(batch_size, 1, -1, num_patches)
    layer_losses = []
    for attention in attentions:
        # (batch, heads, seq_len, num_patches): each query's attention to the image, renormalised over patches
        to_image = attention.float().gather(-1, image_positions.expand(*attention.shape[:3], num_patches))
        to_image = to_image / to_image.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        # (batch, num_groups, seq_len, num_patches): averaged over each group's heads
        student = to_image.view(batch_size, num_groups, num_heads // num_groups, *to_image.shape[2:]).mean(dim=2)
        kl = (torch.xlogy(targets, targets) - targets * student.clamp(min=1e-12).log()).sum(dim=-1).mean(dim=1)
        layer_losses.append((kl * query_weights).sum(dim=-1).mean())
    return torch.stack(layer_losses).mean()


class DeepseekV3MultimodalForConditionalGeneration(DeepseekV3MultimodalPreTrainedModel, GenerationMixin):
    """The shared decoder with the language-model head: next-token prediction over text, images and audio."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DeepseekV3MultimodalConfig):
        super().__init__(config)
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

    def get_text_features(self, *args, **kwargs) -> torch.FloatTensor:
        """See [`DeepseekV3MultimodalModel.get_text_features`]."""
        return self.model.get_text_features(*args, **kwargs)

    def get_image_features(self, *args, **kwargs) -> torch.FloatTensor:
        """See [`DeepseekV3MultimodalModel.get_image_features`]."""
        return self.model.get_image_features(*args, **kwargs)

    def get_audio_features(self, *args, **kwargs) -> torch.FloatTensor:
        """See [`DeepseekV3MultimodalModel.get_audio_features`]."""
        return self.model.get_audio_features(*args, **kwargs)

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
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, slice_indices, :])
        if labels is not None:
            losses["lm_loss"] = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        if distillation_targets is not None:
            image_mask = input_ids == self.config.image_token_id
            losses["distillation_loss"] = self.config.attention_distillation_weight * attention_distillation_loss(
                outputs.attentions, image_mask, distillation_query_mask.bool(), distillation_targets
            )
        if penalize_gates:
            losses["gate_sparsity_loss"] = self.config.attention_gate_sparsity_weight * gate_sparsity_loss(
                outputs.gate_values, attention_mask
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
