"""The native CPU kernels against the PyTorch reference, and their row independence.

Row independence is what makes bfloat16 tree decoding token-identical to plain decoding:
a row's result must be bit-identical whether it is computed alone or among other rows.
"""

from __future__ import annotations

import multiprocessing
import threading
import warnings

import numpy as np
import pytest
import torch

from workers.kernels import native, reference
from workers.kernels.choice import native_unsupported

pytestmark = pytest.mark.skipif(
    native_unsupported(torch.device("cpu"), torch.float32) is not None,
    reason=f"native kernels unavailable: {native_unsupported(torch.device('cpu'), torch.float32)}",
)

# Odd sizes on purpose: in_features not a multiple of 8 (the vector width), out_features
# not a multiple of 3 (the weight rows per block).
LINEAR_SHAPES = [(1, 576, 960), (2, 64, 7), (4, 100, 33), (5, 576, 1536), (13, 37, 50), (64, 1536, 577)]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=0.05, rtol=0.02)}


# Each path of the kernels: (AMX tiles, AVX-512) on or off.
PATHS = {"amx": (True, True), "avx512": (False, True), "avx2": (False, False)}


@pytest.fixture(params=list(PATHS))
def vector_path(request):
    """Each path of the kernels: AMX tiles for bfloat16 products where the CPU (and Linux)
    allow them (the default there), the AVX-512 ones where the CPU has them (bfloat16
    products by AVX512-BF16 dot products, attention in 16 lanes), and the AVX2 ones."""
    amx, avx512 = PATHS[request.param]
    on = native.use_avx512(avx512), native.use_amx(amx)
    if on != (avx512, amx):
        native.use_avx512(True), native.use_amx(True)
        pytest.skip(f"this CPU has no {request.param.upper()} (or Linux does not grant AMX's tile state)")
    yield request.param
    native.use_avx512(True)
    native.use_amx(True)


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,m", LINEAR_SHAPES)
def test_linear_matches_reference(vector_path, dtype, rows, k, m):
    x, w, b = rand(1, rows, k, dtype=dtype), rand(m, k, dtype=dtype, seed=1), rand(m, dtype=dtype, seed=2)
    for bias in (None, b):
        got = native.linear(x, w, bias)
        assert got.shape == (1, rows, m) and got.dtype == dtype
        # the reference in float32 on the same (exactly representable) inputs
        want = reference.linear(x.float(), w.float(), None if bias is None else bias.float()).to(dtype)
        torch.testing.assert_close(got, want, **TOL[dtype])
        wide = native.linear(x, w, bias, float_out=True)  # the LM head's float32 sums
        assert wide.dtype == torch.float32 and torch.equal(wide.to(dtype), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_rows_are_independent(vector_path, dtype):
    x, w = rand(100, 576, dtype=dtype), rand(1000, 576, dtype=dtype, seed=1)
    together = native.linear(x, w, None)  # AMX: 100 rows take the packed weight blocks
    for r in (0, 3, 4, 5, 37, 63, 99):  # in a block of rows, in the remainder, alone
        assert torch.equal(native.linear(x[r : r + 1], w, None)[0], together[r])
    # every blocking (AVX2: 1-4, 5-6, 7+ rows; AVX512-BF16: 1-4, 5-8, 9+; AMX: groups of 16,
    # in pairs, streamed weights up to 64 rows), remainders
    for n in [*range(2, 20), 31, 32, 33, 47, 64, 65]:
        assert torch.equal(native.linear(x[:n], w, None), together[:n]), n


@pytest.mark.parametrize("rows", [1, 2, 16, 17, 40, 64])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (48, 64), (1008, 1536)])
def test_amx_streamed_and_packed_weights_give_the_same_bits(rows, out_features, in_features):
    """On AMX, up to 64 rows stream the weights straight from memory and more rows copy them
    into packed blocks first (amx_gemm.h): a row gets the same bits either way, and the
    same as a one-row step."""
    if not native.use_amx(True):
        pytest.skip("this CPU has no AMX (or Linux does not grant its tile state)")
    x, w = rand(130, in_features, dtype=torch.bfloat16), rand(out_features, in_features, dtype=torch.bfloat16, seed=1)
    packed = native.linear(x, w, None, float_out=True)
    assert torch.equal(native.linear(x[-rows:], w, None, float_out=True), packed[-rows:])
    assert torch.equal(native.linear(x[5:6], w, None, float_out=True)[0], packed[5])
    want = reference.linear(x.float(), w.float(), None)
    torch.testing.assert_close(packed, want, atol=1e-3, rtol=1e-4)


