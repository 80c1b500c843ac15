"""Symmetric int8 weight levels for the ONNX quantize modes (dynamic and static), with the torch
pass's arithmetic (``ptool.passes.quant.quantizers``), so both routes store the same integers."""

from __future__ import annotations

import numpy as np
import torch

from ptool.passes.quant import quantizers as qz


def int8_weight(weight: np.ndarray, axis: int, per_channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 levels (the weight's shape) and one scale per channel along ``axis`` (the
    torch pass's arithmetic), or one scale, shape ``()``, for the whole tensor."""
    if not per_channel:
        scale = np.float32(max(float(np.abs(weight).max()) / 127, float(np.finfo(np.float32).tiny)))
        return np.clip(np.round(weight / scale), -127, 127).astype(np.int8), np.asarray(scale, np.float32)
    moved = np.moveaxis(weight, axis, 0)
    levels, scales = qz.quantize_weight(torch.from_numpy(moved.reshape(moved.shape[0], -1).copy()), 8)
    levels = np.moveaxis(levels.numpy().reshape(moved.shape), 0, axis)
    return np.ascontiguousarray(levels), scales.reshape(-1).numpy().astype(np.float32)
