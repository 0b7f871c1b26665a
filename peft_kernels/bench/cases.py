"""What is benchmarked: for each op, the cases (shape × variant) and their providers.

Every provider of a case shares the case's frozen weight tensor and input, so they differ only in
how the adapter is computed. Providers: the frozen nn.Linear (every ratio's denominator), a second
frozen nn.Linear (the control: the noise floor), HF PEFT where it has the op, the reference
(``peft_kernels.reference``, the spec, as eager PyTorch), and each of our backends. A provider that
cannot run says why (a row with ``skipped``), never silently disappears.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from .. import _ext, dispatch
from ..ops.multi_lora import SUPPORTED as MULTI_SUPPORTED
from ..nn import AdapterLinear, IA3Linear, LoRALinear, MultiLoRALinear
from ..reference import (activation_ref, adapter_linear_ref, dora_linear_ref, ia3_linear_ref, lora_linear_ref,
                         multi_lora_linear_ref, qlora_linear_ref)
from . import traffic
from .shapes import Shape

FROZEN = "nn.Linear (frozen)"
CONTROL = "nn.Linear (frozen, control)"
PEFT = "HF PEFT"
REFERENCE = "reference"
UNFUSED = "unfused nn modules"
NO_EXT = "ours (torch, no C++ ext)"
MODES = ("fwd", "bwd", "full")


@dataclass
class Provider:
    fn: Callable[[], torch.Tensor]          # the forward on the case's input
    params: List[torch.Tensor]              # its trainable tensors (grads cleared between calls)
    modes: Sequence[str] = MODES
    why_not: str = ""                       # why the modes it lacks are missing


@dataclass
class Case:
    op: str
    shape: Shape
    variant: Dict[str, object]
    providers: Dict[str, Provider]
    skipped: Dict[str, str]
    x: torch.Tensor
    dy: torch.Tensor
    costs: Dict[str, traffic.Cost]          # the op's traffic model per mode
    frozen_costs: Dict[str, traffic.Cost]
    fwd_no_grad: bool = False               # forward timed under no_grad (serving)
    compare_to: Optional[str] = REFERENCE   # outputs checked against this provider (None: random dropout)
    frozen_weights: List[torch.Tensor] = field(default_factory=list)  # not activations: excluded from saved bytes

    @property
    def label(self) -> str:
        v = " ".join(f"{k}={val}" for k, val in self.variant.items())
        return f"{self.op} {self.shape.name} {v}".strip()


@dataclass
class Config:
    dtype: torch.dtype
    device: torch.device
    backends: Sequence[str]
    dropouts: Sequence[float] = (0.0,)
    adapters: Sequence[int] = (1, 8, 32)
    placements: Sequence[str] = ("sequential", "parallel")
    ia3_scalings: Sequence[str] = ("output", "input")
    activation: str = "relu"


def _elem(dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _base(shape: Shape, cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Linear(shape.K, shape.N, device=cfg.device, dtype=cfg.dtype).requires_grad_(False)

    def sharing():
        lin = nn.Linear(shape.K, shape.N, device="meta")
        lin.weight, lin.bias = base.weight, base.bias
        return lin
    return base, sharing


def _inputs(shape: Shape, cfg: Config):
    x = torch.randn(shape.M, shape.K, device=cfg.device, dtype=cfg.dtype, requires_grad=True)
    dy = torch.randn(shape.M, shape.N, device=cfg.device, dtype=cfg.dtype)
    return x, dy


def _ours(cfg: Config, make, skipped, providers, x, params_of=lambda m: list(m.parameters()), call=None,
          supported=dispatch.DEFAULT_SUPPORTED):
    for be in cfg.backends:
        why = (f"this op has no {be} kernels (it runs on: {', '.join(supported)})" if be not in supported
               else dispatch.unavailable_reason(be, cfg.device))
        if why:
            skipped[f"ours ({be})"] = why
            continue
        m = make(be)
        providers[f"ours ({be})"] = Provider(call(m) if call else (lambda m=m: m(x)), params_of(m))


def _peft_model(linear: nn.Module, configs: Dict[str, dict]):
    try:
        import peft
    except ImportError:
        return None
    holder = nn.Module()
    holder.fc = linear
    names = list(configs)
    pm = peft.get_peft_model(holder, peft.LoraConfig(target_modules=["fc"], **configs[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, peft.LoraConfig(target_modules=["fc"], **configs[n]))
    return pm.base_model.model.fc


# ------------------------------------------------------------------------------------------------
def lora_cases(shape: Shape, cfg: Config) -> Iterator[Case]:
    """LoRALinear at each dropout p: vs PEFT LoRA and the reference (which stores its dropout mask)."""
    for p in cfg.dropouts:
        base, sharing = _base(shape, cfg)
        W, b = base.weight, base.bias
        M, K, N, r = shape.M, shape.K, shape.N, shape.r
        x, dy = _inputs(shape, cfg)
        provs: Dict[str, Provider] = {FROZEN: Provider(lambda: base(x), []),
                                      CONTROL: Provider(lambda m=sharing(): m(x), [])}
        skipped: Dict[str, str] = {}
        pl = _peft_model(sharing(), {"default": dict(r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False)})
        if pl is None:
            skipped[PEFT] = "peft is not installed"
        else:
            pl.to(device=cfg.device, dtype=cfg.dtype).train()
            provs[PEFT] = Provider(lambda: pl(x), [pl.lora_A["default"].weight, pl.lora_B["default"].weight])
        if pl is not None:
            A = pl.lora_A["default"].weight.detach().clone().requires_grad_()
            B = pl.lora_B["default"].weight.detach().clone().requires_grad_()
        else:
            A = (torch.randn(r, K, device=cfg.device, dtype=cfg.dtype) / K ** 0.5).requires_grad_()
            B = (torch.randn(N, r, device=cfg.device, dtype=cfg.dtype) / r ** 0.5).requires_grad_()

        def ref(p=p):  # the spec as a naive user writes it: the dropout mask made and kept in forward
            m = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p) if p > 0 else None
            return lora_linear_ref(x, W, b, A, B, 2.0, m)
        provs[REFERENCE] = Provider(ref, [A, B])

        def make(be):
            m = LoRALinear.from_linear(sharing(), r=r, lora_alpha=2 * r, lora_dropout=p, backend=be)
            with torch.no_grad():
                m.lora_A.copy_(A)
                m.lora_B.copy_(B)
            return m.train()
        _ours(cfg, make, skipped, provs, x, params_of=lambda m: [m.lora_A, m.lora_B])
        e = _elem(cfg.dtype)
        yield Case("lora", shape, {"p": p}, provs, skipped, x, dy, traffic.lora(M, K, N, r, e, p),
                   traffic.frozen(M, K, N, e), compare_to=REFERENCE if p == 0 else None, frozen_weights=[W, b])


def multi_lora_cases(shape: Shape, cfg: Config) -> Iterator[Case]:
    """MultiLoRALinear on a mixed batch (a random adapter per token) over 1/8/32 adapters: vs PEFT's
    ``adapter_names`` path (inference only) and the per-token reference. Forward is timed under no_grad."""
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    for n in cfg.adapters:
        base, sharing = _base(shape, cfg)
        W, b = base.weight, base.bias
        x, dy = _inputs(shape, cfg)
        ids = torch.randint(0, n, (M,), device=cfg.device)
        names = [f"a{i}" for i in ids.tolist()]
        provs: Dict[str, Provider] = {FROZEN: Provider(lambda: base(x), []),
                                      CONTROL: Provider(lambda m=sharing(): m(x), [])}
        skipped: Dict[str, str] = {}
        pl = _peft_model(sharing(), {f"a{i}": dict(r=r, lora_alpha=2 * r, init_lora_weights=False) for i in range(n)})
        A = torch.zeros(n, r, K, device=cfg.device, dtype=cfg.dtype)
        B = torch.zeros(n, N, r, device=cfg.device, dtype=cfg.dtype)
        if pl is None:
            skipped[PEFT] = "peft is not installed"
            A.normal_(0, K ** -0.5)
            B.normal_(0, r ** -0.5)
        else:
            pl.to(device=cfg.device, dtype=cfg.dtype).eval()
            for i in range(n):
                A[i] = pl.lora_A[f"a{i}"].weight.detach()
                B[i] = pl.lora_B[f"a{i}"].weight.detach()
            provs[PEFT] = Provider(lambda: pl(x, adapter_names=names), [], modes=("fwd",),
                                   why_not="PEFT's mixed-batch adapter_names path is inference-only")
        A.requires_grad_()
        B.requires_grad_()
        scal = torch.full((n,), 2.0, device=cfg.device)
        provs[REFERENCE] = Provider(lambda: multi_lora_linear_ref(x, W, b, A, B, scal, ids), [A, B])

        def make(be):
            m = MultiLoRALinear.from_linear(sharing(), max_adapters=n, max_rank=r, backend=be)
            for a in range(n):
                m.set_adapter(a, A[a].detach(), B[a].detach(), 2.0)
            return m
        _ours(cfg, make, skipped, provs, x, params_of=lambda m: [m.lora_A, m.lora_B], call=lambda m: lambda: m(x, ids),
              supported=MULTI_SUPPORTED)
        if "ours (torch)" in provs and cfg.device.type == "cpu" and _ext.available():
            # the same module on the plain-torch grouped path: what the C++ CPU kernels are measured against
            m = make("torch")
            provs[NO_EXT] = Provider(_without_ext(lambda: m(x, ids)), [m.lora_A, m.lora_B])
        e = _elem(cfg.dtype)
        n_active = len(set(ids.tolist()))
        yield Case("multi_lora", shape, {"adapters": n}, provs, skipped, x, dy,
                   traffic.multi_lora(M, K, N, r, n_active, e), traffic.frozen(M, K, N, e), fwd_no_grad=True,
                   frozen_weights=[W, b])


def _without_ext(fn):
    """``fn`` run with the compiled CPU kernels turned off (PEFT_KERNELS_DISABLE_EXT=1): the torch path.
    The choice is made at forward and kept for that call's backward."""
    def call():
        old = os.environ.get("PEFT_KERNELS_DISABLE_EXT")
        os.environ["PEFT_KERNELS_DISABLE_EXT"] = "1"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["PEFT_KERNELS_DISABLE_EXT"]
            else:
                os.environ["PEFT_KERNELS_DISABLE_EXT"] = old
    return call


