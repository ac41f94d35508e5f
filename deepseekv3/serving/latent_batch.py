"""The decoding batch of the serving engine: in-flight requests sharing one left-padded MLA latent cache.

DeepSeek-V3's MLA caches, per layer, the normalized compressed latent (`kv_nope`, `(rows, 1, kv_len,
kv_lora_rank)`) and the rotated single-head key (`k_rot`, `(rows, 1, kv_len, qk_rope_head_dim)`) in a transformers
`DynamicCache`. Each request is prefilled on its own rows; joining the batch left-pads its cache, or the batch's, to
the longer of the two, and the attention mask hides the padding. When rows leave, the columns that only held
padding are dropped, so the batch is always padded to its own longest member and no further (elastic padding).
Positions are per row (the request's own token count), exactly as `generate` computes them for a left-padded batch.

Every row ends at the last column, so the cache holds `rows x longest row` positions, padding included (the same
bytes for each: every layer's latent and rotated key); `padded_peak` projects that over the coming decoding steps.

A decoding step attends to the cached latent directly (`absorbed_decoding`) unless the batch is built with
`absorbed_decoding=False`.
"""

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from .absorbed_attention import absorbed_decoding

__all__ = [
    "LatentBatch",
    "cache_from_layers",
    "cache_layers",
    "left_pad_layers",
    "padded_peak",
    "select_rows",
    "stack_rows",
]


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer `(kv_nope, k_rot)` tensors of an MLA cache, each `(rows, 1, kv_len, dim)`."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_layers(layers: list[tuple[torch.Tensor, torch.Tensor]], model: PreTrainedModel) -> DynamicCache:
    """A `DynamicCache` holding `layers` (as returned by `cache_layers`). The tensors are not copied: the cache only
    ever concatenates onto them, so sharing them (with the prefix cache, say) is safe."""
    return DynamicCache(ddp_cache_data=layers, config=model.config)


def left_pad_layers(layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> list[tuple[torch.Tensor, ...]]:
    """Left-pads every cache tensor with zeros along the sequence axis to `length` positions."""
    return [tuple(F.pad(tensor, (0, 0, length - tensor.shape[-2], 0)) for tensor in pair) for pair in layers]


def stack_rows(rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]], length: int) -> list[tuple[torch.Tensor, ...]]:
    """Caches (as `cache_layers` returns them) left-padded with zeros to `length` positions and stacked along the
    batch axis, in order."""
    padded = [left_pad_layers(layers, length) for layers in rows]
    return [tuple(torch.cat(tensors, dim=0) for tensors in zip(*pairs)) for pairs in zip(*padded)]


