"""``quantize:mode=auto``: float, int8 or int4 per layer under a weight-byte budget, from measured sensitivity.

Every layer ``quantize`` can rewrite (Linears; embedding tables with ``embeddings=true``) gets the
choices in ``choices``:

- ``float``: left as it is (its float32 weight bytes);
- ``int8``: a Linear as ``mode=int8-dynamic`` (int8 weight per output channel, the activation
  quantized on the fly; ``activations=`` applies), an embedding as int8 rows with one scale each;
- ``int4``: a Linear as ``mode=int4-weight`` (round to nearest, ``group_size`` inputs per scale
  and zero point: ONNX Runtime's ``MatMulNBits``), an embedding as 4-bit rows in the same groups.
  Layers whose width is not a multiple of ``group_size`` have no int4 choice.

**Sensitivity** is measured, not guessed: for each layer and each quantized choice, the model runs
on the first :data:`PROBE_CALLS` calibration calls with *only that layer* quantized (the real
quantized op, as deployed) and the error of the model's outputs is recorded,
``e = sum ||y_q - y||^2 / sum ||y||^2`` over every float output (for L2-normalized embeddings
``e = 2 (1 - mean cosine)``).

**The choice**: the errors are taken as additive (each layer's quantization noise independent),
and the multiple-choice knapsack "least total error with the layers' bytes within the budget" is
solved exactly by dynamic programming over the bytes in :data:`RESOLUTION` steps (each choice's
bytes rounded *up* to a step, so the budget is never exceeded). ``budget`` is the fraction of the
graph's stored weight bytes (every parameter and buffer, the layers left float included) the result
may keep; ``max_error`` (optional) asks for the smallest model whose predicted error is at most
that, within the budget.

**Report**: ``notes["mixed_precision"]`` holds per layer its parameters, choice, bytes and the
measured error of every choice, the bytes before and after, the predicted and the measured error
of the chosen configuration (all chosen layers quantized together), and the Pareto front of
predicted error against size, with the measured error of up to :data:`FRONT_POINTS` of its
configurations; ``notes["tables"]`` prints the per-layer table and the front under the report.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ptool.errors import PassError
from ptool.ir.graph import attr_users, eliminate_dead_code, remove_unused_attributes
from ptool.passes.base import PassContext, PassResult
from ptool.passes.quant._quant_sites import BIAS, LayerSite, Stored, X, find_sites, merged_site, replace_group
from ptool.progress import steps as progress

#: Calibration calls each sensitivity probe runs (the first ones).
PROBE_CALLS = 4
#: Steps of the dynamic program over the bytes the choices can differ by.
RESOLUTION = 20000
#: Configurations on the Pareto front whose error is measured (all their layers quantized together).
FRONT_POINTS = 8

CHOICES = ("float", "int8", "int4")
_BITS = {"float": 32, "int8": 8, "int4": 4}


@dataclass
class Option:
    """One choice for one layer: the bytes it stores and the output error measured with it alone."""

    choice: str
    bytes: int
    error: float = 0.0
    op: tuple | None = None  # (target, args) of the quantized op; None for float


@dataclass
class Layer:
    site: LayerSite
    options: list[Option]

    @property
    def params(self) -> int:
        return self.site.weight.numel()


def stored_bytes(gm: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (tied tensors counted once)."""
    seen, total = set(), 0
    for t in (*gm.parameters(), *gm.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _quantizers(q) -> dict:
    """The ``quantize`` configurations the int8 and int4 choices rewrite with."""
    base = dict(budget=None, max_error=None, choices=CHOICES, keep_float=0)
    return {"int8": dataclasses.replace(q, mode="int8-dynamic", **base),
            "int4": dataclasses.replace(q, mode="int4-weight", activations="per-tensor", granularity="per-channel",
                                        **base)}


def _op_bytes(args: tuple) -> int:
    return sum(a.value.numel() * a.value.element_size() for a in args if isinstance(a, Stored))


def _probe(op: tuple):
    """``(x, bias) -> y``: the quantized op computing a site from its inputs."""
    target, template = op

    def run(x, bias=None):
        resolved = [x if a is X else bias if a is BIAS else a.value if isinstance(a, Stored)
                    else a for a in template]
        return target(*resolved)

    return run


def _float_leaves(out) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor) and v.is_floating_point()]