# The model's product shapes (SmolLM2-135M: qkv, o, gate/up, down), (out, in), and odd ones:
# in_features not a multiple of 32 (a tile row) or even of 2 (a bfloat16 pair), out_features
# not a multiple of 16 (a tile's rows).
MODEL_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
ODD_SHAPES = [(33, 100), (50, 37), (577, 64), (7, 1)]


@pytest.mark.parametrize("out_features,in_features", MODEL_SHAPES + ODD_SHAPES)
def test_prompt_rows_do_not_depend_on_how_many_share_the_call(vector_path, out_features, in_features):
    """Prompt rows (bfloat16) give each row the same bits whether 1, 2 or hundreds of prompt
    rows share the call, and wherever the row sits; the rows after them are the one-row
    kernels' bits. Every mode computes a prompt position the same way only if this holds."""
    x, w = rand(1, 300, in_features, dtype=torch.bfloat16), rand(out_features, in_features, dtype=torch.bfloat16, seed=1)
    b = rand(out_features, dtype=torch.bfloat16, seed=2)
    for bias in (None, b):
        full = native.prompt_linear(x, w, bias, 299)
        for start, m in [(0, 1), (0, 2), (5, 3), (0, 17), (40, 64), (3, 33), (0, 150), (100, 199), (0, 299)]:
            part = native.prompt_linear(x[:, start : start + m], w, bias, m)
            assert torch.equal(part, full[:, start : start + m]), (start, m)
        assert torch.equal(full[:, 299:], native.linear(x[:, 299:], w, bias))  # the last row: the one-row kernels
        want = reference.linear(x.float(), w.float(), None if bias is None else bias.float())
        torch.testing.assert_close(full.float(), want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("out_features,in_features", MODEL_SHAPES + ODD_SHAPES[:1])
def test_prompt_rows_do_not_depend_on_the_thread_count(vector_path, out_features, in_features):
    """Prompt rows' products split their output columns over the kernels' threads: the same
    bits on 1 and 2 threads, on the main thread and in another (the kernels' own pool)."""
    x, w = rand(1, 120, in_features, dtype=torch.bfloat16), rand(out_features, in_features, dtype=torch.bfloat16, seed=1)
    torch.set_num_threads(2)
    try:
        two = native.prompt_linear(x, w, None, 119)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(native.prompt_linear(x, w, None, 119), two)
    assert all(torch.equal(got, two) for got in in_threads(lambda: native.prompt_linear(x, w, None, 119), 2)[::10])


def test_prompt_rows_do_not_depend_on_a_library_s_kernel_choice(vector_path):
    """Prompt rows are our kernels' own sums, never a library GEMM: turning PyTorch's oneDNN
    off (which changes the kernel, and the rounding, of its own bfloat16 GEMM: on an AMX CPU
    both its choice by row count and this switch did) changes no bit of them."""
    x, w = rand(1, 120, 576, dtype=torch.bfloat16), rand(960, 576, dtype=torch.bfloat16, seed=1)
    with_onednn = native.prompt_linear(x, w, None, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that oneDNN's TF32 is for Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            without = native.prompt_linear(x, w, None, 120)
    assert torch.equal(with_onednn, without)


def test_prompt_rows_in_float32_are_the_native_kernels():
    x, w = rand(1, 40, 576), rand(960, 576, seed=1)
    assert torch.equal(native.prompt_linear(x, w, None, 39), native.linear(x, w, None))


def test_prompt_rows_in_bfloat16_are_the_one_row_kernels(vector_path):
    """Prompt rows against bfloat16 weights are linear's on every path (AMX tiles there too):
    a prompt position gets the bits a decode step gives it."""
    x, w = rand(1, 40, 576, dtype=torch.bfloat16), rand(960, 576, dtype=torch.bfloat16, seed=1)
    assert torch.equal(native.prompt_linear(x, w, None, 39), native.linear(x, w, None))
    assert torch.equal(native.extension().prompt_linear(x, w, None), native.linear(x, w, None))  # the kernel itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_threads_do_not_change_results(vector_path, dtype):
    x, w = rand(8, 576, dtype=dtype), rand(3000, 576, dtype=dtype, seed=1)
    torch.set_num_threads(1)
    one = native.linear(x, w, None)
    torch.set_num_threads(2)
    assert torch.equal(native.linear(x, w, None), one)


def in_threads(fn, n: int) -> list:
    """fn() 20 times in each of n threads started together, each on two torch threads (the
    kernels' own pool serves threads other than the main one: cpu_kernels.cpp); their
    results in thread order."""
    results, start = [None] * n, threading.Barrier(n)

    def run(i: int) -> None:
        torch.set_num_threads(2)  # the tests' one thread (conftest) would leave the pool unused
        start.wait()
        results[i] = [fn() for _ in range(20)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a kernel call hung"
    return [r for rs in results for r in rs]


@pytest.mark.parametrize("threads", [1, 3])
def test_kernels_in_other_threads_match_the_main_thread(vector_path, threads):
    """Other threads' loops run on the kernels' pool (one caller at a time; a second caller
    meanwhile runs alone): the same numbers as the main thread's OpenMP loops."""
    x, w = rand(8, 576, dtype=torch.bfloat16), rand(3000, 576, dtype=torch.bfloat16, seed=1)
    q, k, v = rand(1, 9, 16, 64), rand(1, 3, 300, 64, seed=1), rand(1, 3, 300, 64, seed=2)
    mask = causal_tree_mask(16, 300)
    prompt = rand(1, 90, 576, dtype=torch.bfloat16, seed=3)  # prompt rows: ATen's GEMM in column parts
    calls = lambda: (native.linear(x, w, None), native.attention(q, k, v, mask), native.prompt_linear(prompt, w, None, 89))  # noqa: E731
    torch.set_num_threads(2)
    try:
        want = calls()
    finally:
        torch.set_num_threads(1)
    for got in in_threads(calls, threads):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_kernels_in_a_forked_child_get_a_pool_of_their_own():
    """A child forked after the parent's pool started has none of its threads: its own
    threads' loops must still finish (a pool shared across fork would wait forever)."""
    x, w = rand(8, 576), rand(3000, 576, seed=1)
    want = in_threads(lambda: native.linear(x, w, None), 1)[0]  # the parent's pool is up
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_linear_in_a_thread, (x, w)).get(timeout=120)
    assert torch.equal(got, want)


def _linear_in_a_thread(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return in_threads(lambda: native.linear(x, w, None), 1)[0]


def test_linear_needing_grad_runs_the_reference():
    x, w = rand(3, 16).requires_grad_(), rand(5, 16, seed=1)
    native.linear(x, w, None).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, 16))


def test_linear_rejects_a_transposed_weight():
    with pytest.raises(RuntimeError, match="contiguous"):
        native.linear(rand(1, 16), rand(16, 8).t(), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(dtype):
    x, w = rand(2, 7, 576, dtype=dtype), rand(576, dtype=dtype, seed=1)
    got = native.rms_norm(x, w, 1e-5)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.rms_norm(x, w, 1e-5), **TOL[dtype])


def rms_norm_in_its_order(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The native rms_norm's arithmetic, step by step in float32 (norms.h): squares summed in
    8 lanes, the lanes' fixed horizontal sum, the d % 8 rest in order; then its roundings."""
    d, d8 = x.shape[-1], x.shape[-1] - x.shape[-1] % 8
    out = []
    for row in x.reshape(-1, d):
        sq = (row.float() * row.float()).numpy()
        lanes = np.zeros(8, np.float32)
        for i in range(0, d8, 8):
            lanes = lanes + sq[i : i + 8]
        s = lanes[:4] + lanes[4:]
        ss = (s[0] + s[2]) + (s[1] + s[3])
        for i in range(d8, d):
            ss = np.float32(ss + sq[i])
        scale = np.float32(1) / np.sqrt(np.float32(ss / np.float32(d) + np.float32(eps)))
        out.append((w.float() * (row.float() * torch.tensor(scale)).to(x.dtype).float()).to(x.dtype))
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [576, 37, 8, 3])
def test_rms_norm_is_its_fixed_order_and_rows_are_independent(dtype, d):
    x, w = rand(5, d, dtype=dtype) * 3, rand(d, dtype=dtype, seed=1)
    x[2, 0] = float("nan")  # a NaN row: bfloat16 rounding keeps it NaN
    got = native.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, rms_norm_in_its_order(x, w, 1e-5), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(native.rms_norm(x[3:4], w, 1e-5), got[3:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batched_angles", [False, True])
@pytest.mark.parametrize("d", [16, 64, 12])  # halves of 8 and 32 (8 lanes at a time) and of 6 (one by one)
def test_rotary_matches_reference(dtype, batched_angles, d):
    B, n, heads, kv_heads = 2, 5, 4, 2
    qkv = rand(B, n, (heads + 2 * kv_heads) * d, dtype=dtype)
    shape = (B, n, d) if batched_angles else (n, d)
    cos, sin = rand(*shape, dtype=dtype, seed=1), rand(*shape, dtype=dtype, seed=2)
    want = reference.rotary(qkv, cos, sin, heads + kv_heads, d)
    got = native.rotary(qkv.clone(), cos, sin, heads + kv_heads, d)
    # Elementwise and rounded where the reference rounds: exact in float32 and bfloat16.
    assert torch.equal(got, want)


def causal_tree_mask(n: int, keys: int) -> torch.Tensor:
    mask = torch.ones(n, keys, dtype=torch.bool)
    mask[:, keys - n :] = torch.ones(n, n, dtype=torch.bool).tril()
    if n > 3:
        mask[3, keys - n + 1] = False  # a branch: row 3 does not see row 1
    return mask


# Head sizes: 64 (the model's), 48 and 80 (the 16-lane path's partial passes over d), 72 (no
# multiple of 16: the AVX2 path on either setting).
@pytest.mark.parametrize("n,keys,d", [(1, 1, 64), (1, 200, 64), (4, 9, 64), (16, 300, 64), (3, 37, 48), (5, 70, 80), (2, 33, 72)])
def test_attention_matches_reference(vector_path, n, keys, d):
    q, k, v = rand(1, 9, n, d), rand(1, 3, keys, d, seed=1), rand(1, 3, keys, d, seed=2)
    mask = causal_tree_mask(n, keys) if n > 1 else None
    got = native.attention(q, k, v, mask)
    assert got.shape == (1, n, 9 * d)
    torch.testing.assert_close(got, reference.attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_attention_row_equals_that_row_alone_over_its_keys(vector_path):
    n, keys = 16, 300
    q, k, v = rand(1, 9, n, 64), rand(1, 3, keys, 64, seed=1), rand(1, 3, keys, 64, seed=2)
    mask = causal_tree_mask(n, keys)
    together = native.attention(q, k, v, mask)
    for i in (0, 3, 15):
        seen = mask[i].nonzero().squeeze(1)
        alone = native.attention(q[:, :, i : i + 1], k[:, :, seen], v[:, :, seen], None)
        assert torch.equal(alone[0, 0], together[0, i])


def test_attention_reads_cache_views(vector_path):
    cache = rand(2, 1, 3, 50, 64)  # (layers, B, kv_heads, max_len, d): a layer's prefix is a strided view
    k, v = cache[0, :, :, :20], cache[1, :, :, :20]
    q = rand(1, 9, 2, 64)
    torch.testing.assert_close(native.attention(q, k, v, None), reference.attention(q, k, v, None), atol=1e-5, rtol=1e-5)
