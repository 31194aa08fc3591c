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

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
NAME = "leapfrog_cpu_kernels"
# -fopenmp: at::parallel_for then runs on torch's OpenMP pool (same libgomp soname, loaded once);
# -ffp-contract=off: no fused a*b+c where the reference rounds the product first.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]


def build_dir() -> Path:
    """One folder per torch, Python, source and flags: two checkouts of different kernels
    each keep their own build instead of rebuilding over each other."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS + LDFLAGS).encode()).hexdigest()[:12]
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T (+ bias), in float32; the result in x's dtype."""
    if needs_grad(x, weight, bias):
        return reference.linear(x, weight, bias)
    return extension().linear(x, weight, bias)


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


def main() -> None:
    """`python -m workers.kernels`: build now."""
    if not cpu_supported():
        print("native kernels: skipped, this CPU has no AVX2; the torch kernels will be used")
        return
    print(f"native kernels: building {SOURCE.name} in {build_dir()} (about a minute the first time)", flush=True)
    extension()
    print("native kernels: ready")
