"""``multi_lora_linear``: one frozen linear, many LoRA adapters, one adapter per token, with autograd.

    y_t = x_t·Wᵀ + b + s_a · B_a[:, :r_a]·(A_a[:r_a]·x_t),   a = adapter_ids[t]   (a = -1: base only)

The slot stacks are ``lora_A [S, R, K]`` and ``lora_B [S, N, R]``; slot ``a`` uses its true rank
``r_a = ranks[a] ≤ R`` and scale ``s_a = scalings[a]``. Columns past a slot's rank are never read
and get zero gradient.

Tokens are grouped by adapter once per batch (:class:`AdapterMapping`: a stable sort, segment starts,
active slots) and the grouping is reused by every layer of a forward pass and by backward.

Saved-tensor policy (the one place it is written down): ``x`` as given, ``S`` = the shrink output
(``[T_active, R]``, rows in adapter-sorted order, tokens with id -1 excluded), the frozen ``weight``
and the slot stacks (parameters), copies of ``scalings``/``ranks`` (S numbers each) and the mapping.
Per-adapter dropout (``dropout_p``, training): only the seed and each slot's p are kept; every backend
regenerates the mask in backward (``ops._torch_dropout.rows_keep``: a keyed hash of (token, column), each
token compared with its slot's threshold). Under ``torch.compile`` the op is a custom op (``ops/_compiled.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .. import _ext, dispatch, quant
from ..reference import expand_adapter_ids
from . import _amp, _torch_dropout
from ._autograd import own_shape, torch_backend_double_backward, unviewed
from .lora import check_base, check_dtypes_devices, finish_lora_backward, save_for_lora_backward, saved_lora_tensors

PATHS = ("auto", "bgmv", "sgmv")
# "auto" picks the per-token (BGMV) kernels when segments average fewer tokens than this
# (an SGMV tile would be mostly padding), the per-segment (SGMV) kernels otherwise.
BGMV_MAX_MEAN_TOKENS = 4


# --------------------------------------------------------------------------------------------
# the token → adapter grouping, built once per batch
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AdapterMapping:
    """Tokens grouped by adapter. Built by :func:`build_mapping`; reuse it across layers.

    Device tensors (what kernels read): ``perm`` int32 ``[T_active]`` token indices sorted by adapter
    (stable, id -1 excluded), ``pos_slots`` int32 ``[T_active]`` the adapter of each sorted position,
    ``seg_slots`` int32 ``[G]`` the active adapters, ``seg_starts`` int32 ``[G+1]`` segment offsets
    into ``perm``. Host copies (what launchers and the CPU path read): ``slots``, ``starts``.

    Immutable: the kernels index memory with these values, so the mapping keeps its own tensors and the
    ``perm``/``pos_slots``/``seg_slots``/``seg_starts`` properties return copies (changing one changes
    nothing). Constructed directly (not by :func:`build_mapping`), every value is checked first.
    """

    num_tokens: int
    num_slots: int
    _perm: torch.Tensor
    _pos_slots: torch.Tensor
    _seg_slots: torch.Tensor
    _seg_starts: torch.Tensor
    slots: Tuple[int, ...]
    starts: Tuple[int, ...]
    checked: bool
    _trusted: bool = field(default=False, repr=False)
    _blocks: dict = field(default_factory=dict, repr=False)  # block_m -> row_blocks(block_m)

    def __post_init__(self):
        if not self._trusted:
            _check_mapping(self)

    perm = property(lambda self: self._perm.clone(), doc="int32 [T_active] (a copy)")
    pos_slots = property(lambda self: self._pos_slots.clone(), doc="int32 [T_active] (a copy)")
    seg_slots = property(lambda self: self._seg_slots.clone(), doc="int32 [G] (a copy)")
    seg_starts = property(lambda self: self._seg_starts.clone(), doc="int32 [G+1] (a copy)")

    @property
    def num_segments(self) -> int:
        return len(self.slots)

    @property
    def num_active(self) -> int:
        return self.starts[-1]

    @property
    def max_count(self) -> int:
        return max((e - s for s, e in zip(self.starts, self.starts[1:])), default=0)

    @property
    def device(self) -> torch.device:
        return self._perm.device

    def num_row_blocks(self, block_m: int) -> int:
        """Σ over segments of ⌈count / block_m⌉: the programs of a flattened SGMV grid (host ints only)."""
        return sum(-(-(e - s) // block_m) for s, e in zip(self.starts, self.starts[1:]))

    def row_blocks(self, block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The flattened SGMV grid for row blocks of ``block_m`` rows, as Punica and vLLM lay it out: one
        entry per (segment, row block) that holds rows, ``(block_seg, block_row0)`` int32 ``[NB]`` (the
        segment, and the block's first sorted position), NB = :meth:`num_row_blocks`. A skewed batch then
        launches Σ⌈count/block_m⌉ programs instead of segments × ⌈max_count/block_m⌉. Built on the
        device from ``seg_starts`` (no host sync, no host→device copy), cached per ``block_m`` except
        while a CUDA graph is being captured (its tensors would live in the graph's pool)."""
        hit = self._blocks.get(block_m)
        if hit is not None:
            return hit
        dev = self._perm.device
        NB = self.num_row_blocks(block_m)
        starts = self._seg_starts.to(torch.int64)
        nbs = (starts[1:] - starts[:-1] + (block_m - 1)) // block_m
        ends = torch.cumsum(nbs, 0)  # blocks of segments 0..g
        b = torch.arange(NB, device=dev)
        seg = torch.searchsorted(ends, b, right=True)  # the segment whose blocks include b (G > 0 when NB > 0)
        row0 = starts[seg] + (b - (ends - nbs)[seg]) * block_m
        out = (seg.to(torch.int32), row0.to(torch.int32))
        if not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self._blocks[block_m] = out
        return out

    def counts(self) -> dict:
        """{slot: number of tokens} for the active slots."""
        return {a: e - s for a, s, e in zip(self.slots, self.starts, self.starts[1:])}

    def __repr__(self) -> str:
        return (f"AdapterMapping(tokens={self.num_tokens}, active={self.num_active}, slots={self.num_slots}, "
                f"counts={self.counts()})")