class _Act(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x):
        return activation_ref(x, self.name)


class Unfused(nn.Module):
    """The same adapter as a user would write it from nn modules (AdapterHub's structure)."""

    def __init__(self, base: nn.Linear, ours: AdapterLinear):
        super().__init__()
        self.base = base
        self.mode = ours.mode
        self.adapter_down = nn.Sequential(ours.adapter_down, _Act(ours.activation))
        self.adapter_up = ours.adapter_up
        self.scale = ours._scaling()

    def forward(self, x):
        y = self.base(x)
        h = y if self.mode == "sequential" else x
        return y + self.adapter_up(self.adapter_down(h)) * self.scale


def adapter_cases(shape: Shape, cfg: Config) -> Iterator[Case]:
    """AdapterLinear (bottleneck r) in each placement: vs the same adapter from unfused nn modules and the
    reference. HF PEFT has no bottleneck adapters (a skipped row says so)."""
    M, K, N, bsz = shape.M, shape.K, shape.N, shape.r
    for placement in cfg.placements:
        base, sharing = _base(shape, cfg)
        x, dy = _inputs(shape, cfg)
        provs: Dict[str, Provider] = {FROZEN: Provider(lambda: base(x), []),
                                      CONTROL: Provider(lambda m=sharing(): m(x), [])}
        skipped = {PEFT: "HF PEFT has no bottleneck (Houlsby/Pfeiffer) adapters"}
        made = {}

        def make(be):
            m = AdapterLinear.from_linear(sharing(), bottleneck_size=bsz, activation=cfg.activation, mode=placement,
                                          backend=be).to(device=cfg.device, dtype=cfg.dtype)
            with torch.no_grad():  # a trained-looking adapter (not the near-zero init)
                torch.manual_seed(1)
                m.adapter_up.weight.normal_(0, 1 / bsz ** 0.5)
            made[be] = m
            return m
        first = make("torch")  # its adapter weights are the ones every provider uses
        D, U = first.adapter_down, first.adapter_up
        unf = Unfused(sharing(), first)
        provs[UNFUSED] = Provider(lambda: unf(x), list(first.parameters()))
        provs[REFERENCE] = Provider(
            lambda: adapter_linear_ref(x, base.weight, base.bias, D.weight, D.bias, U.weight, U.bias, cfg.activation,
                                       first._scaling(), placement), list(first.parameters()))

        def make_shared(be):
            m = made.get(be) or make(be)
            if m is not first:
                m.load_state_dict(first.state_dict())
            return m
        _ours(cfg, make_shared, skipped, provs, x)
        e = _elem(cfg.dtype)
        yield Case("adapter", shape, {"placement": placement}, provs, skipped, x, dy,
                   traffic.adapter(M, K, N, bsz, e, placement), traffic.frozen(M, K, N, e),
                   frozen_weights=[base.weight, base.bias])


