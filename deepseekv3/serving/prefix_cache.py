"""Automatic prefix caching: the MLA latents of every prompt the engine prefills, kept in a radix tree, so a later
prompt that starts the same way (a system prompt, an earlier turn of the conversation, a recurring image) skips that
part of its prefill. Least recently used entries are evicted to stay within a byte budget.

Each position of a prompt has a key: its token id, or, inside an image or audio span, a `MediaPosition` holding the
token, a digest of the span's pixels or clip, and the position's offset in the span. So the same placeholder ids
with another image are another prefix, and a span's positions match only in order. A prompt reuses the longest
stored prefix of its keys that ends at a boundary (`boundary_before`): not inside a media span, whose media the model
embeds whole (and whose positions may attend to each other both ways), and short of the whole prompt, since the
engine needs at least one new token to compute the first logits.

The latent of a position depends only on the keys up to it and, inside a span, on the span's media, so the stored
latents of a prefix are exactly what a prefill of any prompt with the same keys computes there.
"""

import hashlib
import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = ["MediaPosition", "PrefixCache", "PrefixEntry", "boundary_after", "boundary_before", "media_digest"]


def media_digest(tensor: torch.Tensor) -> str:
    """A content digest of one image's `pixel_values` or one clip's (unpadded) `input_features`."""
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()


class MediaPosition(NamedTuple):
    """The key of a position inside an image or audio span: its token, the `media_digest` of the span's media and
    its offset in the span (0 at the span's first position)."""

    token: int
    digest: str
    offset: int


def _continues_a_span(key) -> bool:
    return isinstance(key, MediaPosition) and key.offset > 0


def boundary_before(keys: Sequence, position: int) -> int:
    """The last boundary at or before `position` in a prompt's `keys`: a position that is not inside a media span."""
    while 0 < position < len(keys) and _continues_a_span(keys[position]):
        position -= 1
    return position


def boundary_after(keys: Sequence, position: int) -> int:
    """The first boundary at or after `position` in a prompt's `keys` (`len(keys)` at the latest)."""
    while position < len(keys) and _continues_a_span(keys[position]):
        position += 1
    return position


def _common_length(stored: tuple, keys: Sequence) -> int:
    length = 0
    for stored_key, key in zip(stored, keys):
        if stored_key != key:
            break
        length += 1
    return length


@dataclass(eq=False)
class PrefixEntry:
    """A node of the radix tree: a run of positions following its parent's, with their latents.

    Attributes:
        keys (`tuple`): the positions' keys (token ids and `MediaPosition`s).
        layers (`list[tuple[torch.Tensor, torch.Tensor]]`): per layer `(kv_nope, k_rot)`, `(1, 1, len(keys), dim)`,
            each in storage of its own (so `nbytes` is what the entry holds).
        parent (`PrefixEntry` or `None`): the entry before it (`None` for the root).
        children (`dict`): the entries after it, by their first key.
        last_used (`int`): the cache's clock when a lookup or an insert last went through it.
    """

    keys: tuple
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    parent: "PrefixEntry | None" = field(repr=False)
    children: dict = field(default_factory=dict, repr=False)
    last_used: int = 0

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for pair in self.layers for tensor in pair)


