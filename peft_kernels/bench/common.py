"""Timing and memory measurement shared by the benchmarks.

Timing on this kind of noisy machine: every provider shares one weight tensor; each round runs
every provider once in a fresh random order; a provider's score is the median over rounds of its
time divided by the frozen nn.Linear's time in the same round. A second frozen nn.Linear (the
control) shows the noise floor. CPU uses torch.utils.benchmark, CUDA triton.testing.do_bench.
"""
from __future__ import annotations

import contextlib
import random
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves


def saved_activation_bytes(fn: Callable[[], torch.Tensor], params) -> int:
    """Bytes of tensors autograd saves for backward during ``fn()``: deduplicated by storage,
    parameters (and anything sharing their storage) excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


class _CpuTimer:
    """One torch.utils.benchmark.Timer per provider, timed one call at a time.

    ``Timer.timeit(n)`` runs two untimed warm-up calls before every measurement, which would
    triple the cost of an interleaved round; providers are warmed once up front instead, and each
    round times a single call with the Timer's own clock and thread setting.
    """

    def __init__(self, fn):
        from torch.utils import benchmark

        self.timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())

    def __call__(self) -> float:
        t = self.timer
        if hasattr(t, "_timeit"):
            return t._timeit(1)
        return t.timeit(1).median


class Call:
    """One timed call of a provider in one mode. ``prepare()`` runs untimed before each timed ``run()``
    (backward-only timing builds the graph there); ``reset()`` runs untimed after it."""

    def __init__(self, run, prepare=None, reset=None):
        self.run, self.prepare, self.reset = run, prepare, reset


def timed_call(fn: Callable[[], torch.Tensor], mode: str, x: torch.Tensor, dy: torch.Tensor, params,
               no_grad_fwd: bool = False) -> Call:
    """What one timed call does: ``"fwd"`` runs ``fn()`` (under no_grad if ``no_grad_fwd``);
    ``"full"`` runs ``fn().backward(dy)``; ``"bwd"`` runs the forward untimed and times
    ``out.backward(dy, retain_graph=True)``. Grads of ``x`` and ``params`` are cleared after each call."""
    params = [q for q in params if q.requires_grad]

    def clear():
        x.grad = None
        for q in params:
            q.grad = None

    if mode == "fwd":
        if no_grad_fwd:
            def fwd():
                with torch.no_grad():
                    return fn()
            return Call(fwd)
        return Call(fn)
    if mode == "full":
        return Call(lambda: fn().backward(dy), reset=clear)
    if mode == "bwd":
        state = {}

        def prepare():
            state["out"] = fn()

        return Call(lambda: state["out"].backward(dy, retain_graph=True), prepare=prepare, reset=clear)
    raise ValueError(f"mode must be fwd, bwd or full, got {mode!r}")


class _CudaTimer:
    """triton.testing.do_bench's p20/p50/p80 of one call (milliseconds -> seconds)."""

    def __init__(self, call: Call):
        self.call = call

    def __call__(self):
        import triton.testing

        if self.call.prepare:
            self.call.prepare()
        q = triton.testing.do_bench(self.call.run, warmup=10, rep=50, quantiles=[0.2, 0.5, 0.8])
        if self.call.reset:
            self.call.reset()
        return tuple(v / 1e3 for v in q)


@dataclass
class Result:
    name: str
    times: List[float] = field(default_factory=list)
    ratios: List[float] = field(default_factory=list)
    quantiles: tuple = ()  # (p20, p50, p80) seconds from do_bench (CUDA); else taken over rounds

    def percentile(self, q: float) -> float:
        """Seconds at quantile ``q`` of the per-round times (or do_bench's quantiles on CUDA)."""
        if self.quantiles:
            return self.quantiles[{0.2: 0, 0.5: 1, 0.8: 2}[q]]
        return _quantile(self.times, q)

    @property
    def median_ms(self) -> float:
        return self.percentile(0.5) * 1e3

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_iqr(self) -> float:
        """Interquartile range of the per-round ratios: how much to trust ``ratio``."""
        if len(self.ratios) < 4:
            return float("nan")
        return _quantile(self.ratios, 0.75) - _quantile(self.ratios, 0.25)


def _quantile(xs: List[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), for any number of samples ≥ 1."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def interleaved(calls: Dict[str, Call], baseline: str, rounds: int, warmup: int, device: torch.device,
                seed: int = 0) -> Dict[str, Result]:
    """Run every provider once per round in random order; ratios are to ``baseline`` in the same round.
    On CUDA each round is one do_bench per provider (its p20/p50/p80 kept from the last round)."""
    rng = random.Random(seed)
    names = list(calls)
    for _ in range(warmup):
        for n in names:
            _untimed(calls[n])
    results = {n: Result(n) for n in names}
    cuda = device.type == "cuda"
    timers = {n: (_CudaTimer(calls[n]) if cuda else _CpuTimer(calls[n].run)) for n in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        t = {}
        for n in order:
            c = calls[n]
            if cuda:
                q = timers[n]()
                results[n].quantiles = q
                t[n] = q[1]
                continue
            if c.prepare:
                c.prepare()
            t[n] = timers[n]()
            if c.reset:
                c.reset()
        for n in names:
            results[n].times.append(t[n])
            results[n].ratios.append(t[n] / t[baseline])
    return results


def _untimed(c: Call) -> None:
    if c.prepare:
        c.prepare()
    c.run()
    if c.reset:
        c.reset()


class OpCounter(TorchDispatchMode):
    """Counts the kernels one call launches: every ATen / custom op that does work (views, aliases
    and uninitialised allocations excluded) plus every Triton kernel launch, and the bytes the
    ATen ops read and write (sum of their tensor arguments' and results' sizes: the one-kernel-per-op
    traffic of an eager graph)."""

    _FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
             "set_"}  # allocations without a fill, and re-pointing a tensor at memory: no kernel

    def __init__(self):
        super().__init__()
        self.ops: List[str] = []
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not getattr(func, "is_view", False) and name not in self._FREE:
            self.ops.append(f"{func.namespace}::{name}")
            seen = set()
            for t in (v for v in tree_leaves((args, kwargs, out)) if isinstance(v, torch.Tensor)):
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
                if key not in seen:
                    seen.add(key)
                    self.bytes += t.numel() * t.element_size()
        return out


@contextlib.contextmanager
def count_triton_launches():
    """Within the block, the names of the Triton kernels launched (each still runs; under the interpreter
    too). What a kernel does inside is hidden from an active OpCounter: one launch is one kernel."""
    names: List[str] = []
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    saved = {c: c.run for c in classes}

    def wrap(real):
        def run(self, *a, **kw):
            names.append(getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "triton"))
            with _disable_current_modes():
                return real(self, *a, **kw)
        return run

    for c, real in saved.items():
        c.run = wrap(real)
    try:
        yield names
    finally:
        for c, real in saved.items():
            c.run = real


def count_launches(call: Call) -> tuple:
    """(kernel launches, names, bytes the ATen ops move) of one call, its untimed prepare excluded."""
    if call.prepare:
        call.prepare()
    with OpCounter() as oc, count_triton_launches() as tri:
        call.run()
    if call.reset:
        call.reset()
    return len(oc.ops) + len(tri), oc.ops + [f"triton::{n}" for n in tri], oc.bytes
