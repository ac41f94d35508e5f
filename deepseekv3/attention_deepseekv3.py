"""The attention of the DeepSeek-V3 multimodal model: upstream's MLA with a dynamic per-head gate.

`DeepseekV3MultimodalAttention` subclasses transformers' `DeepseekV3Attention` (its projections, state-dict keys,
rotary embedding, `expand_kv` and attention backends) for what upstream's forward cannot express: the gate reads the
cached latent before the queries are projected, so that heads whose gate is closed can be left out of every matmul
at inference (`attention_gate_skip_threshold`), and image tokens carry their patch position in their values
(`use_image_position_values`). In cached decoding the gate's running mean comes from a fixed-size state kept in the
cache layer beside the latent (`DeepseekV3MultimodalGateStateMixin`): the running sum and count of each row, so a
decoding step costs the same at any context length.

This file is part of the hub-portable core: it imports only torch, transformers and `.configuration_deepseekv3`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, is_torchdynamo_compiling

from .configuration_deepseekv3 import DeepseekV3MultimodalConfig

__all__ = [
    "DeepseekV3MultimodalAttention",
    "DeepseekV3MultimodalDynamicLayer",
    "DeepseekV3MultimodalGateOutput",
    "DeepseekV3MultimodalGateStateMixin",
    "DeepseekV3MultimodalHeadGate",
    "DeepseekV3MultimodalStaticLayer",
    "attach_gate_state",
    "causal_running_sums",
    "gate_inputs",
    "is_prepared_mask",
    "open_media_spans",
    "padding_mask",
    "visible_sums",
]


def causal_running_sums(
    values: torch.Tensor, padding_mask: torch.Tensor | None, segment_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of `values` over the real positions `<= t` of the same sequence, at every position `t`.

    Args:
        values (`torch.Tensor` of shape `(batch, seq_len, dim)`): per-position vectors.
        padding_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 for real tokens, 0 for padding;
            padding positions count for nothing. `None` means every position is real.
        segment_ids (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): for packed rows, the sequence each
            position belongs to (non-decreasing); the sums restart at every new sequence.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: the sums `(batch, seq_len, dim)` and counts `(batch, seq_len, 1)`, in
        fp32.
    """
    values = values.float()
    if padding_mask is None:
        padding_mask = values.new_ones(values.shape[:2])
    weights = padding_mask.to(values.dtype).unsqueeze(-1)  # (batch, seq_len, 1)
    weighted = torch.cat([values * weights, weights], dim=-1)  # sums and counts side by side
    running = torch.cumsum(weighted, dim=1)
    if segment_ids is not None:
        # subtract what the earlier sequences of the row had summed by the start of this one
        positions = torch.arange(segment_ids.shape[1], device=segment_ids.device)
        is_start = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0), value=True)
        start_index = torch.cummax(torch.where(is_start, positions, 0), dim=1).values  # (batch, seq_len)
        before_start = (running - weighted).gather(1, start_index.unsqueeze(-1).expand_as(running))
        running = running - before_start
    return running[..., :-1], running[..., -1:]


