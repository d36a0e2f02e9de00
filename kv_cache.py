"""
The KV cache of model.py: post-RoPE keys and values, one buffer per layer, whose lengths may
differ (KV-cache compression shrinks each layer on its own), and a batch made of several caches.
"""
from __future__ import annotations

import torch


class KVCache:
    """Post-RoPE keys and values per layer. Layer lengths may differ (after compression).

    Each layer's buffer is (B, n_kv, capacity, hd) with the first `lengths[l]` slots
    filled; appending writes in place and doubles the capacity when full, so a decode
    step costs no copy of the whole cache. A batch made by `stack_caches` also has
    `valid[l]` (B, capacity): False on the padding attention must skip.
    """

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.valid: list[torch.Tensor | None] = [None] * n_layers  # None: every filled slot is a token
        self.lengths = [0] * n_layers
        self.next_pos = 0  # true position of the next token: continues from the prompt length

    def keys(self, layer: int) -> torch.Tensor:  # (B, n_kv, len, hd)
        return self.k[layer][:, :, : self.lengths[layer]]

    def values(self, layer: int) -> torch.Tensor:  # (B, n_kv, len, hd)
        return self.v[layer][:, :, : self.lengths[layer]]

    def valid_slots(self, layer: int) -> torch.Tensor | None:  # (B, len) bool, or None
        return None if self.valid[layer] is None else self.valid[layer][:, : self.lengths[layer]]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, old = k.shape[2], self.lengths[layer]
        if self.k[layer] is None or old + n > self.k[layer].shape[2]:
            self._reserve(layer, k, max(2 * (old + n), 64))
        self.k[layer][:, :, old : old + n] = k
        self.v[layer][:, :, old : old + n] = v
        self.lengths[layer] = old + n
        return self.keys(layer), self.values(layer)

    def set_layer(self, layer: int, k: torch.Tensor, v: torch.Tensor, room: int = 64) -> None:
        """Replace a layer's contents (e.g. with its compressed K/V), leaving `room` free slots."""
        self.k[layer] = self.v[layer] = self.valid[layer] = None
        self.lengths[layer] = 0
        self._reserve(layer, k, k.shape[2] + room)
        self.append(layer, k, v)

    def _reserve(self, layer: int, like: torch.Tensor, capacity: int) -> None:
        B, n_kv, _, hd = like.shape
        new_k = like.new_empty(B, n_kv, capacity, hd)
        new_v = like.new_empty(B, n_kv, capacity, hd)
        if self.k[layer] is not None:
            n = self.lengths[layer]
            new_k[:, :, :n], new_v[:, :, :n] = self.keys(layer), self.values(layer)
        if self.valid[layer] is not None:  # padding stays masked; new slots are for new tokens
            valid = torch.ones(B, capacity, dtype=torch.bool, device=like.device)
            valid[:, : self.lengths[layer]] = self.valid_slots(layer)
            self.valid[layer] = valid
        self.k[layer], self.v[layer] = new_k, new_v

    def clone(self) -> "KVCache":
        other = KVCache(len(self.lengths))
        for layer in range(len(self.lengths)):
            if self.k[layer] is not None:
                other.set_layer(layer, self.keys(layer), self.values(layer))
                if self.valid[layer] is not None:
                    other.valid[layer] = torch.ones_like(other.k[layer][:, 0, :, 0], dtype=torch.bool)
                    other.valid[layer][:, : self.lengths[layer]] = self.valid_slots(layer)
        other.next_pos = self.next_pos
        return other

    def share(self) -> "KVCache":
        """A cache that reads this one's buffers without copying them. What it appends goes past
        this cache's tokens, never over them, and a layer it replaces (set_layer) gets its own buffer:
        the calibration compresses one layer and reads every other layer from the full prefill."""
        other = KVCache(len(self.lengths))
        other.k, other.v, other.valid = list(self.k), list(self.v), list(self.valid)
        other.lengths, other.next_pos = list(self.lengths), self.next_pos
        return other

    def nbytes(self) -> int:
        """Bytes of the valid K and V entries (not the spare capacity)."""
        return sum(2 * self.keys(l).numel() * self.keys(l).element_size() for l in range(len(self.lengths)) if self.k[l] is not None)


def stack_caches(caches: list[KVCache], room: int = 64) -> KVCache:
    """B one-sequence caches of the same prompt as one batch, so they decode together (one pass
    over the weights per step serves them all). Each layer is right-padded to its longest
    member and the padding is marked invalid; generated tokens go after it, in the same slot
    of every row. Their layer lengths may differ (different plans)."""
    if len({c.next_pos for c in caches}) != 1:
        raise ValueError("stack_caches: the caches must continue from the same position")
    out = KVCache(len(caches[0].lengths))
    out.next_pos = caches[0].next_pos
    for layer in range(len(out.lengths)):
        longest = max(c.lengths[layer] for c in caches)
        like = caches[0].keys(layer)  # (1, n_kv, len, hd)
        k = like.new_zeros(len(caches), like.shape[1], longest + room, like.shape[3])  # (B, n_kv, capacity, hd)
        v = torch.zeros_like(k)
        valid = torch.ones(len(caches), longest + room, dtype=torch.bool, device=like.device)
        for b, c in enumerate(caches):
            n = c.lengths[layer]
            k[b, :, :n], v[b, :, :n] = c.keys(layer)[0], c.values(layer)[0]
            valid[b, n:longest] = False
        out.k[layer], out.v[layer], out.valid[layer], out.lengths[layer] = k, v, valid, longest
    return out
