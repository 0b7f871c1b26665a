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
from typing import Callable, Dict, List, Optional

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


def time_once(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds for one call of ``fn``."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") / 1e3
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(1).median


@dataclass
class Result:
    name: str
    times: List[float] = field(default_factory=list)
    ratios: List[float] = field(default_factory=list)
    saved_bytes: Optional[int] = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def interleaved(providers: Dict[str, Callable[[], None]], baseline: str, rounds: int, warmup: int,
                device: torch.device, seed: int = 0) -> Dict[str, Result]:
    """Run every provider once per round in random order; ratios are to ``baseline`` in the same round."""
    rng = random.Random(seed)
    names = list(providers)
    for _ in range(warmup):
        for n in names:
            providers[n]()
    results = {n: Result(n) for n in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        t = {n: time_once(providers[n], device) for n in order}
        for n in names:
            results[n].times.append(t[n])
            results[n].ratios.append(t[n] / t[baseline])
    return results