def _check_mapping(m: AdapterMapping) -> None:
    """Every value of a mapping not built by build_mapping (kernels index memory with them): ValueError/TypeError."""
    def bad(msg):
        raise ValueError(f"AdapterMapping: {msg}")
    for name in ("num_tokens", "num_slots"):
        v = getattr(m, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "num_slots" else 0):
            bad(f"{name} must be a {'positive' if name == 'num_slots' else 'non-negative'} int, got {v!r}")
    ts = {"perm": m._perm, "pos_slots": m._pos_slots, "seg_slots": m._seg_slots, "seg_starts": m._seg_starts}
    for name, t in ts.items():
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1:
            raise TypeError(f"AdapterMapping: {name} must be a 1-D int32 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != m._perm.device:
            bad(f"{name} is on {t.device} but perm is on {m._perm.device}")
    if not isinstance(m.checked, bool):
        raise TypeError(f"AdapterMapping: checked must be a bool, got {m.checked!r}")
    slots, starts = m.slots, m.starts
    if (not isinstance(slots, tuple) or not isinstance(starts, tuple) or len(starts) != len(slots) + 1
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in slots + starts)):
        bad("slots and starts must be tuples of ints with len(starts) == len(slots) + 1")
    if any(not 0 <= a < m.num_slots for a in slots) or any(a >= b for a, b in zip(slots, slots[1:])):
        bad(f"slots must be increasing slot indices in [0, {m.num_slots}), got {slots}")
    if starts[0] != 0 or any(a > b for a, b in zip(starts, starts[1:])):
        bad(f"starts must be non-decreasing from 0, got {starts}")
    if m._seg_slots.tolist() != list(slots) or m._seg_starts.tolist() != list(starts):
        bad("seg_slots/seg_starts must hold the same values as slots/starts")
    T_active = starts[-1]
    if m._perm.numel() != T_active or m._pos_slots.numel() != T_active or T_active > m.num_tokens:
        bad(f"perm and pos_slots must have starts[-1] = {T_active} entries (≤ num_tokens = {m.num_tokens}), got "
            f"{m._perm.numel()} and {m._pos_slots.numel()}")
    perm = m._perm.tolist()
    if any(not 0 <= v < m.num_tokens for v in perm) or len(set(perm)) != len(perm):
        bad(f"perm must hold distinct token indices in [0, {m.num_tokens})")
    want = [a for a, s0, s1 in zip(slots, starts, starts[1:]) for _ in range(s1 - s0)]
    if m._pos_slots.tolist() != want:
        bad("pos_slots must give each sorted position its segment's slot")


def build_mapping(adapter_ids: torch.Tensor, num_tokens: int, num_slots: int, *, device=None,
                  check_ids: bool = True) -> AdapterMapping:
    """Group ``num_tokens`` tokens by adapter: one stable sort and exactly one small device→host copy
    (the per-slot counts), so building it once per batch is the batch's only host sync.

    ``adapter_ids``: int32/int64, one id per token, each in ``[-1, num_slots)`` (-1 = no adapter).
    ``check_ids=True`` raises ValueError for any id outside that range. With ``check_ids=False`` no
    error is raised and such ids are treated as -1 (never read out of bounds); use it only on a hot
    path whose ids are known to be valid.
    """
    return _build_mapping(adapter_ids, num_tokens, num_slots, device, check_ids)[0]


def _bad_ids_error(bad, num_slots: int) -> ValueError:
    return ValueError(f"adapter_ids must be in [-1, {num_slots}) (-1 = no adapter, {num_slots} slots); "
                      f"got {bad[:8]}{' ...' if len(bad) > 8 else ''}")