PLAIN_LORA = "ours plain LoRA (torch)"


def dora_cases(shape: Shape, cfg: Config) -> Iterator[Case]:
    """LoRALinear(use_dora=True) vs PEFT's DoRA, the reference, and our plain LoRA on the same weights (the
    DoRA target is a ratio to plain LoRA). Dropout 0 (with dropout both PEFT and ours add a base GEMM)."""
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    base, sharing = _base(shape, cfg)
    W, b = base.weight, base.bias
    x, dy = _inputs(shape, cfg)
    provs: Dict[str, Provider] = {FROZEN: Provider(lambda: base(x), []), CONTROL: Provider(lambda m=sharing(): m(x), [])}
    skipped: Dict[str, str] = {}
    pl = _peft_model(sharing(), {"default": dict(r=r, lora_alpha=2 * r, use_dora=True, init_lora_weights=False)})
    if pl is None:
        skipped[PEFT] = "peft is not installed"
        first = LoRALinear.from_linear(sharing(), r=r, lora_alpha=2 * r, use_dora=True, init_lora_weights=False)
        A, B, mag = first.lora_A, first.lora_B, first.lora_magnitude_vector
    else:
        pl.to(device=cfg.device, dtype=cfg.dtype).train()
        A, B = pl.lora_A["default"].weight, pl.lora_B["default"].weight
        mag = pl.lora_magnitude_vector["default"].weight
        provs[PEFT] = Provider(lambda: pl(x), [A, B, mag])
    A0, B0, m0 = (t.detach().clone().requires_grad_() for t in (A, B, mag))
    provs[REFERENCE] = Provider(lambda: dora_linear_ref(x, W, b, A0, B0, 2.0, m0), [A0, B0, m0])

    def make(be, dora=True):
        m = LoRALinear.from_linear(sharing(), r=r, lora_alpha=2 * r, use_dora=dora, backend=be)
        with torch.no_grad():
            m.lora_A.copy_(A0)
            m.lora_B.copy_(B0)
            if dora:
                m.lora_magnitude_vector.copy_(m0)
        return m.train()
    plain = make("torch", dora=False)
    provs[PLAIN_LORA] = Provider(lambda: plain(x), [plain.lora_A, plain.lora_B])
    _ours(cfg, make, skipped, provs, x)
    e = _elem(cfg.dtype)
    yield Case("dora", shape, {}, provs, skipped, x, dy, traffic.dora(M, K, N, r, e), traffic.frozen(M, K, N, e),
               frozen_weights=[W, b])


