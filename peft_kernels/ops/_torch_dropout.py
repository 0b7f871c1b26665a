"""The torch backend's dropout mask: a keyed hash of each element's index, regenerated on demand.

``keep(m, k) = hash(m·K + k) ≥ thr``, where ``hash`` is three murmur3 ``fmix32`` rounds keyed by
three 32-bit round keys derived from the seed, and ``thr = round(p·2³²)``. The inverted-dropout
scale uses the exact keep probability, ``2³² / (2³² − thr)``. The mask depends only on
(seed, row, col), never on strides or tiling, so backward regenerates forward's mask exactly.

Three implementations that agree bit for bit (tested):
  * the C++ kernels in ``csrc/`` (``csrc/include/peft_kernels/dropout_hash.h``), which generate
    the mask inside the fused CPU LoRA passes, so it is never materialised;
  * ``keep_mask`` below, in plain torch integer ops, for any device and when the extension
    is not built;
  * on a CUDA device with Triton, ``keep_mask`` runs ``kernels._common.hash_keep_mask``: the same hash in
    one pass (the torch-op version's ~25 int64 passes over M·K made the torch backend's dropout 8.6×
    its no-dropout time on an H200).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

Seed = Union[int, torch.Tensor]

_M32 = 0xFFFFFFFF
_TWO32 = 1 << 32


class Keys(NamedTuple):
    k0: Union[int, torch.Tensor]
    k1: Union[int, torch.Tensor]
    k2: Union[int, torch.Tensor]
    thr: int


def draw_seed(device) -> torch.Tensor:
    """A fresh dropout seed: int64 ``[1]`` drawn by torch's generator of ``device``, on that device.

    Every backend reads the seed from this tensor, never from a host int: the Triton kernels load it, so
    it never changes a compiled variant (a seed divisible by 16 used to compile a second one), and under
    CUDA-graph capture the draw is a captured, graph-safe RNG op, so every replay gets a fresh mask
    (torch advances its generator's offset per replay). ``torch.manual_seed`` makes it reproducible.
    """
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def _fmix32(h):
    """murmur3's 32-bit finalizer on a Python int or an int64 tensor holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def threshold(p: float) -> int:
    return min(int(round(p * _TWO32)), _TWO32 - 1)


def keys(seed: Seed, p: float) -> Keys:
    """The round keys of ``seed``: Python ints for an int or a CPU seed tensor (what the C++ kernels take),
    int64 tensors on the seed's device otherwise (no host copy: graph-safe)."""
    if isinstance(seed, torch.Tensor):
        if seed.device.type == "cpu":
            seed = int(seed.reshape(-1)[0])
        else:
            s = seed.reshape(-1)[:1].to(torch.int64)  # seeds are < 2**62: non-negative
            k0 = _fmix32((s & _M32) ^ 0x9E3779B9)
            k1 = _fmix32((s >> 32) ^ k0 ^ 0x85EBCA77)
            return Keys(k0, k1, _fmix32(k1 ^ 0xC2B2AE3D), threshold(p))
    s = int(seed) & ((1 << 64) - 1)
    k0 = _fmix32((s & _M32) ^ 0x9E3779B9)
    k1 = _fmix32((s >> 32) ^ k0 ^ 0x85EBCA77)
    k2 = _fmix32(k1 ^ 0xC2B2AE3D)
    return Keys(k0, k1, k2, threshold(p))


def keep_scale(p: float) -> float:
    """Inverted-dropout scale for this mask (exact keep probability)."""
    return _TWO32 / (_TWO32 - threshold(p))


def keep_mask(seed: Seed, shape, p: float, device, offset: int = 0) -> torch.Tensor:
    """Bool keep-mask of ``shape`` (last dim = K) in plain torch ops, for element indices
    ``offset + flat index``."""
    n = 1
    for d in shape:
        n *= int(d)
    dev = torch.device(device)
    if dev.type == "cuda" and _triton_ok(dev):
        from ..kernels import _common

        if isinstance(seed, torch.Tensor):
            st = seed.reshape(-1)[:1].to(dev, torch.int64)
        else:  # the seed's 64-bit pattern as a signed int64 (the kernel reads its two 32-bit words)
            v = int(seed) & ((1 << 64) - 1)
            st = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v], dtype=torch.int64, device=dev)
        return _common.hash_keep_mask(st, threshold(p), n, offset, dev).view(tuple(shape))
    return keep_mask_ops(seed, n, p, device, offset).view(tuple(shape))


