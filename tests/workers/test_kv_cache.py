"""KVCache slot semantics (workers.kv_cache)."""

from __future__ import annotations

import pytest
import torch

from workers.kv_cache import CacheFullError, KVCache

LAYERS, HEADS, HEAD_DIM, MAX_LEN = 2, 2, 3, 8


def new_cache(max_len: int = MAX_LEN, batch: int = 1) -> KVCache:
    return KVCache(LAYERS, HEADS, HEAD_DIM, max_len, batch=batch)


def kv(n: int, base: float, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct k and v for n positions: k[..., p, :] is filled with base + p, v with -(base + p)."""
    k = (base + torch.arange(n, dtype=torch.float32)).view(1, 1, n, 1).expand(batch, HEADS, n, HEAD_DIM).clone()
    return k, -k


def slot_values(cache: KVCache, layer: int, upto: int) -> list[float]:
    """The k value stored at each slot [0, upto) of a layer (all heads and dims agree by construction)."""
    k = cache.k[layer, 0, 0, :upto, 0]
    assert torch.equal(cache.v[layer, 0, 0, :upto, 0], -k)
    return k.tolist()


def test_new_cache_is_empty():
    cache = new_cache()
    assert cache.length == 0 and cache.max_len == MAX_LEN
    assert cache.k.shape == (LAYERS, 1, HEADS, MAX_LEN, HEAD_DIM)


def test_write_lands_in_pending_slots_and_returns_prefix_plus_new():
    cache = new_cache()
    k, v = kv(3, base=10)
    keys, values = cache.write(0, k, v)
    assert keys.shape == values.shape == (1, HEADS, 3, HEAD_DIM)
    assert torch.equal(keys, k) and torch.equal(values, v)
    assert cache.length == 0  # nothing committed yet
    assert slot_values(cache, 0, 4) == [10, 11, 12, 0]
    assert slot_values(cache, 1, 4) == [0, 0, 0, 0]  # other layers untouched
    cache.commit(3)
    assert cache.length == 3
    k2, v2 = kv(2, base=20)
    keys, values = cache.write(0, k2, v2)
    assert keys.shape == (1, HEADS, 5, HEAD_DIM)
    assert keys[0, 0, :, 0].tolist() == [10, 11, 12, 20, 21]
    assert values[0, 0, :, 0].tolist() == [-10, -11, -12, -20, -21]


def test_uncommitted_positions_are_overwritten():
    cache = new_cache()
    cache.write(0, *kv(2, base=1))
    cache.commit(2)
    cache.write(0, *kv(3, base=50))  # pending, then abandoned
    cache.write(0, *kv(1, base=7))
    assert slot_values(cache, 0, 3) == [1, 2, 7]
    cache.commit(1)
    assert cache.length == 3


def test_write_returns_views_into_the_cache():
    cache = new_cache()
    keys, _ = cache.write(1, *kv(2, base=3))
    cache.k[1, 0, 0, 0, 0] = 99.0
    assert keys[0, 0, 0, 0] == 99.0


def test_keep_compacts_chosen_positions_in_order():
    cache = new_cache()
    for layer in range(LAYERS):
        cache.write(layer, *kv(2, base=100 * layer + 1))
    cache.commit(2)
    for layer in range(LAYERS):
        cache.write(layer, *kv(5, base=100 * layer + 10))  # pending offsets 0..4 hold base+0..base+4
    cache.keep([1, 3, 4])
    assert cache.length == 5
    for layer in range(LAYERS):
        b = 100 * layer
        assert slot_values(cache, layer, 5) == [b + 1, b + 2, b + 11, b + 13, b + 14]
    # The next write goes right after the kept positions.
    cache.write(0, *kv(1, base=77))
    assert slot_values(cache, 0, 6)[5] == 77


def test_keep_with_batch_and_heads():
    cache = new_cache(batch=2)
    k = torch.randn(2, HEADS, 4, HEAD_DIM)
    v = torch.randn(2, HEADS, 4, HEAD_DIM)
    for layer in range(LAYERS):
        cache.write(layer, k, v)
    cache.keep([0, 2])
    assert cache.length == 2
    for layer in range(LAYERS):
        assert torch.equal(cache.k[layer, :, :, :2], k[:, :, [0, 2]])
        assert torch.equal(cache.v[layer, :, :, :2], v[:, :, [0, 2]])


def test_keep_leading_positions_is_commit():
    cache = new_cache()
    cache.write(0, *kv(4, base=5))
    cache.keep([0, 1])
    assert cache.length == 2
    assert slot_values(cache, 0, 2) == [5, 6]
    cache.keep([])
    assert cache.length == 2


@pytest.mark.parametrize("indices", [[2, 1], [0, 0], [1, 3, 3], [3, 2, 4]])
def test_keep_needs_increasing_indices(indices):
    cache = new_cache()
    cache.write(0, *kv(5, base=1))
    with pytest.raises(ValueError, match="increasing"):
        cache.keep(indices)
    assert cache.length == 0


def test_keep_past_the_end():
    cache = new_cache()
    cache.write(0, *kv(4, base=1))
    cache.commit(4)
    with pytest.raises(CacheFullError):
        cache.keep([0, MAX_LEN - 4])
    assert cache.length == 4


def test_truncate():
    cache = new_cache()
    cache.write(0, *kv(5, base=1))
    cache.commit(5)
    cache.truncate(2)
    assert cache.length == 2
    cache.write(0, *kv(1, base=40))
    assert slot_values(cache, 0, 3) == [1, 2, 40]
    cache.truncate(2)
    cache.truncate(0)
    assert cache.length == 0


@pytest.mark.parametrize("length", [4, 10, -1])
def test_truncate_out_of_range(length):
    cache = new_cache()
    cache.write(0, *kv(3, base=1))
    cache.commit(3)
    with pytest.raises(ValueError):
        cache.truncate(length)
    assert cache.length == 3


def test_cache_full():
    cache = new_cache()
    cache.write(0, *kv(MAX_LEN, base=1))  # exactly full is fine
    cache.commit(MAX_LEN - 1)
    with pytest.raises(CacheFullError):
        cache.write(0, *kv(2, base=1))
    cache.write(0, *kv(1, base=1))
    cache.commit(1)
    assert cache.length == MAX_LEN
    with pytest.raises(CacheFullError):
        cache.write(0, *kv(1, base=1))
    with pytest.raises(CacheFullError):
        cache.commit(1)
    assert cache.length == MAX_LEN


def test_model_new_cache(tiny_models):
    model, _ = tiny_models("llama")
    cache = model.new_cache(16)
    assert cache.k.shape == (2, 1, 2, 16, 16)  # layers, batch, kv heads, slots, head_dim
    assert cache.k.dtype == model.dtype