class PrefixCache:
    """Radix tree of prompt prefixes and their latents, at most `max_bytes` of tensors in all.

    `insert` stores a prefilled prompt, sharing the entries of the prefixes already stored; `lookup` returns the
    latents of a prompt's longest stored prefix. When an insert takes the tree over `max_bytes`, the least recently
    used leaves are evicted first. A lookup or insert marks every entry on its path as used at once, so an entry is
    never older than the entries after it: eviction shortens the stored prefixes from their ends.

    Args:
        max_bytes (`int`): the byte budget of the stored tensors.

    Attributes:
        nbytes (`int`): bytes of the stored tensors.
        hits, misses (`int`): lookups that found a prefix / found none.
    """

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes ({max_bytes}) must be positive")
        self.max_bytes = max_bytes
        self._root = PrefixEntry((), [], None)
        self._clock = 0
        self._size = 0
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Entries (runs of positions) stored."""
        return self._size

    def entries(self) -> list[PrefixEntry]:
        """Every stored entry, parents before their children."""
        entries, stack = [], list(self._root.children.values())
        while stack:
            entry = stack.pop()
            entries.append(entry)
            stack.extend(entry.children.values())
        return entries

    def lookup(self, keys: Sequence, max_length: int) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest stored prefix of `keys[:max_length]` that ends at a boundary.

        Args:
            keys (`Sequence`): a prompt's keys (token ids, `MediaPosition`s inside media spans).
            max_length (`int`): the longest prefix wanted (the engine asks for `len(keys) - 1`).

        Returns:
            `(length, layers)`: the prefix's length and, per layer, its `(kv_nope, k_rot)` `(1, 1, length, dim)`;
            `(0, None)` when nothing is stored for it.
        """
        path, length = self._match(keys, max_length)
        if length == 0:
            self.misses += 1
            return 0, None
        self.hits += 1
        self._clock += 1
        pieces, remaining = [], length
        for entry, matched in path:
            used = min(matched, remaining)
            if used == 0:
                break
            entry.last_used = self._clock
            pieces.append([tuple(tensor[..., :used, :] for tensor in pair) for pair in entry.layers])
            remaining -= used
        layers = [tuple(torch.cat(tensors, dim=-2) for tensors in zip(*pairs)) for pairs in zip(*pieces)]
        return length, layers

    def match_length(self, keys: Sequence, max_length: int) -> int:
        """The length `lookup` would return, without copying the latents or counting a hit or a miss."""
        return self._match(keys, max_length)[1]

    def _match(self, keys: Sequence, max_length: int) -> tuple[list[tuple[PrefixEntry, int]], int]:
        """The entries on the path of `keys[:max_length]` with how many keys of each match, and the matched length
        cut back to a boundary."""
        path, entry, length = [], self._root, 0
        while length < max_length and (child := entry.children.get(keys[length])) is not None:
            matched = _common_length(child.keys, keys[length:max_length])
            path.append((child, matched))
            length += matched
            entry = child
            if matched < len(child.keys):
                break
        return path, boundary_before(keys, length)

    def insert(self, keys: Sequence, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Stores a prefilled prompt: the positions not stored yet are copied into new entries. A prompt larger than
        `max_bytes` is stored up to the last boundary that fits; then least recently used leaves are evicted until
        the tree fits again.

        Args:
            keys (`Sequence`): the prompt's keys; it must end at a boundary (whole media spans).
            layers (`list[tuple[torch.Tensor, torch.Tensor]]`): per layer `(kv_nope, k_rot)`, `(1, 1, len(keys),
                dim)` (views are fine: what is stored is copied).
        """
        bytes_per_position = sum(tensor[..., :1, :].nbytes for pair in layers for tensor in pair)
        length = boundary_before(keys, min(len(keys), self.max_bytes // bytes_per_position))
        self._clock += 1
        entry, position = self._root, 0
        while position < length:
            child = entry.children.get(keys[position])
            if child is None:
                stored = [tuple(tensor[..., position:length, :].clone() for tensor in pair) for pair in layers]
                child = PrefixEntry(tuple(keys[position:length]), stored, entry, last_used=self._clock)
                entry.children[child.keys[0]] = child
                self._size += 1
                self.nbytes += child.nbytes
                break
            matched = _common_length(child.keys, keys[position:length])
            if matched < len(child.keys):
                child = self._split(child, matched)
            child.last_used = self._clock
            entry, position = child, position + matched
        self._evict()

    def _split(self, entry: PrefixEntry, length: int) -> PrefixEntry:
        """Splits `entry` after its first `length` positions; returns the new entry holding them."""
        head = PrefixEntry(
            entry.keys[:length],
            [tuple(tensor[..., :length, :].clone() for tensor in pair) for pair in entry.layers],
            entry.parent,
            last_used=entry.last_used,
        )
        entry.keys = entry.keys[length:]
        entry.layers = [tuple(tensor[..., length:, :].clone() for tensor in pair) for pair in entry.layers]
        entry.parent = head
        head.children[entry.keys[0]] = entry
        head.parent.children[head.keys[0]] = head
        self._size += 1
        return head

    def _evict(self) -> None:
        """Evicts the least recently used leaves until the tree fits `max_bytes`."""
        if self.nbytes <= self.max_bytes:
            return
        order = itertools.count()  # breaks ties between entries used at the same time
        leaves = [(entry.last_used, next(order), entry) for entry in self.entries() if not entry.children]
        heapq.heapify(leaves)
        while self.nbytes > self.max_bytes:
            _, _, entry = heapq.heappop(leaves)
            parent = entry.parent
            del parent.children[entry.keys[0]]
            self._size -= 1
            self.nbytes -= entry.nbytes
            if parent is not self._root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, next(order), parent))