def _to_device(values, dev: torch.device) -> torch.Tensor:
    """A small int32 host list on ``dev`` without a sync: a pinned staging copy, enqueued asynchronously."""
    t = torch.tensor(values, dtype=torch.int32)
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def _build_mapping(adapter_ids, num_tokens: int, num_slots: int, device, check_ids: bool,
                   ranks: Optional[torch.Tensor] = None):
    """:func:`build_mapping`, plus (when ``ranks`` is given) a host copy of ``ranks`` fetched in the same
    device→host copy as the counts: (mapping, ranks as a tuple or None)."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor of int32/int64, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    if adapter_ids.numel() != num_tokens:
        raise ValueError(f"adapter_ids must hold one id per token ({num_tokens}), got {adapter_ids.numel()}")
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
    dev = torch.device(device) if device is not None else adapter_ids.device
    ids = adapter_ids.reshape(-1)
    if dev.type == "cpu" and ids.device.type == "cpu" and _ext.available():
        # one C++ counting sort: no thread-pool wake-ups, no Python loop over tokens
        perm, pos_slots, seg_slots, seg_starts, bad = _ext.ops().group_by_adapter(ids, num_slots)
        if check_ids and bad.numel():
            raise _bad_ids_error(bad.tolist(), num_slots)
        m = AdapterMapping(num_tokens, num_slots, perm, pos_slots, seg_slots, seg_starts,
                           tuple(seg_slots.tolist()), tuple(seg_starts.tolist()), check_ids, _trusted=True)
        return m, (tuple(ranks.tolist()) if ranks is not None else None)
    # On the device: ids outside [0, S) sort first as -1; bucket counts by index_add (no sync), then ONE
    # host copy of [count(-1), count(slot 0..S-1), count(bad ids), ranks...].
    ids = ids.to(device=dev, dtype=torch.int64)
    valid = (ids >= 0) & (ids < num_slots)
    key = torch.where(valid, ids, -1)
    sorted_key, order = torch.sort(key, stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=dev).index_add_(0, key + 1, torch.ones_like(key))
    parts = [counts, (~valid & (ids != -1)).sum().reshape(1)]
    if ranks is not None:
        parts.append(ranks.to(device=dev, dtype=torch.int64).reshape(-1))
    host = torch.cat(parts).tolist()  # the one sync
    n_none, per_slot, n_bad = host[0], host[1:num_slots + 1], host[num_slots + 1]
    if check_ids and n_bad:
        raise _bad_ids_error(sorted(set(ids[~valid & (ids != -1)].tolist())), num_slots)
    slots, starts = [], [0]
    for a, c in enumerate(per_slot):
        if c:
            slots.append(a)
            starts.append(starts[-1] + c)
    perm = order[n_none:n_none + starts[-1]].to(torch.int32)
    pos_slots = sorted_key[n_none:n_none + starts[-1]].to(torch.int32)
    m = AdapterMapping(num_tokens, num_slots, perm, pos_slots, _to_device(slots, dev), _to_device(starts, dev),
                       tuple(slots), tuple(starts), check_ids, _trusted=True)
    return m, (tuple(host[num_slots + 2:]) if ranks is not None else None)


def choose_path(mapping: AdapterMapping, path: str = "auto") -> str:
    """``"bgmv"`` (per token) or ``"sgmv"`` (per segment) for this batch."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    G = mapping.num_segments
    return "bgmv" if G and mapping.num_active < BGMV_MAX_MEAN_TOKENS * G else "sgmv"


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _as_float_vector(v, name: str, S: int, device, dtype=torch.float32) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        if isinstance(v, (list, tuple)) and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
            v = torch.tensor(v, dtype=torch.float64)
        else:
            raise TypeError(f"{name} must be a float tensor of shape [{S}] (or a list of floats), got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if tuple(v.shape) != (S,):
        raise ValueError(f"{name} must have shape [{S}] (one per slot of lora_A), got {tuple(v.shape)}")
    return v.to(device=device, dtype=dtype)


class NoBase:
    """The frozen base of a call whose base output was computed outside it (``multi_lora_delta``). Stands for a
    weight of shape [N, K] in x's dtype and device. ``y0``: the base output [T, N] (unit column stride, owned by the
    call: the update is added into it in place), or None for zeros; ``weight``: the frozen [N, K] block whose dY·W
    backward adds to dX, or None (no base term)."""
    __slots__ = ("shape", "dtype", "device", "y0", "weight")

    def __init__(self, N: int, K: int, dtype: torch.dtype, device: torch.device, y0=None, weight=None):
        self.shape, self.dtype, self.device = (int(N), int(K)), dtype, device
        self.y0, self.weight = y0, weight


def validate(x, weight, bias, lora_A, lora_B, scalings, ranks):
    """Raise ValueError/TypeError naming the bad argument; return (scalings fp32, ranks int32) on x's device.
    ``weight``: the frozen [N, K] tensor, or a quantized base (``quant.QuantBase``, x in its compute dtype)."""
    quantized = isinstance(weight, quant.QuantBase)
    if quantized:
        from .qlora import check_quant_base

        N, K = check_quant_base(x, weight, bias, lora_A, lora_B)
    elif isinstance(weight, NoBase):
        for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        N, K = weight.shape
        if bias is not None or x.dim() < 1 or x.shape[-1] != K:
            raise ValueError(f"a LoRA-only call takes no bias and x [..., {K}], got x {tuple(x.shape)}")
    else:
        N, K = check_base(x, weight, bias, lora_A, lora_B)
    if lora_A.dim() != 3 or lora_A.shape[2] != K or lora_A.shape[0] < 1 or lora_A.shape[1] < 1:
        raise ValueError(f"lora_A must have shape [slots, max_rank, in_features={K}] with slots, max_rank ≥ 1, "
                         f"got {tuple(lora_A.shape)}")
    S, R = lora_A.shape[:2]
    if tuple(lora_B.shape) != (S, N, R):
        raise ValueError(f"lora_B must have shape [slots={S}, out_features={N}, max_rank={R}] (from lora_A and "
                         f"weight), got {tuple(lora_B.shape)}")
    if quantized:
        if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"lora_A/lora_B must both be x's dtype ({x.dtype}) or float32, got {lora_A.dtype} and "
                            f"{lora_B.dtype}")
    else:
        check_dtypes_devices(x, weight, bias, lora_A, lora_B)
    dev = x.device
    # fp64 scalings for fp64 inputs (the torch backend's float64 stays float64 end to end)
    scal = _as_float_vector(scalings, "scalings", S, dev, torch.float64 if x.dtype == torch.float64 else torch.float32)
    if ranks is None:
        rk = torch.full((S,), R, dtype=torch.int32, device=dev)
    else:
        if not isinstance(ranks, torch.Tensor):
            if isinstance(ranks, (list, tuple)) and all(isinstance(e, int) and not isinstance(e, bool) for e in ranks):
                ranks = torch.tensor(ranks, dtype=torch.int32)
            else:
                raise TypeError(f"ranks must be an int tensor of shape [{S}] (or a list of ints), got {type(ranks).__name__}")
        if ranks.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"ranks must be an integer tensor, got {ranks.dtype}")
        if tuple(ranks.shape) != (S,):
            raise ValueError(f"ranks must have shape [{S}] (one per slot), got {tuple(ranks.shape)}")
        rk = ranks.to(device=dev, dtype=torch.int32)
    return scal, rk


def _check_ranks(ranks_h, R: int) -> None:
    lo, hi = min(ranks_h), max(ranks_h)
    if lo < 0 or hi > R:
        raise ValueError(f"ranks must be in [0, max_rank={R}] (max_rank = lora_A.shape[1]), got min {lo}, max {hi}")


