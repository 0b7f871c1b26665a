"""Test utilities shipped with the package (used by tests/ and by ``python -m peft_kernels.gpucheck``)."""
from __future__ import annotations

import torch

# ops that make the host wait for the device (a value or a data-dependent shape must come back)
SYNC_OPS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "bincount",
            "unique_consecutive", "_unique", "_unique2", "unique_dim", "repeat_interleave", "allclose")


class HostSyncSpy:
    """Records every host↔device synchronisation point reachable from Python inside the block: aten ops
    whose result needs the device's data on the host (``.item()``, ``bool(t)``, ``nonzero``, ``unique``, ...,
    seen by a TorchDispatchMode), and the Python-side copies ``Tensor.tolist/item/cpu/numpy`` and
    ``torch.cuda.synchronize``. On the CPU these cost nothing, but the same Python path on a GPU would
    stall the stream and break CUDA-graph capture, so a CPU test can prove a call makes none."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        spy = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in SYNC_OPS:
                    spy.calls.append(f"aten.{name}")
                return func(*args, **(kwargs or {}))

        self._patches = []
        for owner, attr in ((torch.Tensor, "tolist"), (torch.Tensor, "item"), (torch.Tensor, "cpu"),
                            (torch.Tensor, "numpy"), (torch.cuda, "synchronize")):
            real = getattr(owner, attr)

            def wrapped(*a, _real=real, _name=f"{getattr(owner, '__name__', owner)}.{attr}", **kw):
                spy.calls.append(_name)
                return _real(*a, **kw)

            setattr(owner, attr, wrapped)
            self._patches.append((owner, attr, real))
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for owner, attr, real in self._patches:
            setattr(owner, attr, real)
        return False
