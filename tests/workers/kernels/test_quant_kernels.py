"""linear_q: products with the GGUF file's quantized blocks (workers/kernels/quant.h).

Both variants (blocks typed uint8: x in float32; typed int8: x quantized to int8 per block
first) against the reference (the same blocks de-quantized by workers.kernels.quant_blocks,
which equals gguf-py's de-quantization; x rounded to int8 blocks the same way for the int8
variant), and the guarantee of every product kernel: a row's result is bit-identical
whether computed alone or among other rows, on 1 or 2 threads, in the main thread or
another (the kernels' own pool).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.kernels import native, reference
from workers.kernels.choice import native_unsupported
from workers.kernels.quant_blocks import BLOCK, BLOCK_BYTES, BLOCK_WEIGHTS, dequantize, quantize_rows

from test_native_kernels import in_threads, rand, vector_path  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(
    native_unsupported(torch.device("cpu"), torch.float32) is not None,
    reason=f"native kernels unavailable: {native_unsupported(torch.device('cpu'), torch.float32)}",
)

FORMATS = [f for f in BLOCK_BYTES if BLOCK_WEIGHTS[f] == BLOCK]  # 32 weights a block; the K formats below
# (out_features, in_features): the 135M model's products, then odd ones: in_features 32 x an
# odd number of blocks, out_features not a multiple of any tile's weight rows (1, 2).
SHAPES = [(960, 576), (576, 1536), (37, 96), (5, 32), (129, 160)]


@pytest.fixture(params=[torch.uint8, torch.int8], ids=["float-x", "int8-x"])
def variant(request) -> torch.dtype:
    """How the blocks are typed: uint8, x multiplied in float32; int8, x quantized to int8 first."""
    return request.param


def random_blocks(fmt: str, out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Blocks with random quantized values and plausible scales (and minimums)."""
    g = torch.Generator().manual_seed(seed)
    n = in_features // BLOCK
    blocks = torch.randint(0, 256, (out_features, n, BLOCK_BYTES[fmt]), dtype=torch.uint8, generator=g)
    blocks[..., 0:2] = (torch.rand(out_features, n, 1, generator=g) * 0.02).half().view(torch.uint8)
    if fmt == "Q4_1":
        blocks[..., 2:4] = (-torch.rand(out_features, n, 1, generator=g) * 0.15).half().view(torch.uint8)
    return blocks


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_gguf_py_s(fmt):
    from gguf import GGMLQuantizationType, quants

    blocks = random_blocks(fmt, 7, 96)
    want = quants.dequantize(blocks.reshape(7, -1).numpy(), GGMLQuantizationType[fmt])
    assert np.array_equal(dequantize(blocks).numpy(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_q_matches_the_de_quantized_reference(vector_path, variant, fmt, out_features, in_features, dtype):
    w = random_blocks(fmt, out_features, in_features).view(variant)
    x, b = rand(1, 6, in_features, dtype=dtype), rand(out_features, seed=2)
    for bias in (None, b.to(dtype)):
        got = native.linear(x, w, bias)
        assert got.dtype == dtype and got.shape == (1, 6, out_features)
        want = reference.linear(x.double(), w, None if bias is None else bias.double())
        tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
        torch.testing.assert_close(got.double(), want, **tol)
    logits = native.linear(x, w, None, float_out=True)  # the LM head: float32 sums, not rounded
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), reference.linear(x.double(), w), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_q_rows_are_independent(vector_path, variant, fmt):
    x, w = rand(64, 576), random_blocks(fmt, 389, 576).view(variant)
    together = native.linear(x, w, None)
    for r in (0, 1, 3, 4, 5, 8, 37, 63):  # in a tile of rows, in the remainder, alone
        assert torch.equal(native.linear(x[r : r + 1], w, None)[0], together[r])
    for n in range(1, 65):  # every tile (float x: 1-2, 3-4, 5+ rows; int8 x: 1-2, 3+) and its remainders
        assert torch.equal(native.linear(x[:n], w, None), together[:n]), n
        assert torch.equal(native.linear(x[64 - n :], w, None), together[64 - n :]), n
    assert torch.equal(native.prompt_linear(x, w, None, 63), together)  # prompt rows: the same kernel


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_q_threads_do_not_change_results(vector_path, variant, fmt):
    x, w = rand(8, 160), random_blocks(fmt, 3001, 160).view(variant)
    one = native.linear(x, w, None)
    torch.set_num_threads(2)
    try:
        assert torch.equal(native.linear(x, w, None), one)
        assert all(torch.equal(got, one) for got in in_threads(lambda: native.linear(x, w, None), 2)[::10])
    finally:
        torch.set_num_threads(1)


def test_linear_q_refuses_what_it_cannot_read():
    x = rand(1, 64)
    with pytest.raises(RuntimeError, match="no format it takes"):
        native.linear(x, torch.zeros(3, 2, 19, dtype=torch.uint8), None)
    with pytest.raises(RuntimeError, match="x has 64 inputs, the weight 96"):
        native.linear(x, random_blocks("Q8_0", 3, 96), None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_x_is_x_rounded_to_int8_blocks(fmt):
    """The int8 variant computes what the float one computes on x rounded to int8 blocks
    (quant_blocks.quantize_rows mirrors the kernel's rounding), up to float32 sums; and its
    integer dot products make AVX-VNNI and AVX2 machines agree bit for bit."""
    x, w = rand(5, 576) * 3, random_blocks(fmt, 200, 576)
    rounded = quantize_rows(x)
    assert not torch.equal(rounded, x)
    torch.testing.assert_close(native.linear(x, w.view(torch.int8), None), native.linear(rounded, w, None), atol=2e-4, rtol=1e-5)
    vnni = native.linear(x, w.view(torch.int8), None)
    native.use_vnni(False)
    try:
        assert torch.equal(native.linear(x, w.view(torch.int8), None), vnni)
    finally:
        native.use_vnni(True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prompt_rows_on_amx_are_the_bfloat16_weights_prompt_rows(variant, fmt):
    """bfloat16 prompt rows against quantized weights take the AMX tiles against the weights
    de-quantized to bfloat16: the very bits that weights = "float" in bfloat16 gives a
    prompt position, however many rows share the call; elsewhere (no AMX) linear_q."""
    if not native.use_amx(True):
        pytest.skip("this CPU has no AMX (or Linux does not grant its tile state)")
    w = random_blocks(fmt, 389, 576).view(variant)
    bf16 = dequantize(w).bfloat16()
    assert torch.equal(native.extension().dequantize_bf16(w), bf16)
    x = rand(1, 120, 576, dtype=torch.bfloat16)
    full = native.prompt_linear(x, w, None, 119)
    assert torch.equal(full[:, :119], native.prompt_linear(x[:, :119], bf16, None, 119))
    assert torch.equal(full[:, 119:], native.linear(x[:, 119:], w, None))  # the last row: one-row kernels
    assert torch.equal(native.prompt_linear(x[:, 7:20], w, None, 13), full[:, 7:20])
    native.use_amx(False)
    try:
        assert torch.equal(native.prompt_linear(x, w, None, 119), native.linear(x, w, None))
    finally:
        native.use_amx(True)


K_FORMATS = [f for f in BLOCK_BYTES if BLOCK_WEIGHTS[f] != BLOCK]


def random_k_blocks(fmt: str, out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """K blocks (256 weights) with random values, scales and minimums; plausible float16 d (and dmin)."""
    g = torch.Generator().manual_seed(seed)
    n = in_features // 256
    blocks = torch.randint(0, 256, (out_features, n, BLOCK_BYTES[fmt]), dtype=torch.uint8, generator=g)
    at = [0, 2] if fmt == "Q4_K" else [208]  # d (and dmin)
    for i in at:
        blocks[..., i : i + 2] = (torch.rand(out_features, n, 1, generator=g) * 0.002).half().view(torch.uint8)
    return blocks


@pytest.mark.parametrize("fmt", K_FORMATS)
def test_k_formats_match_gguf_py_and_keep_rows_independent(vector_path, fmt):
    """Q4_K / Q6_K (float32 x): against gguf-py's de-quantization (768 inputs: 3 blocks of 256,
    an odd count), a row alone is the row among 1-20 others, 1 and 2 threads agree, and
    prompt rows on AMX take float's bfloat16 weights."""
    w, x = random_k_blocks(fmt, 131, 768), rand(20, 768)
    got = native.linear(x, w, None)
    torch.testing.assert_close(got.double(), x.double() @ dequantize(w).double().T, atol=1e-4, rtol=1e-5)
    for n in range(1, 21):
        assert torch.equal(native.linear(x[:n], w, None), got[:n]), n
    assert torch.equal(native.linear(x[7:8], w, None)[0], got[7])
    torch.set_num_threads(2)
    try:
        assert torch.equal(native.linear(x, w, None), got)
    finally:
        torch.set_num_threads(1)
    if native.use_amx(True):
        assert torch.equal(native.extension().dequantize_bf16(w), dequantize(w).bfloat16())
    with pytest.raises(RuntimeError, match="K-format blocks take float32 x only"):
        native.linear(x, w.view(torch.int8), None)