class _Switchboard:
    """The graph with a switch after every layer: while :meth:`error` runs, the layers named in its
    argument compute with their quantized op instead (compiled once; the graph is restored on exit).

    ``error(choices)``: ``sum ||y_q - y||^2 / sum ||y||^2`` over the model's float outputs on the calls.
    """

    def __init__(self, gm: fx.GraphModule, layers: list[Layer], calls: list) -> None:
        self.gm, self.calls, self.layers = gm, calls, layers
        self.active: dict[int, object] = {}
        self.switches: list[tuple[fx.Node, fx.Node]] = []
        active = self.active

        def ptool_switch(value, key, x, bias=None):
            fn = active.get(key)
            return value if fn is None else fn(x, bias)

        for i, layer in enumerate(layers):
            site = layer.site
            args = (site.node, i, site.x, site.bias) if site.kind == "linear" else (site.node, i, site.x)
            with gm.graph.inserting_after(site.node):
                self.switches.append((site.node, gm.graph.call_function(ptool_switch, args)))

    def __enter__(self) -> _Switchboard:
        for node, switch in self.switches:
            node.replace_all_uses_with(switch, delete_user_cb=lambda user, s=switch: user is not s)
        self.gm.recompile()
        with torch.no_grad():
            self.reference = [[v.double() for v in _float_leaves(self.gm(*a, **k))] for a, k in self.calls]
        self.power = sum(float(v.pow(2).sum()) for ref in self.reference for v in ref)
        return self

    def __exit__(self, *exc) -> None:
        for node, switch in self.switches:
            switch.replace_all_uses_with(node)
            self.gm.graph.erase_node(switch)
        self.gm.recompile()

    def error(self, ops: dict[int, tuple]) -> float:
        self.active.clear()
        self.active.update({i: _probe(op) for i, op in ops.items()})
        err = 0.0
        try:
            with torch.no_grad():
                for (a, k), ref in zip(self.calls, self.reference):
                    got = _float_leaves(self.gm(*a, **k))
                    err += sum(float((g.double() - r).pow(2).sum()) for g, r in zip(got, ref))
        finally:
            self.active.clear()
        return err / self.power if self.power else 0.0


@dataclass
class Solution:
    """Choice index per layer, its bytes (the layers' own) and its predicted (additive) error."""

    picks: list[int]
    bytes: int
    predicted: float


