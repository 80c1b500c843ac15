"""Fixtures shared by the quantization-transform tests (built once per test process)."""

from __future__ import annotations

import copy
import functools

import torch

import ptool
from ptool.frontends.torch_export import capture
from ptool.passes.base import PassContext
from tests.models import zoo


@functools.cache
def fixture(name: str):
    return zoo.minilm() if name == "minilm" else getattr(zoo, name)()


def heldout_rel(name: str, m2, seed: int = 7) -> float:
    """Max relative error of ``m2`` against the fixture's model on a held-out batch."""
    f = fixture(name)
    args, kwargs = f.inputs(seed)
    with torch.no_grad():
        return ptool.verify.compare(f.run((args, kwargs)), m2(*args, **kwargs)).max_rel_error


@functools.cache
def _captured_minilm():
    f = fixture("minilm")
    return capture(f.model, f.example_inputs, f.example_kwargs).graph_module


def run_on_minilm(quant_pass, calibration: int):
    """``(graph, result)``: ``quant_pass`` run directly on a fresh copy of the captured MiniLM graph.

    Skips the pass manager's extra verification runs, which cost time on this model.
    """
    f = fixture("minilm")
    gm = copy.deepcopy(_captured_minilm())
    calls = f.batches(calibration)
    result = quant_pass.run(gm, PassContext(calibration=[a for a, _ in calls], calibration_calls=calls))
    gm.recompile()
    return gm, result


def onnxruntime_rel_error(name: str, m2, path) -> "ptool.verify.Fidelity":
    """``m2`` exported to ``path`` and run by ONNX Runtime on held-out inputs, compared with ``m2`` itself
    (the Llama fixture's logits; the BERT fixture's hidden states and pooled output)."""
    import numpy as np
    import onnxruntime as ort

    f = fixture(name)
    path = ptool.export_onnx(m2, path, example_inputs=f.example_inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args, _ = f.inputs(3)
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
    with torch.no_grad():
        want = m2(*args)
    ref = [want.logits] if name == "llama" else [want.last_hidden_state, want.pooler_output]
    return ptool.verify.compare(ref, [torch.from_numpy(np.asarray(g)) for g in got])
