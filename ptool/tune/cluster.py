"""``ptool tune --ray ADDRESS``: the autotuner's candidates spread over a Ray cluster.

The search is the local one (:mod:`ptool.tune.search`), with each unit of work a Ray task:

* a candidate (transform, compile, fidelity check, timing) runs on a node whose **device fingerprint
  equals the target's** (the driver's ``device_fingerprint(device)``): such a node advertises the
  custom resource ``ptool_fp_<fingerprint key>`` with amount 1, so it times one candidate at a time,
  and the task checks the node's real fingerprint again before it times anything. Compiled models
  are tied to the device they were built for, so a timed candidate is also built there;
* an approximate pass's fidelity check (transform + eager torch on the held-out inputs) runs on any
  node with a free CPU; its short eager timing is kept only on a timing node (one advertising, and having, the target's
  fingerprint);
* the run-off (the best few re-timed side by side) is one task on one matching node, so the rows it
  compares were all measured on the same machine.

Rows are never mixed across devices: a node advertising another fingerprint is refused for timing
(one line in the result's notes) and only runs fidelity checks. Each result is written into the
tuning record as it arrives, so a driver or worker that dies loses no measured candidate; a worker
that dies mid-candidate has that task retried on another matching node (Ray's task retries);
Ctrl-C cancels the tasks in flight and saves the record, which a rerun resumes.

A node joins as a timing node with::

    ray start --address HEAD:6379 --resources "$(python -m ptool.tune.cluster --device cpu)"
"""

from __future__ import annotations

import time
from typing import Any

from ptool.errors import UsageError
from ptool.tune.record import Row, Status
from ptool.tune.search import RUN_OFF, Search, excluded_label
from ptool.tune.space import TuningConfig, approximate_variants, backend_left_out

__all__ = ["RESOURCE_PREFIX", "ClusterSearch", "check_address", "connect", "node_resources", "scan_nodes"]

#: Custom Ray resource ``ptool_fp_<key>``: the node's device fingerprint for the device it tunes.
RESOURCE_PREFIX = "ptool_fp_"

#: How many times a candidate a node refused (its real fingerprint differs) is sent out again.
REFUSAL_RETRIES = 2

#: Ray task retries when the worker or node running a task dies (the task runs again elsewhere).
TASK_RETRIES = 3

INSTALL = "pip install 'ptool[cluster]'"


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(f"a cluster search needs Ray, which is not installed: {INSTALL}") from None
    return ray


def check_address(address: str) -> str:
    """The cluster address, checked: ``auto``, ``ray://HOST:PORT`` (Ray Client) or ``HOST:PORT``
    (the head's GCS address). Ray must be installed.

    Raises:
        UsageError: Ray missing, or an address of another form.
    """
    _ray()
    if not isinstance(address, str) or not address:
        raise UsageError(f"cluster address must be 'auto', 'ray://HOST:PORT' or 'HOST:PORT', got {address!r}")
    if address == "auto":
        return address
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"cluster address '{address}' is not allowed (allowed: auto, ray://HOST:PORT, HOST:PORT)")
    return address


def connect(address: str) -> bool:
    """Connect this process to the Ray cluster at ``address`` unless it already is; True when this
    call connected (the caller disconnects with ``ray.shutdown()`` when done).

    Raises:
        UsageError: no cluster answers there, or ``ray://`` without Ray Client installed.
    """
    from ptool.errors import first_line

    ray = _ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except ImportError as e:  # ray:// needs grpcio (Ray Client)
        raise UsageError(f"cluster address '{address}' needs Ray Client: pip install 'ray[client]' "
                         f"({first_line(e)})") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot join the Ray cluster at '{address}': {first_line(e)}") from None
    return True


def node_resources(device: str = "cpu") -> dict[str, float]:
    """The custom resource a node advertises to time candidates for ``device``: ``{"ptool_fp_<key>": 1}``."""
    from ptool.tune.fingerprint import device_fingerprint

    return {RESOURCE_PREFIX + device_fingerprint(device).key: 1}


def _node_name(ip: str, node_id: str) -> str:
    return f"{ip}/{node_id[:8]}"


