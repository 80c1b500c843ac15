"""Fixture models for tests: real Hugging Face architectures (small configs, seeded random
weights), the real all-MiniLM-L6-v2 checkpoint on real text, and plain-torch BatchNorm cases.

Every builder returns a fresh :class:`Fixture` with the model in eval mode. Conventions chosen so
``torch.export.export(f.model, f.example_inputs, f.example_kwargs, strict=False)`` works:

- transformers models keep ``return_dict=True`` (outputs are ``ModelOutput``s, which transformers
  registers as pytree nodes, so export and ``ep.module()`` keep that structure) and decoders get
  ``use_cache=False`` (otherwise a ``DynamicCache``, not a pytree type, lands in the output and
  export fails). ``config.return_dict=False`` is NOT used: in transformers 5.23 it breaks
  task-head models (ViTForImageClassification, GPT2LMHeadModel, LlamaForCausalLM raise
  ``'tuple' object has no attribute 'last_hidden_state'``), because the base model then returns a
  tuple to a head that reads attributes;
- inputs are positional where ``forward``'s parameter order allows (BERT/Llama:
  ``(input_ids, attention_mask)``), keyword otherwise (GPT-2: ``attention_mask`` follows
  ``past_key_values``, so it is a kwarg) - see ``ptool.frontends.huggingface.split_call``;
- text batches are ``(2, 16)`` with right padding in the second row, so masks matter.

Norm layers get non-trivial parameters: a fresh BatchNorm is the identity (mean 0, var 1,
weight 1, bias 0) and a fresh LayerNorm/RMSNorm has weight 1, so folding them would prove nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ptool.frontends.huggingface import split_call

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
"""``(args, kwargs)`` for one call of a fixture model."""

BATCH = 2
SEQ_LEN = 16
VOCAB = 128
IMAGE = 32
MOBILENET_IMAGE = 64  # MobileNetV2 downsamples 32x: at 32 px its last blocks see 1x1 maps
RESIDUAL_GAMMA = 0.25  # scale of the last BatchNorm's weight in each residual branch
VAR_FLOOR = 0.1  # measured variances are floored at this fraction of their BN's median

__all__ = [
    "FIXTURES",
    "Fixture",
    "bert",
    "bn_zoo",
    "gpt2",
    "llama",
    "minilm",
    "mobilenet_v2",
    "randomize_batchnorm",
    "randomize_norms",
    "resnet",
    "sentence_embedder",
    "transformer_zoo",
    "vit",
]


@dataclass(frozen=True, kw_only=True)
class Fixture:
    """A model plus how to call it.

    Attributes:
        name: short id, used as the pytest param id.
        model: the ``nn.Module`` in eval mode.
        example_inputs / example_kwargs: one call, ``model(*example_inputs, **example_kwargs)``.
        make_inputs: ``seed -> (args, kwargs)``, a batch of the same shapes/dtypes; seed 0 gives
            the example inputs, any other seed a different batch (held-out / calibration data).
        kind: ``"text"``, ``"vision"`` or ``"bn"``.
        folds: for BatchNorm cases, how many BatchNorms an exact fold-bn must remove.
        keeps: for BatchNorm cases, how many BatchNorms fold-bn must leave in place.
        note: what the case exercises (and, for ``keeps``, why folding is wrong).
    """

    name: str
    model: nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any]
    make_inputs: Callable[[int], Inputs] = field(repr=False)
    kind: str
    folds: int = 0
    keeps: int = 0
    note: str = ""

    def inputs(self, seed: int = 0) -> Inputs:
        """``(args, kwargs)`` of the batch for ``seed`` (0 = the example batch)."""
        return self.make_inputs(seed)

    def heldout(self, seed: int = 1) -> Inputs:
        """A second batch, same shapes as the example, different values."""
        if seed == 0:
            raise ValueError("seed 0 is the example batch; a held-out batch needs seed != 0")
        return self.make_inputs(seed)

    def batches(self, n: int, seed: int = 100) -> list[Inputs]:
        """``n`` distinct batches (seeds ``seed .. seed+n-1``), e.g. for calibration."""
        return [self.make_inputs(seed + i) for i in range(n)]

    def calibration(self, n: int, seed: int = 100) -> list[tuple[Any, ...]]:
        """``n`` positional input tuples, the form ``ptool.transform(calibration=...)`` takes.

        Raises:
            ValueError: the fixture also needs keyword inputs (use :meth:`batches`).
        """
        if self.example_kwargs:
            raise ValueError(f"{self.name} takes keyword inputs {sorted(self.example_kwargs)}; use batches()")
        return [args for args, _ in self.batches(n, seed)]

    def run(self, inputs: Inputs | None = None) -> Any:
        """Call the model under ``torch.no_grad`` on ``inputs`` (default: the example batch)."""
        args, kwargs = inputs if inputs is not None else (self.example_inputs, self.example_kwargs)
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def export(self) -> torch.export.ExportedProgram:
        """``torch.export.export(model, example_inputs, example_kwargs, strict=False)``."""
        return torch.export.export(self.model, self.example_inputs, self.example_kwargs, strict=False)


# ---------------------------------------------------------------------------------------------
# parameter randomization


def randomize_batchnorm(
    model: nn.Module, seed: int = 0, data: Iterable[tuple[Any, ...]] | None = None
) -> int:
    """Give every BatchNorm non-trivial running stats and affine parameters, in place.

    Affine: |weight| ~ U(0.5, 1.5) with a quarter of the signs negative, bias ~ N(0, 0.3).
    Running stats: without ``data``, running_mean ~ N(0, 0.5) and running_var ~ U(0.5, 2). With
    ``data`` (positional input tuples) they are measured instead, like a trained network's: one
    train-mode pass over the batches with a cumulative average. Use ``data`` for deep networks,
    where made-up statistics that do not match the activations wash the signal out (a
    MobileNetV2 with 17 randomized blocks gives the same logits for every image).
    Returns how many BatchNorm modules were changed; the model is left in eval mode if it was.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            n = bn.num_features
            if bn.affine:
                magnitude = torch.rand(n, generator=gen) + 0.5
                sign = torch.where(torch.rand(n, generator=gen) < 0.25, -1.0, 1.0)
                bn.weight.copy_(magnitude * sign)
                bn.bias.copy_(torch.randn(n, generator=gen) * 0.3)
            if bn.running_mean is not None and data is None:
                bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                bn.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        if data is not None:
            _measure_batchnorm_stats(model, bns, data)
    return len(bns)