# --------------------------------------------------------------------------------------------
# torch backend (any device; the CPU hot path): one pair of small GEMMs per segment, never per token
# --------------------------------------------------------------------------------------------
def _base_out(x, weight, bias):
    """The frozen base's output x·Wᵀ + b: W a float tensor (one GEMM), or a quantized base (``quant.QuantBase``:
    dequantized in row chunks, ``quant.base_linear``)."""
    if isinstance(weight, torch.Tensor):
        return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    if isinstance(weight, NoBase):
        return x.new_zeros((x.shape[0], weight.shape[0])) if weight.y0 is None else weight.y0  # [T, N]
    return quant.base_linear(x, weight, bias)


def _base_dx(dy, weight):
    """The base's part of dX, dY·W (as ``_base_out``)."""
    if isinstance(weight, NoBase):
        if weight.weight is not None:
            return torch.mm(dy, weight.weight)
        return dy.new_zeros((dy.shape[0], weight.shape[1]))
    return torch.mm(dy, weight) if isinstance(weight, torch.Tensor) else quant.base_grad_input(dy, weight)


def _segments(m: AdapterMapping, ranks_h: Sequence[int], R: int):
    """(slot, start, end, rank) of every segment whose slot has rank > 0; ranks clamped to [0, R] as the
    kernels clamp them."""
    for a, s, e in zip(m.slots, m.starts, m.starts[1:]):
        r = min(max(ranks_h[a], 0), R)
        if r > 0:
            yield a, s, e, r


def _use_ext(x: torch.Tensor) -> bool:
    """The C++ CPU kernels (csrc/cpu/multi_lora.cpp: segments on at::parallel_for's threads) run
    for CPU tensors when the extension is built; elsewhere the same grouping runs as torch ops."""
    return x.device.type == "cpu" and _ext.available()


def _drop_rows(xs, perm, a: int, drop, K: int):
    """The segment's rows ``xs`` with slot ``a``'s dropout applied (``drop``: SlotDropout or None)."""
    f = None if drop is None else drop.rows_factor(perm, a, K, xs.dtype)
    return xs if f is None else xs * f


def _torch_forward(x, weight, bias, A, B, m: AdapterMapping, scal, ranks, scal_h, ranks_h, ext: bool, drop=None):
    """y [T, N] in x.dtype and S [T_active, R] in the adapter dtype (sorted rows, unscaled; with dropout,
    S = drop(x)·Aᵀ)."""
    cdt = A.dtype
    R = A.shape[1]
    y = _base_out(x, weight, bias)
    if m.num_active == 0:
        return y, x.new_empty((0, R), dtype=cdt)
    if ext:  # (y may be row-strided: a sibling group's column block)
        return y, _ext.ops().multi_lora_fwd(y, x, A, B, m._perm, m._seg_slots, m._seg_starts, ranks, scal, None)
    perm = m._perm.long()
    xs = x.index_select(0, perm)
    if xs.dtype != cdt:
        xs = xs.to(cdt)
    S = xs.new_zeros((m.num_active, R))
    Z = xs.new_empty((m.num_active, weight.shape[0]))
    K = x.shape[1]
    for a, s, e, r in _segments(m, ranks_h, A.shape[1]):
        xa = _drop_rows(xs[s:e], perm[s:e], a, drop, K)
        if r == R:
            torch.mm(xa, A[a].t(), out=S[s:e])
        else:
            S[s:e, :r] = torch.mm(xa, A[a, :r].t())
        torch.addmm(Z[s:e], S[s:e, :r], B[a, :, :r].t(), beta=0, alpha=scal_h[a], out=Z[s:e])
    for a, s, e in zip(m.slots, m.starts, m.starts[1:]):  # rank-0 (cleared) slots add exactly nothing
        if ranks_h[a] <= 0:
            Z[s:e].zero_()
    y.index_add_(0, perm, Z if Z.dtype == y.dtype else Z.to(y.dtype))
    return y, S


def _torch_backward(dy, x, weight, A, B, S, m: AdapterMapping, scal, ranks, scal_h, ranks_h, ext: bool,
                    need_dx, need_da, need_db, drop=None):
    cdt = A.dtype
    dx = _base_dx(dy, weight) if need_dx else None
    if ext and m.num_active and (need_dx or need_da or need_db):
        dA, dB = _ext.ops().multi_lora_bwd(dy, x, S, A, B, m._perm, m._seg_slots, m._seg_starts, ranks, scal,
                                           dx, need_da, need_db, None)
        return dx, (dA if need_da else None), (dB if need_db else None)
    dA = torch.zeros_like(A) if need_da else None
    dB = torch.zeros_like(B) if need_db else None
    if m.num_active == 0 or not (need_dx or need_da or need_db):
        return dx, dA, dB
    perm = m._perm.long()
    dys = dy.index_select(0, perm)
    if dys.dtype != cdt:
        dys = dys.to(cdt)
    xs = None
    if need_da:
        xs = x.index_select(0, perm)
        xs = xs.to(cdt) if xs.dtype != cdt else xs
    K = A.shape[2]
    dXs = dys.new_zeros((m.num_active, K)) if need_dx else None
    for a, s, e, r in _segments(m, ranks_h, A.shape[1]):
        sc = scal_h[a]
        f = None if drop is None else drop.rows_factor(perm[s:e], a, K, dys.dtype)  # forward's mask, regenerated
        dS = torch.mm(dys[s:e], B[a, :, :r]).mul_(sc)  # [n, r]
        if need_db:
            dB[a, :, :r].addmm_(dys[s:e].t(), S[s:e, :r], beta=0, alpha=sc)
        if need_da:
            torch.mm(dS.t(), xs[s:e] if f is None else xs[s:e] * f, out=dA[a, :r])
        if need_dx:
            torch.mm(dS, A[a, :r], out=dXs[s:e])
            if f is not None:
                dXs[s:e].mul_(f)
    if need_dx:
        dx.index_add_(0, perm, dXs if dXs.dtype == dx.dtype else dXs.to(dx.dtype))
    return dx, dA, dB


def _triton_forward(x, weight, bias, A, B, m, scal, ranks, path, drop=None):
    from ..kernels import multi_lora as K

    y = _base_out(x, weight, bias)
    return K.multi_lora_forward(y, x, A, B, m, scal, ranks, path, drop)