def keep_mask_ops(seed: Seed, n: int, p: float, device, offset: int = 0) -> torch.Tensor:
    """``keep_mask`` for ``n`` flat elements in plain torch integer ops, on any device (the definition the
    one-launch Triton version is checked against on a GPU)."""
    idx = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    return hash_u32(seed, idx) >= threshold(p)


def hash_u32(seed: Seed, idx: torch.Tensor) -> torch.Tensor:
    """The keyed hash (uint32 values in int64) of each element index in ``idx``."""
    k = keys(seed, 0.0)
    h = _fmix32((idx & _M32) ^ k.k0)
    h = _fmix32(h ^ (idx >> 32) ^ k.k1)
    return _fmix32(h ^ k.k2)


def rows_keep(seed: Seed, rows: torch.Tensor, K: int, thr) -> torch.Tensor:
    """Bool keep-mask ``[len(rows), K]`` of the given token rows of a ``[T, K]`` input: element (t, k) is kept
    when hash(t·K + k) ≥ its threshold (``thr``: one int, or an int64 tensor with one per row). The same mask
    as ``keep_mask`` over the whole input when every row has one p, so a row's mask does not depend on which
    other rows are computed with it (the multi-adapter op's per-adapter dropout)."""
    idx = rows.to(torch.int64)[:, None] * K + torch.arange(K, dtype=torch.int64, device=rows.device)[None, :]
    h = hash_u32(seed, idx)
    return h >= (thr[:, None] if isinstance(thr, torch.Tensor) else thr)


class SlotDropout(NamedTuple):
    """Per-adapter dropout of one multi-adapter call: the seed (int64 [1]), each slot's p (host), and on the
    device each slot's threshold (int64 [S]) and inverted-dropout scale (fp32 [S])."""
    seed: torch.Tensor
    ps: tuple
    thr: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def make(ps, seed: torch.Tensor, device) -> "SlotDropout":
        thr = torch.tensor([threshold(p) for p in ps], dtype=torch.int64).to(device)
        scale = torch.tensor([keep_scale(p) for p in ps], dtype=torch.float32).to(device)
        return SlotDropout(seed, tuple(float(p) for p in ps), thr, scale)

    def rows_factor(self, rows: torch.Tensor, slot: int, K: int, dtype) -> Optional[torch.Tensor]:
        """The ``[len(rows), K]`` factors (0 or 1/(1-p)) of slot ``slot``'s rows; None when its p is 0."""
        p = self.ps[slot]
        if p <= 0:
            return None
        return rows_keep(self.seed, rows, K, threshold(p)).to(dtype) * keep_scale(p)

    def full_mask(self, ids: torch.Tensor, K: int) -> torch.Tensor:
        """The ``[T, K]`` factors (fp64) for every token (ids per token; -1 and p = 0 rows all ones): the
        reference's, and the torch.compile path's."""
        ids = ids.reshape(-1).to(torch.int64)
        S = len(self.ps)
        ok = (ids >= 0) & (ids < S)
        slot = torch.where(ok, ids, 0).to(self.thr.device)
        thr = torch.where(ok.to(self.thr.device), self.thr[slot], 0)
        exact = torch.tensor([keep_scale(p) for p in self.ps], dtype=torch.float64, device=self.thr.device)
        scale = torch.where(ok.to(self.thr.device), exact[slot], 1.0)
        rows = torch.arange(ids.numel(), device=self.thr.device)
        return rows_keep(self.seed, rows, K, thr).to(torch.float64) * scale[:, None]


def _triton_ok(device: torch.device) -> bool:
    """Whether the one-pass Triton version of ``keep_mask`` can run on this CUDA device."""
    from .. import dispatch

    return dispatch.triton_unavailable_reason(device) is None


def dropout_mask(seed: Seed, shape, p: float, device) -> torch.Tensor:
    """The multiplicative mask (0 or keep_scale, fp32) that the torch backend applies for ``seed``."""
    return keep_mask(seed, shape, p, device).to(torch.float32) * keep_scale(p)
