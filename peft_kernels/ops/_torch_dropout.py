"""Seeded dropout masks for the torch backend, cheap enough for the CPU hot path.

The mask is a pure function of (seed, shape, p, device): forward and backward both regenerate it,
so it is never stored. Each int64 drawn from a seeded ``torch.Generator`` gives four 16-bit
lanes, and an element is kept when its lane is ≥ a 16-bit threshold. That is ~4× fewer generator
calls than ``bernoulli_`` and yields a bool mask with no float pass.

``p`` is quantized to ``t/65536`` (``t = round(p·65536)``); the inverted-dropout scale uses the
exact keep probability, ``65536/(65536 - t)``, so the mask stays unbiased.
"""
from __future__ import annotations

import torch

_LANES = 65536


def threshold(p: float) -> int:
    return min(int(round(p * _LANES)), _LANES - 1)


def keep_scale(p: float) -> float:
    """Inverted-dropout scale for the torch backend's mask (exact keep probability)."""
    return _LANES / (_LANES - threshold(p))


def keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """Bool keep-mask of ``shape`` for ``seed``; keep probability ``1 - threshold(p)/65536``."""
    n = 1
    for d in shape:
        n *= int(d)
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    words = torch.empty(((n + 3) // 4,), dtype=torch.int64, device=device)
    words.random_(-(2 ** 63), None, generator=g)  # the full 64-bit range: four uniform int16 lanes
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes >= (threshold(p) - _LANES // 2)


def dropout_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The multiplicative mask (0 or keep_scale, fp32) that the torch backend applies for ``seed``."""
    return keep_mask(seed, shape, p, device).to(torch.float32) * keep_scale(p)
