"""The native CPU kernels (cpu_kernels.cpp), built with the compiler that is on the machine.

`make install` builds them once (`python -m workers.kernels`); later loads find the built
library in the cache folder and return at once (a changed source builds in a folder of
its own). Each kernel takes and returns what its counterpart in
workers.kernels.reference does. Training backpropagates through the model: whenever
autograd needs a result, the reference computes it, as it has a backward.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import torch

from workers.cache_dir import cache_dir
from workers.kernels import reference
from workers.kernels.quant_blocks import is_quantized

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # its parts (cpu_kernels.cpp includes them)
NAME = "leapfrog_cpu_kernels"
# -mf16c: float16 -> float32 conversions (the GGUF blocks' scales, quant.h);
# -fopenmp: at::get_num_threads reads torch's OpenMP setting (same libgomp soname, loaded once;
# the loops themselves run on the kernels' own pool, cpu_kernels.cpp);
# -ffp-contract=off: no fused a*b+c where the reference rounds the product first.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]


def build_dir() -> Path:
    """One folder per torch, Python, source and flags: two checkouts of different kernels
    each keep their own build instead of rebuilding over each other."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [SOURCE, *HEADERS]) + " ".join(CFLAGS + LDFLAGS).encode()).hexdigest()[:12]
    return cache_dir() / "kernels" / f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{digest}"


def cpu_supported() -> bool:
    """AVX2 and FMA, as PyTorch reports this CPU's vector capability."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def extension():
    """The compiled module (built now if `make install` did not); raises if it cannot be."""
    if not cpu_supported():
        raise RuntimeError(f"this CPU has no AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})")
    from torch.utils.cpp_extension import load

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return load(NAME, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=str(folder))


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, float_out: bool = False) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T (+ bias), in float32; the result in x's dtype, or in
    float32 with `float_out` (the LM head's logits: workers.model.LogitsHead). bfloat16 x and
    weight take AMX tiles where the CPU has them (use_amx), else the AVX512-BF16 dot products
    where it has those (use_avx512): on AMX a step of 1 to 32 rows costs about what one row
    does, which lets token trees grow."""
    if needs_grad(x, weight, bias):
        out = reference.linear(x, weight, bias)
        return out.float() if float_out else out
    return extension().linear(x, weight, bias, float_out)


def use_avx512(enable: bool) -> bool:
    """Turn the AVX-512 paths on (where the CPU has them; the default) or off: `linear`'s
    AVX512-BF16 dot products and `attention`'s 16-lane scores and weighted values. Their sums
    round otherwise than the AVX2 paths', so a process keeps one setting while it decodes:
    tests switch it to cover both paths. Returns whether any is on."""
    return extension().use_avx512(enable)


def prompt_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """linear, with the first n rows (dim -2: prompt rows, workers.model.AttentionContext) on
    the many-row path, which differs from linear only for quantized weights against bfloat16
    rows: on AMX, tiles against the weights de-quantized to bfloat16 for the call (products.h,
    prompt_linear). Either way each row's bits are its own, whatever other rows share the call
    and however many threads run it; never a library's GEMM, whose choice of kernel (and
    rounding) varies with the row count and the CPU."""
    n = min(n, x.shape[-2])
    if x.dtype != torch.bfloat16 or not is_quantized(weight) or n <= 0 or needs_grad(x, weight, bias):
        return linear(x, weight, bias)  # unquantized weights: one call, the same bits
    out = extension().prompt_linear(x[..., :n, :], weight, bias)
    if n == x.shape[-2]:
        return out
    return torch.cat((out, linear(x[..., n:, :], weight, bias)), dim=-2)


def use_amx(enable: bool) -> bool:
    """Turn the AMX tiles of linear and prompt_linear on (where the CPU has AMX and Linux
    grants the tile state: the default) or off; returns whether they are on. Tiles round
    otherwise than the AVX-512 and AVX2 paths, so a process keeps one setting while it
    decodes (workers.kernels.choice.resolve_kernels sets it from `--kernels`)."""
    return extension().use_amx(enable)


# The native kernels' paths, fastest first: AMX tiles for bfloat16 products (with AVX-512
# attention), AVX-512 (AVX512-BF16 products, 16-lane attention), AVX2. They round differently.
PATHS = ("amx", "avx512", "avx2")


def path_on() -> str:
    """The path the kernels take now (one of PATHS)."""
    amx, avx512_products, avx512_attention = extension().paths_on()
    return "amx" if amx else "avx512" if avx512_products or avx512_attention else "avx2"


def select_path(path: str) -> str | None:
    """Take `path` (one of PATHS) from now on; None, or why this CPU cannot (then nothing
    changes). The setting is the process's: the last engine loaded sets it for all."""
    before = path_on()
    use_avx512(path != "avx2")
    use_amx(path == "amx")
    if path_on() == path:
        return None
    select_path(before)
    need = {"amx": "AMX-BF16 (or Linux did not grant its tile state)", "avx512": "AVX512-BF16 or AVX512F"}[path]
    return f"this CPU has no {need}"


