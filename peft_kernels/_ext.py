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
        return
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only (meta) implementations of the gather ops, for torch.compile and opcheck."""
    import torch

    def shrink(x, w, perm, *rest):
        return x.new_empty((perm.shape[0], w.shape[1]), dtype=torch.float32)

    def nothing(*args):
        return None

    for name, fn in (("bgmv_shrink", shrink), ("sgmv_shrink", shrink), ("bgmv_expand", nothing),
                     ("sgmv_expand", nothing), ("lora_expand", nothing)):
        torch.library.register_fake(f"peft_kernels::{name}")(fn)


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


def build_info() -> str:
    """"cpu" or "cuda <archs>": how peft_kernels._C was built ("" when it is not available)."""
    if not available():
        return ""
    return ops().build_info()


def ops():
    """``torch.ops.peft_kernels`` after loading the extension."""
    import torch

    _load()
    return torch.ops.peft_kernels
