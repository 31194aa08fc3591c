"""Which kernels a model gets, and the errors when the asked-for ones cannot run."""

from __future__ import annotations

import pytest
import torch

from workers.kernels.choice import NATIVE, TORCH, KernelError, native_unsupported, resolve_kernels, weight_layout

CPU = torch.device("cpu")


def test_unknown_kernels_name_the_choices():
    with pytest.raises(KernelError, match="auto, native, amx, avx512, avx2, torch"):
        resolve_kernels("fast", CPU, torch.float32)


def test_torch_is_always_available():
    assert resolve_kernels("torch", torch.device("meta"), torch.float16) is TORCH


def test_native_elsewhere_than_the_cpu_is_an_error_auto_falls_back():
    with pytest.raises(KernelError, match="run on the CPU"):
        resolve_kernels("native", torch.device("meta"), torch.float32)
    assert resolve_kernels("auto", torch.device("meta"), torch.float32) is TORCH


def test_float16_gets_the_torch_kernels():
    assert "float16" in native_unsupported(CPU, torch.float16)
    assert resolve_kernels("auto", CPU, torch.float16) is TORCH


@pytest.mark.skipif(native_unsupported(CPU, torch.float32) is not None, reason="native kernels unavailable")
def test_auto_is_native_on_this_cpu():
    assert resolve_kernels("auto", CPU, torch.bfloat16) is NATIVE


@pytest.mark.skipif(native_unsupported(CPU, torch.float32) is not None, reason="native kernels unavailable")
def test_a_path_by_name_is_taken_or_refused_with_the_reason():
    """amx / avx512 / avx2 take that path of the native kernels, or say what the CPU lacks
    and leave the path as it was; native (and auto) take the fastest this CPU has."""
    from workers.kernels import native

    taken = []
    try:
        for path in native.PATHS:
            before = native.path_on()
            try:
                assert resolve_kernels(path, CPU, torch.bfloat16) is NATIVE
            except KernelError as e:
                assert f"kernels {path!r} unavailable: this CPU has no" in str(e)
                assert native.path_on() == before
            else:
                assert native.path_on() == path
                taken.append(path)
        assert "avx2" in taken  # every CPU the native kernels run on has AVX2
        assert resolve_kernels("native", CPU, torch.bfloat16) is NATIVE and native.path_on() == taken[0]
        resolve_kernels("avx2", CPU, torch.float32)
        assert resolve_kernels("auto", CPU, torch.float32) is NATIVE and native.path_on() == taken[0]
    finally:
        native.best_path()


def test_weight_layouts():
    w = torch.randn(6, 4)
    col = weight_layout(TORCH, w)  # float32 on the CPU: transposed view of an (in, out) matrix
    assert torch.equal(col, w) and col.t().is_contiguous()
    assert weight_layout(NATIVE, col).is_contiguous() and torch.equal(weight_layout(NATIVE, col), w)
    assert weight_layout(TORCH, w.bfloat16()).is_contiguous()
