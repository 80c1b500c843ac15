"""The timing harness: structure and bookkeeping only (no assertions about speed)."""

from __future__ import annotations

import gc

import pytest
import torch

from ptool.benchmark import (
    Candidate,
    Timing,
    compare_candidates,
    measure,
    measure_blocks,
    measure_interleaved,
    memory_snapshot,
    plan_repeats,
    summarize,
)


def test_measure_counts_warmup_and_repeat():
    calls = []
    t = measure(lambda x: calls.append(x), (1,), warmup=2, repeat=5)
    assert isinstance(t, Timing)
    assert len(calls) == 7 and t.runs == 5 and len(t.samples_ms) == 5
    assert t.p10_ms <= t.median_ms <= t.p90_ms
    assert t.spread >= 0


def test_measure_passes_kwargs():
    seen = {}
    measure(lambda a, *, b: seen.update(a=a, b=b), (1,), {"b": 2}, warmup=0, repeat=1)
    assert seen == {"a": 1, "b": 2}


def test_calls_run_without_grad_and_gc():
    states = []

    def probe():
        states.append((torch.is_grad_enabled(), gc.isenabled()))

    was_enabled = gc.isenabled()
    measure(probe, warmup=1, repeat=3)
    assert states == [(False, False)] * 4
    assert gc.isenabled() == was_enabled and torch.is_grad_enabled()


def test_gc_is_restored_when_the_call_raises():
    def fail():
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        measure(fail, warmup=0, repeat=1)
    assert gc.isenabled() and torch.is_grad_enabled()


def test_min_seconds_adds_runs_up_to_max_repeat():
    t = measure(lambda: None, warmup=0, repeat=2, min_seconds=10.0, max_repeat=25)
    assert t.runs == 25  # 10 s is never reached by a no-op: the cap stops it


def test_bad_counts_are_value_errors():
    with pytest.raises(ValueError, match="repeat"):
        measure(lambda: None, repeat=0)
    with pytest.raises(ValueError, match="warmup"):
        measure(lambda: None, warmup=-1)


def test_interleaved_round_robin_and_even_spread():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    result = measure_interleaved(fns, warmup=1, repeat={"a": 6, "b": 6, "c": 2})
    assert list(result) == ["a", "b", "c"]
    assert [result[n].runs for n in "abc"] == [6, 6, 2]
    timed = order[3:]  # after one warm-up call each
    assert timed.count("a") == 6 and timed.count("c") == 2
    # round robin: a and b alternate; c's two calls are spread out, not bunched at the start
    assert timed[:2] == ["a", "b"]
    rounds_with_c = [i for i, name in enumerate(n for n in timed if n != "b") if name == "c"]
    assert len(rounds_with_c) == 2 and rounds_with_c[1] - rounds_with_c[0] > 2


def test_interleaved_settle_calls_precede_each_timed_call():
    import time

    order = []

    def slow_after_switch(name):
        def fn():
            # the first call after another candidate is slow (its runtime's threads were busy)
            time.sleep(0.02 if order and order[-1] != name else 0.0)
            order.append(name)
        return fn

    fns = {name: slow_after_switch(name) for name in ("a", "b")}
    plain = measure_interleaved(fns, warmup=0, repeat=3)
    order.clear()
    settled = measure_interleaved(fns, warmup=0, repeat=3, settle=1)
    assert order == ["a", "a", "b", "b"] * 3  # one untimed call right before each timed one
    assert plain["b"].median_ms >= 15.0  # every timed call paid the switch
    assert settled["a"].median_ms < 10.0 and settled["b"].median_ms < 10.0  # the untimed call did


def test_interleaved_per_candidate_inputs():
    got = {}
    measure_interleaved({"x": lambda v: got.setdefault("x", v), "y": lambda v: got.setdefault("y", v)}, (1,),
                        warmup=0, repeat=1, inputs={"y": ((2,), {})})
    assert got == {"x": 1, "y": 2}


