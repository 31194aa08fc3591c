"""Which kernels a model multiplies with, and the weight layout each streams fastest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from configs.schema import KERNELS
from workers.kernels import native, reference


class KernelError(RuntimeError):
    pass


@dataclass(frozen=True)
class Kernels:
    name: str  # "torch" | "native"
    linear: Callable  # (x, weight, bias) -> y
    prompt_linear: Callable  # (x, weight, bias, n) -> y, its first n rows prompt rows (workers.model.prompt_rows)
    rms_norm: Callable  # (x, weight, eps) -> y
    rotary: Callable  # (qkv, cos, sin, heads, head_dim) -> qkv with q and k rotated
    attention: Callable  # (q, k, v, mask) -> (B, n, heads * head_dim)
    # A whole decoder layer in one call (workers.kernels.native.decoder_layer), or None:
    # workers.model.DecoderLayer then runs op by op.
    decoder_layer: Callable | None = None
    # The same over the rows of several sequences, each with its own cache
    # (workers.kernels.native.ragged_decoder_layer), or None: workers.batched_step runs op by op.
    ragged_decoder_layer: Callable | None = None


TORCH = Kernels("torch", reference.linear, reference.prompt_linear, reference.rms_norm, reference.rotary, reference.attention)
NATIVE = Kernels(
    "native", native.linear, native.prompt_linear, native.rms_norm, native.rotary, native.attention, native.decoder_layer,
    native.ragged_decoder_layer,
)


def native_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the native kernels cannot run this model, or None when they can."""
    if device.type != "cpu":
        return f"they run on the CPU, the model is on {device}"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"they take float32 or bfloat16 weights, not {dtype}"
    if not native.cpu_supported():
        return f"this CPU has no AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    try:
        native.extension()
    except Exception as e:  # no compiler, a failed build: say so; the torch kernels still work
        return f"the extension did not build or load ({' '.join(str(e).split())[:300]})"
    return None


def resolve_kernels(name: str, device: torch.device, dtype: torch.dtype) -> Kernels:
    """The kernels `name` (one of KERNELS) stands for on this device and dtype.

    "auto" is native where native runs, else torch; "native" is native on the fastest path
    this CPU has (native.PATHS), and "amx", "avx512" or "avx2" native on that path. Asking
    for native, or a path of it, where it cannot run is an error that says why. The path is
    the process's (native.select_path): the last model loaded sets it.
    """
    if name not in KERNELS:
        raise KernelError(f"unknown kernels {name!r}: expected one of {', '.join(KERNELS)}")
    if name == "torch":
        return TORCH
    reason = native_unsupported(device, dtype)
    if reason is not None:
        if name == "auto":
            return TORCH
        raise KernelError(f"native kernels unavailable: {reason}")
    if name in native.PATHS:
        reason = native.select_path(name)
        if reason is not None:
            raise KernelError(f"kernels {name!r} unavailable: {reason}")
    else:
        native.best_path()
    return NATIVE


def weight_layout(kernels: Kernels, weight: torch.Tensor) -> torch.Tensor:
    """The weight (same values and shape) in the memory layout `kernels` streams fastest.

    native reads rows of the (out, in) matrix. F.linear on an x86 CPU streams float32
    matrix-vector products ~1.4x faster from the transposed view of an (in, out) contiguous
    matrix (docs/results.md); bfloat16, other devices and many-row products gain nothing.
    """
    if kernels is TORCH and weight.device.type == "cpu" and weight.dtype == torch.float32:
        return weight.t().contiguous().t()
    return weight.contiguous()