def _measure_batchnorm_stats(model: nn.Module, bns: list[nn.Module], data: Iterable[tuple[Any, ...]]) -> None:
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        if bn.running_mean is not None:
            bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    model.train()
    try:
        for args in data:
            model(*args)
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    # A channel that is constant on the random measurement images (dead after ReLU6) would get
    # var 0: floor it at a fraction of its layer's median, as a trained network's would be.
    with torch.no_grad():
        for bn in bns:
            if bn.running_var is not None:
                floor = VAR_FLOOR * bn.running_var.median()
                bn.running_var.clamp_(min=float(floor))


def randomize_norms(model: nn.Module, seed: int = 0) -> int:
    """Perturb LayerNorm / RMSNorm scales (U(0.5, 1.5)) and shifts (N(0, 0.1)), in place.

    Fresh transformers norms have weight 1 and bias 0, which would let a wrong scale fold pass
    its test. Returns how many norm modules were changed.
    """
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            weight = getattr(module, "weight", None)
            if not is_norm or not isinstance(weight, nn.Parameter):
                continue
            weight.copy_(torch.rand(weight.shape, generator=gen) + 0.5)
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.1)
            count += 1
    return count


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for model construction without disturbing the caller's stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _transformers():
    import transformers

    return transformers


# ---------------------------------------------------------------------------------------------
# input makers


