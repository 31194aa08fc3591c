"""This device's cost curve (workers.cost_curve, `leapfrog profile`): every shape
timed, the cache left empty, the JSON written, bad shapes refused; the tree modes' quick
curve measured once and cached."""

import json

import pytest

from configs.schema import ConfigError, ModelConfig, TreeSizingConfig
from runtime.cli import EXIT_USAGE, main
from runtime.engine import Engine
from workers import cost_curve as cost_curve_module
from workers.cost_curve import cost_curve, device_profile
from workers.cpu_info import cpu_info


@pytest.fixture(scope="module")
def engine():
    return Engine(ModelConfig(dtype="float32", device="cpu", max_context=64))


def test_every_shape_is_timed_and_the_cache_is_left_empty(engine):
    profile = cost_curve(engine, rows=[1, 3, 8], contexts=[4, 16], repeats=2, progress=False)
    assert profile["rows"] == [1, 3, 8] and profile["contexts"] == [4, 16] and profile["dtype"] == "float32"
    for c in (4, 16):
        assert set(profile["ms_median"][c]) == {1, 3, 8}
        assert all(0 < profile["ms_min"][c][n] <= profile["ms_median"][c][n] for n in (1, 3, 8))
    assert engine.cache.length == 0
    assert profile["cpu"] == cpu_info()  # which CPU ran it, with its flags
    with pytest.raises(ValueError, match="exceed max_context 64"):
        cost_curve(engine, rows=[32], contexts=[40], progress=False)


def test_the_command_writes_the_profile(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["profile", "--out", str(out), "--rows", "1,2", "--contexts", "8", "--repeats", "1",
                 "--threads", "1", "--no-progress"]) == 0
    profile = json.loads(out.read_text())
    assert profile["rows"] == [1, 2] and list(profile["ms_median"]) == ["8"]
    assert "c=8" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:  # argparse refuses it before anything loads
        main(["profile", "--out", str(out), "--rows", "1,x"])
    assert bad.value.code == EXIT_USAGE


def test_the_tree_modes_curve_is_measured_once_and_cached(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAPFROG_CACHE", str(tmp_path))
    monkeypatch.setattr(cost_curve_module.os, "getloadavg", lambda: (0.5, 0.5, 0.5))  # a quiet machine
    profile = device_profile(engine, progress=False)
    assert profile["key"]["kernels"].split()[0] == engine.model.kernels.name and profile["rows"][0] == 1
    assert max(profile["rows"]) + max(profile["contexts"]) <= 64  # fits this engine's max_context
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 1

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(cost_curve_module, "cost_curve", no_measuring)
    assert device_profile(engine, progress=False) == json.loads(json.dumps(profile))
    engine.set_drafter_config("tree_sizing", TreeSizingConfig(cost="auto"))
    assert engine.cost_curve().at(1).rows[0] == 1


def test_a_curve_measured_on_a_busy_machine_is_used_but_not_cached(engine, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEAPFROG_CACHE", str(tmp_path))
    cores = cost_curve_module.os.cpu_count()
    monkeypatch.setattr(cost_curve_module.os, "getloadavg", lambda: (2.0 * cores, 1.0, 1.0))
    profile = device_profile(engine, progress=False)
    assert profile["busy"] == f"load {2.0 * cores:.1f} on {cores} cores" and profile["rows"][0] == 1
    assert not list(tmp_path.glob("profiles/*.json")) and "not cached" in capsys.readouterr().err


def test_a_changed_native_kernel_is_measured_anew(engine, monkeypatch, tmp_path):
    """The cached curve is keyed by the native kernels' build and path: a faster kernel (or
    AMX tiles instead of AVX-512) is not sized by the curve of the other."""
    if engine.model.kernels.name != "native":
        pytest.skip("the native kernels are not built here")
    before = cost_curve_module.profile_key(engine)
    monkeypatch.setattr(cost_curve_module.native, "build_dir", lambda: tmp_path / "torch-x-py3-otherdigest")
    after = cost_curve_module.profile_key(engine)
    assert before["kernels"] != after["kernels"] and after["kernels"] == f"native torch-x-py3-otherdigest {cost_curve_module.native.path_on()}"
    monkeypatch.setattr(cost_curve_module.native, "path_on", lambda: "avx2")
    assert cost_curve_module.profile_key(engine)["kernels"] == "native torch-x-py3-otherdigest avx2"


def test_a_profile_that_cannot_be_read_is_a_config_error(engine, tmp_path):
    for content in (None, "not json", json.dumps({"rows": [1]})):
        path = tmp_path / "profile.json"
        if content is not None:
            path.write_text(content)
        engine.set_drafter_config("tree_sizing", TreeSizingConfig(cost=str(path)))
        with pytest.raises(ConfigError, match=r"\[tree_sizing\] cost"):
            engine.cost_curve()
    engine.set_drafter_config("tree_sizing", TreeSizingConfig(cost="off"))
    assert engine.cost_curve() is None and engine.tree_sizer() is None