def _triton_backward(dy, x, weight, A, B, S, m, scal, ranks, path, need_dx, need_da, need_db, drop=None):
    from ..kernels import multi_lora as K

    dx = _base_dx(dy, weight) if need_dx else None
    dA, dB = K.multi_lora_backward(dy, x, dx, A, B, S, m, scal, ranks, path, need_da, need_db, drop)
    return dx, dA, dB


def _active_factor(drop, m: AdapterMapping, K: int) -> torch.Tensor:
    """The dropout factors (0 or 1/(1-p) of each row's adapter) of the active rows, in sorted order [T_active, K]."""
    pos = m._pos_slots.long()
    keep = _torch_dropout.rows_keep(drop.seed, m._perm, K, drop.thr[pos])
    return keep.to(torch.float32) * drop.scale[pos][:, None]


def _dropped_input(x, drop, m: AdapterMapping):
    """x with each active row's dropout applied (a temporary: the gather kernels read rows through perm; rows
    not in perm are never read)."""
    perm = m._perm.long()
    xd = torch.empty_like(x)
    xd.index_copy_(0, perm, (x.index_select(0, perm) * _active_factor(drop, m, x.shape[1])).to(x.dtype))
    return xd


def _gather_forward(x, weight, bias, A, B, m, scal, ranks, path, drop=None):
    """The "cuda" backend: base GEMM, then the compiled gather ops (``torch.ops.peft_kernels.{b,s}gmv_*``,
    csrc/cuda on CUDA tensors; their csrc/cpu twins run the same code path on CPU tensors in the tests)."""
    ops = _ext.ops()
    y = _base_out(x, weight, bias)
    if m.num_active == 0:
        return y, x.new_zeros((0, A.shape[1]), dtype=torch.float32)
    S = _gather_shrink(ops, path, x if drop is None else _dropped_input(x, drop, m), A, m, ranks, None)
    _gather_expand(ops, path, y, S, B, m, ranks, scal)
    return y, S


def _gather_shrink(ops, path, inp, w, m, ranks, scal):
    if path == "sgmv":
        return ops.sgmv_shrink(inp, w, m._perm, m._seg_slots, m._seg_starts, ranks, scal, m.max_count)
    return ops.bgmv_shrink(inp, w, m._perm, m._pos_slots, ranks, scal)


def _gather_expand(ops, path, out, buf, w, m, ranks, scal):
    if path == "sgmv":
        ops.sgmv_expand(out, buf, w, m._perm, m._seg_slots, m._seg_starts, ranks, scal, m.max_count)
    else:
        ops.bgmv_expand(out, buf, w, m._perm, m._pos_slots, ranks, scal)


def _gather_backward(dy, x, weight, A, B, S, m, scal, ranks, path, need_dx, need_da, need_db, drop=None):
    """dS = s·dY·B and dX += dS·A with the gather kernels (B and A read transposed through strides, no
    copy); dA = dSᵀ·x and dB = s·dYᵀ·S as one GEMM pair per segment (deterministic). No host copies of
    ranks or scalings: S and dS are zero past each slot's rank (the shrinks write only r < rank), so the
    full-width products are zero there, and the scale is a device scalar."""
    ops = _ext.ops()
    dx = _base_dx(dy, weight) if need_dx else None
    dA = torch.zeros_like(A) if need_da else None
    dB = torch.zeros_like(B) if need_db else None
    if m.num_active == 0 or not (need_dx or need_da or need_db):
        return dx, dA, dB
    dS = None
    fac = None if drop is None or not (need_dx or need_da) else _active_factor(drop, m, x.shape[1])
    perm = m._perm.long()
    if need_dx or need_da:
        dS = _gather_shrink(ops, path, dy, B.transpose(1, 2), m, ranks, scal)  # [T_active, R] fp32, scaled
        if need_dx and fac is None:
            _gather_expand(ops, path, dx, dS, A.transpose(1, 2), m, ranks, None)
        elif need_dx:  # dX through forward's mask (regenerated): expand into a temporary, mask, add
            dxl = torch.zeros_like(dx)
            _gather_expand(ops, path, dxl, dS, A.transpose(1, 2), m, ranks, None)
            dx.index_add_(0, perm, (dxl.index_select(0, perm) * fac).to(dx.dtype))
    if need_da or need_db:
        for a, s, e in zip(m.slots, m.starts, m.starts[1:]):  # the mapping's host segments (built per batch)
            rows = perm[s:e]
            if need_da:
                xr = x.index_select(0, rows).float()
                dA[a] = torch.mm(dS[s:e].t(), xr if fac is None else xr * fac[s:e]).to(A.dtype)
            if need_db:
                dB[a] = torch.mm(dy.index_select(0, rows).float().t(), S[s:e]).mul_(scal[a]).to(B.dtype)
    return dx, dA, dB


