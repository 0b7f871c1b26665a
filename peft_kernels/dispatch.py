"""The one place that decides which backend runs an op, and can say why.

Backends:
    ``"torch"``  plain PyTorch (any device); the fastest CPU path.
    ``"triton"`` fused Triton kernels: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
                 was set before triton was imported (that is how the test suite runs them).
    ``"cuda"``   the hand-written CUDA kernels of ``peft_kernels._C`` (csrc/cuda), for the ops that
                 have them (multi_lora_linear); needs the extension built with CUDA and CUDA tensors.
    ``"auto"``   triton on CUDA when it can run there, else cuda when the op has CUDA kernels and
                 they can run, torch otherwise.

The environment variable ``PEFT_KERNELS_BACKEND`` (one of the names above) overrides the backend an
op or module asked for. Nothing here touches a GPU at import time.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
DEFAULT_SUPPORTED = ("torch", "triton")  # what an op runs unless it says otherwise
ENV_VAR = "PEFT_KERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run on the given inputs."""


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "the `triton` package is not installed (pip install triton)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "tensors are on CUDA but torch.cuda.is_available() is False"
        return None
    if device.type == "cpu":
        if not interpreting():
            return ("tensors are on the CPU; Triton kernels run on CPU only under the interpreter "
                    "(set TRITON_INTERPRET=1 before triton is imported)")
        from .kernels import _common  # imported lazily: importing triton is not free

        if not _common.INTERPRETED:
            return ("TRITON_INTERPRET=1 is set now, but peft_kernels' Triton kernels were compiled "
                    "before it was set; set it before the first import of triton")
        return None
    return f"Triton kernels do not support device type {device.type!r}"


def cuda_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the compiled CUDA kernels cannot run on ``device`` (None when they can)."""
    from . import _ext

    why = _ext.unavailable_reason()
    if why is not None:
        return why
    if not _ext.build_info().startswith("cuda"):
        return ("peft_kernels._C was built without CUDA (install with a CUDA torch and toolkit, "
                "PEFT_KERNELS_CUDA=1; see the README)")
    if device.type != "cuda":
        return f"the CUDA kernels take CUDA tensors, these are on {device}"
    if not torch.cuda.is_available():
        return "tensors are on CUDA but torch.cuda.is_available() is False"
    return None


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        return triton_unavailable_reason(device)
    if backend == "cuda":
        return cuda_unavailable_reason(device)
    raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")


def requested_backend(backend: str = "auto") -> str:
    """The backend asked for, after the ``PEFT_KERNELS_BACKEND`` override."""
    _check_name(backend, "backend")
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return backend


def resolve(backend: str, device: torch.device, op_reason: Optional[Callable[[str], Optional[str]]] = None,
            supported=DEFAULT_SUPPORTED) -> str:
    """Pick the concrete backend for tensors on ``device``; raise if an explicit one can't run.

    ``supported``: the backends the op has. ``op_reason(name)`` lets an op add why ``name`` cannot
    take these particular inputs (a dtype it has no kernel for, say); "auto" then falls back to torch.
    """
    req = requested_backend(backend)

    def why(name):
        if name not in supported:
            return f"this op has no {name} kernels (it runs on: {', '.join(supported)})"
        r = unavailable_reason(name, device)
        return r if r is not None or op_reason is None else op_reason(name)

    if req == "auto":
        if device.type == "cuda":
            for name in ("triton", "cuda"):
                if why(name) is None:
                    return name
        return "torch"
    reason = why(req)
    if reason is not None:
        src = f" (from {ENV_VAR})" if os.environ.get(ENV_VAR, "").strip() else ""
        raise BackendUnavailable(f"backend {req!r}{src} cannot run: {reason}")
    return req


def explain(backend: str = "auto", device="cpu") -> str:
    """A human-readable account of what ``backend`` resolves to on ``device`` and why."""
    device = torch.device(device)
    lines = []
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        lines.append(f"{ENV_VAR}={env!r} overrides the requested backend {backend!r}")
    try:
        chosen = resolve(backend, device)
        lines.append(f"on {device}: {requested_backend(backend)!r} -> {chosen!r}")
    except (BackendUnavailable, ValueError) as e:
        lines.append(f"on {device}: {e}")
    for name in BACKENDS[1:]:
        why = unavailable_reason(name, device)
        lines.append(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)
