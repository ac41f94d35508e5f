"""The loss terms and router statistics the DeepSeek-V3 multimodal model's `forward` returns.

Small functions of tensors, in fp32, each returning a scalar or a count: the contrastive (CLIP InfoNCE),
attention-distillation and gate-sparsity terms, DeepSeek-V3's sequence-wise balance loss, and the per-expert loads
its router-bias rule balances. The model computes them from a forward's outputs; `modeling_deepseekv3`
re-exports them.

This file is part of the hub-portable core: it imports only torch, and `save_pretrained` copies it next to the
weights with the model files that import it.
"""

import torch
import torch.nn.functional as F
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

__all__ = [
    "attention_distillation_loss",
    "contrastive_loss",
    "expert_load",
    "false_negative_pairs",
    "gate_sparsity_loss",
    "sequence_balance_loss",
]


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
    return image_text_contrastive_loss(logits)  # CLIP's: the mean of the two directions' cross-entropies


def _identical_rows(*tensors: torch.Tensor | None) -> torch.Tensor:
    """`(batch, batch)` True where two rows are equal in every given tensor (each `(batch, ...)`)."""
    rows = torch.cat([tensor.flatten(1).float() for tensor in tensors if tensor is not None], dim=1)
    row_ids = torch.unique(rows, dim=0, return_inverse=True)[1]
    return row_ids[:, None] == row_ids[None, :]


def false_negative_pairs(
    text_input_ids: torch.LongTensor,
    text_attention_mask: torch.Tensor | None = None,
    pixel_values: torch.FloatTensor | None = None,
    input_features: torch.FloatTensor | None = None,
    input_features_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which pairs of a contrastive batch are no negatives of each other: the same caption, or the same image or
    clip (the `is_false_negative` of [`contrastive_loss`]).

    Args:
        text_input_ids (`torch.LongTensor` of shape `(num_pairs, text_len)`): one text per image, then one per clip.
        text_attention_mask (`torch.Tensor` of shape `(num_pairs, text_len)`, *optional*).
        pixel_values (`torch.FloatTensor` of shape `(num_images, ...)`, *optional*): the images, in pair order.
        input_features (`torch.FloatTensor` of shape `(num_clips, ...)`, *optional*), input_features_mask
            (`(num_clips, frames)`, *optional*): the clips, after the images.

    Returns:
        `torch.Tensor` of shape `(num_pairs, num_pairs)`, bool.
    """
    same_text = _identical_rows(text_input_ids, text_attention_mask)
    same_media = torch.zeros_like(same_text)
    num_images = 0 if pixel_values is None else pixel_values.shape[0]
    if pixel_values is not None:
        same_media[:num_images, :num_images] = _identical_rows(pixel_values)
    if input_features is not None:
        same_media[num_images:, num_images:] = _identical_rows(input_features, input_features_mask)
    return same_text | same_media


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
