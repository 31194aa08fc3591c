"""Preallocated key/value cache.

Layout per layer: (batch, n_kv_heads, max_len, head_dim). Slots [0, length) hold the
committed prefix. A forward pass writes its n new positions into the *pending* slots
[length, length + n) of every layer it runs; the caller then decides what survives:

    commit(n)         keep the first n pending positions (autoregressive step, prefill)
    keep(indices)     keep a chosen subset of pending positions, compacted in place
                      (the accepted path of a token tree)
    truncate(length)  drop everything after `length` (rollback)

Pending positions that are neither committed nor kept are simply overwritten later.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    pass


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, n_kv_heads, n, head_dim) in the pending slots of `layer`.

        Returns the keys and values of the committed prefix plus the new positions,
        (batch, n_kv_heads, length + n, head_dim), as views into the cache.
        """
        end = self.length + k.shape[2]
        self.check_room(k.shape[2])
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def check_room(self, n: int) -> None:
        """Raise CacheFullError unless n pending positions fit after the committed prefix."""
        if self.length + n > self.max_len:
            raise CacheFullError(f"KV cache holds {self.max_len} positions; {self.length + n} needed")

    def commit(self, n: int) -> None:
        """Make the first n pending positions part of the committed prefix."""
        if self.length + n > self.max_len:
            raise CacheFullError(f"KV cache holds {self.max_len} positions; {self.length + n} needed")
        self.length += n

    def keep(self, indices: list[int]) -> None:
        """Commit the pending positions at `indices` (offsets from `length`), in that order.

        Positions are moved down so that the kept ones are contiguous after the prefix.
        `indices` must be increasing: an accepted tree path is, in a tree flattened in
        topological order, and anything else is a caller bug.
        """
        if any(b <= a for a, b in zip(indices, indices[1:])):
            raise ValueError(f"keep() needs increasing indices, got {indices}")
        if indices and self.length + indices[-1] >= self.max_len:
            raise CacheFullError(f"index {indices[-1]} is past the cache end")
        if indices != list(range(len(indices))):
            src = torch.tensor(indices, device=self.k.device) + self.length
            dst = slice(self.length, self.length + len(indices))
            self.k[:, :, :, dst] = self.k[:, :, :, src]
            self.v[:, :, :, dst] = self.v[:, :, :, src]
        self.length += len(indices)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