def ia3_cases(shape: Shape, cfg: Config) -> Iterator[Case]:
    """IA3Linear, output scaling (attention k/v) and input scaling (feed-forward), vs PEFT's IA3 and the
    reference. (For this op the shape's r is unused.)"""
    M, K, N = shape.M, shape.K, shape.N
    for scaling in cfg.ia3_scalings:
        ff = scaling == "input"
        base, sharing = _base(shape, cfg)
        W, b = base.weight, base.bias
        x, dy = _inputs(shape, cfg)
        provs: Dict[str, Provider] = {FROZEN: Provider(lambda: base(x), []),
                                      CONTROL: Provider(lambda m=sharing(): m(x), [])}
        skipped: Dict[str, str] = {}
        l0 = (1 + 0.1 * torch.randn(K if ff else N, device=cfg.device)).to(cfg.dtype)
        try:
            import peft
            holder = nn.Module()
            holder.fc = sharing()
            pm = peft.get_peft_model(holder, peft.IA3Config(target_modules=["fc"],
                                                            feedforward_modules=["fc"] if ff else []))
            pl = pm.base_model.model.fc.to(device=cfg.device, dtype=cfg.dtype)
            with torch.no_grad():
                pl.ia3_l["default"].copy_(l0.reshape(pl.ia3_l["default"].shape))
            provs[PEFT] = Provider(lambda pl=pl: pl(x), [pl.ia3_l["default"]])
        except ImportError:
            skipped[PEFT] = "peft is not installed"
        lr = l0.clone().requires_grad_()
        provs[REFERENCE] = Provider(lambda ff=ff, lr=lr: ia3_linear_ref(x, W, b, lr, ff), [lr])

        def make(be, ff=ff):
            m = IA3Linear.from_linear(sharing(), feedforward=ff, backend=be)
            with torch.no_grad():
                m.ia3_l.copy_(l0.reshape(m.ia3_l.shape))
            return m
        _ours(cfg, make, skipped, provs, x, params_of=lambda m: [m.ia3_l])
        e = _elem(cfg.dtype)
        yield Case("ia3", shape, {"scaling": scaling}, provs, skipped, x, dy, traffic.ia3(M, K, N, e, ff),
                   traffic.frozen(M, K, N, e), frozen_weights=[W, b])


