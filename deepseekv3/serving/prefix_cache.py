"""Prefix cache: the MLA latent states of frequent prompt prefixes (system prompts, recurring images), kept in an LRU
with a byte budget, so a request that starts with one skips that part of its prefill.

An entry is keyed by the prefix's token ids and by a digest of each image and audio clip inside it, so a recurring
image hits only when its pixels are the same. A prefix always holds whole media spans, and only prefixes strictly
shorter than the prompt match: the engine needs at least one new token to compute the first logits.
"""

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["PrefixCache", "PrefixEntry", "media_digest"]


def media_digest(tensor: torch.Tensor) -> str:
    """A content digest of one image's `pixel_values` or one clip's (unpadded) `input_features`."""
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()


@dataclass
class PrefixEntry:
    """The cached state of one prefix.

    Attributes:
        token_ids (`tuple[int, ...]`): the prefix.
        image_digests, clip_digests (`tuple[str, ...]`): `media_digest` of each image / clip inside the prefix.
        layers (`list[tuple[torch.Tensor, torch.Tensor]]`): per layer `(kv_nope, k_rot)`, `(1, 1, len, dim)`.
    """

    token_ids: tuple[int, ...]
    image_digests: tuple[str, ...]
    clip_digests: tuple[str, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(tensor.numel() * tensor.element_size() for pair in self.layers for tensor in pair)


class PrefixCache:
    """Least-recently-used cache of `PrefixEntry`s, at most `max_bytes` of tensors in all.

    Args:
        max_bytes (`int`): the byte budget; the least recently used entries are evicted to stay within it.
    """

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes ({max_bytes}) must be positive")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, PrefixEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held."""
        return sum(entry.nbytes for entry in self._entries.values())

    def put(self, entry: PrefixEntry) -> None:
        """Stores `entry` (replacing one with the same key), evicting least recently used entries to fit."""
        if entry.nbytes > self.max_bytes:
            raise ValueError(
                f"a prefix of {len(entry.token_ids)} tokens takes {entry.nbytes} bytes, more than the prefix cache's "
                f"max_bytes ({self.max_bytes})"
            )
        key = (entry.token_ids, entry.image_digests, entry.clip_digests)
        self._entries.pop(key, None)
        while self._entries and self.nbytes + entry.nbytes > self.max_bytes:
            self._entries.popitem(last=False)
        self._entries[key] = entry

    def lookup(self, token_ids: list[int], image_digests: list[str], clip_digests: list[str]) -> PrefixEntry | None:
        """The longest cached prefix of a prompt (strictly shorter than it) whose media match, or None.

        Args:
            token_ids (`list[int]`): the prompt.
            image_digests, clip_digests (`list[str]`): `media_digest` of each of the prompt's images / clips.
        """
        best_key, best = None, None
        for key, entry in self._entries.items():
            length = len(entry.token_ids)
            if length >= len(token_ids) or (best is not None and length <= len(best.token_ids)):
                continue
            if (
                tuple(token_ids[:length]) == entry.token_ids
                and tuple(image_digests[: len(entry.image_digests)]) == entry.image_digests
                and tuple(clip_digests[: len(entry.clip_digests)]) == entry.clip_digests
            ):
                best_key, best = key, entry
        if best is None:
            self.misses += 1
            return None
        self._entries.move_to_end(best_key)
        self.hits += 1
        return best
