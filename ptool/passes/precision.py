"""``precision``: run the model in bf16 or fp16, with float32 kept where the numerics need it.

Every compute node gets one of four roles, decided once from the op (the rule torch's autocast
applies at run time, applied here to the graph so the weights are converted once, not per call):

- **low** — matmul-like ops (``linear``, ``matmul``/``mm``/``bmm``/``addmm``/``baddbmm``,
  convolutions, ``embedding``, ``scaled_dot_product_attention``): their float inputs are cast to
  ``dtype`` and the weights only they read are *stored* in it. These are the ops that run on the
  CPU's bf16 units (AVX-512-BF16, AMX) or a GPU's tensor cores; they accumulate in float32
  internally.
- **float** — softmax, normalizations (layer / group / batch / RMS norm), reductions (sum, mean,
  var, norms, cumsum, logsumexp) and ``exp``/``log``/``pow``/``rsqrt``/``sqrt``/``reciprocal``:
  their inputs are cast to float32, so statistics and exponentials never round in 8 bits of
  mantissa. So are ptool's own ops (quantized linears, attention kernel modules), which define
  their arithmetic in float32.
- **follow** — everything else (element-wise ops, views, concatenation): computes in the widest
  float dtype among its activation inputs (float32 if any is float32), weights cast to it. So
  the residual stream after a float32 norm stays float32, and a GELU between two linears runs in
  ``dtype``.
- **explicit** — ops that name their dtype (``.to(float32)``, ``arange(dtype=...)``) keep it.

The model's outputs are cast back to their original dtype. ``keep_float=N`` moves the N low
sites whose own output suffers most in ``dtype`` (relative output error of the op alone, measured
on the calibration data or the example call) to float32; ``exclude=`` patterns (``fnmatch`` on
module path or node name) do the same by name. Casts to fp16 saturate at +-65504 (fp16's range)
instead of overflowing to infinity (attention masks hold float32's minimum).

Equivalence: approximate. bf16 keeps float32's range with an 8-bit mantissa (relative rounding
2^-9 per stored value), fp16 a 11-bit mantissa with a range of +-65504. Declared bound: output
cosine >= 0.999 vs the float32 graph (all-MiniLM-L6-v2 measures 0.9999+ in both).

Backends: the graph is unambiguous as it stands (every op the pass touches reads one dtype), so
the backends lower it without extra casts: torch runs it as is; TVM casts around its own
float32-accumulating matmul converters (:mod:`ptool.backends.tvm_precision`; bf16 arithmetic is
widened to float32 there, no AVX-512-BF16 instructions); ONNX Runtime runs fp16 natively and, on
its CPU provider, which has no bf16 arithmetic kernels, bf16 as bf16-stored weights computed in
float32 (:mod:`ptool.backends.onnx_bf16`: half the file, float32's speed).

Limits: float64 values are left alone; ops with no rule above follow their inputs; a graph
already in ``dtype`` is left unchanged (idempotent).
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from ptool.ir.graph import attr_tensor, get_tensor, is_export_guard, mark, module_path
from ptool.ir.record import record_values
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.quant._sites import calls_of, exclude_pattern
from ptool.verify import Lossy, Numerics

aten = torch.ops.aten

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP16_MAX = 65504.0

#: Ops that run in the reduced dtype (their float inputs cast to it, their weights stored in it).
LOW_OPS = frozenset({
    aten.linear, aten.matmul, aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.addbmm, aten.einsum,
    aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.conv_transpose1d, aten.conv_transpose2d,
    aten.conv_transpose3d, aten.embedding, aten.scaled_dot_product_attention,
})

#: Ops whose inputs are cast to float32: statistics, exponentials, normalizers.
FLOAT_OPS = frozenset({
    aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax,
    aten.layer_norm, aten.native_layer_norm, aten.group_norm, aten.native_group_norm, aten.batch_norm,
    aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit, aten.instance_norm,
    aten.rms_norm, aten.mean, aten.sum, aten.var, aten.var_mean, aten.std, aten.std_mean, aten.prod,
    aten.cumsum, aten.cumprod, aten.logsumexp, aten.norm, aten.linalg_vector_norm,
    aten.exp, aten.log, aten.log1p, aten.expm1, aten.pow, aten.rsqrt, aten.sqrt, aten.reciprocal, aten.erfinv,
})


class Role(enum.Enum):
    LOW = "low"
    FLOAT = "float"
    FOLLOW = "follow"
    EXPLICIT = "explicit"


def _packet(node: fx.Node) -> object:
    return getattr(node.target, "overloadpacket", None)


def _is_aten(node: fx.Node) -> bool:
    return getattr(node.target, "namespace", None) == "aten"


def _names_dtype(node: fx.Node) -> bool:
    return node.kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in node.args)


def role_of(node: fx.Node) -> Role:
    """The op rule (module docstring) for one compute node."""
    if node.op != "call_function":
        return Role.FLOAT  # kernel modules, methods: ptool's own float32 arithmetic
    if node.target is operator.getitem:
        return Role.FOLLOW
    if _names_dtype(node):
        return Role.EXPLICIT
    if not _is_aten(node):
        return Role.FLOAT  # ptool's custom ops (quantized linears...) compute in float32
    packet = _packet(node)
    if packet in LOW_OPS:
        return Role.LOW
    if packet in FLOAT_OPS:
        return Role.FLOAT
    return Role.FOLLOW


def _value_dtype(node: object) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if val is None and isinstance(node, fx.Node) and node.op == "get_attr":
        owner, _, attr = node.target.rpartition(".")
        val = getattr(node.graph.owning_module.get_submodule(owner) if owner else node.graph.owning_module, attr, None)
    return val.dtype if isinstance(val, torch.Tensor) else None


def _weight_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The stored float weight a low site reads (None for activation-by-activation products)."""
    for a in node.all_input_nodes:
        t = attr_tensor(gm, a)
        if t is not None and t.is_floating_point() and t.dim() >= 2:
            return a
    return None


