"""Softmax-free quadratic attention kernels: sigmoid attention and softplus attention (LSSA/LSSAR).

Both replace softmax's ``exp`` + row normalization and are *not* function-preserving: a softmax
model converted to them needs fine-tuning or distillation (METHODS §1.10-1.11, P4). Both
materialize the ``N x M`` scores - they are quadratic kernels (plain Sigmoid / Softplus / MatMul in
ONNX), chosen for their numerics and length behaviour, not for speed.

* ``sigmoid`` (Apple's sigmoid attention): ``O = sigmoid(q k^T * scale + b_h) V`` with no row
  normalization; ``b_h`` a trainable per-head bias initialized to ``-log n``, ``n`` the site's
  captured key length (the config's ``-7.62 = -ln 2048`` at ``n = 2048``).
* ``softplus`` (LSSA): ``A_ij = softplus(lambda_i s_ij) / sum_j softplus(lambda_i s_ij)`` over the
  visible keys, ``s_ij = q_i k_j * scale``, with the entropy-invariance scale
  ``lambda_i = log(max(n_i, 2)) / log(max(n_train, 2))`` - ``n_i`` the keys query ``i`` sees (the
  mask and causality counted), ``n_train`` the captured key length - so ``lambda = 1`` at the
  length the model was captured at and grows like ``log n_i`` beyond (``max(., 2)`` keeps
  ``log`` positive for one-key rows). With ``reweight=True`` (LSSAR) each row is then sharpened:
  ``R_ij = relu(A_ij - 1 / n_i) ** 3`` renormalized (weights above the uniform level amplified,
  those below dropped), falling back to ``A`` on an exactly uniform row; this is our reading of
  the paper's "ReLU-thresholded power" (``p = 3``), which is scale-free per row, so
  ``relu(n_i A_ij - 1) ** p`` gives the same rows.

Masked (and, on causal sites, future) keys contribute 0 in both; a row with no visible key is 0.
Both add the mask's additive part to their scores (:func:`~ptool.passes.attention.kernel.score_bias`),
so they take sites whose scores carry a bias (Swin's relative-position bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ptool.passes.attention.kernel import SiteShape, score_bias
from ptool.passes.attention.sparse import ConfiguredKernel, visible

REWEIGHT_POWER = 3
"""The LSSAR sharpening exponent ``p`` (> 1)."""


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    bias = score_bias(mask)
    return scores if bias is None else scores + bias.float()


class SigmoidAttention(ConfiguredKernel):
    """``sigmoid(q k^T * scale + b_h) V`` (no normalization); masked keys contribute 0.

    ``bias`` ``(H,)`` is trainable, initialized to ``-log(kv_len)`` so that a row of ``n`` keys
    starts with a total weight of order 1. Reads no option (all are accepted).
    """

    takes_bias = True

    def __init__(self, shape: SiteShape, **options) -> None:
        super().__init__(shape, **options)
        self.bias = nn.Parameter(torch.full((shape.heads,), -math.log(max(shape.kv_len, 1))))

    def attention_weights(self, q, k, mask=None):
        """The unnormalized sigmoid weights ``(B, H, N, M)``."""
        w = torch.sigmoid(_scores(q, k, self.shape.scale, mask) + self.bias.float().reshape(1, -1, 1, 1))
        ok = visible(mask, q.shape[-2], k.shape[-2], self.shape.causal, q.device)
        return w if ok is None else w * ok.to(w.dtype)

    def forward(self, q, k, v, mask=None):
        return (self.attention_weights(q, k, mask) @ v.float()).to(q.dtype)


class SoftplusAttention(ConfiguredKernel):
    """LSSA: length-scaled softplus with l1 row normalization; ``reweight=True`` adds LSSAR.

    Args:
        shape: the site (``kv_len`` is ``n_train`` of the length scale).
        reweight: apply the LSSAR sharpening (see the module docstring).
        **options: the shared kernel options (none is read).
    """

    takes_bias = True

    def __init__(self, shape: SiteShape, *, reweight: bool = False, **options) -> None:
        super().__init__(shape, **options)
        self.reweight = bool(reweight)

    def attention_weights(self, q, k, mask=None):
        """The normalized rows ``(B, H, N, M)``."""
        n, m = q.shape[-2], k.shape[-2]
        s = _scores(q, k, self.shape.scale, mask)
        ok = visible(mask, n, m, self.shape.causal, q.device)
        if ok is None:
            count = torch.full((1, 1, 1, 1), float(m), device=q.device)
        else:
            ok = ok.to(s.dtype)
            count = ok.sum(-1, keepdim=True)
        lam = torch.log(count.clamp_min(2.0)) / math.log(max(self.shape.kv_len, 2))
        a = F.softplus(lam * s)
        a = a if ok is None else a * ok
        tiny = torch.finfo(a.dtype).tiny
        a = a / a.sum(-1, keepdim=True).clamp_min(tiny)
        if not self.reweight:
            return a
        r = torch.relu(a - 1.0 / count.clamp_min(1.0)) ** REWEIGHT_POWER
        total = r.sum(-1, keepdim=True)
        return torch.where(total > 0, r / total.clamp_min(tiny), a)

    def forward(self, q, k, v, mask=None):
        return (self.attention_weights(q, k, mask) @ v.float()).to(q.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reweight={self.reweight}"


OTHER_KERNELS: dict[str, type[ConfiguredKernel]] = {
    "sigmoid": SigmoidAttention,
    "softplus": SoftplusAttention,
}
"""The softmax-free kernels by their option name."""