def _this_node() -> tuple[str, str]:
    """(this node's id, its name)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return node_id, _node_name(ray.util.get_node_ip_address(), node_id)


def refusal(node: str, key: str, target: str) -> str:
    """The line saying a node is not used for timing."""
    return (f"node {node} refused for timing: its device fingerprint {key} differs from the target's {target}; "
            f"it runs fidelity checks only")


def scan_nodes(target: str) -> tuple[dict[str, str], list[str]]:
    """(node id -> name of the nodes that time candidates for fingerprint ``target``, one note per live
    node refused for timing).

    Raises:
        UsageError: no live node advertises ``target`` (naming the resource to start nodes with).
    """
    import ray

    timing, notes = {}, []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        name = _node_name(n["NodeManagerAddress"], n["NodeID"])
        keys = sorted(k.removeprefix(RESOURCE_PREFIX) for k in n.get("Resources", {}) if k.startswith(RESOURCE_PREFIX))
        if target in keys:
            timing[n["NodeID"]] = name
        elif keys:
            notes.append(refusal(name, ", ".join(keys), target))
        elif n.get("Resources", {}).get("CPU"):
            notes.append(f"node {name} advertises no device fingerprint: it runs fidelity checks only")
    if not timing:
        raise UsageError(f"no node of the Ray cluster advertises the target's device fingerprint {target}: start "
                         f"timing nodes with ray start --resources '{{\"{RESOURCE_PREFIX}{target}\": 1}}' "
                         f"(python -m ptool.tune.cluster prints it)")
    return timing, notes


# -- what runs on the workers --------------------------------------------------------------------


#: The worker process's search of the job it ran last: later tasks of the same job reuse its
#: transformed pipelines (stage 1 transforms the base pipeline once per worker, as the local search does).
_WORKER: dict[str, Search] = {}


def _worker_search(job: dict) -> Search:
    import torch

    torch.set_num_threads(job["threads"])  # Ray sets OMP_NUM_THREADS=1 per CPU asked for; time as the driver would
    if job["id"] not in _WORKER:
        _WORKER.clear()
        _WORKER[job["id"]] = Search(**job["search"], done_rows={}, reference=job["reference"])
    search = _WORKER[job["id"]]
    search.rows, search.compiled = [], {}  # rows and compiled models are the driver's; only transforms are kept
    base, recent = tuple(search.base), list(search.transformed)[-1:]  # memory: the base and the latest pipeline
    search.transformed = {k: v for k, v in search.transformed.items() if k == base or k in recent}
    return search


def _fingerprint_here(job: dict) -> str:
    from ptool.tune.fingerprint import device_fingerprint

    return device_fingerprint(job["device"]).key


def measure_task(job: dict, config: dict) -> dict:
    """One candidate built, checked and timed on this node: ``{"row": ...}`` or ``{"refused": line}``."""
    _, node = _this_node()
    key = _fingerprint_here(job)
    if key != job["target"]:
        return {"refused": refusal(node, key, job["target"]), "node": node}
    search = _worker_search(job)
    search._candidate(TuningConfig.from_dict(config), skip=False)
    row = search.rows[-1]
    row.node = node
    return {"row": row.to_dict(), "node": node}


def check_task(job: dict, pipeline: tuple[str, ...], spec: str) -> dict:
    """An approximate pipeline transformed and checked in eager torch: ``{"reason": None}`` when it is
    within max_error, else the reason and its excluded row (timed only on a matching node)."""
    search = _worker_search(job)
    reason = search._check_pipeline(pipeline)
    if reason is None:
        return {"reason": None}
    node_id, node = _this_node()
    timed = node_id in job["timing_nodes"] and _fingerprint_here(job) == job["target"]
    row = search.excluded_row(pipeline, spec, reason, timed=timed)
    row.node = node if timed else ""
    return {"reason": reason, "row": row.to_dict()}


def run_off_task(job: dict, configs: list[dict], runs: dict[str, int]) -> dict:
    """The best few rebuilt on this node and re-timed side by side: ``{"timings": label -> Timing}``."""
    import ptool

    _, node = _this_node()
    key = _fingerprint_here(job)
    if key != job["target"]:
        return {"refused": refusal(node, key, job["target"]), "node": node}
    search = _worker_search(job)
    compiled = {}
    for c in configs:
        config = TuningConfig.from_dict(c)
        fn = ptool.compile(search._transform(config.passes), backend=config.backend, device=search.device,
                           **config.options_dict)
        compiled[config.label(search.base)] = fn
    return {"timings": search.interleave(compiled, runs), "node": node}


# -- the driver ------------------------------------------------------------------------------------


class ClusterSearch(Search):
    """:class:`Search` whose candidates, checks and run-off are Ray tasks; rows stream in as they finish."""

    def __init__(self, *args: Any, target: str, search_kwargs: dict, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import torch

        ray = _ray()
        self.target = target
        self.timing_nodes, self.notes = scan_nodes(target)
        import uuid

        job = {"id": uuid.uuid4().hex, "search": search_kwargs, "reference": self.reference, "target": target,
               "device": self.device, "threads": torch.get_num_threads(), "timing_nodes": set(self.timing_nodes)}
        try:
            self.job = ray.put(job)
        except Exception as e:
            from ptool.errors import first_line

            raise UsageError(f"the model cannot be sent to the Ray cluster: {type(e).__name__}: "
                             f"{first_line(e)}") from None
        resource = {RESOURCE_PREFIX + target: 1}
        self._measure = ray.remote(measure_task).options(num_cpus=1, resources=resource, max_retries=TASK_RETRIES)
        self._run_off = ray.remote(run_off_task).options(num_cpus=1, resources=resource, max_retries=TASK_RETRIES)
        self._check = ray.remote(check_task).options(num_cpus=1, max_retries=TASK_RETRIES)
        self._pending: dict[Any, tuple[str, Any]] = {}  # object ref -> (kind, what it was for)
        self._order: dict[str, tuple] = {}  # label -> where the local search would have put its row

    def _note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)

    def _finish(self, row: Row) -> None:
        self.rows.append(row)
        self.on_row(row)

    def _submit(self, config: TuningConfig, order: tuple, tries: int = 0) -> None:
        label = config.label(self.base)
        self._order[label] = order
        if self._reuse(label):
            return
        if self.budget_hit:
            self.rows.append(Row(label, config.to_dict(), self._exact(config), Status.NOT_MEASURED,
                                 "time budget spent before it started"))
            return
        self._pending[self._measure.remote(self.job, config.to_dict())] = ("measure", (config, order, tries))

    @staticmethod
    def _exact(config: TuningConfig) -> bool:
        from ptool.passes.registry import parse_pass

        return all(parse_pass(p).exact for p in config.passes)

    @staticmethod
    def _outcome(ref: Any) -> dict:
        """What a finished task returned, or ``{"lost": why}`` (retries spent as nodes died, or the task broke)."""
        import ray

        from ptool.errors import first_line

        try:
            return ray.get(ref)
        except Exception as e:
            cause = getattr(e, "cause", None) or e  # a RayTaskError carries what the task raised
            return {"lost": f"{type(cause).__name__}: {first_line(cause)}"}

    def _measured_row(self, config: TuningConfig, out: dict) -> Row:
        """The row of a measure task's outcome (a refusal or a lost task: ``not measured``, with why)."""
        label = config.label(self.base)
        if "refused" in out:
            return Row(label, config.to_dict(), self._exact(config), Status.NOT_MEASURED, out["refused"])
        if "lost" in out:
            return Row(label, config.to_dict(), self._exact(config), Status.NOT_MEASURED,
                       f"its task was lost: {out['lost']}")
        return Row.from_dict(out["row"])

    def _excluded_row(self, ai: int, specs: tuple[str, ...], out: dict) -> Row:
        """The row of a check that found the approximate pipeline past max_error (timed on a timing node)."""
        row = (Row.from_dict(out["row"]) if out.get("row")
               else self.excluded_row((*self.base, *specs), " + ".join(specs), out["reason"], timed=False))
        self._order[row.label] = (1, ai, -1)
        return row

    def _lost_check_row(self, ai: int, specs: tuple[str, ...], why: str) -> Row:
        """The ``not measured`` row of an approximate pipeline whose check was lost (its candidates never ran)."""
        config = TuningConfig.make((*self.base, *specs), "torch")
        row = Row(excluded_label(" + ".join(specs)), config.to_dict(), False, Status.NOT_MEASURED,
                  f"fidelity check lost: {why}")
        self._order[row.label] = (1, ai, -1)
        return row

    def run(self, stage1: list[TuningConfig], approximate: list[tuple[str, ...]], backends: list[str],
            budget_s: float | None, started: float, update: Any) -> None:
        ray = _ray()
        for i, r in enumerate(self.rows):  # rows made before the search (formats the device cannot run)
            self._order[r.label] = (-1, i)
        self.planned = list(stage1)
        total = len(stage1) + len(approximate) * (1 + len(backends))
        done = 0
        stage1_left = 0
        best: dict[str, dict] = {}
        for i, config in enumerate(stage1):
            before = len(self._pending)
            self._submit(config, (0, i))
            stage1_left += len(self._pending) - before
        done += len(stage1) - stage1_left
        if not stage1_left:
            best = self._best_variant_per_backend(backends)
        for ai, specs in enumerate(approximate):
            pipeline = (*self.base, *specs)
            if self._reuse(excluded_label(" + ".join(specs))):  # excluded by the unfinished run resumed
                self._order[excluded_label(" + ".join(specs))] = (1, ai, -1)
                done += 1 + len(backends)
                continue
            self._pending[self._check.remote(self.job, pipeline, " + ".join(specs))] = ("check", (ai, specs))
        waiting: list[tuple[int, tuple[str, ...]]] = []  # approximate pipelines within max_error, before stage 1 ends
        group_left: dict[tuple[int, int], int] = {}  # (approximate, backend) -> its candidates in flight

        def plan(ai: int, specs: tuple[str, ...]) -> int:
            """Send out an approximate pipeline's candidates; how many (approximate, backend) groups finished."""
            pipeline, finished = (*self.base, *specs), 0
            for bi, b in enumerate(backends):
                n = 0
                for vi, options in enumerate(approximate_variants(b, self.variants.get(b, []), best.get(b))):
                    config = TuningConfig.make(pipeline, b, options)
                    left_out = backend_left_out(b, specs, options)
                    if left_out is not None:
                        self._order[config.label(self.base)] = (1, ai, bi, vi)
                        self._finish(Row(config.label(self.base), config.to_dict(), False, Status.EXCLUDED, left_out))
                        continue
                    before = len(self._pending)
                    self._submit(config, (1, ai, bi, vi, ai, bi))
                    n += len(self._pending) - before
                if n:
                    group_left[(ai, bi)] = n
                else:
                    finished += 1
            return finished

        def over_budget() -> bool:
            self.budget_hit = self.budget_hit or (budget_s is not None and time.perf_counter() - started > budget_s)
            return self.budget_hit

        while self._pending:
            if over_budget():
                self._cancel("time budget spent before its result came back")
                break
            ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=1.0)
            for ref in ready:
                kind, what = self._pending.pop(ref)
                out = self._outcome(ref)
                if kind == "check":
                    ai, specs = what
                    done += 1
                    if "lost" in out:  # not measured: a resumed search checks it again
                        self._finish(self._lost_check_row(ai, specs, out["lost"]))
                        done += len(backends)
                    elif out["reason"] is None:
                        if stage1_left:
                            waiting.append((ai, specs))
                        else:
                            done += plan(ai, specs)
                    else:
                        self._finish(self._excluded_row(ai, specs, out))
                        done += len(backends)
                    update(done, total, f"checked {' + '.join(specs)}")
                    continue
                config, order, tries = what
                label = config.label(self.base)
                if "refused" in out:
                    self._note(out["refused"])
                    if tries < REFUSAL_RETRIES:
                        self._submit(config, order, tries + 1)
                        continue
                self._finish(self._measured_row(config, out))
                if order[0] == 0:
                    stage1_left -= 1
                    done += 1
                    if not stage1_left:
                        best = self._best_variant_per_backend(backends)
                        for ai, specs in waiting:
                            done += plan(ai, specs)
                        waiting.clear()
                else:
                    group = order[4:]
                    group_left[group] -= 1
                    if not group_left[group]:
                        done += 1
                update(done, total, label)
        self._sort()
        update(total, total, "done")

    def _sort(self) -> None:
        index = {id(r): i for i, r in enumerate(self.rows)}
        self.rows.sort(key=lambda r: (self._order.get(r.label, (9,))[:4], index[id(r)]))

    def _cancel(self, reason: str) -> None:
        """Keep the results already back but not yet read (a measured candidate is never thrown away to
        be measured again on resume), cancel the tasks still in flight: their candidates become
        ``not measured`` with ``reason``."""
        import ray

        refs = list(self._pending)
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        for ref, (kind, what) in list(self._pending.items()):
            out = self._outcome(ref) if ref in ready else None
            if out is None or "refused" in out or "lost" in out:
                ray.cancel(ref, force=True)
                if kind == "measure":
                    config, _, _ = what
                    self.rows.append(Row(config.label(self.base), config.to_dict(), self._exact(config),
                                         Status.NOT_MEASURED, reason))
            elif kind == "measure":
                self._finish(self._measured_row(what[0], out))
            elif out["reason"] is not None:  # a check that excluded its pipeline: its row is measured
                self._finish(self._excluded_row(*what, out))
        self._pending.clear()

    def run_off(self) -> None:
        """The best few (within max_error) rebuilt and re-timed side by side on one matching node."""
        ray = _ray()
        ok = sorted((r for r in self.rows if r.status == Status.OK and r.median_ms is not None),
                    key=lambda r: r.median_ms)[:RUN_OFF]
        if len(ok) < 2:
            return
        for _ in range(1 + REFUSAL_RETRIES):
            out = ray.get(self._run_off.remote(self.job, [r.config for r in ok], {r.label: r.runs for r in ok}))
            if "refused" not in out:
                break
            self._note(out["refused"])
        else:
            return
        for r in ok:
            self._set_timing(r, out["timings"][r.label], "run-off")
            r.node = out["node"]
            self.on_row(r)

    def mark_interrupted(self) -> None:
        self._cancel("Ctrl-C before its result came back")
        super().mark_interrupted()
        self._sort()


def main(argv: list[str] | None = None) -> int:
    """``python -m ptool.tune.cluster [--device cpu]``: the ``--resources`` JSON for ``ray start``."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m ptool.tune.cluster",
                                description="print the Ray resources a timing node advertises (for ray start "
                                            "--resources)")
    p.add_argument("--device", default="cpu", help="the device this node times candidates on (default cpu)")
    args = p.parse_args(argv)
    print(json.dumps(node_resources(args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