def _text_inputs(model: nn.Module, *, vocab: int, pad_id: int = 0) -> Callable[[int], Inputs]:
    """Random ids in ``[pad_id+1, vocab)``; row 0 unpadded, later rows right-padded (seed 0: 4 pads)."""

    def make(seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, vocab, (BATCH, SEQ_LEN), generator=gen)
        mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
        for row in range(1, BATCH):
            pads = 4 if seed == 0 else int(torch.randint(1, SEQ_LEN // 2, (), generator=gen))
            mask[row, SEQ_LEN - pads :] = 0
        ids = ids.masked_fill(mask == 0, pad_id)
        return split_call(model, {"input_ids": ids, "attention_mask": mask})

    return make


def _image_inputs(
    model: nn.Module, *, channels: int = 3, size: int = IMAGE, batch: int = BATCH
) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        return split_call(model, {"pixel_values": torch.randn(batch, channels, size, size, generator=gen)})

    return make


def _tensor_inputs(*shapes: tuple[int, ...]) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        gen = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(shape, generator=gen) for shape in shapes), {}

    return make


def _fixture(name: str, model: nn.Module, make: Callable[[int], Inputs], kind: str, **extra: Any) -> Fixture:
    model.eval()
    args, kwargs = make(0)
    return Fixture(name=name, model=model, example_inputs=args, example_kwargs=kwargs,
                   make_inputs=make, kind=kind, **extra)


def _hf(cls_name: str, config, attn_implementation: str | None, seed: int) -> nn.Module:
    """Instantiate a transformers class from ``config`` with seeded weights and randomized norms."""
    cls = getattr(_transformers(), cls_name)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with _seeded(seed):
        model = cls._from_config(config, **extra)
    randomize_norms(model, seed)
    return model.eval()


def _image_stats_batches(model: nn.Module, seed: int, size: int = IMAGE) -> list[tuple[torch.Tensor, ...]]:
    """Random image batches (seeds far from the example/held-out ones) for BatchNorm statistics."""
    make = _image_inputs(model, batch=8, size=size)
    return [make(10_000 + seed * 10 + i)[0] for i in range(4)]


# ---------------------------------------------------------------------------------------------
# transformers architectures (random weights)


def bert(seed: int = 0, attn_implementation: str | None = "sdpa") -> Fixture:
    """``BertModel``: 2 layers, hidden 32, 4 heads; call ``(input_ids, attention_mask)``.

    Returns ``BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state (2,16,32), pooler_output (2,32))``.
    """
    t = _transformers()
    config = t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    model = _hf("BertModel", config, attn_implementation, seed)
    return _fixture("bert", model, _text_inputs(model, vocab=VOCAB), "text")


def vit(seed: int = 0, attn_implementation: str | None = "sdpa") -> Fixture:
    """``ViTForImageClassification``: 32x32 images, patch 8 (16 patches + CLS), 2 layers, hidden 32.

    Call ``(pixel_values,)``; returns ``ImageClassifierOutput(logits (2,10))``.
    """
    t = _transformers()
    config = t.ViTConfig(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, num_labels=10)
    model = _hf("ViTForImageClassification", config, attn_implementation, seed)
    return _fixture("vit", model, _image_inputs(model), "vision")


def gpt2(seed: int = 0, attn_implementation: str | None = "sdpa") -> Fixture:
    """``GPT2LMHeadModel``: causal, 2 layers, hidden 32, 4 heads, GPT-2 ``Conv1D`` projections.

    Call ``(input_ids,)`` + ``{"attention_mask": ...}``; returns ``CausalLMOutputWithCrossAttentions(logits (2,16,128))``.
    """
    t = _transformers()
    config = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = _hf("GPT2LMHeadModel", config, attn_implementation, seed)
    return _fixture("gpt2", model, _text_inputs(model, vocab=VOCAB), "text")


def llama(seed: int = 0, attn_implementation: str | None = "sdpa") -> Fixture:
    """``LlamaForCausalLM``: RoPE, grouped-query attention (4 query heads, 2 KV heads), RMSNorm,
    SwiGLU MLP, causal; 2 layers, hidden 32. Call ``(input_ids, attention_mask)``; returns
    ``CausalLMOutputWithPast(logits (2,16,128))``.
    """
    t = _transformers()
    config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = _hf("LlamaForCausalLM", config, attn_implementation, seed)
    return _fixture("llama", model, _text_inputs(model, vocab=VOCAB), "text")


def resnet(seed: int = 0) -> Fixture:
    """``ResNetForImageClassification``: bottleneck blocks, stages (32, 64) x depth 1, 32x32 input;
    every conv is followed by a BatchNorm (random affine, statistics measured on random images),
    incl. the projection shortcuts.
    Call ``(pixel_values,)``; returns ``ImageClassifierOutputWithNoAttention(logits (2,10))``.
    """
    t = _transformers()
    config = t.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                            layer_type="bottleneck", num_labels=10)
    model = _hf("ResNetForImageClassification", config, None, seed)
    randomize_batchnorm(model, seed, data=_image_stats_batches(model, seed))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return _fixture("resnet", model, _image_inputs(model), "vision", folds=n_bn,
                    note="conv->BN everywhere (stem, bottlenecks, projection shortcuts)")


