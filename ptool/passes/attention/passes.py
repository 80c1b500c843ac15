"""The attention passes: which kernel each selected site gets (the mechanics are in ``swap.py``).

Every pass here is approximate. Its fidelity (cosine of the model outputs) is measured by the pass
manager; kernels with parameters are converted on the calibration data first (``convert.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ptool.passes.attention.kernel import AttentionKernel
from ptool.passes.attention.sites import AttentionSite
from ptool.passes.attention.swap import AttentionSwap
from ptool.passes.base import Family
from ptool.verify import Lossy, Numerics

FeatureMap = Literal["elu", "relu", "performer", "transnormer", "inline", "flow", "hash", "hedgehog"]
Mixer = Literal["linear", "gla", "delta", "retnet"]
SparseMethod = Literal["topk", "sea", "window", "block-diag", "axial"]


def _linear_kernels() -> dict[str, type[AttentionKernel]]:
    from ptool.passes.attention.linear import LINEAR_KERNELS
    from ptool.passes.attention.linear_more import LINEAR_MORE_KERNELS

    return {**LINEAR_KERNELS, **LINEAR_MORE_KERNELS}


@dataclass(frozen=True, kw_only=True)
class LinearAttention(AttentionSwap):
    """Swap softmax attention for linear attention phi(q) (phi(K)^T V) (chunked prefix sums when causal).

    Args:
        feature_map: ``elu`` (1+elu), ``relu`` (SLAB), ``performer`` (FAVOR+), ``transnormer``
            (NormAttention; DiagAttention in the first ``diag_layers``), ``inline`` (injective),
            ``flow`` (Flowformer), ``hash`` (EcoFormer codes) or ``hedgehog`` (learned MLP maps).
        feature_dim: feature width of the map (0: the method's default).
        chunk_size: chunk length of the causal form (and TransNormer's diagonal blocks).
        local: add the method's local term (SLAB/InLine depthwise conv on V).
        diag_layers: TransNormer only: how many of the replaced layers (the first ones) use
            block-diagonal softmax; -1 is TransNormer's first half.
        window: LoLCATs' hybrid when > 0: exact softmax over a sliding window of this many keys,
            the feature map's linear attention over the rest, one normalizer (``elu``, ``relu``,
            ``performer``, ``hedgehog``).
        mixer: ``linear`` (the normalized sum above) or a linear RNN over the feature map's state,
            without denominator, with an output norm and gate: ``gla`` (GLA's data-dependent
            diagonal decay), ``delta`` (DeltaNet's delta rule), ``retnet`` (a fixed decay per
            head); chunked when run, step by step when decoding (``ptool.passes.attention.gated``).
            Feature maps ``elu``, ``performer``, ``hedgehog``; self-attention sites only.
    """

    name: ClassVar[str] = "linear-attention"
    family: ClassVar[Family] = Family.ATTENTION_LINEAR

    feature_map: FeatureMap = "hedgehog"
    feature_dim: int = 0
    chunk_size: int = 64
    local: bool = False
    diag_layers: int = -1
    window: int = 0
    mixer: Mixer = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixer != "linear":
            from ptool.passes.attention.gated import GATED_FEATURE_MAPS

            if self.feature_map not in GATED_FEATURE_MAPS:
                raise ValueError(f"mixer={self.mixer} reads a per-token feature map: feature_map must be one of "
                                 f"{', '.join(GATED_FEATURE_MAPS)}, got {self.feature_map}")
            if self.window or self.local:
                raise ValueError(f"mixer={self.mixer} has no sliding-window or local term: leave window=0 and "
                                 "local=false")
        if self.feature_dim < 0 or self.chunk_size < 1 or self.window < 0:
            raise ValueError("feature_dim and window must be >= 0 and chunk_size >= 1")
        if self.diag_layers < -1:
            raise ValueError(f"diag_layers must be >= 0, or -1 for TransNormer's first half; got {self.diag_layers}")

    def build_kernel(self, site: AttentionSite, position: int, selected: int) -> AttentionKernel:
        local = self.local
        if self.feature_map == "transnormer":
            diag = selected // 2 if self.diag_layers < 0 else self.diag_layers
            local = position < diag
        cls = _linear_kernels()[self.feature_map]
        if self.mixer != "linear":
            from ptool.passes.attention.gated import GATED_KERNELS

            features = cls(site.shape(), feature_dim=self.feature_dim, chunk_size=self.chunk_size, seed=self.seed)
            return GATED_KERNELS[self.mixer](site.shape(), features, chunk_size=self.chunk_size, seed=self.seed)
        kernel = cls(site.shape(), feature_dim=self.feature_dim, chunk_size=self.chunk_size, seed=self.seed,
                     local=local)
        if self.window:
            from ptool.passes.attention.hybrid import SlidingWindowHybrid

            kernel = SlidingWindowHybrid(kernel, self.window)
        return kernel


@dataclass(frozen=True, kw_only=True)
class SparseAttention(AttentionSwap):
    """Swap softmax attention for sparse attention: top-k, SEA, local window, block-diagonal or axial.

    Args:
        method: ``topk`` (per-query top-k keys), ``sea`` (linear-attention estimate, exact softmax
            over its top-k), ``window`` (local band), ``block-diag`` or ``axial`` (rows/columns of
            a 2-D token grid).
        k: keys kept per query for ``topk``/``sea``: a fraction of the keys if < 1, else a count.
        window: band width of ``window``.
        block_size: block length of ``block-diag``.
        feature_dim: ``sea``'s estimator width: the rank of ``lowrank``, the per-sign feature
            count of ``features`` (0: default, see :class:`~ptool.passes.attention.sparse.SEAAttention`).
        tail: ``topk``/``sea``: ``mean`` puts the softmax mass outside the top-k (exact for
            ``topk``, the estimator's for ``sea``) on the mean of those values; ``drop``
            renormalizes over the top-k (DRSformer, SEA).
        estimator: ``sea``'s key estimator: ``lowrank`` (rank-``r`` bilinear scores, fitted in
            closed form on the calibration data, then KL-distilled) or ``features`` (a learned
            positive-feature linear attention, closer to SEA's Performer estimator).
    """

    name: ClassVar[str] = "sparse-attention"
    family: ClassVar[Family] = Family.ATTENTION_SPARSE

    method: SparseMethod = "topk"
    k: float = 0.25
    window: int = 64
    block_size: int = 64
    feature_dim: int = 0
    tail: Literal["mean", "drop"] = "mean"
    estimator: Literal["lowrank", "features"] = "lowrank"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.k > 0 or self.window < 1 or self.block_size < 1 or self.feature_dim < 0:
            raise ValueError("k must be > 0, window and block_size >= 1, feature_dim >= 0")

    def build_kernel(self, site: AttentionSite, position: int, selected: int) -> AttentionKernel:
        from ptool.passes.attention.sparse import SPARSE_KERNELS

        extra = {"tail": self.tail} if self.method in ("topk", "sea") else {}
        if self.method == "sea":
            extra["estimator"] = self.estimator
        return SPARSE_KERNELS[self.method](site.shape(), k=self.k, window=self.window, block_size=self.block_size,
                                           feature_dim=self.feature_dim, seed=self.seed, **extra)


def _other(name: str, site: AttentionSite, seed: int, **extra) -> AttentionKernel:
    from ptool.passes.attention.kernels_other import OTHER_KERNELS

    return OTHER_KERNELS[name](site.shape(), seed=seed, **extra)


@dataclass(frozen=True, kw_only=True)
class SigmoidAttention(AttentionSwap):
    """Swap softmax for sigmoid attention sigma(q k^T * scale + b) V with b = -log n (Apple's recipe)."""

    name: ClassVar[str] = "sigmoid-attention"
    family: ClassVar[Family] = Family.ATTENTION_KERNEL
    # Rows are not normalized, so a converted model drifts more than with the normalized kernels:
    # 0.94 on the random-weight Llama fixture (calibrated bias only), hence a looser bound.
    numerics: ClassVar[Numerics] = Lossy("cosine", 0.9)

    def build_kernel(self, site: AttentionSite, position: int, selected: int) -> AttentionKernel:
        return _other("sigmoid", site, self.seed)


@dataclass(frozen=True, kw_only=True)
class SoftplusAttention(AttentionSwap):
    """Swap softmax for softplus attention with its length-dependent scale (LSSA), optionally re-weighted.

    Args:
        reweight: apply LSSAR's training-free re-weighting of the normalised rows.
    """

    name: ClassVar[str] = "softplus-attention"
    family: ClassVar[Family] = Family.ATTENTION_KERNEL

    reweight: bool = False

    def build_kernel(self, site: AttentionSite, position: int, selected: int) -> AttentionKernel:
        return _other("softplus", site, self.seed, reweight=self.reweight)
