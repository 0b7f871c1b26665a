"""Timing and memory measurement shared by the benchmarks.

Timing on this kind of noisy machine: every provider shares one weight tensor; each round runs
every provider once in a fresh random order; a provider's score is the median over rounds of its
time divided by the frozen nn.Linear's time in the same round. A second frozen nn.Linear (the
control) shows the noise floor. CPU uses torch.utils.benchmark, CUDA triton.testing.do_bench.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch


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


def timed_call(fn: Callable[[], torch.Tensor], mode: str, x: torch.Tensor, dy: torch.Tensor, params) -> Callable[[], None]:
    """What one timed call does: ``fn()`` for ``"fwd"``; for ``"fwd+bwd"``, ``fn().backward(dy)`` and
    the grads of ``x`` and ``params`` cleared (so no call accumulates into the next)."""
    if mode == "fwd":
        return fn
    params = list(params)

    def fb():
        fn().backward(dy)
        x.grad = None
        for q in params:
            q.grad = None
    return fb


def make_timer(fn: Callable[[], None], device: torch.device) -> Callable[[], float]:
    """A callable that times one call of ``fn`` in seconds (CUDA: do_bench's median)."""
    if device.type == "cuda":
        import triton.testing

        return lambda: triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") / 1e3
    return _CpuTimer(fn)


@dataclass
class Result:
    name: str
    times: List[float] = field(default_factory=list)
    ratios: List[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_iqr(self) -> float:
        """Interquartile range of the per-round ratios: how much to trust ``ratio``."""
        if len(self.ratios) < 4:
            return float("nan")
        q = statistics.quantiles(self.ratios, n=4)
        return q[2] - q[0]


def interleaved(providers: Dict[str, Callable[[], None]], baseline: str, rounds: int, warmup: int,
                device: torch.device, seed: int = 0) -> Dict[str, Result]:
    """Run every provider once per round in random order; ratios are to ``baseline`` in the same round."""
    rng = random.Random(seed)
    names = list(providers)
    for _ in range(warmup):
        for n in names:
            providers[n]()
    results = {n: Result(n) for n in names}
    timers = {n: make_timer(providers[n], device) for n in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        t = {n: timers[n]() for n in order}
        for n in names:
            results[n].times.append(t[n])
            results[n].ratios.append(t[n] / t[baseline])
    return results
