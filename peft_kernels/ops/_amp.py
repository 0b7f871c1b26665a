"""Autocast for the fused ops: behave like ``nn.Linear`` under ``torch.autocast``.

Inside an autocast region ``F.linear`` casts its floating inputs (all but float64) to the region's dtype and
computes in it. A custom ``autograd.Function`` gets no such casting, so an fp32 model under
``torch.autocast("cuda", dtype=torch.bfloat16)`` would run the fp32 kernels (no tensor cores) or fail on
mixed dtypes. Each public op therefore casts its inputs the way autocast casts ``F.linear``'s (HF PEFT's
LoRA layers are ``nn.Linear``s, so their update is computed in the autocast dtype as well), then runs with
autocast off, so no op inside re-casts. The casts are differentiable: gradients reach the fp32 parameters.
"""
from __future__ import annotations

from typing import Optional

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(x) -> Optional[torch.dtype]:
    """The autocast dtype for ``x``'s device type when autocast is on there, else None."""
    if not isinstance(x, torch.Tensor):
        return None
    dev = x.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(dev) if on else None


def cast(dtype: torch.dtype, *tensors):
    """Each floating tensor (not float64) in ``dtype``; anything else unchanged."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _CASTABLE and t.dtype != dtype else t
                 for t in tensors)


def disabled(x: torch.Tensor):
    """A context with autocast off on ``x``'s device type."""
    return torch.autocast(x.device.type, enabled=False)
