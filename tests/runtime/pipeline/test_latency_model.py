"""The pipelined modes' latency/compute model (runtime.pipeline.latency_model) on synthetic
step costs and runs: the cycle arithmetic, one worker, the hit rate needed, and reading a
measured run's metrics."""

import pytest

from runtime.pipeline.latency_model import MAX_ANY_HIT, DecodeStats, needed_hit_rate, predict
from workers.tree_sizing import StepCost

CPU = StepCost((1, 8, 16), (20.0, 34.0, 50.0))  # 2 ms a row past the first
FLAT = StepCost((1, 64), (10.0, 10.0))  # a GPU: rows are free
RUN = DecodeStats(workers=2, policy="chain", root_rows=5.0, spawned_rows=9.0, tau_root=1.6, tau_hit=1.5,
                  hit_rate=0.5, overhead_ms=2.0, context=300)


def test_a_chain_cycle_by_hand():
    # h = 0.5: one hit and one wasted step per cycle; C(5) = 28, C(9) = 36 (the overhead is not compute).
    p = predict(RUN, CPU)
    assert (p.hits_per_cycle, p.wasted_per_cycle) == (1.0, 1.0)
    assert p.worker_ms == pytest.approx((28.0 + 2 * 36.0) / (1.6 + 1.5))
    # wasted steps cut halfway: the hit costs its whole step, the wasted one half of it
    cut = predict(DecodeStats(**{**RUN.__dict__, "wasted_fraction": 0.5}), CPU)
    assert cut.worker_ms == pytest.approx((28.0 + 36.0 + 0.5 * 36.0) / (1.6 + 1.5)) and cut.latency_ms == p.latency_ms
    fanout = DecodeStats(**{**RUN.__dict__, "policy": "fanout", "hit_rate": 0.3})
    cut_fanout = DecodeStats(**{**fanout.__dict__, "wasted_fraction": 0.5})
    assert predict(cut_fanout, CPU, workers=3).worker_ms < predict(fanout, CPU, workers=3).worker_ms


def test_steps_that_launch_nothing_end_the_cycle_and_waste_nothing():
    # s = 0.5, h = 0.5: a step goes on with 0.25; hits = 0.25 / 0.75, and of the cycles a
    # third end on a miss (0.5 * 0.5 / 0.75), the rest on a step that launched nothing.
    sparse = DecodeStats(**{**RUN.__dict__, "launch_rate": 0.5})
    p = predict(sparse, CPU)
    assert p.hits_per_cycle == pytest.approx(1 / 3) and p.wasted_per_cycle == pytest.approx(1 / 3)
    assert p.worker_ms == pytest.approx((28.0 + 36.0 / 3 + 36.0 / 3) / (1.6 + 1.5 / 3))
    assert predict(RUN, CPU).latency_ms < p.latency_ms < predict(RUN, CPU, hit_rate=0.0).latency_ms
    assert predict(DecodeStats(**{**RUN.__dict__, "launch_rate": 0.0}), CPU).latency_ms == predict(RUN, CPU, hit_rate=0.0).latency_ms


TEN = StepCost((1, 64), (10.0, 10.0))
EVEN = DecodeStats(workers=2, policy="chain", root_rows=1.0, spawned_rows=1.0, tau_root=1.0, tau_hit=1.0,
                   hit_rate=0.5, overhead_ms=0.0, context=100)


def test_latency_follows_the_critical_path():
    """Two workers, steps of 10 ms launched at once on their parent's prediction: they finish
    in pairs at 10, 10, 20, 20, ... ms. A cycle with m hits ends at 10 (m // 2 + 1) ms."""
    # h = 0.5: E[end] = sum 0.5^(m+1) 10 (m // 2 + 1) = 7.5 / 0.75^2; E[tokens] = 1 + 1
    assert predict(EVEN, TEN).latency_ms == pytest.approx(7.5 / 0.75**2 / 2)
    assert predict(EVEN, TEN, hit_rate=0.0).latency_ms == pytest.approx(10.0)  # every cycle a root alone
    assert predict(EVEN, TEN, hit_rate=0.99).latency_ms == pytest.approx(5.0, rel=0.02)  # two steps every 10 ms
    late = DecodeStats(**{**EVEN.__dict__, "predict_fraction": 0.5})  # predictions halfway through the parent
    assert predict(late, TEN, hit_rate=0.99).latency_ms == pytest.approx(5.0, rel=0.02)  # still two a step's time
    later = DecodeStats(**{**EVEN.__dict__, "predict_fraction": 0.8, "overhead_ms": 1.0})
    assert predict(later, TEN, hit_rate=0.99).latency_ms == pytest.approx(0.8 * 11 + 1, rel=0.03)  # the launch delay rules


