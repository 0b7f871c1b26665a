"""Benchmark shapes: presets taken from real models' projections, or explicit ``M,K,N,r``.

A preset expands to one shape per distinct projection of one decoder (encoder) layer, with
M = ``tokens`` rows and r = ``rank`` (for the bottleneck adapter op, r is the bottleneck size).
Projections with the same (K, N) are benchmarked once under a joined name ("k,v").

The dimensions are the models' published configs (``config.json`` on the Hub):

============  ======  ============  =====  ========  ========
preset        hidden  intermediate  heads  kv heads  head dim
============  ======  ============  =====  ========  ========
llama3-8b       4096         14336     32         8       128
mistral-7b      4096         14336     32         8       128
qwen2.5-7b      3584         18944     28         4       128
bert-base        768          3072     12        12        64
============  ======  ============  =====  ========  ========
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool = True   # gate_proj/up_proj/down_proj (Llama family) vs intermediate/output (BERT)


PRESETS: Dict[str, ModelDims] = {
    "llama3-8b": ModelDims(4096, 14336, 32, 8, 128),
    "mistral-7b": ModelDims(4096, 14336, 32, 8, 128),
    "qwen2.5-7b": ModelDims(3584, 18944, 28, 4, 128),
    "bert-base": ModelDims(768, 3072, 12, 12, 64, gated_mlp=False),
}
ALIASES = {"llama-3-8b": "llama3-8b", "mistral": "mistral-7b", "qwen2.5": "qwen2.5-7b", "qwen2.5-7B": "qwen2.5-7b",
           "bert": "bert-base", "Llama-3-8B": "llama3-8b", "Mistral-7B": "mistral-7b", "Qwen2.5-7B": "qwen2.5-7b",
           "BERT-base": "bert-base"}


@dataclass(frozen=True)
class Shape:
    name: str  # "llama3-8b.q" or "M,K,N,r"
    M: int
    K: int
    N: int
    r: int

    def __str__(self) -> str:
        return f"{self.name} (M={self.M} K={self.K} N={self.N} r={self.r})"


def projections(d: ModelDims) -> List[tuple]:
    """(names, K, N) of one layer's linear projections (nn.Linear: in K, out N), deduplicated by (K, N)."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    if d.gated_mlp:
        named = [("q", d.hidden, q), ("k", d.hidden, kv), ("v", d.hidden, kv), ("o", q, d.hidden),
                 ("gate", d.hidden, d.intermediate), ("up", d.hidden, d.intermediate),
                 ("down", d.intermediate, d.hidden)]
    else:
        named = [("query", d.hidden, q), ("key", d.hidden, kv), ("value", d.hidden, kv), ("attn_out", q, d.hidden),
                 ("intermediate", d.hidden, d.intermediate), ("output", d.intermediate, d.hidden)]
    out: Dict[tuple, List[str]] = {}
    for n, k, m in named:
        out.setdefault((k, m), []).append(n)
    return [(",".join(names), k, n) for (k, n), names in out.items()]


def parse_shapes(specs: Sequence[str], tokens: int, rank: int) -> List[Shape]:
    """Shapes from ``--shapes`` entries: a preset name (optionally ``preset:proj``, e.g. ``llama3-8b:down``)
    or ``M,K,N,r``. Raises ValueError naming the bad entry."""
    out: List[Shape] = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        if spec[0].isdigit():
            parts = spec.split(",")
            try:
                vals = [int(v) for v in parts]
            except ValueError:
                vals = []
            if len(vals) != 4 or min(vals) < 1:
                raise ValueError(f"--shapes: {spec!r} is not M,K,N,r (four positive integers) or a preset "
                                 f"({', '.join(PRESETS)})")
            out.append(Shape(spec, *vals))
            continue
        name, _, proj = spec.partition(":")
        name = ALIASES.get(name, name).lower()
        if name not in PRESETS:
            raise ValueError(f"--shapes: unknown preset {spec!r}; presets: {', '.join(PRESETS)}, or M,K,N,r")
        projs = projections(PRESETS[name])
        if proj:
            projs = [p for p in projs if proj in p[0].split(",")]
            if not projs:
                raise ValueError(f"--shapes: {name} has no projection {proj!r}; it has "
                                 f"{', '.join(n for p in projections(PRESETS[name]) for n in p[0].split(','))}")
        out += [Shape(f"{name}.{n}", tokens, k, nn, rank) for n, k, nn in projs]
    return out
