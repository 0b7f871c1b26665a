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
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:
        _loaded, _why = False, "peft_kernels._C was not built (this install has no compiled extension)"
        return
    try:
        from . import _C  # noqa: F401  (registers the TORCH_LIBRARY ops)

        _loaded, _why = True, None
    except ImportError as e:
        _loaded, _why = False, f"peft_kernels._C was not built or failed to load ({e})"
        return
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only (fake) implementations of the tensor ops, for torch.compile and opcheck."""
    import torch

    def shrink(x, w, perm, *rest):
        return x.new_empty((perm.shape[0], w.shape[1]), dtype=torch.float32)

    def nothing(*args):
        return None

    def dropout_shrink(x, A, *keys):
        return x.new_empty((x.shape[0], A.shape[0]), dtype=torch.float32)

    def dropout_bwd(dS, x, A, k0, k1, k2, thr, need_dx, need_da):
        f32 = dict(dtype=torch.float32, device=x.device)
        return (x.new_empty(x.shape, **f32) if need_dx else x.new_empty((0,), **f32),
                x.new_empty((A.shape[0], x.shape[1]), **f32) if need_da else x.new_empty((0,), **f32))

    def dropout_shrink_group(x, As, keys):
        return [x.new_empty((x.shape[0], A.shape[0]), dtype=torch.float32) for A in As]

    def dropout_bwd_group(dS, x, As, keys, need_dx, need_da):
        f32 = dict(dtype=torch.float32, device=x.device)
        return (x.new_empty(x.shape, **f32) if need_dx else x.new_empty((0,), **f32),
                [x.new_empty((A.shape[0], x.shape[1]) if d else (0,), **f32) for A, d in zip(As, need_da)])

    def multi_fwd(y, x, A, B, perm, *rest):
        return A.new_empty((perm.shape[0], A.shape[1]))

    def multi_bwd(dy, x, S, A, B, perm, seg_slots, seg_starts, ranks, scalings, dx, need_da, need_db, B_t=None):
        return (A.new_empty(A.shape) if need_da else A.new_empty((0,)),
                B.new_empty(B.shape) if need_db else B.new_empty((0,)))

    def hash_dropout(x, *keys_and_scale):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def group(ids, num_slots):
        ctx = torch.library.get_ctx()
        ta, g, bad = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
        i32 = dict(dtype=torch.int32, device=ids.device)
        return (ids.new_empty((ta,), **i32), ids.new_empty((ta,), **i32), ids.new_empty((g,), **i32),
                ids.new_empty((g + 1,), **i32), ids.new_empty((bad,), dtype=torch.int64))

    def dequantize_4bit(packed, absmax, code, blocksize, N, K, dtype):
        return packed.new_empty((N, K), dtype=dtype)

    for name, fn in (("dequantize_4bit", dequantize_4bit), ("bgmv_shrink", shrink), ("sgmv_shrink", shrink), ("bgmv_expand", nothing),
                     ("sgmv_expand", nothing), ("lora_expand", nothing), ("lora_dropout_shrink", dropout_shrink),
                     ("lora_dropout_bwd", dropout_bwd), ("multi_lora_fwd", multi_fwd), ("multi_lora_bwd", multi_bwd),
                     ("group_by_adapter", group), ("hash_dropout", hash_dropout),
                     ("lora_dropout_shrink_group", dropout_shrink_group),
                     ("lora_dropout_bwd_group", dropout_bwd_group)):
        torch.library.register_fake(f"peft_kernels::{name}")(fn)


def disabled() -> bool:
    """PEFT_KERNELS_DISABLE_EXT=1: behave as if the extension were not built."""
    return os.environ.get("PEFT_KERNELS_DISABLE_EXT", "0") == "1"


def available() -> bool:
    if disabled():
        return False
    _load()
    return bool(_loaded)


def unavailable_reason() -> Optional[str]:
    if disabled():
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