def qlora_cases(shape: Shape, cfg: Config) -> Iterator[Case]:
    """LoRALinear on a bitsandbytes NF4 base (double quantization, compute dtype = the bench dtype) vs HF PEFT's
    QLoRA layer on the same quantized layer, and the reference (dequantize W whole, then the LoRA math: the
    unsloth-style path). The frozen rows are the bitsandbytes layer alone."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    base, _ = _base(shape, cfg)
    q = bnb.nn.Linear4bit(K, N, compute_dtype=cfg.dtype, quant_type="nf4", compress_statistics=True)
    q.load_state_dict(base.state_dict())
    q = q.to(cfg.device).requires_grad_(False)
    del base
    x, dy = _inputs(shape, cfg)
    provs: Dict[str, Provider] = {FROZEN: Provider(lambda: q(x), []), CONTROL: Provider(lambda: q(x), [])}
    skipped: Dict[str, str] = {}
    pl = _peft_model(q, {"default": dict(r=r, lora_alpha=2 * r, init_lora_weights=False)})
    if pl is None:
        skipped[PEFT] = "peft is not installed"
        A = (torch.randn(r, K, device=cfg.device) / K ** 0.5).requires_grad_()
        B = (torch.randn(N, r, device=cfg.device) / r ** 0.5).requires_grad_()
    else:
        pl.train()
        A, B = pl.lora_A["default"].weight, pl.lora_B["default"].weight
        provs[PEFT] = Provider(lambda: pl(x), [A, B])
    A0, B0 = (t.detach().clone().requires_grad_() for t in (A, B))

    def make(be):
        m = LoRALinear.from_linear(q, r=r, lora_alpha=2 * r, backend=be)
        with torch.no_grad():
            m.lora_A.copy_(A0)
            m.lora_B.copy_(B0)
        return m.train()
    ours = make("torch")
    provs[REFERENCE] = Provider(lambda: qlora_linear_ref(x, ours.quant_base, q.bias, A0, B0, 2.0), [A0, B0])
    _ours(cfg, make, skipped, provs, x, params_of=lambda m: [m.lora_A, m.lora_B], supported=("torch",))
    e = _elem(cfg.dtype)
    qb = traffic.nf4_bytes_per_weight(int(q.weight.quant_state.blocksize), True)
    yield Case("qlora", shape, {"quant": "nf4-dq"}, provs, skipped, x, dy, traffic.qlora(M, K, N, r, e, qb),
               traffic.frozen(M, K, N, e), frozen_weights=[q.weight, q.bias])


BUILDERS = {"lora": lora_cases, "multi_lora": multi_lora_cases, "adapter": adapter_cases, "dora": dora_cases,
            "ia3": ia3_cases, "qlora": qlora_cases}
