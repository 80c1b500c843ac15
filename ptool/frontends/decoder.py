"""A causal decoder as one step graph with a static KV cache: what generation runs on every backend.

:class:`DecodeStep` wraps a Hugging Face Llama-family causal LM (``LlamaForCausalLM``,
``Qwen2ForCausalLM``: RMSNorm, rotary positions, grouped-query attention,
gated MLP) and reuses its modules and weights. One call processes ``T`` new tokens at position
``pos`` against a preallocated cache of fixed length ``M``::

    inputs:  ids (B, T) int64, pos () int64, k_cache, v_cache (L, B, Hkv, M, D)
             [+ k_scale, v_scale (L, B, Hkv, M, 1) float32 when the cache is int8]
    outputs: logits (B, T, V) (or (B, 1, V): last position only), new_k, new_v (L, B, Hkv, T, D)
             [+ new_k_scale, new_v_scale (L, B, Hkv, T, 1)]

Cache slots ``j < pos`` hold the context; slots at and after ``pos`` are masked out, so their
contents never matter. The new tokens attend to the valid slots and causally to each other. The
step returns the new tokens' keys and values instead of a whole updated cache: the caller writes
them into slots ``pos .. pos + T - 1`` of its buffers in place (:func:`write_cache`), so no backend
copies the cache out on every token. The same graph with ``T = 1`` decodes and with ``T = chunk``
pre-fills a prompt chunk by chunk; every shape is static, so TVM compiles it once.

int8 cache (``kv_dtype="int8"``): each key and value vector (one token, one head) is stored as int8
with one float32 scale beside it, ``s = max|x| / 127``, ``q = round(x / s)``. The new tokens' own
keys and values go through the same rounding before they are attended to, so pre-filling ``T``
tokens at once equals decoding them one by one. Bytes per token and head: ``D + 4`` instead of
``4 D`` (float32) or ``2 D`` (bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ptool.errors import UsageError

__all__ = ["CacheSpec", "DecodeStep", "KVDtype", "decoder_parts", "write_cache"]

KVDtype = Literal["float32", "int8"]
KV_DTYPES: tuple[str, ...] = ("float32", "int8")
#: Hugging Face ``model_type``s whose layers the step mirrors (RMSNorm, RoPE, GQA, gated MLP, no QK-norm).
_MODEL_TYPES = ("llama", "qwen2", "mistral")
_INT8_MAX = 127.0


@dataclass(frozen=True)
class CacheSpec:
    """The static cache's geometry: ``layers`` x ``batch`` x ``kv_heads`` x ``length`` x ``head_dim``."""

    layers: int
    batch: int
    kv_heads: int
    length: int
    head_dim: int
    dtype: KVDtype = "float32"

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, self.batch, self.kv_heads, self.length, self.head_dim)

    def empty(self) -> list[torch.Tensor]:
        """Zeroed cache buffers in the step's input order (keys, values[, key scales, value scales])."""
        if self.dtype == "int8":
            scale_shape = (*self.shape[:-1], 1)
            return [torch.zeros(self.shape, dtype=torch.int8), torch.zeros(self.shape, dtype=torch.int8),
                    torch.zeros(scale_shape), torch.zeros(scale_shape)]
        return [torch.zeros(self.shape), torch.zeros(self.shape)]

    def nbytes(self) -> int:
        """Bytes of the cache buffers (scales included)."""
        return sum(t.numel() * t.element_size() for t in self.empty_meta())

    def empty_meta(self) -> list[torch.Tensor]:
        scale_shape = (*self.shape[:-1], 1)
        if self.dtype == "int8":
            return [torch.empty(self.shape, dtype=torch.int8, device="meta")] * 2 + \
                   [torch.empty(scale_shape, device="meta")] * 2
        return [torch.empty(self.shape, device="meta")] * 2