def _kaiming_convs(model: nn.Module, seed: int) -> None:
    """He-initialize convs (as trained-from-scratch CNNs are), instead of transformers' N(0, 0.02).

    With N(0, 0.02) a 17-block MobileNetV2 has activations whose mean dwarfs their spread, so
    BatchNorm's mean subtraction cancels catastrophically and the model amplifies float32
    rounding ~100x: its own fp32 output is ~1e-5 off its fp64 output, and float32 comparisons
    would measure the fixture rather than the pass.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_out) ** 0.5)


def _small_residual_branches(model: nn.Module) -> None:
    """Scale the projection BatchNorm's weight of every inverted-residual block by RESIDUAL_GAMMA.

    Trained residual networks keep each branch small next to the stream it adds to (torchvision's
    ``zero_init_residual`` starts them at zero). With unit-size random weights instead, 17 blocks
    grow the residual stream until float32 rounding is amplified ~30x between input and logits
    (the untransformed model's own fp32 output is then 1e-5 off its fp64 output), and a float32
    comparison would measure the fixture rather than the pass.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("reduce_1x1.normalization"):
                module.weight.mul_(RESIDUAL_GAMMA)


def mobilenet_v2(seed: int = 0) -> Fixture:
    """``MobileNetV2ForImageClassification``: depth multiplier 0.35, 32x32 input, TF "same" padding
    (explicit pads before convs), depthwise convs, ReLU6; every conv has a BatchNorm (random affine, measured statistics).
    Call ``(pixel_values,)``; returns ``ImageClassifierOutputWithNoAttention(logits (2,10))``.
    """
    t = _transformers()
    config = t.MobileNetV2Config(num_channels=3, image_size=MOBILENET_IMAGE, depth_multiplier=0.35, num_labels=10)
    model = _hf("MobileNetV2ForImageClassification", config, None, seed)
    _kaiming_convs(model, seed)
    randomize_batchnorm(model, seed, data=_image_stats_batches(model, seed, MOBILENET_IMAGE))
    _small_residual_branches(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    return _fixture("mobilenet_v2", model, _image_inputs(model, size=MOBILENET_IMAGE), "vision", folds=n_bn,
                    note="conv->BN incl. depthwise convs")


# ---------------------------------------------------------------------------------------------
# real weights


@functools.lru_cache(maxsize=1)
def _minilm_state() -> dict[str, torch.Tensor]:
    from ptool.default_model import minilm_folder
    from ptool.frontends.huggingface import load_hf_model

    return {k: v.clone() for k, v in load_hf_model(minilm_folder()).state_dict().items()}


def _minilm_encoder() -> nn.Module:
    """A fresh BertModel with the real all-MiniLM-L6-v2 weights (checkpoint read once per process)."""
    from ptool.default_model import minilm_folder

    t = _transformers()
    config = t.AutoConfig.from_pretrained(minilm_folder(), local_files_only=True)
    config.use_cache = False
    model = t.BertModel(config)
    model.load_state_dict(_minilm_state())
    return model.eval()


def _sentence_inputs(model: nn.Module) -> Callable[[int], Inputs]:
    """Real sentences: seed 0 takes the first BATCH shipped sentences, other seeds a seeded sample."""
    from ptool.default_model import encode
    from ptool.frontends.huggingface import sample_sentences

    sentences = sample_sentences()

    def make(seed: int) -> Inputs:
        if seed == 0:
            picked = sentences[:BATCH]
        else:
            order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))
            picked = [sentences[int(i)] for i in order[:BATCH]]
        ids, mask = encode(picked, SEQ_LEN)
        return split_call(model, {"input_ids": ids, "attention_mask": mask})

    return make