def test_host_work_adds_to_every_step():
    busy = DecodeStats(**{**EVEN.__dict__, "host_ms": 5.0})
    assert predict(busy, TEN, hit_rate=0.0).latency_ms == pytest.approx(15.0)
    assert predict(busy, TEN, workers=1).latency_ms == pytest.approx(15.0)
    assert predict(busy, TEN).worker_ms == pytest.approx(1.5 * predict(EVEN, TEN).worker_ms)


def test_one_worker_runs_root_steps_in_process():
    p = predict(RUN, CPU, workers=1)
    assert p.latency_ms == p.worker_ms == pytest.approx(28.0 / 1.6)


def test_more_hits_and_free_rows_pay_more_workers_spend_more():
    assert predict(RUN, CPU, hit_rate=0.8).latency_ms < predict(RUN, CPU).latency_ms < predict(RUN, CPU, hit_rate=0.1).latency_ms
    assert predict(RUN, FLAT).latency_ms < predict(RUN, FLAT, workers=1).latency_ms  # the second worker pays on a GPU
    assert predict(RUN, CPU, hit_rate=0.1).latency_ms > predict(RUN, CPU, workers=1).latency_ms  # not here at 10%
    assert predict(RUN, CPU, workers=4).worker_ms > predict(RUN, CPU).worker_ms


def test_fanout_counts_any_alternative_that_holds():
    fanout = DecodeStats(**{**RUN.__dict__, "policy": "fanout", "hit_rate": 0.3})
    p = predict(fanout, CPU, workers=3)  # a = 0.6: 1.5 hits, (3 - 2) * 1.5 + 2 wasted
    assert p.hits_per_cycle == pytest.approx(1.5) and p.wasted_per_cycle == pytest.approx(3.5)
    assert predict(fanout, CPU, workers=9).hits_per_cycle == pytest.approx(MAX_ANY_HIT / (1 - MAX_ANY_HIT))


def test_needed_hit_rate_reaches_the_target():
    one = predict(RUN, CPU, workers=1).latency_ms
    need = needed_hit_rate(RUN, CPU, one / 1.2)
    assert 0 < need < 1 and predict(RUN, CPU, hit_rate=need).latency_ms == pytest.approx(one / 1.2, rel=1e-6)
    assert needed_hit_rate(RUN, CPU, 1e6) == 0.0  # any hit rate does
    assert needed_hit_rate(RUN, CPU, 0.1) is None  # none does


def test_stats_from_a_runs_metrics():
    summary = dict(tokens=130, first_tokens=2, steps=90, spawned=40, hits=12, round_trip_s=3.0, step_s=2.7,
                   coordinator_s=0.05, wall_s=2.0, first_s=0.3, first_step_s=0.25, root_steps=45, root_rows=225.0,
                   root_tokens=80, spawned_steps=40, spawned_rows=360.0, spawned_tokens=46, decode_context=17000)
    stats = DecodeStats.from_summary(summary, 2, "chain")
    assert (stats.root_rows, stats.spawned_rows, stats.hit_rate) == (5.0, 9.0, 0.3)
    assert stats.tau_root == pytest.approx(80 / 45) and stats.tau_hit == pytest.approx(46 / 12)
    assert stats.overhead_ms == pytest.approx(1000 * (0.3 / 90 + 0.05 / 85)) and stats.context == 200
    assert stats.latency_ms == pytest.approx(1000 * 1.7 / 128) and stats.worker_ms == pytest.approx(1000 * 2.45 / 128)
    assert DecodeStats.from_summary({**summary, "spawned_steps": 0}, 2, "chain") is None
    # with the measuring device's t(n): the steps' compute beyond it is their host work
    timed = DecodeStats.from_summary({**summary, "root_step_s": 1.35, "spawned_step_s": 1.6}, 2, "chain", 0.5, CPU)
    forward = CPU(5.0) * 45 + CPU(9.0) * 40  # 28 and 36 ms
    assert timed.host_ms == pytest.approx((2950.0 - forward) / 85) and timed.predict_fraction == 0.5
    assert timed.wasted_fraction == 1.0  # no wasted steps counted: taken as run to their end
    assert timed.launch_rate == pytest.approx(40 / (45 + 12))  # launches per step that committed
    # 10 wasted steps: all compute but the first step's (0.25 s), the roots' (1.35 s) and
    # the 12 hits' at a returned spawned step's 40 ms (0.48 s): 0.2 s, half a spawned step each
    wasting = {**summary, "root_step_s": 1.35, "spawned_step_s": 1.6, "step_s": 2.28, "wasted_steps": 10}
    assert DecodeStats.from_summary(wasting, 2, "chain").wasted_fraction == pytest.approx(0.5)
    assert DecodeStats.from_summary(wasting, 3, "fanout").launch_rate == pytest.approx(40 / 2 / 57)
