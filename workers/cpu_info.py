"""Which CPU ran it: its model name and the vector extensions the kernels choose by, so that
figures from different machines are never compared as if they were one (issue 36).

The class is the best path the native kernels have on it: "AMX" (AMX-BF16 tiles for prompt
rows, AVX512-BF16 for the rest), "AVX512-BF16", "AVX512" (without BF16), "AVX2", or "other"
(the PyTorch kernels)."""

from __future__ import annotations

import functools
import os
import platform

# The flags (as /proc/cpuinfo spells them) that change which kernels run or how fast.
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_class(flags: set[str]) -> str:
    if {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags:
        return "AMX"
    if {"avx512f", "avx512_bf16"} <= flags:
        return "AVX512-BF16"
    if "avx512f" in flags:  # attention in 16 lanes; the bfloat16 products on AVX2
        return "AVX512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return "other"


@functools.cache
def cpu_info() -> dict:
    """{"model": "Intel(R) Xeon(R) ...", "class": "AMX", "flags": [...], "cores": 2} from
    /proc/cpuinfo (the machine's name for the model, and FLAGS it has); elsewhere the
    platform's name with no flags."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return {"model": model, "class": cpu_class(flags), "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count()}


def describe_cpu() -> str:
    """One line for a report: 'Intel(R) Xeon(R) Processor (AMX: avx2 fma ...)'."""
    info = cpu_info()
    return f"{info['model']} ({info['class']}: {' '.join(info['flags']) or 'no vector flags read'})"