def visible_sums(values: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of `values` over the positions each query sees: the gate's summary under a prepared 4-D mask.

    Where the mask is causal within each sequence (padding, packing), this is `causal_running_sums`; a mask of
    another shape (a shared prefix, a tree of continuations) gives each query the sum of exactly what it attends to.

    Args:
        values (`torch.Tensor` of shape `(batch, kv_len, dim)`): per-position vectors.
        key_mask (`torch.Tensor` of shape `(batch, num_queries, mask_kv_len)`, bool): True where a query sees a key;
            the batch may be 1 (shared by every row), and keys past `kv_len` are ignored, as the attention functions
            ignore them (a static cache's free slots).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: the sums `(batch, num_queries, dim)` and counts
        `(batch, num_queries, 1)`, in fp32.
    """
    weights = key_mask[..., : values.shape[1]].float()
    return torch.matmul(weights, values.float()), weights.sum(dim=-1, keepdim=True)


class DeepseekV3MultimodalGateOutput(nn.Linear):
    """The head gate's last layer (`up_proj`), a plain `nn.Linear` with its own initialisation in `_init_weights`.

    transformers initialises module by module and skips a module without parameters of its own, as the gate is:
    the initialisation has to be keyed on this layer, not on the gate around it.
    """


class DeepseekV3MultimodalHeadGate(nn.Module):
    """Dynamic per-head attention gate: `sigmoid(W2 silu(W1 mean_{s<=t} c_s))`, one value per head.

    `c_s` is the normalized compressed KV latent of position `s` (`kv_a_layernorm` output), which MLA caches anyway.
    In cached decoding the mean over the cached positions comes from their sum and count (`past_sum`, `past_count`),
    which the cache layer keeps (`DeepseekV3MultimodalGateStateMixin`): a step reads a fixed-size state, not the
    cached latent, and decoding step by step equals the full forward.
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
        key_mask: torch.Tensor | None = None,
        past_sum: torch.Tensor | None = None,
        past_count: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gate values of the last `num_queries` positions of `latent`.

        Args:
            latent (`torch.Tensor` of shape `(batch, kv_len, kv_lora_rank)`): the positions the mean runs over (after
                `past_sum`'s, if given).
            padding_mask, segment_ids (`torch.Tensor` of shape `(batch, kv_len)`, *optional*): see
                `causal_running_sums`.
            num_queries (`int`): how many trailing positions to gate.
            key_mask (`torch.Tensor` of shape `(batch, num_queries, kv_len)`, bool, *optional*): with a prepared 4-D
                attention mask, the keys each query sees, which then replace the causal running mean (see
                `visible_sums`).
            past_sum (`torch.Tensor` of shape `(batch, kv_lora_rank)`, *optional*), past_count (`torch.Tensor` of
                shape `(batch, 1)`, *optional*): fp32 sum and count of the latent of the real positions before
                `latent`'s first (a cache's), added to every query's.

        Returns:
            `torch.Tensor` of shape `(batch, num_queries, num_heads)` in fp32.
        """
        # fp32 throughout, autocast or not: the gate decides which heads are skipped
        with torch.autocast(device_type=latent.device.type, enabled=False):
            if key_mask is None:
                running_sum, running_count = causal_running_sums(latent, padding_mask, segment_ids)
                running_sum, running_count = running_sum[:, -num_queries:], running_count[:, -num_queries:]
            else:
                running_sum, running_count = visible_sums(latent, key_mask)
            if past_sum is not None:
                running_sum, running_count = running_sum + past_sum[:, None], running_count + past_count[:, None]
            summary = (running_sum / running_count.clamp(min=1.0)).to(self.down_proj.weight.dtype)
            return torch.sigmoid(self.up_proj(self.act_fn(self.down_proj(summary))).float())


# ---- the gate's running state in the cache ----


class DeepseekV3MultimodalGateStateMixin:
    """The head gate's running state in a transformers cache layer, beside the latent the layer caches: per row, the
    fp32 sum `gate_sum` `(batch, kv_lora_rank)` and count `gate_count` `(batch, 1)` of the latent of the real (not
    padding) positions the layer holds. Fixed-size whatever the context length, so a decoding step reads and updates
    it at a constant cost.

    The layer subclasses apply the batch operations to it as to the keys: `reorder_cache` (beam search),
    `batch_select_indices`, `batch_repeat_interleave`. `crop` and `reset` drop it (`has_gate_state` False): the sum
    at an earlier length is not kept, and the next forward recomputes it once from the cached latent and that
    forward's attention mask, which covers the cached positions (a crop is rare: assisted decoding's rejected
    tokens). The state stays on the device when an offloaded cache moves its keys to the CPU (a few KB per layer).

    A second base, after transformers' layer class: a plain `DynamicLayer` or `StaticLayer` can then take on the
    subclass in place (`__class__` assignment needs the same leading base).
    """

    gate_sum: torch.Tensor | None
    gate_count: torch.Tensor | None
    has_gate_state: bool

    def _init_gate_state(self) -> None:
        self.gate_sum = self.gate_count = None
        self.has_gate_state = False

    def store_gate_state(self, gate_sum: torch.Tensor, gate_count: torch.Tensor) -> None:
        """Sets the state to `gate_sum` `(batch, kv_lora_rank)` and `gate_count` `(batch, 1)`, fp32."""
        self.gate_sum, self.gate_count = gate_sum, gate_count
        self.has_gate_state = True

    def _drop_gate_state(self) -> None:
        self._init_gate_state()

    def _map_gate_state(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Applies a batch operation to the state (nothing without one)."""
        if self.has_gate_state:
            self.store_gate_state(function(self.gate_sum), function(self.gate_count))

    def _reorder_gate_state(self, beam_idx: torch.LongTensor) -> None:
        self._map_gate_state(lambda state: state.index_select(0, beam_idx.to(state.device)))


class DeepseekV3MultimodalDynamicLayer(DynamicLayer, DeepseekV3MultimodalGateStateMixin):
    """transformers' `DynamicLayer` with the head gate's running state (`DeepseekV3MultimodalGateStateMixin`)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._init_gate_state()

    def reset(self) -> None:
        super().reset()
        self._drop_gate_state()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove != 0:
            self._drop_gate_state()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._reorder_gate_state(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_gate_state(lambda state: state.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_gate_state(lambda state: state[indices])


class DeepseekV3MultimodalStaticLayer(StaticLayer, DeepseekV3MultimodalGateStateMixin):
    """transformers' `StaticLayer` with the head gate's running state (`DeepseekV3MultimodalGateStateMixin`), held
    like the keys for `torch.compile`: two buffers allocated once, at a static address, and written in place."""

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len, **kwargs)
        self._init_gate_state()

    def store_gate_state(self, gate_sum: torch.Tensor, gate_count: torch.Tensor) -> None:
        if self.gate_sum is None:
            self.gate_sum, self.gate_count = torch.zeros_like(gate_sum), torch.zeros_like(gate_count)
            if not is_torchdynamo_compiling():
                # as `StaticLayer.lazy_initialization` marks the keys: in-place writes, no recompiles, cudagraph-safe
                torch._dynamo.mark_static_address(self.gate_sum)
                torch._dynamo.mark_static_address(self.gate_count)
        self.gate_sum.copy_(gate_sum)
        self.gate_count.copy_(gate_count)
        self.has_gate_state = True

    def _drop_gate_state(self) -> None:
        # the buffers stay (their addresses are static); the next forward recomputes their content
        self.has_gate_state = False

    def reset(self) -> None:
        super().reset()
        self._drop_gate_state()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove != 0:
            self._drop_gate_state()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._reorder_gate_state(beam_idx)


# transformers' own layer classes (those `DynamicCache` and `StaticCache` build from this model's config, in
# `generate` and upstream's forward) and the subclass each becomes to carry the gate's state
_GATE_STATE_LAYERS = {DynamicLayer: DeepseekV3MultimodalDynamicLayer, StaticLayer: DeepseekV3MultimodalStaticLayer}


def attach_gate_state(cache: Cache) -> None:
    """Lets every layer of `cache` keep the head gate's running state: each plain `DynamicLayer` or `StaticLayer`
    takes on its subclass (`DeepseekV3MultimodalDynamicLayer`, `DeepseekV3MultimodalStaticLayer`) in place, the same
    object and tensors (a static cache keeps its static addresses) with the state added. Other layer classes (a
    quantized cache's, say) are left as they are: the state is then recomputed from the cached latent at each step.

    The attention does this itself when it first reads a layer outside `torch.compile`; `generate` calls it on the
    cache it prepares, so a compiled first forward (chunked prefill) finds the state too. Call it on a cache of your
    own before compiling a forward that fills it.

    Args:
        cache (`Cache`): a transformers cache (its `layers`); layers it has not created yet are adopted when the
            attention first reads them.
    """
    for layer in cache.layers:
        gated_class = _GATE_STATE_LAYERS.get(type(layer))
        if gated_class is not None:
            layer.__class__ = gated_class  # the same leading base: a valid `__class__` assignment
            layer._init_gate_state()


def _gate_state_layer(cache: Cache, layer_idx: int) -> DeepseekV3MultimodalGateStateMixin | None:
    """The layer of `cache` at `layer_idx` if it keeps the gate's state (adopting a plain one, see
    `attach_gate_state`), else None. Inside `torch.compile` a layer is not adopted (dynamo cannot trace a
    `__class__` assignment): None, and the state is recomputed, as for a layer class without it."""
    layer = cache.layers[layer_idx]
    if not isinstance(layer, DeepseekV3MultimodalGateStateMixin) and not is_torchdynamo_compiling():
        attach_gate_state(cache)
    return layer if isinstance(layer, DeepseekV3MultimodalGateStateMixin) else None


def _weighted_sum(values: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 sum `(batch, dim)` and count `(batch, 1)` of `values` `(batch, length, dim)` over the positions where
    `weights` `(batch or 1, length)` is 1 (every position if None)."""
    values = values.float()
    if weights is None:
        return values.sum(dim=1), values.new_full((values.shape[0], 1), values.shape[1])
    weights = weights.to(values.dtype).expand(values.shape[0], -1)
    return (values * weights.unsqueeze(-1)).sum(dim=1), weights.sum(dim=1, keepdim=True)


def _new_gate_weights(
    padding_mask: torch.Tensor | None, key_mask: torch.Tensor | None, positions: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the gate reads of the masks for the new positions `positions` `(seq_len,)` of a cached forward: their
    weights `(batch or 1, seq_len)` (1 real, 0 padding; None: all real), and under a prepared 4-D mask the new keys
    each query sees `(batch or 1, seq_len, seq_len)` (else None). Under a 4-D mask a position is real when some query
    of the forward sees it (as for the cached positions, `_cached_gate_weights`): no query sees a padding position."""
    if key_mask is not None:
        new_key_mask = key_mask.index_select(-1, positions)
        return new_key_mask.any(dim=-2), new_key_mask
    if padding_mask is not None:
        return padding_mask.index_select(-1, positions), None
    return None, None


def _cached_gate_weights(
    padding_mask: torch.Tensor | None, key_mask: torch.Tensor | None, past_length: torch.Tensor, kv_length: int
) -> torch.Tensor:
    """Weights `(batch or 1, kv_length)` of a cache's slots to recompute the gate's state: 1 for the real positions
    before `past_length` (a 0-d tensor), 0 elsewhere. Static shapes and no device sync, so a compiled forward
    can take this path too.

    Under a prepared 4-D mask a cached position is real when some query of the forward sees it: every query then
    counts every real cached position, which is what it sees under a causal mask with padding (as `generate` builds
    it for a static cache)."""
    if key_mask is not None:
        is_real = F.pad(key_mask, (0, max(kv_length - key_mask.shape[-1], 0)))[..., :kv_length].any(dim=-2)
    elif padding_mask is not None:
        is_real = F.pad(padding_mask, (0, max(kv_length - padding_mask.shape[-1], 0)))[:, :kv_length].bool()
    else:
        is_real = torch.ones(1, kv_length, dtype=torch.bool, device=past_length.device)
    return is_real & (torch.arange(kv_length, device=is_real.device) < past_length)


def _head_rows(heads: torch.Tensor, rows_per_head: int) -> torch.Tensor:
    """Row indices of a `(num_heads * rows_per_head, ...)` weight that belong to `heads`."""
    return (heads[:, None] * rows_per_head + torch.arange(rows_per_head, device=heads.device)).reshape(-1)


def _is_plain_linear(module: nn.Module) -> bool:
    """Whether `module` computes exactly `F.linear(inputs, module.weight, module.bias)` on a dense weight."""
    return type(module).forward is nn.Linear.forward and type(module.weight.data) is torch.Tensor


class DeepseekV3MultimodalAttention(DeepseekV3Attention):
    """Upstream MLA attention with a dynamic per-head output gate and inference-time head skipping
    (`use_attention_gate`), and patch positions in the values of image tokens (`use_image_position_values`)."""

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

    # Adapted from transformers 5.24.0 `DeepseekV3Attention.forward`, reordered: the latent is cached first, the gate
    # reads it and picks the heads to compute, and only those heads are projected, attended and gated before `o_proj`.
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        gate_padding_mask: torch.Tensor | None = None,
        gate_segment_ids: torch.Tensor | None = None,
        gate_key_mask: torch.Tensor | None = None,
        image_coordinates: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`image_coordinates` `(batch, seq_len, 2)`: with `use_image_position_values`, each position's patch (row,
        column) in [-1, 1] (zeros for text and audio), cached beside the latent and added to every head's value.
        `gate_padding_mask` and `gate_segment_ids`: see `causal_running_sums`; `gate_key_mask`: see `visible_sums`."""
        batch_size, seq_length = hidden_states.shape[:-1]
        kv_nope, k_rot = self._latent(hidden_states, position_embeddings, image_coordinates)
        latent = kv_nope[:, 0, :, : self.kv_lora_rank]  # (batch, seq, kv_lora_rank): what the gate reads
        positions = None
        if cache is not None:
            # the new positions' cache slots, taken before `update` (a static cache advances its length in place)
            positions = torch.arange(seq_length, device=latent.device) + cache.get_seq_length(self.layer_idx)
            kv_nope, k_rot = cache.update(kv_nope, k_rot, self.layer_idx, kwargs=kwargs)
        if self.config.use_image_position_values:
            kv_nope, coordinates = torch.split(kv_nope, [self.kv_lora_rank, 2], dim=-1)
        gate_values = heads = None
        if self.head_gate is not None:
            gate_masks = (gate_padding_mask, gate_segment_ids, gate_key_mask)
            gate_values = self._gate(latent, kv_nope, cache, positions, *gate_masks)  # (batch, seq, num_heads)
            heads = self._kept_heads(gate_values, gate_padding_mask)
            gate_values = gate_values if heads is None else gate_values[..., heads]
        self.last_kept_heads = heads

        query_states = self._query_states(hidden_states, position_embeddings, heads)
        key_states, value_states = self._expand_kv(kv_nope, k_rot, heads)
        if self.config.use_image_position_values:
            # (batch, 1, kv_len, 2) added to channels 0-1 of every head: the attention output then holds the
            # attention-weighted patch position, which the latent alone does not pass on (README, "The main job")
            value_states = torch.cat((value_states[..., :2] + coordinates, value_states[..., 2:]), dim=-1)
        attn_output, attn_weights = self._attend(query_states, key_states, value_states, attention_mask, **kwargs)
        if gate_values is not None:
            # (batch, seq, kept_heads, v_head_dim) scaled per head, then flattened for o_proj
            attn_output = attn_output * gate_values.unsqueeze(-1).to(attn_output.dtype)
        attn_output = attn_output.reshape(batch_size, seq_length, -1).contiguous()
        if heads is None:
            return self.o_proj(attn_output), attn_weights
        weight = self.o_proj.weight[:, _head_rows(heads, self.v_head_dim)]
        return F.linear(attn_output, weight, self.o_proj.bias), attn_weights

    def _gate(
        self,
        latent: torch.Tensor,
        cached_latent: torch.Tensor,
        cache: Cache | None,
        positions: torch.Tensor | None,
        padding_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Gate values `(batch, seq_len, num_heads)` of the new positions, whose latent is `latent`
        `(batch, seq_len, kv_lora_rank)`.

        Without a cache, the mean runs over the forward's own positions. With one, the new positions (cache slots
        `positions`) add to the sum and count of the cached ones: the layer's state, read and updated at a cost
        independent of the context length, or, where the layer has none yet (the first forward, after a `crop`, a
        cache built from tensors, a layer class without it), their sum over the cached latent `cached_latent`
        `(batch, 1, kv_len, kv_lora_rank)`, recomputed once.
        """
        if cache is None:
            return self.head_gate(latent, padding_mask, latent.shape[1], segment_ids, key_mask)
        layer = _gate_state_layer(cache, self.layer_idx)
        new_weights, new_key_mask = _new_gate_weights(padding_mask, key_mask, positions)
        if layer is not None and layer.has_gate_state:
            past_sum, past_count = layer.gate_sum, layer.gate_count
        else:
            past_weights = _cached_gate_weights(padding_mask, key_mask, positions[0], cached_latent.shape[2])
            past_sum, past_count = _weighted_sum(cached_latent[:, 0], past_weights)
        gate_values = self.head_gate(
            latent, new_weights, latent.shape[1], segment_ids, new_key_mask, past_sum, past_count
        )
        if layer is not None:
            new_sum, new_count = _weighted_sum(latent, new_weights)
            layer.store_gate_state(past_sum + new_sum, past_count + new_count)
        return gate_values

    def _rotate(self, states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Upstream's rotary embedding (interleaved with `rope_interleave`) of `(batch, heads, seq_len,
        qk_rope_head_dim)` states. Upstream's functions rotate a query and a key together: the key given is a
        one-head slice, rotated for nothing (the keys are rotated before the gate picks the queries' heads)."""
        rotate = apply_rotary_pos_emb_interleave if self.config.rope_interleave else apply_rotary_pos_emb
        return rotate(states, states[:, :1], *position_embeddings)[0]

    def _latent(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        image_coordinates: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What upstream caches: the normalized latent `(batch, 1, seq_len, kv_lora_rank)`, with the image
        coordinates as two more channels (so decoding step by step sees the values of the full forward), and the
        rotated single-head key `(batch, 1, seq_len, qk_rope_head_dim)`."""
        batch_size, seq_length = hidden_states.shape[:-1]
        compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
        kv_nope, k_rot = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope).view(batch_size, 1, seq_length, self.kv_lora_rank)
        k_rot = k_rot.view(batch_size, 1, seq_length, self.qk_rope_head_dim)
        k_rot = self._rotate(k_rot, position_embeddings)
        if self.config.use_image_position_values:
            coordinates = image_coordinates.to(kv_nope.dtype).view(batch_size, 1, seq_length, 2)
            kv_nope = torch.cat((kv_nope, coordinates), dim=-1)
        return kv_nope, k_rot

    def _kept_heads(self, gate_values: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Heads to compute, or None for all. Only in eval mode: a head is skipped when its gate is below
        `attention_gate_skip_threshold` at every real position of the batch. Padding positions (0 in the 2-D
        `padding_mask` `(batch, kv_len)`, cached positions first) never decide: a padded batch skips the heads that
        each of its rows alone skips."""
        threshold = self.config.attention_gate_skip_threshold
        if self.training or threshold <= 0.0:
            return None
        q_module = self.q_proj if self.q_lora_rank is None else self.q_b_proj
        projections = (q_module, self.kv_b_proj, self.o_proj)
        if not all(_is_plain_linear(module) for module in projections):
            # slicing `.weight` rows is exact only for a plain linear layer: an unmerged LoRA adds its own term, and a
            # quantized weight (torchao's `Int8Tensor`) would lose its per-row scales
            return None
        is_open = gate_values >= threshold  # (batch, seq, num_heads)
        if padding_mask is not None:
            # a pad's gates say nothing of its row (left of the first token: a mean over nothing, so a constant)
            is_open = is_open & padding_mask[:, -gate_values.shape[1] :, None].bool()
        is_open = is_open.flatten(0, 1).any(dim=0)  # (num_heads,)
        if bool(is_open.all()):
            return None
        return is_open.nonzero().squeeze(-1)

    def _query_states(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        heads: torch.Tensor | None,
    ) -> torch.Tensor:
        """Rotated queries of `heads` (None: all): `(batch, kept_heads, seq_len, qk_head_dim)`."""
        batch_size, seq_length = hidden_states.shape[:-1]
        if self.q_lora_rank is None:
            q_module, q_input = self.q_proj, hidden_states
        else:
            q_module, q_input = self.q_b_proj, self.q_a_layernorm(self.q_a_proj(hidden_states))
        if heads is None:
            query_states = q_module(q_input)
        else:
            query_states = F.linear(q_input, q_module.weight[_head_rows(heads, self.qk_head_dim)])
        query_states = query_states.view(batch_size, seq_length, -1, self.qk_head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(query_states, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return torch.cat((q_pass, self._rotate(q_rot, position_embeddings)), dim=-1)

    def _expand_kv(
        self, kv_nope: torch.Tensor, k_rot: torch.Tensor, heads: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's `expand_kv`, for the rows of `heads` only when some are skipped."""
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

    def _attend(
        self,
        query_states: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The configured attention backend, as upstream calls it: `(batch, seq_len, kept_heads, v_head_dim)`."""
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
        return attn_output[..., : self.v_head_dim], attn_weights


# ---- prepared (4-D) attention masks: what the model adds to them and what the head gate reads of them ----


def open_media_spans(
    attention_mask: torch.Tensor, block_sequence_ids: torch.LongTensor, past_length: int = 0
) -> torch.Tensor:
    """A prepared 4-D attention mask with every media span opened both ways: the overlay `create_causal_mask` adds for
    `block_sequence_ids` (transformers' `blockwise_overlay`), added to a mask it passes on as it is.

    Args:
        attention_mask (`torch.Tensor` of shape `(batch or 1, heads or 1, q_len, kv_len)`): bool (True attends) or
            float (added to the scores: 0 attends, the dtype's minimum masks).
        block_sequence_ids (`torch.LongTensor` of shape `(batch, q_len)`): the media span of each query position
            (-1 for text), numbered through the batch.
        past_length (`int`): cached positions before the queries (never part of a span: a span is always in one
            forward); keys past `past_length + q_len` (a static cache's free slots) are left as the mask has them.

    Returns:
        `torch.Tensor` of shape `(batch, heads or 1, q_len, kv_len)` and the mask's dtype.
    """
    key_ids = F.pad(block_sequence_ids, (past_length, 0), value=-1)
    key_ids = F.pad(key_ids, (0, attention_mask.shape[-1] - key_ids.shape[1]), value=-1)
    query_ids = block_sequence_ids[:, :, None]  # (batch, q_len, 1)
    same_span = ((query_ids == key_ids[:, None, :]) & (query_ids >= 0))[:, None]  # (batch, 1, q_len, kv_len)
    if attention_mask.dtype == torch.bool:
        return attention_mask | same_span
    return torch.where(same_span, 0.0, attention_mask)


def is_prepared_mask(attention_mask: torch.Tensor | None) -> bool:
    """Whether `attention_mask` is a prepared 4-D mask (a tensor or a `BlockMask`), as transformers' masking
    utilities tell it from a 2-D padding mask: they pass it on unchanged."""
    return attention_mask is not None and len(attention_mask.shape) == 4


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`attention_mask` if it is a `(batch, kv_len)` padding mask, else None (no mask, or a prepared 4-D one)."""
    return attention_mask if attention_mask is not None and len(attention_mask.shape) == 2 else None


def gate_inputs(attention_mask: torch.Tensor | None, packed_sequence_ids: torch.LongTensor | None) -> dict:
    """What the head gate reads of the mask (`DeepseekV3MultimodalAttention.forward`'s `gate_*` arguments): the 2-D
    padding mask and the packed sequences, or, under a prepared 4-D mask, the keys each query sees."""
    inputs = {"gate_padding_mask": padding_mask(attention_mask), "gate_segment_ids": packed_sequence_ids}
    if is_prepared_mask(attention_mask):
        inputs["gate_key_mask"] = _visible_keys(attention_mask)
    return inputs


def _visible_keys(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(batch, q_len, kv_len)` bool: the keys each query attends to, in any head, under a prepared 4-D mask read as
    transformers' attention functions read it (bool: True attends; float: added to the scores, so the dtype's
    minimum or -inf masks). The head gate's running mean is taken over these keys."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            "use_attention_gate needs the attention mask as a tensor (bool or float, 4-D) to know the keys each "
            "position sees; got a flex-attention BlockMask"
        )
    if attention_mask.dtype == torch.bool:
        return attention_mask.any(dim=1)
    return (attention_mask > torch.finfo(attention_mask.dtype).min / 2).any(dim=1)