def select_rows(
    cache: DynamicCache, attention_mask: torch.Tensor, rows: list[int]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """`rows` of a left-padded cache (as `cache_layers` returns them) and of its mask `(rows, kv_len)`, without the
    leading columns that hold only padding in those rows. The tensors are copies of exactly that size, so the dropped
    rows and columns are freed."""
    index = torch.tensor(rows, dtype=torch.long, device=attention_mask.device)
    mask = attention_mask[index]
    start = int(mask.any(dim=0).long().argmax())  # first column some kept row uses
    layers = [tuple(tensor[..., start:, :][index] for tensor in pair) for pair in cache_layers(cache)]
    return layers, mask[:, start:]


def padded_peak(rows: Sequence[tuple[int, int]]) -> int:
    """The most positions a batch's cache holds over its coming decoding steps, padding included.

    Args:
        rows (`Sequence[tuple[int, int]]`): `(length, steps)` of each row: the positions it caches at the next decoding
            step, and how many decoding steps it runs (0: it never joins the batch).

    At decoding step `t` (from 0) the rows with `steps > t` hold `length + t` positions each, padded to the longest,
    so the cache holds `running rows x (longest length + t)`. That grows with `t` until a row leaves, so the peak is
    at the last step of some row.
    """
    peak = 0
    for steps in {steps for _, steps in rows if steps > 0}:
        running = [length for length, other in rows if other >= steps]
        peak = max(peak, len(running) * (max(running) + steps - 1))
    return peak


class LatentBatch:
    """Rows of in-flight requests decoding together on one left-padded `DynamicCache`.

    Args:
        model (`PreTrainedModel`): the model that decodes.
        absorbed_decoding (`bool`, defaults to `True`): whether decoding steps attend to the cached latent directly
            (see `absorbed_attention`) instead of expanding it through `kv_b_proj` at every step.

    Attributes:
        request_ids (`list[int]`): the request of each row.
        attention_mask (`torch.LongTensor` of shape `(rows, kv_len)`): 1 for real cached positions.
        positions (`torch.LongTensor` of shape `(rows,)`): the position of each row's next token.
        next_tokens (`torch.LongTensor` of shape `(rows,)`): the token each row feeds at the next step.
    """

    def __init__(self, model: PreTrainedModel, absorbed_decoding: bool = True):
        self.model = model
        self.absorbed_decoding = absorbed_decoding
        self._clear()

    def _clear(self) -> None:
        self.request_ids: list[int] = []
        self.cache: DynamicCache | None = None
        self.attention_mask = torch.zeros(0, 0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.next_tokens = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def kv_length(self) -> int:
        """Cached positions per row, padding included."""
        return self.attention_mask.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the cache tensors hold."""
        if self.cache is None:
            return 0
        return sum(tensor.nbytes for pair in cache_layers(self.cache) for tensor in pair)

    def add(
        self,
        request_ids: list[int],
        cache: DynamicCache,
        attention_mask: torch.Tensor,
        next_tokens: torch.Tensor,
    ) -> None:
        """Adds prefilled rows: their cache (`rows` = `len(request_ids)`), the mask over its positions `(rows,
        kv_len)` and the first token each row feeds next. Some row must use the first column (`select_rows` makes
        sure of it), so the batch stays padded to its longest row."""
        device = attention_mask.device
        positions = attention_mask.sum(dim=1)
        if not self.request_ids:
            self.request_ids = list(request_ids)
            self.cache, self.attention_mask = cache, attention_mask.long()
            self.positions, self.next_tokens = positions, next_tokens.to(device)
            return
        length = max(self.kv_length, attention_mask.shape[1])
        self.cache = cache_from_layers(stack_rows([cache_layers(self.cache), cache_layers(cache)], length), self.model)
        self.attention_mask = torch.cat(
            [
                F.pad(self.attention_mask, (length - self.kv_length, 0)),
                F.pad(attention_mask.long(), (length - attention_mask.shape[1], 0)),
            ]
        )
        self.request_ids += list(request_ids)
        self.positions = torch.cat([self.positions, positions])
        self.next_tokens = torch.cat([self.next_tokens, next_tokens.to(device)])

    def keep(self, rows: list[int]) -> None:
        """Keeps only `rows` (indices into `request_ids`), then drops the leading columns that hold only padding."""
        if len(rows) == len(self.request_ids):
            return
        if not rows:
            self._clear()
            return
        layers, self.attention_mask = select_rows(self.cache, self.attention_mask, rows)
        self.cache = cache_from_layers(layers, self.model)
        index = torch.tensor(rows, dtype=torch.long, device=self.positions.device)
        self.request_ids = [self.request_ids[row] for row in rows]
        self.positions = self.positions[index]
        self.next_tokens = self.next_tokens[index]

    @torch.no_grad()
    def decode(self) -> torch.Tensor:
        """Feeds every row its next token; returns the next-token logits `(rows, vocab_size)` in fp32."""
        attention_mask = F.pad(self.attention_mask, (0, 1), value=1)
        with absorbed_decoding(self.model) if self.absorbed_decoding else nullcontext():
            outputs = self.model(
                input_ids=self.next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=self.positions[:, None],
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.attention_mask = attention_mask
        self.positions = self.positions + 1
        return outputs.logits[:, -1].float()
