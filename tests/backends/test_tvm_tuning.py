"""MetaSchedule tuning of the heavy kernels with ptool's schedule as the baseline (real tuning, real
builds): what is tuned, that both schedules are measured and the faster kept, that the database is
applied, and that a second build reuses it."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ptool.backends import compile_module
from ptool.backends.tvm_tuning import KernelTuning

pytestmark = [pytest.mark.tvm, pytest.mark.slow]

TRIALS = 4
"""Two trials per kernel: enough to exercise search, build, run and database, in about a minute."""


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(model, input, first build, its seconds, second build, its seconds, tuning folder)."""
    model, x = _mlp(), torch.randn(32, 64)
    folder = tmp_path_factory.mktemp("tvm-tuning")
    t0 = time.perf_counter()
    first = compile_module(model, "tvm", (x,), tune_trials=TRIALS, tuning_dir=str(folder))
    t1 = time.perf_counter()
    second = compile_module(model, "tvm", (x,), tune_trials=TRIALS, tuning_dir=str(folder))
    t2 = time.perf_counter()
    return model, x, first, t1 - t0, second, t2 - t1, folder


def test_only_the_matmul_kernels_are_tuned_and_both_schedules_measured(tuned):
    _, _, first, *_ = tuned
    info = first.info
    assert info["tuning_reused"] is False and info["tune_trials"] == TRIALS
    assert info["tuned_kernels"] == 2  # the two Linear kernels (with bias / GELU fused), nothing else
    kernels = info["kernels"]
    assert sorted(k["kernel"] for k in kernels) == ["fused_matmul1_add1", "fused_matmul_add_gelu"]
    for k in kernels:
        assert k["ptool_us"] > 0 and k["metaschedule_us"] > 0  # each timed alone by the runner
        assert k["ptool_model_ms"] > 0 and k["metaschedule_model_ms"] > 0  # and inside the model
        faster = "ptool" if k["ptool_model_ms"] <= k["metaschedule_model_ms"] else "metaschedule"
        assert k["chosen"] == faster  # the model's timing decides


def test_tuned_build_matches_torch(tuned):
    model, x, first, _, second, *_ = tuned
    with torch.no_grad():
        ref = model(x)
    assert (first(x) - ref).abs().max().item() < 1e-5
    assert torch.equal(first(x), second(x))


def test_second_build_reuses_the_database(tuned):
    _, _, first, t_first, second, t_second, folder = tuned
    assert second.info["tuning_reused"] is True and second.info["tuning_seconds"] == 0.0
    assert second.info["kernels"] == first.info["kernels"]  # the per-kernel table survives the reuse
    assert second.info["tuned_with_seconds"] == first.info["tuning_seconds"]
    assert t_second < 0.2 * t_first
    records = (folder / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= TRIALS  # every MetaSchedule trial, kept for a later, longer tuning


def test_chosen_database_schedules_exactly_the_kernels_metaschedule_won(tuned):
    """The build applies the chosen records only; ptool's rules schedule every other kernel."""
    import tvm
    from tvm import tirx
    from tvm.relax.frontend.torch import from_exported_program

    from ptool.backends import tvm_backend, tvm_tuning

    model, x, first, *_ , folder = tuned
    mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=False)
    target = tvm_backend.host_target()
    with target:
        legalized = tvm.transform.Sequential(tvm_backend._front_passes(target, tvm_backend.Options()))(mod)

    def scheduled_by(database) -> list[str]:
        with target:
            applied = tvm_tuning.apply_database_pass(database)(legalized)
        return sorted(gv.name_hint for gv, f in applied.functions_items()
                      if isinstance(f, tirx.PrimFunc) and f.attrs is not None
                      and f.attrs.get("tirx.is_scheduled", False))

    kernels = first.info["kernels"]
    assert scheduled_by(folder) == sorted(k["kernel"] for k in kernels)  # MetaSchedule has a record for each
    [chosen] = folder.glob("chosen_*")
    assert scheduled_by(chosen) == sorted(k["kernel"] for k in kernels if k["chosen"] == "metaschedule")
    summary = json.loads(next(folder.glob("ptool_kernels_*.json")).read_text())
    assert summary["kernels"] == kernels and summary["trials"] == TRIALS and summary["chosen_in_model"]


def test_metaschedule_logging_set_up_works_with_an_unnamed_handler_on_its_logger(tmp_path):
    """MetaSchedule's logging set-up (run by every tune) fails on a handler without a name on its logger,
    which pytest's log capture or a user's logging attaches once a first tune made it non-propagating:
    ptool sets such handlers aside while it tunes."""
    import logging

    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    from ptool.backends.tvm_tuning import METASCHEDULE_LOGGER, _unnamed_log_handlers_set_aside

    logger, handler = logging.getLogger(METASCHEDULE_LOGGER), logging.NullHandler()
    with _unnamed_log_handlers_set_aside():  # pytest's own handler is there already after an earlier tune
        get_loggers_from_work_dir(str(tmp_path), ["first"])  # as a first tune: the logger stops propagating
    logger.addHandler(handler)
    try:
        with _unnamed_log_handlers_set_aside():
            loggers = get_loggers_from_work_dir(str(tmp_path), ["second"])
        assert handler in logger.handlers and not logger.propagate
        assert [lg.name for lg in loggers] == [f"{METASCHEDULE_LOGGER}.logging.task_0_second"]
    finally:
        logger.removeHandler(handler)


def test_kernel_winner_is_the_faster_schedule_in_the_model_when_timed_there():
    assert KernelTuning("k", 1, 10.0, 8.0, ptool_model_ms=1.0, tuned_model_ms=1.2).winner == "ptool"
    assert KernelTuning("k", 1, 10.0, 12.0, ptool_model_ms=1.2, tuned_model_ms=1.0).winner == "metaschedule"
    assert KernelTuning("k", 1, ptool_us=10.0, tuned_us=12.0).winner == "ptool"
    assert KernelTuning("k", 1, ptool_us=10.0, tuned_us=8.0).winner == "metaschedule"
    assert KernelTuning("k", 1, ptool_us=None, tuned_us=8.0).winner == "metaschedule"
    assert KernelTuning("k", 1, ptool_us=10.0, tuned_us=None).winner == "ptool"