def _compiled_call(x, weight, bias, A, B, scal, ranks, ids, ps, backend: str, path: str):
    """Under torch.compile: the grouped path as one custom op (``ops/_compiled.py``; it groups the tokens inside,
    so the graph has no data-dependent shape and no graph break). "auto" takes the first backend that can run
    (no measured choice while tracing: the torch backend on the CPU, Triton on a GPU)."""
    from ._compiled import multi_lora_fwd

    if isinstance(weight, NoBase):
        raise TypeError("multi_lora_delta is not supported under torch.compile (sibling groups run their members "
                        "alone there); run it eagerly")
    name = dispatch.resolve(backend, x.device, _op_reason(x, A), SUPPORTED)  # (no measured choice while tracing)
    seed = _torch_dropout.draw_seed(x.device) if ps else torch.zeros(1, dtype=torch.int64, device=x.device)
    x2d = x.reshape(-1, x.shape[-1])
    ids = ids.reshape(-1).to(torch.int64)
    base = None
    if isinstance(weight, quant.QuantBase):  # the quantized base traced (its own autograd), the update the op's
        from .qlora import qbase_linear

        base, weight, bias = qbase_linear(x2d, weight, bias), None, None
    y, _ = multi_lora_fwd(x2d, weight, bias, A, B, scal, ranks, ids, list(ps or ()), seed, name, path)
    y = y if base is None else base + y
    return y.view(*x.shape[:-1], B.shape[1])


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
class MultiLoRACall(NamedTuple):
    """Non-differentiable arguments of one multi_lora_linear call."""

    mapping: AdapterMapping
    scalings: torch.Tensor  # fp32 [S] on x's device (a private copy when a backward may follow)
    ranks: torch.Tensor     # int32 [S] on x's device (idem)
    scal_h: Tuple[float, ...]
    ranks_h: Tuple[int, ...]
    backend: str
    path: str               # "bgmv" | "sgmv" (triton, cuda) or "grouped" (torch)
    ext: bool = False       # torch backend: the C++ CPU kernels run it (decided once, for forward and backward)
    drop: Optional[_torch_dropout.SlotDropout] = None  # per-adapter dropout (training), or None


def _forward_2d(x2d, weight, bias, lora_A, lora_B, call: MultiLoRACall):
    if call.backend == "torch":
        return _torch_forward(x2d, weight, bias, lora_A, lora_B, call.mapping, call.scalings, call.ranks,
                              call.scal_h, call.ranks_h, call.ext, call.drop)
    if call.backend == "cuda":
        return _gather_forward(x2d, weight, bias, lora_A, lora_B, call.mapping, call.scalings, call.ranks, call.path,
                               call.drop)
    return _triton_forward(x2d, weight, bias, lora_A, lora_B, call.mapping, call.scalings, call.ranks, call.path,
                           call.drop)


class MultiLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, call: MultiLoRACall):
        K = x.shape[-1]
        x2d = x.reshape(-1, K)
        y, S = _forward_2d(x2d, weight, bias, lora_A, lora_B, call)
        ctx.qbase = None if isinstance(weight, torch.Tensor) else weight  # a quantized base: read again in backward
        saved = x.new_empty((weight.shape[0], 0)) if ctx.qbase is not None else weight
        return save_for_lora_backward(ctx, x, x2d, S, saved, bias, lora_A, lora_B, call, y)

    @staticmethod
    @torch_backend_double_backward("multi_lora_linear", lambda ctx, dy: _differentiable_backward(ctx, dy))
    def backward(ctx, dy):
        x2d, S, weight, A, B = saved_lora_tensors(ctx)
        weight = weight if ctx.qbase is None else ctx.qbase
        call: MultiLoRACall = ctx.call
        need_x, _, _, need_a, need_bb, _ = ctx.needs_input_grad
        dy2d = dy.reshape(-1, weight.shape[0])
        if call.backend == "torch":
            dx, dA, dB = _torch_backward(dy2d, x2d, weight, A, B, S, call.mapping, call.scalings, call.ranks,
                                         call.scal_h, call.ranks_h, call.ext, need_x, need_a, need_bb, call.drop)
        elif call.backend == "cuda":
            dx, dA, dB = _gather_backward(dy2d, x2d, weight, A, B, S, call.mapping, call.scalings, call.ranks,
                                          call.path, need_x, need_a, need_bb, call.drop)
        else:
            dx, dA, dB = _triton_backward(dy2d, x2d, weight, A, B, S, call.mapping, call.scalings, call.ranks,
                                          call.path, need_x, need_a, need_bb, call.drop)
        return finish_lora_backward(ctx, dy2d, x2d, dx, dA, dB)


def _differentiable_backward(ctx, dy):
    """The torch backend's backward as differentiable torch ops (create_graph=True): per segment, the same
    GEMMs as ``_torch_backward`` with S recomputed from x and A, so gradients of the gradients are exact."""
    x, _, weight, A, B = ctx.saved_tensors
    weight = weight if ctx.qbase is None else ctx.qbase
    call: MultiLoRACall = ctx.call
    m = call.mapping
    need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
    x2d = x.reshape(-1, x.shape[-1])
    dy2d = dy.reshape(-1, weight.shape[0])
    cdt, R = A.dtype, A.shape[1]
    dA = A.new_zeros(A.shape) if need_a else None
    dB = B.new_zeros(B.shape) if need_bb else None
    dxl = x2d.new_zeros(x2d.shape, dtype=cdt) if need_x else None
    if m.num_active:
        # host copies (the C++ path runs without them; one small sync on this rare path)
        scal_h = call.scal_h or tuple(call.scalings.tolist())
        ranks_h = call.ranks_h or tuple(call.ranks.tolist())
        perm = m._perm.long()
        xs, dys = x2d.index_select(0, perm).to(cdt), dy2d.index_select(0, perm).to(cdt)
        for a, s, e, r in _segments(m, ranks_h, R):
            sc = scal_h[a]
            f = None if call.drop is None else call.drop.rows_factor(perm[s:e], a, x2d.shape[1], cdt)
            xd = xs[s:e] if f is None else xs[s:e] * f
            Sg = xd @ A[a, :r].t()
            dSg = (dys[s:e] @ B[a, :, :r]) * sc
            if need_a:
                dA[a, :r] = dSg.t() @ xd
            if need_bb:
                dB[a, :, :r] = (dys[s:e].t() @ Sg) * sc
            if need_x:
                dxa = dSg @ A[a, :r]
                dxl = dxl.index_add(0, perm[s:e], dxa if f is None else dxa * f)
    dx = (_base_dx(dy2d, weight) + dxl.to(x.dtype)).view(ctx.x_shape) if need_x else None
    dW = dy2d.t() @ x2d if need_w else None
    db = dy2d.sum(0) if need_b and ctx.has_bias else None
    return dx, dW, db, dA, dB, None


SUPPORTED = ("torch", "triton", "cuda")