@dataclass(frozen=True, kw_only=True)
class Precision(Pass):
    """Run matmuls, convolutions and element-wise ops in bf16 or fp16; float32 for softmax, norms, reductions.

    Args:
        dtype: ``bf16`` (float32's range, 8-bit mantissa; fast on AVX-512-BF16 / AMX CPUs and on
            GPUs from compute capability 8.0) or ``fp16`` (11-bit mantissa, range +-65504; fast
            on GPUs, and on CPUs with AVX-512-FP16 / AMX-FP16).
        keep_float: keep the N matmul-like sites with the largest relative output error in
            ``dtype`` in float32 (measured on the calibration data, or the example call).
        exclude: ``fnmatch`` patterns on module path or node name of ops kept in float32.
    """

    name: ClassVar[str] = "precision"
    family: ClassVar[Family] = Family.PRECISION
    numerics: ClassVar[Numerics] = Lossy("cosine", 0.999)
    tuning_candidates: ClassVar[tuple[str, ...]] = ("precision:dtype=bf16", "precision:dtype=fp16")

    dtype: Literal["bf16", "fp16"] = "bf16"
    keep_float: int = 0
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.keep_float < 0:
            raise ValueError(f"keep_float must be >= 0, got {self.keep_float}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        low = self.torch_dtype
        roles = {n: role_of(n) for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")
                 and not is_export_guard(n)}
        for node, role in roles.items():
            if role is Role.LOW:
                pattern = exclude_pattern(node, self.exclude)
                if pattern is not None:
                    roles[node] = Role.FLOAT
                    result.skip(f"{node.name} ({module_path(node)})", f"kept float32: matches exclude pattern '{pattern}'")
        if self.keep_float:
            for node, error in self._most_sensitive(gm, ctx, [n for n, r in roles.items() if r is Role.LOW]):
                roles[node] = Role.FLOAT
                result.skip(f"{node.name} ({module_path(node)})",
                            f"kept float32: among the {self.keep_float} most sensitive sites "
                            f"(relative output error {error:.2e} in {self.dtype})")
        plan = _Plan(gm, roles, low)
        plan.decide()
        weight_bytes = plan.apply(self.name)
        if plan.touched:  # a graph already in dtype is left as it is (idempotent)
            result.hit(sum(1 for n, r in roles.items() if r is Role.LOW and plan.compute.get(n) == low))
        counts: dict[str, int] = {}
        for n, d in plan.compute.items():
            if d is not None:
                key = "float32" if d == torch.float32 else self.dtype
                counts[key] = counts.get(key, 0) + 1
        result.notes.update({"dtype": self.dtype, "ops_by_dtype": counts, "casts_inserted": plan.casts,
                             "weight_bytes_before": weight_bytes[0], "weight_bytes_after": weight_bytes[1]})
        return result

    def _most_sensitive(self, gm: fx.GraphModule, ctx: PassContext, sites: list[fx.Node]) -> list[tuple[fx.Node, float]]:
        """The ``keep_float`` low sites with the largest relative output error when run in ``dtype``."""
        sites = [s for s in sites if _weight_input(gm, s) is not None]
        inputs = list(dict.fromkeys(a for s in sites for a in s.all_input_nodes if a.op != "get_attr"))
        err = dict.fromkeys(sites, 0.0)
        power = dict.fromkeys(sites, 0.0)
        for values in record_values(gm, inputs, calls_of(ctx)[:4]):
            def load(a, dtype):
                if not isinstance(a, fx.Node):
                    return a
                v = get_tensor(gm, a.target) if a.op == "get_attr" else values[a]
                return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

            def run(site, dtype):  # the op alone, every float input (weights too) in ``dtype``
                with torch.no_grad():
                    return site.target(*fx.node.map_aggregate(site.args, lambda a: load(a, dtype)),
                                       **fx.node.map_aggregate(site.kwargs, lambda a: load(a, dtype))).float()

            for s in sites:
                ref, out = run(s, torch.float32), run(s, self.torch_dtype)
                err[s] += float((out - ref).pow(2).sum())
                power[s] += float(ref.pow(2).sum())
        ranked = sorted(sites, key=lambda s: err[s] / max(power[s], 1e-30), reverse=True)
        return [(s, err[s] / max(power[s], 1e-30)) for s in ranked[: self.keep_float]]


class _Plan:
    """Decide every value's dtype, then insert the casts and convert the weights."""

    def __init__(self, gm: fx.GraphModule, roles: dict[fx.Node, Role], low: torch.dtype) -> None:
        self.gm, self.roles, self.low = gm, roles, low
        self.dtype: dict[fx.Node, torch.dtype | None] = {}  # the value's dtype after the pass
        self.compute: dict[fx.Node, torch.dtype | None] = {}  # the dtype a node computes in
        self.constant: set[fx.Node] = set()  # weights and nodes computed from weights only
        self.casts = 0
        self.touched = False

    def _float(self, d: torch.dtype | None) -> bool:
        return d in (torch.float32, self.low)

    def decide(self) -> None:
        for node in self.gm.graph.nodes:
            orig = _value_dtype(node)
            if node.op in ("placeholder", "output") or node not in self.roles:
                self.dtype[node] = orig
                if node.op == "get_attr":
                    self.constant.add(node)
                continue
            inputs = node.all_input_nodes
            if inputs and all(a in self.constant for a in inputs):
                self.constant.add(node)
            role = self.roles[node]
            if role is Role.EXPLICIT:
                compute = None
            elif role is Role.LOW:
                compute = self.low
            elif role is Role.FLOAT:
                compute = torch.float32
            elif node.target is operator.getitem:
                compute = self.compute.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            else:
                active = [self.dtype[a] for a in inputs if a not in self.constant and self._float(self.dtype[a])]
                compute = torch.float32 if torch.float32 in active else (self.low if active else None)
            self.compute[node] = compute
            self.dtype[node] = compute if compute is not None and self._float(orig) else orig
        # nodes computed from weights only follow their users (reverse order): low if every user is low
        for node in reversed(list(self.gm.graph.nodes)):
            if node not in self.constant or not self._float(_value_dtype(node)):
                continue
            wanted = {self._wants(u, node) for u in node.users}
            d = self.low if wanted == {self.low} else torch.float32
            self.dtype[node] = d
            if node in self.compute and self.roles.get(node) is Role.FOLLOW:
                self.compute[node] = d
        # a tensor read through several get_attr nodes is converted only if every reader wants it low
        readers: dict[str, list[fx.Node]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                readers.setdefault(node.target, []).append(node)
        for nodes in readers.values():
            if len({self.dtype[n] for n in nodes}) > 1:
                for n in nodes:
                    self.dtype[n] = torch.float32

    def _wants(self, user: fx.Node, value: fx.Node) -> torch.dtype | None:
        """The dtype ``user`` reads ``value`` in (None: as it is)."""
        if user.op == "output":
            return _value_dtype(value)
        if user.target is operator.getitem or self.roles.get(user) is Role.EXPLICIT:
            return self.dtype.get(value)
        return self.compute.get(user)

    def apply(self, pass_name: str) -> tuple[int, int]:
        """Convert weights, insert casts; return the float weight bytes before and after."""
        before = after = 0
        seen: set[str] = set()
        for node in list(self.gm.graph.nodes):
            if node.op == "get_attr" and node.target not in seen:
                seen.add(node.target)
                t = attr_tensor(self.gm, node)
                if t is not None and t.is_floating_point():
                    before += t.numel() * t.element_size()
                    want = self.dtype[node]
                    if self._float(want) and self._float(t.dtype) and want != t.dtype:
                        t = self._convert_weight(node, t, want)  # to low, or back to float32 (exact)
                    after += t.numel() * t.element_size()
        cache: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
        for node in list(self.gm.graph.nodes):
            if node.op == "output":
                self._cast_outputs(node, cache, pass_name)
                continue
            if node not in self.roles:
                continue
            if node.target is aten._assert_tensor_metadata.default:
                self._retarget_assert(node)
                continue
            want = self.compute.get(node)
            if want is None or self.roles[node] is Role.EXPLICIT or node.target is operator.getitem:
                continue
            for a in node.all_input_nodes:
                have = self.dtype.get(a)
                if self._float(have) and have != want:
                    node.replace_input_with(a, self._cast(a, want, cache, pass_name))
        return before, after

    def _convert_weight(self, node: fx.Node, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        value = t.detach()
        if dtype == torch.float16:
            value = value.clamp(-FP16_MAX, FP16_MAX)
        value = value.to(dtype)
        owner, _, attr = node.target.rpartition(".")
        module = self.gm.get_submodule(owner) if owner else self.gm
        if isinstance(t, torch.nn.Parameter):
            setattr(module, attr, torch.nn.Parameter(value, requires_grad=t.requires_grad))
        else:
            setattr(module, attr, value)
        self.touched = True
        return value

    def _cast(self, value: fx.Node, dtype: torch.dtype, cache: dict, pass_name: str) -> fx.Node:
        key = (value, dtype)
        if key not in cache:
            with self.gm.graph.inserting_after(value):
                source = value
                if dtype == torch.float16 and self.dtype.get(value) == torch.float32:
                    source = mark(self.gm.graph.call_function(aten.clamp.default, (value, -FP16_MAX, FP16_MAX)),
                                  pass_name)
            with self.gm.graph.inserting_after(source):
                cache[key] = mark(self.gm.graph.call_function(aten._to_copy.default, (source,), {"dtype": dtype}),
                                  pass_name)
            self.casts += 1
            self.touched = True
        return cache[key]

    def _cast_outputs(self, output: fx.Node, cache: dict, pass_name: str) -> None:
        def restore(a):
            if isinstance(a, fx.Node):
                orig, have = _value_dtype(a), self.dtype.get(a)
                if orig is not None and have is not None and orig != have and self._float(have):
                    return self._cast(a, orig, cache, pass_name)
            return a

        new_args = fx.node.map_arg(output.args, restore)
        if new_args != output.args:
            output.args = new_args

    def _retarget_assert(self, node: fx.Node) -> None:
        """torch.export's dtype assertions follow the value's new dtype."""
        value = node.args[0]
        have = self.dtype.get(value)
        if isinstance(value, fx.Node) and have is not None and node.kwargs.get("dtype") not in (None, have):
            node.kwargs = {**node.kwargs, "dtype": have}
            self.touched = True
