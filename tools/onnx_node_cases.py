"""The ONNX operator test cases through ``ptool.transform``: every case ONNX Runtime runs correctly
must come out of the exact cleanup pipeline unchanged, with no ptool error.

The onnx wheel ships the cases' generators (``onnx.backend.test.case.node``) but not their
``data/node`` folders, so the cases are built here from the generators (one model and one set of
inputs and expected outputs each), and ``--write DIR`` writes them out in the standard layout
(``DIR/<case>/model.onnx``, ``test_data_set_0/input_<i>.pb``, ``output_<i>.pb``) for other tools.

For each case:

1. ONNX Runtime runs the model (graph optimizations off); a case it cannot load or run, or whose
   outputs miss the expected ones by the case's own tolerances, is *not runnable* and left out.
2. ``ptool.transform(model, ["dce", "cse", "constant-fold", "fold-bn"], example_inputs={...})`` with
   verification on, then the transformed model is run on the same inputs: an exception is a *ptool
   error*, outputs outside the case's tolerances are *wrong*.

    .venv/bin/python tools/onnx_node_cases.py [--write DIR] [-k SUBSTRING]

``tests/frontends/test_onnx_node_cases.py`` runs the same check in CI (about 30 s).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import pathlib
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

PIPELINE = ["dce", "cse", "constant-fold", "fold-bn"]


@dataclass(frozen=True)
class Outcome:
    """What happened to one case: ``not runnable``, ``ok``, ``ptool error`` or ``wrong``."""

    name: str
    status: str
    detail: str = ""


def cases(substring: str = "") -> list[Any]:
    """The node test cases (``onnx.backend.test.case.test_case.TestCase``), built by their generators."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the generators' own overflow / divide warnings
        return [c for c in collect_testcases() if substring in c.name]


def _close(got: Any, want: Any, rtol: float, atol: float) -> bool:
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and \
            all(_close(g, w, rtol, atol) for g, w in zip(got, want))
    if want is None or got is None:
        return want is None and got is None
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return False
    if want.dtype.kind in "fc":
        return bool(np.allclose(got.astype(want.dtype), want, rtol=rtol, atol=atol, equal_nan=True))
    return bool(np.array_equal(got, want))


def _host(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_host(v) for v in value]
    return value.numpy() if hasattr(value, "numpy") else value


def _runnable(case: Any, inputs: list, outputs: list) -> bool:
    from ptool.ir.onnx_module import ort_session

    try:
        session = ort_session(case.model, optimize=False)
        names = [i.name for i in session.get_inputs()]
        got = session.run(None, dict(zip(names, inputs)))
    except Exception:
        return False
    return all(_close(g, w, case.rtol, case.atol) for g, w in zip(got, outputs))


def run_case(case: Any) -> Outcome:
    """One case through ONNX Runtime, then through ptool (see the module docstring)."""
    import ptool

    inputs, outputs = (list(x) for x in case.data_sets[0])
    if not _runnable(case, inputs, outputs):
        return Outcome(case.name, "not runnable")
    names = [i.name for i in case.model.graph.input][: len(inputs)]
    feeds = dict(zip(names, inputs))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m2 = ptool.transform(case.model, PIPELINE, example_inputs=feeds)
            got = m2(**feeds)
    except Exception as e:
        return Outcome(case.name, "ptool error", f"{type(e).__name__}: {ptool.errors.first_line(e)}")
    got = list(got) if isinstance(got, tuple) and len(outputs) > 1 else [got]
    if not _close(_host(got), outputs, case.rtol, case.atol):
        return Outcome(case.name, "wrong", "outputs outside the case's tolerances")
    return Outcome(case.name, "ok")


def run_all(substring: str = "") -> Iterator[Outcome]:
    for case in cases(substring):
        yield run_case(case)


def write_case(case: Any, folder: pathlib.Path) -> None:
    """The case in the standard layout: ``model.onnx`` and ``test_data_set_0/{input,output}_<i>.pb``."""
    import onnx
    from onnx import numpy_helper

    data = folder / case.name / "test_data_set_0"
    data.mkdir(parents=True, exist_ok=True)
    onnx.save(case.model, str(folder / case.name / "model.onnx"))
    inputs, outputs = case.data_sets[0]
    graph = case.model.graph
    for kind, values, infos in (("input", inputs, graph.input), ("output", outputs, graph.output)):
        for i, (value, info) in enumerate(zip(values, infos)):
            if isinstance(value, np.ndarray):
                proto = numpy_helper.from_array(value, info.name)
            elif isinstance(value, list):
                proto = numpy_helper.from_list(value, info.name)
            else:
                proto = numpy_helper.from_optional(value, info.name)
            (data / f"{kind}_{i}.pb").write_bytes(proto.SerializeToString())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=pathlib.Path, help="also write the cases out to this folder")
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    args = parser.parse_args()
    all_cases = cases(args.k)
    if args.write:
        for case in all_cases:
            write_case(case, args.write)
        print(f"wrote {len(all_cases)} cases to {args.write}")
    outcomes = [run_case(c) for c in all_cases]
    counts = collections.Counter(o.status for o in outcomes)
    print(f"{len(outcomes)} cases: " + ", ".join(f"{counts[s]} {s}" for s in ("ok", "not runnable", "ptool error", "wrong")))
    for o in outcomes:
        if o.status in ("ptool error", "wrong"):
            print(f"  {o.name}: {o.status}: {o.detail}")
    return 1 if counts["ptool error"] or counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
