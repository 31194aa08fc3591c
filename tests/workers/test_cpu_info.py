"""Which CPU ran it (workers.cpu_info): the class that says which kernels ran."""

from __future__ import annotations

import pytest

from workers.cpu_info import cpu_class, cpu_info, describe_cpu

AVX2 = {"avx2", "fma"}
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16", "avx512_vnni"}


@pytest.mark.parametrize("flags,want", [
    (AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}, "AMX"),  # Intel Sapphire Rapids and later
    (AVX512_BF16, "AVX512-BF16"),  # AMD EPYC Zen 4, Intel Cooper Lake
    (AVX2 | {"avx512f"}, "AVX512"),  # without BF16: the bfloat16 products take the AVX2 path
    (AVX2, "AVX2"),
    ({"sse4_2"}, "other"),
    (set(), "other"),
])
def test_cpu_class_is_the_best_path_the_kernels_have(flags, want):
    assert cpu_class(flags) == want


def test_this_machine_is_described_with_its_flags():
    with open("/proc/cpuinfo") as f:
        text = f.read()
    flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    info = cpu_info()
    assert info["class"] == cpu_class(flags)
    assert set(info["flags"]) <= flags and info["model"]
    assert describe_cpu().startswith(info["model"]) and info["class"] in describe_cpu()
