"""Absorbed MLA decoding: one decoding step attends to the cached latent itself, without expanding it into per-head
keys and values.

The model's attention (upstream's) expands the whole cached latent `c` (`kv_lora_rank` wide) through `kv_b_proj`
into every head's keys and values at every step: `rows x cached positions x kv_lora_rank x heads x (qk_nope_head_dim +
v_head_dim)` multiply-adds per layer, for one new token per row. DeepSeek-V2's paper (section 2.1.3) notes that the
up-projections can be absorbed instead: head `h`'s score against position `s` is
`q_nope_h . (W_uk_h c_s) = (W_uk_h^T q_nope_h) . c_s`, and its output is `W_uv_h (sum_s p_hs c_s)`. So a step
projects each query into the latent space once, attends there, and projects the attended latent once: per cached
position it costs `heads x (kv_lora_rank + qk_rope_head_dim)` for the scores and `heads x kv_lora_rank` for the output,
about `(qk_nope_head_dim + v_head_dim) / 2` times fewer than the expansion. This is how vLLM and SGLang decode MLA.

The result is the same attention, summed in another order (fp32: relative differences of ~1e-6 in the logits).
`absorbed_decoding(model)` enables it for the forwards run inside it, on every DeepSeek-V3 multimodal attention module
of `model`, for the forwards it applies to: one new position per row, a cache, eval mode, an eager or sdpa attention
implementation with a tensor mask (or none), and a plain dense `kv_b_proj` (no LoRA adapter, no quantized weight).
Any other forward runs the model's own attention. The head gate and head skipping work as in the model's attention,
and so do the image position values (`use_image_position_values`: two coordinate channels cached beside the latent,
attended like it and added to every head's first two value channels).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from deepseekv3.attention_deepseekv3 import DeepseekV3MultimodalAttention, _head_rows, _is_plain_linear

__all__ = ["absorbed_decoding", "absorbed_forward_applies"]

# the attention implementations whose masks are plain tensors (bool: True attends; float: added to the scores)
_TENSOR_MASK_IMPLEMENTATIONS = ("eager", "sdpa")


def absorbed_forward_applies(
    module: DeepseekV3MultimodalAttention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache,
) -> bool:
    """Whether `module`'s forward on these arguments can attend in the latent space (see the module docstring)."""
    return (
        cache is not None
        and hidden_states.shape[1] == 1
        and not module.training
        and module.config._attn_implementation in _TENSOR_MASK_IMPLEMENTATIONS
        and (attention_mask is None or isinstance(attention_mask, torch.Tensor))
        and _is_plain_linear(module.kv_b_proj)
        and module.kv_b_proj.bias is None
    )


def _absorbed_forward(
    module: DeepseekV3MultimodalAttention,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache=None,
    gate_padding_mask: torch.Tensor | None = None,
    gate_segment_ids: torch.Tensor | None = None,
    gate_key_mask: torch.Tensor | None = None,
    image_coordinates: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`DeepseekV3MultimodalAttention.forward` with the attention computed on the cached latent (or the module's own
    forward where that does not apply)."""
    if not absorbed_forward_applies(module, hidden_states, attention_mask, cache):
        return type(module).forward(
            module,
            hidden_states,
            position_embeddings,
            attention_mask,
            cache=cache,
            gate_padding_mask=gate_padding_mask,
            gate_segment_ids=gate_segment_ids,
            gate_key_mask=gate_key_mask,
            image_coordinates=image_coordinates,
            **kwargs,
        )
    batch_size, seq_length = hidden_states.shape[:-1]
    rank, nope_dim, value_dim = module.kv_lora_rank, module.qk_nope_head_dim, module.v_head_dim
    # the same steps as the module's forward up to the queries: latent, cache, gate, kept heads
    kv_nope, k_rot = module._latent(hidden_states, position_embeddings, image_coordinates)
    latent = kv_nope[:, 0, :, :rank]
    positions = torch.arange(seq_length, device=latent.device) + cache.get_seq_length(module.layer_idx)
    kv_nope, k_rot = cache.update(kv_nope, k_rot, module.layer_idx, kwargs=kwargs)
    coordinates = None
    if module.config.use_image_position_values:
        kv_nope, coordinates = torch.split(kv_nope, [rank, 2], dim=-1)
    gate_values = heads = None
    if module.head_gate is not None:
        gate_masks = (gate_padding_mask, gate_segment_ids, gate_key_mask)
        gate_values = module._gate(latent, kv_nope, cache, positions, *gate_masks)
        heads = module._kept_heads(gate_values, gate_padding_mask)
        gate_values = gate_values if heads is None else gate_values[..., heads]
    module.last_kept_heads = heads
    query_states = module._query_states(hidden_states, position_embeddings, heads)  # (batch, kept, 1, qk_head_dim)
    q_nope, q_rot = torch.split(query_states, [nope_dim, module.qk_rope_head_dim], dim=-1)

    weight = module.kv_b_proj.weight
    if heads is not None:
        weight = weight[_head_rows(heads, nope_dim + value_dim)]
    w_key, w_value = weight.view(-1, nope_dim + value_dim, rank).split([nope_dim, value_dim], dim=1)
    kept = w_key.shape[0]
    # each head's query in the latent space: (batch, kept, rank)
    q_latent = torch.einsum("bhd,hdr->bhr", q_nope[:, :, 0], w_key)
    cached = kv_nope[:, 0]  # (batch, kv_len, rank)
    scores = torch.bmm(q_latent, cached.transpose(1, 2)) + torch.bmm(q_rot[:, :, 0], k_rot[:, 0].transpose(1, 2))
    scores = scores * module.scaling  # (batch, kept, kv_len)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1, : scores.shape[-1]]  # (batch, 1 or heads, kv_len)
        if mask.shape[1] != 1 and heads is not None:
            mask = mask[:, heads]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(cached.dtype)
    attended = torch.bmm(probs, cached)  # (batch, kept, rank)
    attn_output = torch.einsum("bhr,hvr->bhv", attended, w_value)  # (batch, kept, v_head_dim)
    if coordinates is not None:
        # the coordinates are added to channels 0-1 of every head's values: attended like the latent
        position_values = torch.bmm(probs, coordinates[:, 0])  # (batch, kept, 2)
        attn_output = torch.cat((attn_output[..., :2] + position_values, attn_output[..., 2:]), dim=-1)
    attn_output = attn_output.view(batch_size, seq_length, kept, value_dim)
    if gate_values is not None:
        attn_output = attn_output * gate_values.unsqueeze(-1).to(attn_output.dtype)
    attn_output = attn_output.reshape(batch_size, seq_length, -1)
    if heads is None:
        return module.o_proj(attn_output), None
    o_weight = module.o_proj.weight[:, _head_rows(heads, value_dim)]
    return F.linear(attn_output, o_weight, module.o_proj.bias), None


def _attention_modules(model: nn.Module) -> list[DeepseekV3MultimodalAttention]:
    return [module for module in model.modules() if isinstance(module, DeepseekV3MultimodalAttention)]


@contextmanager
def absorbed_decoding(model: PreTrainedModel) -> Iterator[None]:
    """Within the context, every decoding step of `model` (one new position per row, on a cache) attends to the cached
    MLA latent directly (see the module docstring); other forwards are unchanged. The attention modules get their own
    forward back on exit.

    Example:

    ```python
    with absorbed_decoding(model):
        model.generate(**inputs, max_new_tokens=64)
    ```
    """
    modules = [module for module in _attention_modules(model) if "forward" not in vars(module)]
    for module in modules:
        module.forward = partial(_absorbed_forward, module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward
