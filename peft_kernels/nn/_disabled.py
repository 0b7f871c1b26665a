"""Which adapter modules ``peft_kernels.disable_adapters(model)`` blocks have switched off, per thread and per
asyncio task (a ``contextvars`` context), so one thread's block never changes what another thread computes.

The forwards ask :func:`adapters_disabled`. While no block is open anywhere (the common case) that is one read
of a module global, which a compiled graph guards on without a graph break."""
from __future__ import annotations

import contextvars
import threading

import torch.nn as nn

_OPEN = 0  # blocks open in any thread: 0 means no module is disabled anywhere
_LOCK = threading.Lock()
_DISABLED: contextvars.ContextVar = contextvars.ContextVar("peft_kernels_disabled", default=frozenset())


def adapters_disabled(module: nn.Module) -> bool:
    """True inside a ``disable_adapters`` block that covers ``module`` (this thread / task only)."""
    if not _OPEN:
        return False
    return id(module) in _DISABLED.get()


def push(modules) -> contextvars.Token:
    global _OPEN
    with _LOCK:
        _OPEN += 1
    return _DISABLED.set(_DISABLED.get() | {id(m) for m in modules})


def pop(token: contextvars.Token) -> None:
    global _OPEN
    _DISABLED.reset(token)
    with _LOCK:
        _OPEN -= 1