def decoder_parts(model: nn.Module) -> nn.Module:
    """The inner Llama-style ``model.model`` of a causal LM, or a one-line :class:`UsageError` naming what
    is missing (a model that is not a Llama-family causal decoder)."""
    name = type(model).__name__
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or head is None or config is None or any(not hasattr(inner, n) for n in needed):
        raise UsageError(f"generation needs a Llama-family causal decoder (a Hugging Face *ForCausalLM with "
                         f"model.embed_tokens / layers / norm / rotary_emb and lm_head, e.g. LlamaForCausalLM, "
                         f"Qwen2ForCausalLM); got {name}")
    kind = getattr(config, "model_type", "")
    if kind not in _MODEL_TYPES:
        raise UsageError(f"generation supports the model types {', '.join(_MODEL_TYPES)} (the step graph mirrors "
                         f"their attention, norms and positions); {name} is '{kind}'")
    if kind == "mistral" and getattr(config, "sliding_window", None):
        raise UsageError(f"{name} uses sliding-window attention, which the static-cache step does not implement")
    if kind == "qwen2" and getattr(config, "use_sliding_window", False):
        raise UsageError(f"{name} has use_sliding_window=True, which the static-cache step does not implement")
    return inner


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector (last dim) symmetric int8: ``(q int8, scale float32 (..., 1))``."""
    scale = x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-8) / _INT8_MAX  # max, not amax: TVM imports it
    q = torch.clamp(torch.round(x / scale), -_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


class DecodeStep(nn.Module):
    """``T`` new tokens at position ``pos`` against a static KV cache (see the module docstring).

    Args:
        model: a Llama-family ``*ForCausalLM`` (its modules are shared, not copied).
        cache: the cache geometry; :meth:`cache_spec` builds one.
        last_only: return the logits of the last new token only (pre-fill chunks need no more).
    """

    def __init__(self, model: nn.Module, cache: CacheSpec, *, last_only: bool = False) -> None:
        super().__init__()
        inner = decoder_parts(model)
        if cache.dtype not in KV_DTYPES:
            raise UsageError(f"kv cache dtype must be one of {', '.join(KV_DTYPES)}, got '{cache.dtype}'")
        config = model.config
        self.embed, self.layers, self.norm, self.lm_head = inner.embed_tokens, inner.layers, inner.norm, model.lm_head
        self.cache = cache
        self.last_only = last_only
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        if (cache.layers, cache.kv_heads, cache.head_dim) != (len(self.layers), self.kv_heads, self.head_dim):
            raise UsageError(f"cache geometry {cache.shape} does not fit the model ({len(self.layers)} layers, "
                             f"{self.kv_heads} kv heads of {self.head_dim})")
        rotary = inner.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))

    @staticmethod
    def cache_spec(model: nn.Module, length: int, *, batch: int = 1, kv_dtype: KVDtype = "float32") -> CacheSpec:
        """The :class:`CacheSpec` of ``model`` for ``length`` cached tokens."""
        decoder_parts(model)
        c = model.config
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        return CacheSpec(c.num_hidden_layers, batch, kv, length, dim, kv_dtype)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        int8 = self.cache.dtype == "int8"
        if int8 and (k_scale is None or v_scale is None):
            raise UsageError("an int8 KV cache needs its scales: call step(ids, pos, k, v, k_scale, v_scale)")
        b, t = ids.shape
        m = k_cache.shape[3]
        g = self.heads // self.kv_heads
        positions = pos + torch.arange(t, dtype=torch.int64)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling  # (T, D)
        valid = torch.arange(m, dtype=torch.int64) < pos  # (M,)
        causal = torch.arange(t)[:, None] >= torch.arange(t)[None, :]  # (T, T)
        mask = torch.cat((valid[None, :].expand(t, m), causal), dim=1)  # (T, M + T)
        scale = self.head_dim ** -0.5

        h = self.embed(ids)
        new_k, new_v, new_ks, new_vs = [], [], [], []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
            v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            if int8:
                kq, ks = _quantize(k)
                vq, vs = _quantize(v)
                new_k.append(kq)
                new_v.append(vq)
                new_ks.append(ks)
                new_vs.append(vs)
                k_all = torch.cat((k_cache[i].float() * k_scale[i], kq.float() * ks), dim=2)
                v_all = torch.cat((v_cache[i].float() * v_scale[i], vq.float() * vs), dim=2)
            else:
                new_k.append(k)
                new_v.append(v)
                k_all = torch.cat((k_cache[i], k), dim=2)  # (B, Hkv, M + T, D)
                v_all = torch.cat((v_cache[i], v), dim=2)
            # grouped-query attention without repeating the keys: the G query heads of one kv head
            # become G x T query rows of that head
            qg = q.reshape(b, self.kv_heads, g * t, self.head_dim)
            scores = torch.matmul(qg, k_all.transpose(-1, -2).to(qg.dtype)) * scale  # (B, Hkv, G T, M + T)
            scores = scores.reshape(b, self.kv_heads, g, t, m + t).float()
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1).reshape(b, self.kv_heads, g * t, m + t).to(v_all.dtype)
            out = torch.matmul(probs, v_all).reshape(b, self.heads, t, self.head_dim)
            out = out.to(x.dtype).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if self.last_only:
            h = h[:, -1:]
        logits = self.lm_head(self.norm(h))
        outs = [logits, torch.stack(new_k), torch.stack(new_v)]
        if int8:
            outs += [torch.stack(new_ks), torch.stack(new_vs)]
        return tuple(outs)


def write_cache(cache: list, new: list, pos: int) -> None:
    """Write a step's new keys / values (/ scales) into the cache buffers at slots ``pos ..`` in place.

    ``cache`` and ``new`` are matching lists of torch tensors or numpy arrays (``new[i]`` has the
    cache's shape with ``T`` slots on axis 3)."""
    for buf, value in zip(cache, new):
        t = value.shape[3]
        buf[:, :, :, pos:pos + t] = value
