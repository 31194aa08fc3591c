"""`leapfrog sweep`: a tiny grid through the benchmark harness writes its CSV, JSON and PNG."""

from __future__ import annotations

import csv
import json

import pytest

from configs.schema import ConfigError
from runtime.bench.sweep import load_sweep, mark_pareto, project_sweep
from runtime.cli import main

TINY = """
[model]
dtype = "float32"
max_context = 1024

[generation]
max_new_tokens = 12

[runtime]
threads = 1

[tree_sizing]
cost = "off"  # launch trees unsized: whether a sized one spawns depends on this machine's measured curve

[pipeline]
transport = "local"

[sweep]
modes = ["pipeline"]
references = ["ht"]
limit = 2
workers = [1, 2]
policy = "chain"
"""


def test_tiny_sweep_writes_csv_json_and_png(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "2 grid points" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "out" / "sweep.csv")))
    assert [(r["workers"], r["mode"]) for r in rows] == [(w, m) for w in ("1", "2") for m in ("ar", "ht", "pipeline")]
    assert all(r["identical_prompts"] == r["prompts"] == "2" and float(r["latency_ms_per_token"]) > 0 for r in rows)
    pipelined = [r for r in rows if r["mode"] == "pipeline"]
    assert all(float(r["worker_ms_per_token"]) > 0 for r in pipelined)
    assert pipelined[0]["hit_rate"] == "" and pipelined[1]["hit_rate"] != ""  # predictions need 2 workers
    assert any(r["pareto"] == "True" for r in rows)
    assert "model_latency_ms" in rows[0] and rows[0]["model_latency_ms"] == ""  # the model covers pipelined modes only
    results = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["point"] for r in results["results"]] == [{"workers": 1, "policy": "chain"}, {"workers": 2, "policy": "chain"}]
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_marks_only_undominated_rows():
    rows = [
        {"latency_ms_per_token": 10.0, "worker_ms_per_token": 30.0},
        {"latency_ms_per_token": 20.0, "worker_ms_per_token": 20.0},
        {"latency_ms_per_token": 25.0, "worker_ms_per_token": 25.0},  # dominated by the second
    ]
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, True, False]


@pytest.mark.parametrize(
    "sweep, match",
    [
        ("", "no \\[sweep\\] section"),
        ("[sweep]\nlayers = [1, 2]\n", "unknown keys \\['layers'\\]"),
        ("[sweep]\nworkers = []\n", "at least one value"),
        ("[sweep]\nmodes = ['warp']\nworkers = [2]\n", "unknown mode 'warp'"),
        ("[sweep]\npolicy = ['guess']\n", "policy"),
    ],
)
def test_bad_sweep_configs_are_refused(tmp_path, sweep, match):
    config = tmp_path / "bad.toml"
    config.write_text(sweep)
    with pytest.raises(ConfigError, match=match):
        load_sweep(config)


def test_a_measured_sweep_is_projected_onto_another_devices_curve(tmp_path, capsys):
    """`leapfrog sweep --measured sweep.json --project PROFILE`: each pipelined run's
    acceptance and hit rate on another t(n), at every worker count asked for."""
    # every step that committed launched a child: 28 roots and 12 hits, 40 launches
    workers = dict(tokens=130, first_tokens=2, steps=90, spawned=40, hits=12, round_trip_s=2.75, step_s=2.7,
                   coordinator_s=0.05, wall_s=2.0, first_s=0.3, first_step_s=0.25, root_steps=28, root_rows=140.0,
                   root_tokens=50, spawned_steps=40, spawned_rows=360.0, spawned_tokens=46, decode_context=17000)
    result = {"point": {"workers": 2}, "settings": {"workers": 2, "policy": "chain"},
              "modes": {"ar": {"workers": None}, "pipeline": {"workers": workers}}}
    (tmp_path / "sweep.json").write_text(json.dumps({"grid": {"workers": [2]}, "results": [result]}))
    gpu = tmp_path / "gpu.json"  # rows are free there
    gpu.write_text(json.dumps({"ms_median": {"128": {"1": 5.0, "64": 5.5}, "1024": {"1": 6.0, "64": 6.5}}}))
    out = tmp_path / "projected"
    assert main(["sweep", "--measured", str(tmp_path / "sweep.json"), "--project", str(gpu), "--out", str(out),
                 "--project-workers", "1,2,4"]) == 0
    assert "projected.csv" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "projected.csv")))
    assert [(r["mode"], r["workers"]) for r in rows] == [("pipeline", "1"), ("pipeline", "2"), ("pipeline", "4")]
    latency = [float(r["latency_ms_per_token"]) for r in rows]
    assert latency[1] < latency[0] and rows[0]["needed_hit_rate"] == ""  # a second worker pays where rows are free
    assert float(rows[1]["needed_hit_rate"]) < float(rows[1]["hit_rate"]) == 0.3
    assert (out / "projected.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="cannot project"):
        project_sweep(tmp_path / "missing.json", gpu, out, [2])
    assert main(["sweep", "--measured", str(tmp_path / "sweep.json"), "--out", str(out)]) == 2  # --project missing
