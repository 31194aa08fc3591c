"""This device's cost curve (runtime.bench.cost_curve, `leapfrog profile`): every shape
timed, the cache left empty, the JSON written, bad shapes refused."""

import json

import pytest

from configs.schema import ModelConfig
from runtime.bench.cost_curve import cost_curve
from runtime.cli import EXIT_USAGE, main
from runtime.engine import Engine


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