def test_progress_callback():
    seen = []
    measure_interleaved({"a": lambda: None}, warmup=0, repeat=4, on_round=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_summarize_percentiles():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median_ms == 3.0
    assert t.p10_ms == pytest.approx(1.4) and t.p90_ms == pytest.approx(4.6)
    assert t.spread == pytest.approx((4.6 - 1.4) / 3.0)
    assert t.samples_ms == (5.0, 1.0, 3.0, 2.0, 4.0)  # order kept
    assert Timing(2.0, 2.0, 2.0, 0.0, 1).ratio_to(Timing(6.0, 6.0, 6.0, 0.0, 1)) == 3.0
    with pytest.raises(ValueError):
        summarize([])


def test_to_dict_drops_samples_unless_asked():
    t = summarize([1.0, 2.0])
    assert "samples_ms" not in t.to_dict()
    assert t.to_dict(samples=True)["samples_ms"] == [1.0, 2.0]


def test_memory_snapshot_reads_something():
    snap = memory_snapshot()
    assert snap.rss_mb is None or snap.rss_mb > 0
    assert snap.peak_rss_mb is None or snap.peak_rss_mb > 0


def test_plan_repeats_caps_slow_candidates():
    plan = plan_repeats({"fast": 0.001, "slow": 2.0, "mid": 0.5}, repeat=20, max_seconds=5.0)
    assert plan == {"fast": 20, "slow": 3, "mid": 10}
    assert plan_repeats({"a": 9.0}, repeat=2, max_seconds=1.0) == {"a": 2}  # never above repeat
    assert plan_repeats({"a": 9.0}, repeat=20, max_seconds=None) == {"a": 20}


def test_compare_candidates_rows():
    x = torch.randn(4, 8)
    weight = torch.randn(8, 3)
    base = Candidate("eager", lambda t: t @ weight)
    same = Candidate("same", lambda t: (t @ weight).clone(), build_seconds=1.5, memory_mb=2.0, note="n")
    off = Candidate("off", lambda t: t @ weight + 1e-3)
    rows = compare_candidates([base, same, off], (x,), check_inputs=[((torch.randn(4, 8),), {})],
                              warmup=1, repeat=3)
    assert [r.name for r in rows] == ["eager", "same", "off"]
    assert rows[0].speedup == pytest.approx(1.0)
    assert rows[1].fidelity.max_abs_error == 0 and rows[1].fidelity.cosine == pytest.approx(1.0)
    assert rows[2].fidelity.max_abs_error == pytest.approx(1e-3, rel=1e-3)
    assert all(r.timing.runs == 3 for r in rows)
    d = rows[1].to_dict()
    assert d["build_seconds"] == 1.5 and d["memory_mb"] == 2.0 and d["note"] == "n" and d["runs"] == 3


def test_blocks_run_each_candidate_in_whole_turns_with_warm_ups_untimed():
    import time

    order = []

    def slow_after_switch(name):
        def fn():
            # the first two calls after another candidate are slow (its runtime's threads still spin)
            recent = order[-2:]
            time.sleep(0.02 if any(n != name for n in recent) or len(recent) < 2 else 0.0)
            order.append(name)
        return fn

    fns = {name: slow_after_switch(name) for name in ("a", "b")}
    result = measure_blocks(fns, rounds=2, warmup=2, repeat=3)
    assert order == ["a"] * 5 + ["b"] * 5 + ["a"] * 5 + ["b"] * 5
    assert [result[n].runs for n in "ab"] == [6, 6]
    assert result["a"].median_ms < 10.0 and result["b"].median_ms < 10.0  # the warm-ups paid the switch
    slow = measure_interleaved(fns, warmup=0, repeat=3, settle=1)
    assert slow["a"].median_ms >= 15.0  # one settling call is not enough here


def test_blocks_bad_counts_are_value_errors():
    with pytest.raises(ValueError, match="rounds"):
        measure_blocks({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="repeat"):
        measure_blocks({"a": lambda: None}, repeat=0)