def minilm() -> Fixture:
    """``BertModel`` with the real all-MiniLM-L6-v2 weights (6 layers, hidden 384, 12 heads) on real
    tokenized sentences, ``(2, 16)``. Call ``(input_ids, attention_mask)``; returns a
    ``ModelOutput`` ``(last_hidden_state (2,16,384), pooler_output (2,384))``.
    """
    model = _minilm_encoder()
    return _fixture("minilm", model, _sentence_inputs(model), "text", note="real trained weights")


def sentence_embedder() -> Fixture:
    """``ptool.default_model.SentenceEmbedder`` (MiniLM + mean pooling + L2 norm) on real sentences.

    Call ``(input_ids, attention_mask)``; returns unit-norm embeddings ``(2, 384)``.
    """
    from ptool.default_model import SentenceEmbedder

    model = SentenceEmbedder(_minilm_encoder()).eval()
    return _fixture("sentence_embedder", model, _sentence_inputs(model), "text", note="real trained weights")


def transformer_zoo() -> list[Fixture]:
    """One of each random-weight transformers architecture (fresh models)."""
    return [builder() for builder in (bert, vit, gpt2, llama, resnet, mobilenet_v2)]


FIXTURES: dict[str, Callable[[], Fixture]] = {
    "bert": bert,
    "vit": vit,
    "gpt2": gpt2,
    "llama": llama,
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
    "minilm": minilm,
    "sentence_embedder": sentence_embedder,
}
"""Every architecture builder by name (all take no required arguments)."""


# ---------------------------------------------------------------------------------------------
# BatchNorm folding cases (plain torch)


class _Seq(nn.Module):
    """``layers`` applied in order (a named ``nn.Sequential`` that prints as the case)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _SharedConvOutput(nn.Module):
    """conv -> bn, and the conv output also feeds a second branch: folding bn into conv would
    change what the second branch sees, so the BN must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.side = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + self.side(torch.relu(y))


