"""The shared mechanics of every attention pass: find sites, build kernels, convert, rewire.

A concrete pass (``linear-attention``, ``sigmoid-attention``, ``softplus-attention``,
``sparse-attention``) only says which :class:`~ptool.passes.attention.kernel.AttentionKernel` a
site gets (:meth:`AttentionSwap.build_kernel`). Everything else is here:

1. find the sites (:mod:`ptool.passes.attention.sites`), causality measured on the example inputs;
   every softmax that feeds a product but is no site is reported as a skip
   ("softmax attention, not converted: <reason>");
2. select them (``layers=``; the rest keep softmax - the hybrid models' choice) and build kernels;
   a site a kernel cannot serve (e.g. axial attention without a token grid, or scores carrying a
   relative-position bias for a kernel that cannot add it) is skipped with why;
3. convert (:mod:`ptool.passes.attention.convert`): attention transfer on the calibration data
   for kernels with parameters, then optional end-to-end distillation;
4. rewire: each site's nodes are replaced by one ``call_module`` of its kernel, a submodule of
   the graph module (``ptool_attention_<i>``), between the layout ops that take the site's q, k, v
   and terms to ``(B, H, N, D)`` and the output back, so the result stays a trainable ``nn.Module``
   that exports to ONNX and TVM like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from ptool.errors import PassError, first_line
from ptool.ir.graph import eliminate_dead_code
from ptool.ir.record import record_values
from ptool.passes.attention import adapters, convert
from ptool.passes.attention.kernel import AttentionKernel
from ptool.passes.attention.sites import AttentionScan, AttentionSite, scan
from ptool.passes.base import Pass, PassContext, PassResult
from ptool.passes.distill import teacher_outputs
from ptool.verify import Lossy, Numerics


def scan_of(gm: fx.GraphModule, call: tuple[tuple, dict] | None) -> AttentionScan:
    """The attention sites of ``gm`` and the softmaxes that are not sites; ``call`` (example
    ``(args, kwargs)``) lets masks, biases and causality be measured."""
    def mask_values(nodes):
        return record_values(gm, nodes, [call])[0]

    return scan(gm, mask_values if call is not None else None)


def sites_of(gm: fx.GraphModule, call: tuple[tuple, dict] | None) -> list[AttentionSite]:
    """The attention sites of ``gm`` (:func:`scan_of` without the skipped softmaxes)."""
    return scan_of(gm, call).sites


NOT_CONVERTED = "softmax attention, not converted"
"""How a pass reports a softmax that feeds a product but is no site: ``f"{NOT_CONVERTED}: {reason}"``."""


@dataclass(frozen=True, kw_only=True)
class AttentionSwap(Pass):
    """Base of the attention passes (not registered itself).

    Args:
        layers: indices of the attention sites to replace, in graph order (empty: all).
        transfer_steps: attention-transfer steps for kernels with parameters (0: swap only).
        transfer_lr: Adam learning rate of the attention transfer.
        transfer_mse_weight: weight of the attended-values MSE (normalized by the teacher's power)
            next to the attention-row cross-entropy in the transfer loss.
        distill_steps: end-to-end distillation steps against the original model (0: none).
        distill_lr: Adam learning rate of the distillation.
        distill_batch: calibration calls per distillation step (their losses averaged). Under
            torchrun the processes split each step's calls (and each transfer step's rows), so a
            multiple of the process count keeps every process busy.
        distill_params: what distillation trains: the new ``kernels``, ``all`` parameters, or
            ``lora``: the kernels plus rank-``distill_rank`` adapters on the q/k/v projections feeding
            each replaced site and the output projection reading it (LoLCATs); the adapters are
            merged into those weights afterwards (:mod:`ptool.passes.attention.adapters`).
        distill_rank: the adapters' rank for ``distill_params=lora``.
        distill_loss: ``mse`` or ``cosine`` between converted and original outputs.
        distill_site_weight: weight of the layer-wise term of the distillation loss: at every
            replaced site, ``MSE(kernel output, softmax attention output of the original model on
            the same input) / mean(teacher^2)``, averaged over sites, added to the output loss
            (0: outputs only). Denser signal than the final output alone.
        seed: seeds kernel initialisation and training.
    """

    # Cosine of the model outputs vs the pass's input: a converted attention that keeps the model
    # working stays above it; a parameter-free swap on a pretrained model usually does not.
    numerics: ClassVar[Numerics] = Lossy("cosine", 0.95)
    # Conversion trains kernels that have parameters on calibration data; parameter-free kernels
    # (and transfer_steps=0) run without it.
    needs_calibration: ClassVar[bool] = True

    layers: tuple[int, ...] = ()
    transfer_steps: int = 200
    transfer_lr: float = 1e-2
    transfer_mse_weight: float = 1.0
    distill_steps: int = 0
    distill_lr: float = 1e-3
    distill_batch: int = 1
    distill_params: Literal["kernels", "all", "lora"] = "kernels"
    distill_rank: int = 8
    distill_loss: Literal["mse", "cosine"] = "mse"
    distill_site_weight: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if any(i < 0 for i in self.layers):
            raise ValueError(f"layers must be non-negative attention-site indices, got {self.layers}")
        if self.transfer_steps < 0 or self.distill_steps < 0:
            raise ValueError("transfer_steps and distill_steps must be >= 0")
        if not (self.transfer_lr > 0 and self.distill_lr > 0):
            raise ValueError("transfer_lr and distill_lr must be > 0")
        if not self.transfer_mse_weight >= 0:  # a negative weight would train the values away from the teacher
            raise ValueError(f"transfer_mse_weight must be >= 0, got {self.transfer_mse_weight}")
        if not self.distill_site_weight >= 0:
            raise ValueError(f"distill_site_weight must be >= 0, got {self.distill_site_weight}")
        if self.distill_batch < 1:
            raise ValueError(f"distill_batch must be >= 1, got {self.distill_batch}")
        if self.distill_rank < 1:
            raise ValueError(f"distill_rank must be >= 1, got {self.distill_rank}")

    def build_kernel(self, site: AttentionSite, position: int, selected: int) -> AttentionKernel:
        """The kernel for ``site`` (``position``-th of ``selected`` sites being replaced).

        Raises:
            ValueError: the kernel cannot serve this site (the message becomes the skip reason).
        """
        raise NotImplementedError

    # -- run ------------------------------------------------------------------------------------

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        call = (tuple(ctx.example_inputs), dict(ctx.example_kwargs)) if ctx.example_inputs or ctx.example_kwargs else None
        found = scan_of(gm, call)
        sites = found.sites
        if self.layers and (not sites or max(self.layers) >= len(sites)):
            allowed = f"allowed indices: 0..{len(sites) - 1}" if sites else "leave layers empty"
            raise PassError(f"pass '{self.name}': layers={'+'.join(map(str, self.layers))} but the graph has "
                            f"{len(sites)} attention site(s) ({allowed})")
        for skipped in found.skipped:
            result.skip(skipped.label, f"{NOT_CONVERTED}: {skipped.reason}")
        chosen = []
        for site in sites:
            if self.layers and site.index not in self.layers:
                result.skip(site.label, f"kept softmax (layers={'+'.join(map(str, self.layers))})")
            elif site.problem:
                result.skip(site.label, site.problem)
            else:
                chosen.append(site)
        torch.manual_seed(self.seed)
        kernels: dict[int, AttentionKernel] = {}
        for position, site in enumerate(chosen):
            try:
                kernel = self.build_kernel(site, position, len(chosen))
            except ValueError as e:
                result.skip(site.label, first_line(e))
                continue
            if site.biases and not kernel.takes_bias:
                names = ", ".join(site.bias_names())
                result.skip(site.label, f"the scores carry an additive bias ({names}) that {type(kernel).__name__} "
                                        "cannot apply (it reads masks as key visibility only); the site keeps softmax")
                continue
            kernels[site.index] = kernel
        chosen = [s for s in chosen if s.index in kernels]
        result.notes["attention_sites"] = len(sites)
        if found.skipped:
            result.notes["softmax_not_converted"] = len(found.skipped)
        if not chosen:
            return result

        has_params = any(k.trainable for k in kernels.values())
        distills = self.distill_steps > 0 and (has_params or self.distill_params != "kernels")
        calls = self._calls(ctx) if (has_params and self.transfer_steps > 0) or distills else []
        teacher = data = None
        if calls:
            data = self._record(gm, chosen, calls)
            result.notes.update(convert.transfer(kernels, data, steps=self.transfer_steps, lr=self.transfer_lr,
                                                   mse_weight=self.transfer_mse_weight))
            if distills:
                teacher = teacher_outputs(gm, calls)

        linears = []  # the q/k/v/o projections of the replaced sites (for distill_params=lora)
        for site in chosen:
            for node in (site.q, site.k, site.v):
                linears.append(adapters.input_projection(node))
            new = self._rewire(gm, site, kernels[site.index])
            linears.append(adapters.output_projection(new))
            result.hit()
        eliminate_dead_code(gm)
        gm.recompile()
        if teacher is not None:
            self._distill(gm, kernels, calls, teacher, data, [n for n in linears if n is not None],
                          missing=sum(n is None for n in linears), result=result)
        result.notes["kernel"] = type(next(iter(kernels.values()))).__name__
        result.notes["trainable_parameters"] = sum(p.numel() for k in kernels.values() for p in k.parameters())
        return result

    # -- helpers --------------------------------------------------------------------------------

    def _distill(self, gm: fx.GraphModule, kernels: dict[int, AttentionKernel], calls, teacher, data,
                 linears: list[fx.Node], *, missing: int, result: PassResult) -> None:
        kernel_params = [p for k in kernels.values() for p in k.parameters()
                         if getattr(k, "output_trains_parameters", True)]
        attached = []
        if self.distill_params == "kernels":
            params = kernel_params
            if not params:  # e.g. SEA: its estimator only learns through the transfer's row KL
                result.notes["distill_skipped"] = ("the kernels' parameters get no gradient through their outputs; "
                                                   "use distill_params=lora or all")
        elif self.distill_params == "all":
            params = list(dict.fromkeys(gm.parameters()))
        else:
            attached = adapters.attach_adapters(gm, linears, self.distill_rank, seed=self.seed)
            params = kernel_params + [p for a in attached for p in gm.get_submodule(a.name).parameters()]
            result.notes["lora_adapters"] = len(attached)
            if missing:
                result.notes["lora_projections_not_found"] = missing
        if not params:
            return
        sites = None
        if self.distill_site_weight > 0:  # the original model's attention output at each site, per call
            sites = {i: [convert.softmax_output(b, kernels[i].shape) for b in data[i]] for i in kernels}
        try:
            result.notes.update(convert.distill(gm, params, calls, teacher, steps=self.distill_steps,
                                                lr=self.distill_lr, loss=self.distill_loss, kernels=kernels,
                                                site_outputs=sites, site_weight=self.distill_site_weight,
                                                batch=self.distill_batch))
        finally:
            if attached:
                adapters.merge_adapters(gm, attached)

    def _calls(self, ctx: PassContext) -> list[tuple[tuple, dict]]:
        if not ctx.calibration and not ctx.calibration_calls:
            raise PassError(
                f"pass '{self.name}' converts kernels with parameters and needs calibration data: pass "
                "calibration=[inputs, ...], or transfer_steps=0 (and distill_steps=0) to swap without converting"
            )
        return ctx.calls()

    @staticmethod
    def _record(gm: fx.GraphModule, sites: list[AttentionSite], calls) -> dict[int, list[convert.SiteBatch]]:
        nodes = [node for s in sites for node in s.inputs()]
        try:
            runs = record_values(gm, nodes, calls)
        except Exception as e:
            raise PassError(f"the graph cannot run the calibration data ({first_line(e)}); calibration inputs "
                            "must fit the captured shapes") from e
        return {s.index: [s.kernel_inputs(run.__getitem__) for run in runs] for s in sites}

    @staticmethod
    def _rewire(gm: fx.GraphModule, site: AttentionSite, kernel: AttentionKernel) -> fx.Node:
        name = f"ptool_attention_{site.index}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, kernel)
        graph = gm.graph
        stack = site.output.meta.get("nn_module_stack", {})
        added = []

        def emit(op, args):
            added.append(graph.call_function(op, args))
            return added[-1]

        with graph.inserting_before(site.output):
            q, k, v, mask = site.kernel_inputs(lambda node: node, emit)
            new = graph.call_module(name, (q, k, v, mask))
            out = site.out_layout.apply(new, emit)
        new.meta["ptool.attention"] = {"site": site.index, "kernel": type(kernel).__name__, "module": site.module}
        for node in (new, *added):
            node.meta["nn_module_stack"] = stack
        site.output.replace_all_uses_with(out)
        for node in site.nodes:  # the site's own nodes, consumer first
            if not node.users:
                graph.erase_node(node)
        return new
