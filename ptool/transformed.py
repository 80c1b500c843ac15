"""The result of ``ptool.transform``: a drop-in ``nn.Module`` that carries its report."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ptool.errors import InputError
from ptool.report import Report


class TransformedModule(nn.Module):
    """A transformed model: call it like the original (same signature, same output structure).

    Attributes:
        graph_module: the rewritten ``torch.fx.GraphModule`` (trainable; passes may run on it again).
        report: what each pass did (:class:`ptool.report.Report`).
        example_inputs / example_kwargs: the example call used to trace and verify.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, report: Report, example_inputs: tuple, example_kwargs: dict):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.example_inputs = example_inputs
        self.example_kwargs = example_kwargs

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    def forward(self, *args, **kwargs):
        try:
            return self.graph_module(*args, **kwargs)
        except AssertionError as e:
            if "Guard failed" in str(e) or "shape" in str(e).lower():
                expected = ", ".join(
                    str(tuple(a.shape)) for a in (*self.example_inputs, *self.example_kwargs.values()) if isinstance(a, torch.Tensor)
                )
                raise InputError(
                    f"input does not fit the traced model ({str(e).splitlines()[0]}); traced with shapes {expected} — "
                    "re-run ptool.transform with dynamic_shapes= to allow others"
                ) from None
            raise
        except RuntimeError as e:
            if "Runtime assertion failed" in str(e):
                raise InputError(
                    "this input takes a different path through the model than the example inputs did "
                    f"({str(e).splitlines()[0]}); the model was captured specialized to them"
                ) from None
            raise
        except (TypeError, ValueError) as e:
            if "tree_flatten_spec" in repr(e.__traceback__) or "spec" in str(e).lower() or "argument" in str(e).lower():
                raise InputError(f"the model was traced with a different call signature: {str(e).splitlines()[0]}") from None
            raise

    def __repr__(self) -> str:
        return f"TransformedModule(passes=[{', '.join(r.spec for r in self.report)}])"
