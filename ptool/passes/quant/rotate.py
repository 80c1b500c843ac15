"""rotate: orthogonal (and learned scaled-orthogonal) transforms of Linear inputs, QuaRot/OSTQuant style.

Every rewrite uses ``y = x W^T = (x T)(W T^-T)^T`` for an invertible ``T`` (METHODS 4.1): the
weight side is folded into the readers in float64, the ``x T`` side into a producer or kept online.
With ``T`` orthogonal (a normalized Hadamard, :mod:`.hadamard`) ``T^-T = T``: outlier channels
are spread over all channels, which raises the per-token quantization grid's utilization (QSUR).
Three kinds of sites, on the models the fixtures cover:

(a) **Residual stream** (RMSNorm models: Llama): one global ``Q`` of the hidden size; RMSNorm
    ``gamma`` is folded into its readers, then embeddings ``E Q``, readers (q/k/v, gate/up,
    lm_head) ``W Q``, writers (o_proj, down_proj) ``Q^T W`` (:mod:`._residual`). No op is added.
    LayerNorm is not rotation-invariant (it subtracts the channel mean), so ViT/GPT-2 (pre-LN) and
    BERT/MiniLM (post-LN, where the norm output is the stream) get no global rotation; the report
    says why.
(b) **Value -> output projection, per head**: v_proj's output rotated by ``H_dh`` in every head
    and o_proj's input by the same blocks; attention mixes tokens, not head channels, so this
    folds into both weights exactly (every model, grouped-query heads included).
(c) **Online**: sites no weight can absorb - down_proj/fc2 after SwiGLU/GELU, and on LayerNorm
    models the norm outputs read by q/k/v and fc1 (and poolers/classifiers) - get a stored
    ``matmul(x, T)`` before the Linears (``online=true``; else skipped with the reason). A site
    fed directly by another Linear's output gets ``T`` folded into that Linear.

``method=learned`` (OSTQuant-style, :mod:`._learn`) replaces the Hadamard ``H`` of each per-head
and online/linear site by ``T = H K diag(1/s)`` - ``K`` orthogonal
(``torch.nn.utils.parametrizations.orthogonal``, Cayley map, starting at the identity; a
Kronecker product of two factors above 512 channels), ``s > 0`` - trained for ``train_steps``
Adam steps on the calibration activations of that site to minimize the relative squared error
between the Linear outputs and their simulated W``weight_bits``A``act_bits`` versions
(per-channel symmetric weights, per-token dynamic symmetric activations, straight-through
rounding with differentiable scales). Per-head sites learn one ``head_dim`` block shared by all
heads. On the residual stream the rotation stays the Hadamard and each norm output gets a learned
channel scaling instead (OSTQuant's norm scalings: a stored ``mul`` by ``1/s`` where gamma was,
``W diag(s)`` in the readers). Every result is folded exactly like the Hadamard (inverses in
float64, orthogonal factors re-projected first); a site whose training does not lower the loss
keeps the Hadamard. Not implemented: OSTQuant's end-to-end KL-Top objective (the loss here is
layer-local MSE), a learned residual rotation, and q/k scalings through RoPE.

``method=flatquant`` (FlatQuant, :mod:`._flat`) gives each site ``T = diag(1/s) (P_1 (x) P_2)``
with ``P_i = U_i diag(sigma_i) V_i^T`` (``U_i``, ``V_i`` Cayley-orthogonal, ``U_i`` starting at a
Hadamard), trained jointly per transformer block for ``train_steps`` steps on the block's output
error under the simulated W``weight_bits``A``act_bits`` quantization. It is folded in float64: all of
``T`` into a Linear producer (per-head into v_proj), else ``1/s`` into a norm's affine or SwiGLU's
up_proj and ``P`` online, else ``T`` online; ``T^-1`` into the readers. On the residual stream the
Hadamard ``R_res`` is applied first and each reader site gets its ``T`` online on top.

The report's notes hold QSUR and outlier statistics of every rewritten site's Linear input
before and after (``notes["sites"]``, means in ``notes["mean"]``), measured on the calibration
batches (or the example batch).

Limits: matrices are stored dense (O(d^2) per token for online sites, not a fast Walsh-Hadamard
transform); sizes without a Hadamard construction fall back to a seeded random orthogonal matrix
(:func:`~ptool.passes.quant.hadamard.orthogonal`); q/k after RoPE and the KV cache are not rotated;
tied Linears (GPT-2's lm_head) are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from ptool.checkpoint import Finished, finished_units
from ptool.ir.graph import attr_tensor
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.fold_affine._layers import fold_inputs, fold_inputs_matrix
from ptool.passes.quant import _residual, _sites
from ptool.passes.quant._report import SiteReport
from ptool.passes.quant.hadamard import orthogonal
from ptool.verify import Close, Numerics

__all__ = ["Rotate"]

aten = torch.ops.aten

Method = Literal["hadamard", "learned", "flat", "flatquant"]
_METHODS = ("hadamard", "learned", "flat", "flatquant")  # flatquant: another spelling of flat


@dataclass(frozen=True, kw_only=True)
class Rotate(Pass):
    """Hadamard / learned orthogonal / FlatQuant affine transforms of Linear inputs (exact in float).

    Args:
        method: ``hadamard`` (fixed normalized Hadamard matrices), ``learned`` (scaled
            orthogonal transforms trained on calibration data, initialized at the Hadamard) or
            ``flat`` (FlatQuant: Kronecker-factored affine transforms trained block by block;
            ``flatquant`` is accepted for it).
        online: rotate sites no weight can absorb with a stored matmul (else skip them).
        residual: rotate the residual stream globally where RMSNorm allows it.
        seed: seed of the random orthogonal fallback for sizes without a Hadamard matrix.
        train_steps: Adam steps per site (``learned``) or per block (``flatquant``).
        lr: Adam learning rate (``learned``, ``flatquant``).
        weight_bits: weight bits of the simulated quantization the loss measures (``learned``, ``flatquant``).
        act_bits: activation bits of that simulation (``learned``).
        layers: module-path substrings selecting the Linears (empty: all; a subset disables the
            global residual rotation, which must edit every reader and writer).
    """

    name: ClassVar[str] = "rotate"
    family: ClassVar[Family] = Family.QUANTIZATION
    numerics: ClassVar[Numerics] = Close(atol=0.0, rtol=1e-5)
    method: Method = "hadamard"
    online: bool = True
    residual: bool = True
    seed: int = 0
    train_steps: int = 100
    lr: float = 1e-2
    weight_bits: int = 4
    act_bits: int = 8
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            from ptool.errors import did_you_mean

            raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {self.method!r}"
                             f"{did_you_mean(str(self.method), _METHODS)}")
        if self.method == "flatquant":
            object.__setattr__(self, "method", "flat")
        if self.train_steps < 1 or not self.lr > 0:
            raise ValueError(f"train_steps must be >= 1 and lr > 0, got {self.train_steps}, {self.lr}")
        if not (2 <= self.weight_bits <= 16 and 2 <= self.act_bits <= 16):
            raise ValueError(f"weight_bits and act_bits must be in [2, 16], got {self.weight_bits}, {self.act_bits}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.method in ("learned", "flat"):
            ctx.require_calibration(f"{self.name}:method={self.method}")
        calls = _sites.calls_of(ctx)
        select = _sites.module_filter(self.layers)
        result = PassResult()
        sites, left_out = _sites.find_sites(gm, select)
        fresh = [s for s in sites if not s.done_by(self.name)]
        if not fresh:  # nothing to rotate, or an earlier run rotated everything
            for label, reason in left_out:
                result.skip(label, reason)
            return result
        report = SiteReport.before(gm, fresh, calls)

        # the learned sites' results stay on disk until the pass ends: a rerun after Ctrl-C skips them
        finished = finished_units(f"{self.name} learned", self, calls, gm.code) if self.method == "learned" else None
        globally = self._rotate_residual(gm, result)
        sites, left_out = _sites.find_sites(gm, select)  # norm gammas may have moved into the readers
        for label, reason in left_out:
            result.skip(label, reason)
        if self.method == "flat":
            return self._flatquant(gm, sites, globally, calls, report, result)
        done, learned = [], {}
        if self.method == "learned":
            self._scale_residual_readers(gm, [s for s in sites if all(x.node in globally for x in s.layers)],
                                         calls, report, learned, finished)
        for site in sites:
            if all(layer.node in globally for layer in site.layers):
                how = report.how.get(site.label, "residual-reader")
            elif site.done_by(self.name):
                result.skip(site.label, "already rotated by an earlier rotate run")
                continue
            elif not isinstance(site.producer, _ROTATABLE) and not self.online:
                result.skip(site.label, f"not foldable: {_why_online(site)} (online=true inserts a matmul)")
                continue
            else:
                how = self._rotate_site(gm, site, report.values.get(site.layers[0].node), learned, finished)
                site.mark_done(self.name)
                result.hit()
            report.how[site.label] = how
            done.append(site)
        if finished is not None:
            finished.complete()
            if finished.reused:
                result.notes["learned_sites_resumed"] = f"{finished.reused} site(s) reused from an interrupted run"
        if learned:
            result.notes["learned_loss"] = learned
        return _finish(gm, result, report, done, calls)

    # ----------------------------------------------------------------------------- flatquant
    def _flatquant(self, gm: fx.GraphModule, sites: list[_sites.Site], globally: set[fx.Node], calls: list,
                   report: SiteReport, result: PassResult) -> PassResult:
        """FlatQuant (:mod:`._flat`): train ``T = diag(1/s) (P_1 (x) P_2)`` per site block by block, then
        fold it: whole into a Linear producer; ``1/s`` into a norm / SwiGLU factor and ``P`` online;
        else ``T`` online. Residual readers (already rotated by ``R_res``) get ``T`` online on top."""
        from ptool.passes.quant._flat import calibrate

        todo = []
        for site in sites:
            if site.done_by(self.name) and not all(layer.node in globally for layer in site.layers):
                result.skip(site.label, "already rotated by an earlier rotate run")
            elif not isinstance(site.producer, _ROTATABLE) and not self.online:
                result.skip(site.label, f"not foldable: {_why_online(site)} (online=true inserts a matmul)")
                if all(layer.node in globally for layer in site.layers):
                    report.how[site.label] = "residual-reader"
            else:
                todo.append(site)
        done = [s for s in sites if s.label in report.how]
        if todo:
            plans, losses, notes = calibrate(gm, todo, calls, steps=self.train_steps, lr=self.lr,
                                             weight_bits=self.weight_bits, act_bits=self.act_bits, seed=self.seed)
            for site in todo:
                how = self._fold_flat(gm, site, plans[site.label])
                if all(layer.node in globally for layer in site.layers):
                    how = f"residual-reader+{how}"
                report.how[site.label] = how
                site.mark_done(self.name)
                result.hit()
                done.append(site)
            result.notes["flatquant_loss"] = losses
            for note in notes:
                result.notes.update(note)
        return _finish(gm, result, report, done, calls)

    def _fold_flat(self, gm: fx.GraphModule, site: _sites.Site, plan) -> str:
        """Fold one site's ``T = diag(1/s) P`` (float64); return how. Online, ``1/s`` is a ``mul`` (unless a
        norm or SwiGLU's up_proj absorbs it) and ``P`` two small matmuls (:func:`._flat.insert_kronecker`)."""
        from ptool.passes.quant._flat import insert_kronecker
        producer, width = site.producer, site.width(gm)
        t, t_inv = plan.p / plan.s[:, None], plan.p_inv * plan.s[None, :]
        if isinstance(producer, _sites.HeadOutput):
            t_inv = torch.block_diag(*[t_inv] * (width // t.shape[0]))
        for layer in site.layers:
            fold_inputs_matrix(gm, layer, t_inv, self.name)
        if isinstance(producer, _ROTATABLE):
            _sites.rotate_producer(gm, producer, t, self.name)
            return "per-head" if isinstance(producer, _sites.HeadOutput) else "into-linear"
        dtype = attr_tensor(gm, site.layers[0].weight).dtype
        if isinstance(producer, (_sites.NormScale, _sites.ProductOutput)):
            how = "scale+online"
            _sites.scale_producer(gm, producer, 1.0 / plan.s, self.name)
        else:
            how = "online"
            _sites.insert_online(gm, site, aten.mul.Tensor, (1.0 / plan.s).to(dtype), "flat_scale", self.name)
        insert_kronecker(gm, site, plan.factors, dtype, self.name)
        return how

    # ----------------------------------------------------------------------------- (a) residual
    def _rotate_residual(self, gm: fx.GraphModule, result: PassResult) -> set[fx.Node]:
        """Rotate the residual stream if allowed; return the reader Linears it rotated."""
        if not self.residual:
            return set()
        plan = _residual.plan_residual(gm) if not self.layers else "layers= selects a subset of the Linears"
        if isinstance(plan, str):
            if "already rotated" not in plan:
                result.skip("residual stream", f"no global rotation: {plan}")
            return set()
        q = orthogonal(plan.width, self.seed)
        _residual.apply_residual(gm, plan, q, self.name)
        result.hit()  # one site: the stream, with all its readers and writers
        result.notes["residual"] = {"width": plan.width, "readers": len(plan.readers), "writers": len(plan.writers),
                                    "embeddings": len(plan.embeddings)}
        return {layer.node for layer in plan.readers}

    def _scale_residual_readers(self, gm: fx.GraphModule, sites: list[_sites.Site], calls: list,
                                report: SiteReport, learned: dict, finished: Finished | None = None) -> None:
        """``learned``: a trained channel scaling ``s`` on each rotated norm output (OSTQuant's norm
        scalings): a stored ``mul`` by ``1/s`` where the norm's gamma was, ``W diag(s)`` in its readers."""
        from ptool.passes.quant._learn import learn_transform

        values = _sites.record_inputs(gm, [s.layers[0].x for s in sites], calls) if sites else {}
        for site in sites:
            weights = [_weight_out_in(gm, layer) for layer in site.layers]
            width = site.width(gm)
            t, t_inv, losses = learn_transform(values[site.layers[0].x], weights, torch.eye(width, dtype=torch.float64),
                                               blocks=1, steps=self.train_steps, lr=self.lr, rotate=False,
                                               weight_bits=self.weight_bits, act_bits=self.act_bits, seed=self.seed,
                                               finished=finished)
            learned[site.label] = {"hadamard": losses[0], "learned": losses[1]}
            if losses[1] < losses[0]:
                s = torch.diagonal(t_inv)
                for layer in site.layers:
                    fold_inputs(gm, layer, s, None, self.name)
                dtype = attr_tensor(gm, site.layers[0].weight).dtype
                _sites.insert_online(gm, site, aten.mul.Tensor, (1.0 / s).to(dtype), "norm_scale", self.name)
                report.how[site.label] = "residual-reader+scale"

    # ----------------------------------------------------------------------------- (b), (c)
    def _rotate_site(self, gm: fx.GraphModule, site: _sites.Site, x: torch.Tensor | None, learned: dict,
                     finished: Finished | None = None) -> str:
        """Rotate one site; return how (``per-head``, ``into-linear`` or ``online``).

        ``learned`` receives the site's simulated-quantization loss at the Hadamard and after training.
        """
        producer = site.producer
        per_head = isinstance(producer, _sites.HeadOutput)
        size = producer.head_dim if per_head else site.width(gm)
        t = orthogonal(size, self.seed)
        t_inv = t.t()
        if self.method == "learned" and x is not None:
            from ptool.passes.quant._learn import learn_transform

            weights = [_weight_out_in(gm, layer) for layer in site.layers]
            t, t_inv, losses = learn_transform(x, weights, t, blocks=site.width(gm) // size, steps=self.train_steps,
                                               lr=self.lr, weight_bits=self.weight_bits, act_bits=self.act_bits,
                                               seed=self.seed, finished=finished)
            learned[site.label] = {"hadamard": losses[0], "learned": losses[1]}
        full, full_inv = (torch.block_diag(*[t] * (site.width(gm) // size)),
                          torch.block_diag(*[t_inv] * (site.width(gm) // size))) if per_head else (t, t_inv)
        for layer in site.layers:
            fold_inputs_matrix(gm, layer, full_inv, self.name)
        if isinstance(producer, _ROTATABLE):
            _sites.rotate_producer(gm, producer, t, self.name)
            return "per-head" if per_head else "into-linear"
        dtype = attr_tensor(gm, site.layers[0].weight).dtype
        _sites.insert_online(gm, site, aten.matmul.default, full.to(dtype), "rotation", self.name)
        return "online"


_ROTATABLE = (_sites.HeadOutput, _sites.LinearOutput)  # producers that absorb a full matrix


def _finish(gm: fx.GraphModule, result: PassResult, report: SiteReport, done: list[_sites.Site],
            calls: list) -> PassResult:
    """Recompile and note how many sites went each way, with the before/after statistics."""
    if not result.changed:
        return result
    gm.recompile()
    counts: dict[str, int] = {}
    for how in report.how.values():
        counts[how] = counts.get(how, 0) + 1
    result.notes.update(counts)
    result.notes.update(report.after(gm, done, calls))
    return result


def _why_online(site: _sites.Site) -> str:
    p = site.producer
    if isinstance(p, _sites.NormScale):
        return f"the {p.what} {p.node.name} absorbs only a diagonal scale, not a rotation"
    if isinstance(p, _sites.ProductOutput):
        return (f"the input is an elementwise product ({site.key.name}): its factor {p.layer.node.name} "
                "absorbs only a diagonal scale, not a rotation")
    return site.why_online


def _weight_out_in(gm: fx.GraphModule, layer) -> torch.Tensor:
    w = attr_tensor(gm, layer.weight).detach().double()
    return w.t() if layer.kind == "addmm" else w