class _ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn + identity, then relu: two folds inside a residual graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def _bn_cases() -> list[tuple[str, Callable[[], nn.Module], tuple[tuple[int, ...], ...], int, int, str]]:
    """(name, build, input shapes, folds, keeps, note)."""
    n = 2
    return [
        ("conv1d_bn", lambda: _Seq(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8)),
         ((n, 4, 16),), 1, 0, "Conv1d with bias -> BatchNorm1d"),
        ("conv1d_nobias_bn", lambda: _Seq(nn.Conv1d(4, 8, 3, stride=2, bias=False), nn.BatchNorm1d(8)),
         ((n, 4, 16),), 1, 0, "Conv1d without bias, stride 2 -> BatchNorm1d"),
        ("conv2d_bn", lambda: _Seq(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
         ((n, 3, 16, 16),), 1, 0, "Conv2d without bias -> BatchNorm2d -> ReLU"),
        ("conv2d_bias_bn", lambda: _Seq(nn.Conv2d(3, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8)),
         ((n, 3, 16, 16),), 1, 0, "Conv2d with bias, dilation 2 -> BatchNorm2d"),
        ("conv2d_grouped_bn", lambda: _Seq(nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12)),
         ((n, 8, 16, 16),), 1, 0, "grouped Conv2d (groups=4) -> BatchNorm2d"),
        ("conv2d_depthwise_bn", lambda: _Seq(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                                             nn.BatchNorm2d(8)),
         ((n, 8, 16, 16),), 1, 0, "depthwise Conv2d (groups=channels) -> BatchNorm2d"),
        ("conv2d_bn_noaffine", lambda: _Seq(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False)),
         ((n, 3, 16, 16),), 1, 0, "Conv2d -> BatchNorm2d(affine=False): running stats only"),
        ("conv3d_bn", lambda: _Seq(nn.Conv3d(3, 6, 3, padding=1), nn.BatchNorm3d(6)),
         ((n, 3, 6, 8, 8),), 1, 0, "Conv3d -> BatchNorm3d"),
        ("convtranspose2d_bn", lambda: _Seq(nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1),
                                            nn.BatchNorm2d(4)),
         ((n, 8, 8, 8),), 1, 0, "ConvTranspose2d (weight is (in, out, k, k)) -> BatchNorm2d"),
        ("convtranspose2d_grouped_bn", lambda: _Seq(nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2, bias=False),
                                                    nn.BatchNorm2d(6)),
         ((n, 8, 8, 8),), 1, 0, "grouped ConvTranspose2d (groups=2): out channels interleave per group"),
        ("linear_bn1d", lambda: _Seq(nn.Linear(16, 12), nn.BatchNorm1d(12)),
         ((4, 16),), 1, 0, "Linear -> BatchNorm1d on (batch, features)"),
        ("residual_block", _ResidualBlock, ((n, 8, 8, 8),), 2, 0, "two conv->BN folds inside a residual block"),
        ("bn_conv_pad0", lambda: _Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, padding=0)),
         ((n, 4, 12, 12),), 1, 0, "BatchNorm2d -> Conv2d(padding=0): BN folds forward into the conv"),
        ("bn_conv_pad1", lambda: _Seq(nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, padding=1)),
         ((n, 4, 12, 12),), 0, 1,
         "BatchNorm2d -> Conv2d(padding=1): zero padding is not normalized, so a forward fold is inexact at borders"),
        ("conv_bn_shared", _SharedConvOutput, ((n, 4, 12, 12),), 0, 1,
         "conv output has a second consumer: folding would change the other branch"),
        ("conv2d_bn_batchstats", lambda: _Seq(nn.Conv2d(3, 8, 3, padding=1),
                                              nn.BatchNorm2d(8, track_running_stats=False)),
         ((n, 3, 16, 16),), 0, 1, "BatchNorm2d(track_running_stats=False) uses batch statistics even in eval"),
    ]


def bn_zoo(seed: int = 0) -> list[Fixture]:
    """Plain-torch BatchNorm cases for fold-bn: conv/linear/transposed-conv + BN (foldable) and
    cases a correct pass must leave alone (``keeps``). Each has seeded weights and randomized BNs."""
    fixtures = []
    for i, (name, build, shapes, folds, keeps, note) in enumerate(_bn_cases()):
        with _seeded(seed + i):
            model = build()
        randomize_batchnorm(model, seed + i)
        fixtures.append(_fixture(name, model, _tensor_inputs(*shapes), "bn", folds=folds, keeps=keeps, note=note))
    return fixtures