class Knapsack:
    """Least total error with the layers' bytes at most a capacity: multiple-choice knapsack by DP.

    Bytes above each layer's smallest choice are counted in steps of ``unit`` bytes, rounded up, so
    a solution's real bytes never exceed the capacity it was solved for.
    """

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self.base = sum(min(o.bytes for o in layer.options) for layer in layers)
        span = sum(max(o.bytes for o in layer.options) - min(o.bytes for o in layer.options) for layer in layers)
        self.unit = max(1, math.ceil(span / RESOLUTION))
        self.steps = math.ceil(span / self.unit) if span else 0
        best = np.zeros(self.steps + 1)
        self.picks = []
        for layer in layers:
            low = min(o.bytes for o in layer.options)
            new = np.full(self.steps + 1, np.inf)
            pick = np.zeros(self.steps + 1, dtype=np.int8)
            for j, o in enumerate(layer.options):
                w = math.ceil((o.bytes - low) / self.unit)
                if w > self.steps:
                    continue
                cand = np.full(self.steps + 1, np.inf)
                cand[w:] = best[: self.steps + 1 - w] + o.error
                better = cand < new
                new[better], pick[better] = cand[better], j
            best = new
            self.picks.append(pick)
        self.best = best  # least predicted error with at most k steps above the base

    def step_of(self, capacity: int) -> int:
        """The most steps that fit ``capacity`` bytes (-1: not even the smallest choices fit)."""
        if capacity < self.base:
            return -1
        return min(self.steps, (capacity - self.base) // self.unit)

    def solve(self, k: int) -> Solution:
        picks = [0] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            j = int(self.picks[i][k])
            picks[i] = j
            low = min(o.bytes for o in self.layers[i].options)
            k -= math.ceil((self.layers[i].options[j].bytes - low) / self.unit)
        chosen = [layer.options[j] for layer, j in zip(self.layers, picks)]
        return Solution(picks, sum(o.bytes for o in chosen), sum(o.error for o in chosen))

    def front_steps(self) -> list[int]:
        """The smallest step count of every distinct least error (the Pareto front, smallest first)."""
        out, last = [], math.inf
        for k, e in enumerate(self.best):
            if e < last - 1e-15 * max(1.0, abs(last) if math.isfinite(last) else 1.0):
                out.append(k)
                last = e
        return out


def run_auto(q, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """``quantize:mode=auto`` (see the module docstring); ``q`` is the ``Quantize`` pass."""

    calls = ctx.require_calibration_calls(f"{q.name}:mode=auto")[:PROBE_CALLS]
    result = PassResult()
    total_before = stored_bytes(gm)
    budget = q.budget if q.budget is not None else 1.0
    capacity_total = math.floor(budget * total_before)
    sites = [s for s in find_sites(gm) if s.kind == "linear" or q.embeddings]
    floats = q._excluded(sites, result)
    quantizers = _quantizers(q)
    layers: list[Layer] = []
    for site in sites:
        if site.node in floats:
            continue
        others = [u for u in attr_users(gm, site.weight_node.target) if u is not site.node]
        if others:
            result.skip(site.label, f"kept float: its weight is also read by {others[0].name} (tied), so "
                                    "quantizing this layer would not free its bytes")
            continue
        weight_bytes = site.weight.numel() * site.weight.element_size()
        options = [Option("float", weight_bytes)] if "float" in q.choices else []
        for choice in ("int8", "int4"):
            if choice not in q.choices:
                continue
            quantizer = quantizers[choice]
            if quantizer._unsupported(site) is not None:
                continue
            op = quantizer._quantized(site)
            options.append(Option(choice, _op_bytes(op[1]), op=op))
        if not options:
            result.skip(site.label, f"kept float: no choice among {'+'.join(q.choices)} applies to it "
                                    f"(width {site.weight.shape[1]} is not a multiple of group_size {q.group_size})")
            continue
        layers.append(Layer(site, options))
    if not layers:
        return result
    fixed = total_before - sum(layer.params * layer.site.weight.element_size() for layer in layers)
    knapsack = Knapsack(layers)
    k_budget = knapsack.step_of(capacity_total - fixed)
    if k_budget < 0:
        smallest = (knapsack.base + fixed) / total_before
        raise PassError(f"pass '{q.name}': budget={budget:g} is below the smallest size the choices "
                        f"{'+'.join(q.choices)} reach on this model ({smallest:.4f} of its {total_before} weight "
                        f"bytes); raise budget to at least {math.ceil(smallest * 1e4) / 1e4:g}")
    with _Switchboard(gm, layers, calls) as board:
        probes = [(i, o) for i, layer in enumerate(layers) for o in layer.options if o.op is not None]
        with progress(len(probes), f"{q.name}: measuring sensitivity") as bar:
            for i, o in probes:
                o.error = board.error({i: o.op})
                if bar is not None:
                    bar.update(1)
        knapsack = Knapsack(layers)  # again, with the errors
        k = k_budget
        if q.max_error is not None:
            reaching = [s for s in range(k_budget + 1) if knapsack.best[s] <= q.max_error]
            if reaching:
                k = reaching[0]
            else:
                result.notes["max_error_not_reached"] = (
                    f"no configuration within budget={budget:g} has a predicted error <= {q.max_error:g}; "
                    f"the least is {knapsack.best[k_budget]:.3g}")
        chosen = knapsack.solve(k)

        def measured(sol: Solution) -> float:
            ops = {i: layers[i].options[j].op for i, j in enumerate(sol.picks) if layers[i].options[j].op is not None}
            return board.error(ops) if ops else 0.0

        front = []
        steps = _thin(knapsack, knapsack.front_steps(), fixed, total_before)
        sample = {steps[round(i * (len(steps) - 1) / max(1, FRONT_POINTS - 1))] for i in range(FRONT_POINTS)}
        for s in steps:
            sol = knapsack.solve(s)
            counts: dict[str, int] = {}
            for layer, j in zip(layers, sol.picks):
                counts[layer.options[j].choice] = counts.get(layer.options[j].choice, 0) + 1
            front.append({"bytes": sol.bytes + fixed, "fraction": (sol.bytes + fixed) / total_before,
                          "predicted_error": sol.predicted, "measured_error": measured(sol) if s in sample else None,
                          "choices": counts})
        chosen_error = measured(chosen)

    # rewrite: each choice with its own quantize configuration (linears sharing an input and a choice fused)
    by_choice: dict[str, list] = {}
    ops = {layer.site.node: layer.options[j].op for layer, j in zip(layers, chosen.picks)}
    for layer, j in zip(layers, chosen.picks):
        by_choice.setdefault(layer.options[j].choice, []).append(layer.site)
    for choice in ("int8", "int4"):
        quantizer = quantizers[choice]
        for group in quantizer._groups(gm, by_choice.get(choice, [])):
            site = group[0] if len(group) == 1 else merged_site(gm, group)
            op = ops[group[0].node] if len(group) == 1 else None  # the levels measured above, not computed again
            new, _ = quantizer._rewrite(gm, site, None, op=op)
            replace_group(gm, group, new)
            result.hit(len(group))
            if len(group) > 1:
                result.notes.setdefault("fused", []).append(" + ".join(s.node.name for s in group))
    for layer, j in zip(layers, chosen.picks):
        if layer.options[j].choice == "float":
            result.skip(layer.site.label, f"kept float: chosen by mode=auto (alone, int8 / int4 would move the "
                                          f"outputs by {_errors_text(layer)})")
    if result.changed:
        eliminate_dead_code(gm)
        remove_unused_attributes(gm)
    total_after = stored_bytes(gm)
    if total_after > capacity_total:  # the rounding up makes this impossible; a broken invariant is a bug
        raise AssertionError(f"mode=auto stored {total_after} bytes, over its budget of {capacity_total}")
    rows = []
    for layer, j in zip(layers, chosen.picks):
        errs = {o.choice: o.error for o in layer.options}
        rows.append({"layer": layer.site.label, "kind": layer.site.kind, "params": layer.params,
                     "choice": layer.options[j].choice, "bytes": layer.options[j].bytes, "errors": errs})
    result.notes.update({
        "mode": "auto", "weight_bytes_before": total_before, "weight_bytes_after": total_after,
        "mixed_precision": {"budget": budget, "max_error": q.max_error, "bytes_before": total_before,
                            "bytes_after": total_after, "fraction": total_after / total_before,
                            "predicted_error": chosen.predicted, "measured_error": chosen_error,
                            "probe_calls": len(calls), "layers": rows, "front": front},
        "tables": [_layer_table(rows, q.choices), _front_table(front)],
    })
    return result


def _thin(knapsack: Knapsack, steps: list[int], fixed: int, total: int, gap: float = 0.02) -> list[int]:
    """Front points at least ``gap`` of the total bytes apart (the first and the last kept)."""
    kept: list[int] = []
    last = -math.inf
    for s in steps:
        size = (knapsack.base + s * knapsack.unit + fixed) / total
        if size - last >= gap or s == steps[-1]:
            kept.append(s)
            last = size
    return kept


def _errors_text(layer: Layer) -> str:
    return " / ".join(f"{o.error:.2e}" for o in layer.options if o.op is not None) or "-"


def _layer_table(rows: list[dict], choices: tuple[str, ...]) -> dict:
    quantized = [c for c in CHOICES if c in choices and c != "float"]
    headers = ["layer", "kind", "params", "choice", "bytes", *[f"error {c}" for c in quantized]]
    body = [[r["layer"], r["kind"], str(r["params"]), r["choice"], str(r["bytes"]),
             *[f"{r['errors'][c]:.2e}" if c in r["errors"] else "-" for c in quantized]] for r in rows]
    return {"title": "mode=auto: choice per layer (error: relative output MSE with that layer alone quantized)",
            "headers": headers, "rows": body, "align": "llrlr" + "r" * len(quantized)}


def _front_table(front: list[dict]) -> dict:
    body = [[str(p["bytes"]), f"{p['fraction']:.4f}", f"{p['predicted_error']:.3e}",
             f"{p['measured_error']:.3e}" if p["measured_error"] is not None else "-",
             " ".join(f"{c}:{n}" for c, n in sorted(p["choices"].items(), key=lambda kv: -_BITS[kv[0]]))]
            for p in front]
    return {"title": "mode=auto: Pareto front (size vs predicted error; measured: all its layers quantized together)",
            "headers": ["bytes", "x fp32", "predicted", "measured", "layers"], "rows": body, "align": "rrrrl"}