def _dropout_ps(dropout_p, S: int):
    """Each slot's dropout p (a tuple of S floats in [0, 1)), or None when none is > 0."""
    if dropout_p is None:
        return None
    if isinstance(dropout_p, torch.Tensor):
        dropout_p = dropout_p.tolist()
    if isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool):
        ps = (float(dropout_p),) * S
    elif isinstance(dropout_p, (list, tuple)):
        ps = tuple(dropout_p)
        if len(ps) != S:
            raise ValueError(f"dropout_p must be one float or one per slot ({S}), got {len(ps)} values")
    else:
        raise TypeError(f"dropout_p must be a float, a list of {S} floats, or None, got {type(dropout_p).__name__}")
    for p in ps:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_p values must be floats in [0, 1), got {p!r}")
    return tuple(float(p) for p in ps) if any(p > 0 for p in ps) else None


def _op_reason(x: torch.Tensor, lora_A: torch.Tensor):
    def reason(name: str):
        if name in ("triton", "cuda") and x.dtype == torch.float64:
            return f"the {name.capitalize()} kernels take float32/float16/bfloat16, got {x.dtype}"
        if name == "cuda" and lora_A.dtype != x.dtype:
            return f"the CUDA kernels need lora_A/lora_B in x's dtype ({x.dtype}), got {lora_A.dtype}"
        return None
    return reason


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scalings: Union[torch.Tensor, Sequence[float]],
    adapter_ids: Union[torch.Tensor, AdapterMapping],
    *,
    ranks: Optional[torch.Tensor] = None,
    backend: str = "auto",
    path: str = "auto",
    check_ids: bool = True,
    dropout_p: Union[None, float, Sequence[float]] = None,
    training: bool = False,
) -> torch.Tensor:
    """Frozen linear plus a per-token choice of LoRA adapter, fused, with autograd for x, lora_A, lora_B.

    Args:
        x: ``[..., K]``. weight ``[N, K]`` (frozen, x's dtype); bias ``[N]`` or None.
        lora_A: ``[S, R, K]``, lora_B: ``[S, N, R]``: the slot stacks (x's dtype or float32).
        scalings: ``[S]`` per-slot scale (``lora_alpha / r``). ranks: ``[S]`` true ranks ≤ R (None: R).
        adapter_ids: int32/int64 with one id in ``[-1, S)`` per token of x flattened to ``(T, K)``, or
            one per batch row when x is ``[B, L, K]``; -1 = base only (those rows equal the base output
            exactly). Or an :class:`AdapterMapping` built once with :func:`build_mapping` and reused.
        backend: "auto" | "torch" | "triton" | "cuda" (``PEFT_KERNELS_BACKEND`` overrides).
        path: Triton / CUDA kernel shape: "bgmv" (per token), "sgmv" (per segment) or "auto".
        dropout_p: dropout on each adapter's LoRA input: one p for every slot, or ``[S]`` (one per slot, PEFT's
            per-adapter ``lora_dropout``), each in [0, 1); applied only when ``training``. The mask is a keyed
            hash of (token, column) from a seed drawn per call and regenerated in backward, never stored
            (``ops._torch_dropout.rows_keep``; the same on every backend, bit for bit).
        check_ids: raise ValueError on ids outside [-1, S) and ranks outside [0, R] (default). False
            skips it on a hot path: bad ids then act as -1, never as an out-of-bounds read. The ranks are
            checked where that costs no extra host sync: on the CPU, on the torch backend, and in the one
            sync of a call that builds its own mapping; with a prebuilt mapping on CUDA they are not (the
            kernels clamp them to [0, R]; ``MultiLoRALinear`` checks its ranks when they are written).

    Host syncs: building the mapping is one device→host copy (per batch when the mapping is reused, see
    :func:`build_mapping` and ``adapter_ids``); with a prebuilt mapping the triton and cuda backends make
    none, so a decode step can be captured in a CUDA graph (README: "CUDA graphs"). The torch backend on
    a GPU copies the ranks and scalings to the host for its per-segment loops.
    """
    amp = _amp.autocast_dtype(x)
    if amp is not None:  # like F.linear under autocast: x, the base and the slot stacks in the autocast dtype
        with _amp.disabled(x):
            return multi_lora_linear(*_amp.cast(amp, x, weight, bias, lora_A, lora_B), scalings, adapter_ids,
                                     ranks=ranks, backend=backend, path=path, check_ids=check_ids,
                                     dropout_p=dropout_p, training=training)
    scal, rk = validate(x, weight, bias, lora_A, lora_B, scalings, ranks)
    S = lora_A.shape[0]
    T = math.prod(x.shape[:-1])
    ps = _dropout_ps(dropout_p, S)
    ps = ps if training else None
    if torch.compiler.is_compiling():
        if not isinstance(adapter_ids, torch.Tensor):
            raise TypeError("under torch.compile, adapter_ids must be an id tensor (an AdapterMapping holds host "
                            "copies that a graph cannot)")
        return _compiled_call(x, weight, bias, lora_A, lora_B, scal, rk, expand_adapter_ids(adapter_ids, x.shape),
                              ps, backend, path)
    name = dispatch.resolve(backend, x.device, _op_reason(x, lora_A), SUPPORTED, tune=None if isinstance(
        weight, (quant.QuantBase, NoBase)) else lambda: dispatch.op_tune(
        "multi_lora_linear", (x, weight, bias, lora_A, lora_B), (f"path={path}",),
        lambda t, be: multi_lora_linear(*t, scalings, adapter_ids, ranks=ranks, backend=be, path=path, check_ids=False),
        static=("cuda", "triton", "torch"), capture_ok=("cuda", "triton")))
    # Host copies of the ranks: the torch backend needs them (its segment loops; a sync on a GPU), and a
    # check_ids call that builds its own mapping gets them in that build's one sync. A call with a prebuilt
    # mapping on the triton/cuda backends copies nothing to the host, on any device: the kernels clamp
    # every rank to [0, R], and MultiLoRALinear validates its ranks when they are written.
    ranks_h = tuple(rk.tolist()) if name == "torch" else None
    if isinstance(adapter_ids, AdapterMapping):
        m = adapter_ids
        if m.num_tokens != T:
            raise ValueError(f"adapter_ids (an AdapterMapping) covers {m.num_tokens} tokens but x has {T}")
        if m.num_slots != S:
            raise ValueError(f"adapter_ids (an AdapterMapping) was built for {m.num_slots} slots but lora_A has {S}")
        if m.device != x.device:
            raise ValueError(f"adapter_ids (an AdapterMapping) is on {m.device} but x is on {x.device}")
    else:
        if not isinstance(adapter_ids, torch.Tensor):
            raise TypeError(f"adapter_ids must be an int tensor or an AdapterMapping, got {type(adapter_ids).__name__}")
        ids = expand_adapter_ids(adapter_ids, x.shape)
        fetch = check_ids and ranks is not None and ranks_h is None
        m, fetched = _build_mapping(ids, T, S, x.device, check_ids, rk if fetch else None)
        ranks_h = fetched if fetch else ranks_h
    if check_ids and ranks is not None and ranks_h is not None:
        _check_ranks(ranks_h, lora_A.shape[1])
    chosen = choose_path(m, path)  # validates `path` on every backend
    if name == "torch":
        chosen = "grouped"  # the torch backend always groups per segment
    grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in (x, weight, bias, lora_A, lora_B))
    if grad:
        # private copies, so a slot changed between forward and backward cannot skew the gradients
        rk = rk.clone() if ranks is not None and rk.data_ptr() == ranks.data_ptr() else rk
        scal = scal.clone() if isinstance(scalings, torch.Tensor) and scal.data_ptr() == scalings.data_ptr() else scal
    drop = None
    if ps is not None:
        drop = _torch_dropout.SlotDropout.make(ps, _torch_dropout.draw_seed(x.device), x.device)
    ext = name == "torch" and _use_ext(x) and drop is None  # (the C++ segment kernels have no dropout)
    scal_h = tuple(scal.tolist()) if name == "torch" and not ext else ()
    call = MultiLoRACall(m, scal, rk, scal_h, ranks_h or (), name, chosen, ext, drop)
    if not grad:  # inference (serving): no backward can follow, so skip the autograd.Function machinery
        y, _ = _forward_2d(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, call)
        return y.view(*x.shape[:-1], weight.shape[0])
    return own_shape(MultiLoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, call), x)


