"""The compiled extension ``peft_kernels._C`` (csrc/): loaded lazily, never required.

Importing it registers the ``torch.ops.peft_kernels.*`` ops. ``available()`` says whether it
loaded and ``unavailable_reason()`` why not. ``PEFT_KERNELS_DISABLE_EXT=1`` turns it off at run
time (the pure-torch path is then used; tests use this to cover both paths).
"""
from __future__ import annotations

import os
from typing import Optional

_loaded: Optional[bool] = None
_why: Optional[str] = None


def _load() -> None:
    global _loaded, _why
    if _loaded is not None:
        return
    try:
        from . import _C  # noqa: F401  (registers the TORCH_LIBRARY ops)

        _loaded, _why = True, None
    except ImportError as e:
        _loaded, _why = False, f"peft_kernels._C was not built or failed to load ({e})"


def available() -> bool:
    if os.environ.get("PEFT_KERNELS_DISABLE_EXT", "0") == "1":
        return False
    _load()
    return bool(_loaded)


def unavailable_reason() -> Optional[str]:
    if os.environ.get("PEFT_KERNELS_DISABLE_EXT", "0") == "1":
        return "disabled by PEFT_KERNELS_DISABLE_EXT=1"
    _load()
    return _why


def ops():
    """``torch.ops.peft_kernels`` after loading the extension."""
    import torch

    _load()
    return torch.ops.peft_kernels