def best_path() -> str:
    """The fastest path this CPU has."""
    return next(p for p in PATHS if select_path(p) is None)


def use_vnni(enable: bool) -> bool:
    """Turn the AVX-VNNI dot products of linear_q's int8 variant (blocks typed int8) on (where
    the CPU has them; the default) or off (AVX2's): the same integers either way, so the
    same bits; tests switch it to cover both. Returns whether they are on."""
    return extension().use_vnni(enable)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if needs_grad(x, weight) or x.dtype != weight.dtype:
        return reference.rms_norm(x, weight, eps)
    return extension().rms_norm(x, weight, eps)


def rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    if needs_grad(qkv) or not qkv.is_contiguous():
        return reference.rotary(qkv, cos, sin, heads, head_dim)
    if cos.dim() < qkv.dim():  # (n, head_dim) for every batch row
        cos, sin = cos.expand(*qkv.shape[:-1], head_dim), sin.expand(*qkv.shape[:-1], head_dim)
    return extension().rotary_(qkv, cos, sin, heads, head_dim)  # in place: qkv is the projection's fresh output


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """In float32 whatever the dtype (a cache on the CPU is float32 already); the result in q's."""
    if needs_grad(q, k, v) or q.shape[-1] % 8 or (mask is not None and mask.dim() != 2):
        return reference.attention(q, k, v, mask)
    if k.dtype != torch.float32 or k.stride(-1) != 1 or k.stride() != v.stride():
        k, v = k.float().contiguous(), v.float().contiguous()
    return extension().attention(q, k, v, mask).to(q.dtype)


def decoder_layer(
    h: torch.Tensor,
    weights: tuple[torch.Tensor | None, ...],
    eps: float,
    heads: int,
    kv_heads: int,
    head_dim: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    length: int,
) -> torch.Tensor | None:
    """A whole decoder layer in one call (cpu_kernels.cpp: decoder_layer), bit-identical to
    workers.model.DecoderLayer run op by op on these kernels; None where one of them would
    hand its work to the reference (autograd, a head size or mask they do not take, a
    bfloat16 cache), and the caller then runs the layer op by op.

    weights: (input norm, qkv, qkv bias, o, o bias, post-attention norm, gate/up, gate/up
    bias, down, down bias), biases None where absent; cache_k, cache_v (B, kv_heads,
    max_len, head_dim): the layer's slice of the cache, written at [length, length + n)."""
    if not fusable(h, weights, head_dim, [mask], [cache_k]):
        return None
    return extension().decoder_layer(h, *weights, eps, heads, kv_heads, head_dim, cos, sin, mask, cache_k, cache_v, length)


def ragged_decoder_layer(
    h: torch.Tensor,
    weights: tuple[torch.Tensor | None, ...],
    eps: float,
    heads: int,
    kv_heads: int,
    head_dim: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rows: list[int],
    masks: list[torch.Tensor | None],
    caches_k: list[torch.Tensor],
    caches_v: list[torch.Tensor],
    lengths: list[int],
) -> torch.Tensor | None:
    """decoder_layer over the rows of several sequences in one call (cpu_kernels.cpp:
    ragged_decoder_layer): h (1, R, dim), sequence s owning the next rows[s] rows, with its
    mask (rows[s], keys) or None, its layer's cache slices and committed length; cos, sin
    (R, head_dim). Each sequence's rows get what its own decoder_layer gives them; None
    where decoder_layer would be None for one of them."""
    if not fusable(h, weights, head_dim, masks, caches_k):
        return None
    none = torch.empty(0, dtype=torch.bool)
    masks = [none if m is None else m for m in masks]
    return extension().ragged_decoder_layer(h, *weights, eps, heads, kv_heads, head_dim, cos, sin, rows, masks, caches_k,
                                            caches_v, lengths)


def fusable(h: torch.Tensor, weights: tuple, head_dim: int, masks: list, caches_k: list[torch.Tensor]) -> bool:
    """Whether a fused layer call computes what the layer op by op on these kernels does: not
    where one of them would hand its work to the reference (autograd, a head size or mask
    they do not take, a bfloat16 cache)."""
    return not (
        torch.is_grad_enabled()
        or head_dim % 8
        or any(m is not None and m.dim() != 2 for m in masks)
        or any(k.dtype != torch.float32 for k in caches_k)
        or h.dtype != weights[0].dtype
    )


def main() -> None:
    """`python -m workers.kernels`: build now."""
    if not cpu_supported():
        print("native kernels: skipped, this CPU has no AVX2; the torch kernels will be used")
        return
    print(f"native kernels: building {SOURCE.name} in {build_dir()} (about a minute the first time)", flush=True)
    extension()
    print("native kernels: ready")