def multi_lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scalings: Union[torch.Tensor, Sequence[float]], adapter_ids: Union[torch.Tensor, AdapterMapping],
                     base_out: Optional[torch.Tensor] = None, base_weight: Optional[torch.Tensor] = None,
                     **kwargs) -> torch.Tensor:
    """The per-token LoRA update, ``s_a·(drop_a(x)·A_aᵀ)·B_aᵀ`` for each token's adapter a (0 for id -1), with
    autograd for x, lora_A and lora_B: ``multi_lora_linear`` with its base computed outside (sibling groups: their
    stacked base GEMM). ``base_out``: that base output ``[..., N]`` with unit column stride (its rows may be strided:
    a column block of a wider output), owned by the caller (the update is added into it in place and it is
    returned; without it the update alone); ``base_weight``: the frozen ``[N, K]``
    weight whose ``dY·W`` backward adds to dX (no gradient reaches ``base_out``'s graph: compute it without one).
    Keyword arguments as ``multi_lora_linear``'s. Eager only (not under torch.compile)."""
    amp = _amp.autocast_dtype(x)
    if amp is not None:
        with _amp.disabled(x):
            x, lora_A, lora_B, base_out, base_weight = _amp.cast(amp, x, lora_A, lora_B, base_out, base_weight)
            return multi_lora_delta(x, lora_A, lora_B, scalings, adapter_ids, base_out, base_weight, **kwargs)
    if not isinstance(x, torch.Tensor) or not isinstance(lora_B, torch.Tensor) or lora_B.dim() != 3:
        raise TypeError("x must be a torch.Tensor and lora_B a 3-D [slots, out_features, max_rank] tensor")
    N, K = lora_B.shape[1], x.shape[-1]
    rows = None
    if base_out is not None and tuple(base_out.shape) == (*x.shape[:-1], N) and base_out.stride(-1) == 1:
        try:  # its rows as one strided [T, N] (a column block of a wider output is; a transposed tensor is not)
            rows = base_out.view(-1, N)
        except RuntimeError:
            rows = None
    if rows is not None and rows.shape[0] > 1 and N > 1 and rows.stride(0) < N:
        rows = None  # rows that share memory (an expanded tensor): the update is added in place, row by row
    if base_out is not None and (rows is None or base_out.dtype != x.dtype or base_out.requires_grad):
        raise ValueError(f"base_out must be a {x.dtype} tensor of shape {(*x.shape[:-1], N)} with unit column stride "
                         f"and rows viewable as [T, N] that do not overlap, outside autograd, got {tuple(base_out.shape)} "
                         f"{base_out.dtype} strides {base_out.stride()}")
    if base_weight is not None and (tuple(base_weight.shape) != (N, K) or base_weight.dtype != x.dtype):
        raise ValueError(f"base_weight must be a {x.dtype} tensor of shape {(N, K)}, got {tuple(base_weight.shape)}")
    if base_weight is not None and base_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("base_weight requires grad, but multi_lora_delta computes no gradient for it (the frozen base "
                         "only adds dY·W to dX): use multi_lora_linear for an unfrozen base")
    y0 = None
    if rows is not None:  # [T, N] over base_out's memory, not a view of it: the op returns it, and autograd
        # forbids modifying in place a view that a custom Function returns
        y0 = unviewed(rows)
    return multi_lora_linear(x, NoBase(N, K, x.dtype, x.device, y0, base_weight), None, lora_A, lora_B,
                             scalings, adapter_ids, **kwargs)
