"""PEFT × meta-learning: a LoRA initialisation meta-learned with Reptile, every task's inner loop in one
batched pass through :class:`MultiLoRALinear` (one slot per task), against LoRA from PEFT's standard
initialisation and a prototypical network on the frozen model's features.

The task distribution is synthetic and ships with the code (no downloads): inputs in R³² whose class
information lives in a fixed 8-dim subspace, buried in isotropic noise. A small MLP backbone is
pretrained on 64 *base* classes and frozen; tasks are 5-way K-shot problems over classes drawn fresh
(*novel* classes) for evaluation, and over the base classes for meta-training. LoRA (rank r) sits on the
backbone's two linear layers and on a frozen, randomly initialised 5-way head.

Reptile (first-order) needs no second derivatives. Second-order MAML runs through the torch backend of the
LoRA and multi-adapter ops (their backward is differentiable under ``create_graph=True``); the first-order-only
backends raise under ``create_graph=True`` (README: "Second-order gradients"). ``python examples/meta_lora.py`` runs the comparison; ``python -m
peft_kernels.bench --op meta`` runs it and times the batched inner loop against a per-task loop.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import MultiLoRALinear

D_IN, D_SEM, HIDDEN, N_WAY, N_BASE = 32, 8, 64, 5, 64


@dataclass
class Config:
    shots: int = 5
    queries: int = 15
    rank: int = 4
    inner_lr: float = 0.07
    inner_steps_train: int = 5
    meta_iters: int = 1000
    meta_batch: int = 16
    meta_lr: float = 1.0
    eval_tasks: int = 200
    eval_batch: int = 25
    steps: Sequence[int] = (0, 1, 5, 20)
    pretrain_steps: int = 400
    seed: int = 0
    backend: str = "auto"

    @classmethod
    def quick(cls) -> "Config":
        return cls(meta_iters=20, meta_batch=8, eval_tasks=16, eval_batch=8, pretrain_steps=60)


class TaskFamily:
    """Class prototypes μ = U·z (U: a fixed orthonormal [32, 8] basis, z ~ N(0, 4I)); a sample of class c is
    μ_c + 0.6·U·ε + ε' with ε ~ N(0, I₈), ε' ~ N(0, I₃₂) (the nuisance noise)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.U = torch.linalg.qr(torch.randn(D_IN, D_SEM, generator=g))[0]
        self.base = self.prototypes(N_BASE, g)

    def prototypes(self, n: int, g: torch.Generator) -> torch.Tensor:
        return (2.0 * torch.randn(n, D_SEM, generator=g)) @ self.U.T

    def sample(self, protos: torch.Tensor, per_class: int, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(protos.shape[0]).repeat_interleave(per_class)
        x = protos[y] + 0.6 * torch.randn(len(y), D_SEM, generator=g) @ self.U.T + torch.randn(len(y), D_IN, generator=g)
        return x, y

    def task(self, g: torch.Generator, cfg: Config, novel: bool):
        """(x_support, y_support, x_query, y_query) of one N-way task, labels in a random order."""
        if novel:
            protos = self.prototypes(N_WAY, g)
        else:
            protos = self.base[torch.randperm(N_BASE, generator=g)[:N_WAY]]
        xs, ys = self.sample(protos, cfg.shots, g)
        xq, yq = self.sample(protos, cfg.queries, g)
        return xs, ys, xq, yq


def pretrain_backbone(fam: TaskFamily, cfg: Config) -> nn.Sequential:
    """The small frozen model: an MLP trained on the 64 base classes (then its head is dropped)."""
    torch.manual_seed(cfg.seed)
    net = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
    head = nn.Linear(HIDDEN, N_BASE)
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.pretrain_steps):
        x, y = fam.sample(fam.base, 4, g)
        loss = F.cross_entropy(head(net(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.requires_grad_(False).eval()


class FewShotLoRA(nn.Module):
    """Backbone + frozen random 5-way head, each linear layer a MultiLoRALinear with one slot per task."""

    def __init__(self, backbone: nn.Sequential, slots: int, rank: int, seed: int, backend: str = "auto"):
        super().__init__()
        torch.manual_seed(seed + 2)
        head = nn.Linear(HIDDEN, N_WAY).requires_grad_(False)
        self.layers = nn.ModuleList([MultiLoRALinear.from_linear(lin, max_adapters=slots, max_rank=rank,
                                                                 backend=backend)
                                     for lin in (backbone[0], backbone[2], head)])
        self.rank = rank

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h, ids)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h

    def lora_params(self) -> List[torch.Tensor]:
        return [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)]

    def load_init(self, init: List[torch.Tensor], slots: int) -> None:
        """Every one of the first ``slots`` slots starts from ``init`` ([A, B] per layer, PEFT layouts)."""
        for layer, A, B in zip(self.layers, init[0::2], init[1::2]):
            for s in range(slots):
                layer.set_adapter(s, A, B, 1.0)  # lora_alpha = r

    def read_slots(self, slots: int) -> List[torch.Tensor]:
        """The adapted [A, B] per layer of each slot, stacked: [slots, r, K] / [slots, N, r]."""
        return [t.detach()[:slots].clone() for t in self.lora_params()]


def standard_init(model: FewShotLoRA, seed: int) -> List[torch.Tensor]:
    """PEFT's default LoRA init (``init_lora_weights=True``): A kaiming-uniform(a=√5), B = 0."""
    g = torch.Generator().manual_seed(seed + 3)
    out = []
    for layer in model.layers:
        A = torch.empty(model.rank, layer.in_features)
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=√5) on [r, K]
        A.uniform_(-bound, bound, generator=g)
        out += [A, torch.zeros(layer.out_features, model.rank)]
    return out


def adapt(model: FewShotLoRA, init: List[torch.Tensor], tasks, steps: int, lr: float):
    """Each task's inner loop (SGD on its LoRA slot, ``steps`` steps on its support set), all tasks in one
    batched forward/backward per step; returns per-task (query accuracy, query loss)."""
    S = len(tasks)
    model.load_init(init, S)
    xs = torch.cat([t[0] for t in tasks])
    ys = torch.cat([t[1] for t in tasks])
    ids = torch.arange(S).repeat_interleave(len(tasks[0][1]))
    params = model.lora_params()
    per_task = len(tasks[0][1])
    for _ in range(steps):
        loss = F.cross_entropy(model(xs, ids), ys, reduction="sum") / per_task  # Σ over tasks of each task's mean
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
    with torch.no_grad():
        xq = torch.cat([t[2] for t in tasks])
        yq = torch.cat([t[3] for t in tasks])
        qid = torch.arange(S).repeat_interleave(len(tasks[0][3]))
        logits = model(xq, qid)
        ce = F.cross_entropy(logits, yq, reduction="none")
        hit = (logits.argmax(1) == yq).float()
        out = [(hit[qid == s].mean().item(), ce[qid == s].mean().item()) for s in range(S)]
    return out


def reptile(model: FewShotLoRA, init: List[torch.Tensor], fam: TaskFamily, cfg: Config, log=None) -> List[torch.Tensor]:
    """Batched Reptile over the LoRA parameters: each meta-iteration adapts ``meta_batch`` base-class tasks in
    parallel slots and moves the init toward the mean of the adapted weights."""
    g = torch.Generator().manual_seed(cfg.seed + 4)
    init = [t.clone() for t in init]
    for it in range(cfg.meta_iters):
        tasks = [fam.task(g, cfg, novel=False) for _ in range(cfg.meta_batch)]
        adapt(model, init, tasks, cfg.inner_steps_train, cfg.inner_lr)
        adapted = model.read_slots(cfg.meta_batch)
        lr = cfg.meta_lr * (1 - it / cfg.meta_iters)  # linearly annealed, as in Nichol et al.
        for t, a in zip(init, adapted):
            t.add_(lr * (a.mean(0) - t))
        if log and (it + 1) % max(1, cfg.meta_iters // 5) == 0:
            log(f"  reptile {it + 1}/{cfg.meta_iters}")
    return init


def protonet(backbone: nn.Sequential, tasks) -> List[Tuple[float, float]]:
    """Prototypical network on the frozen features: class means of the support features, logits = −‖f − μ_c‖²."""
    out = []
    with torch.no_grad():
        for xs, ys, xq, yq in tasks:
            fs, fq = backbone(xs), backbone(xq)
            protos = torch.stack([fs[ys == c].mean(0) for c in range(N_WAY)])
            logits = -torch.cdist(fq, protos) ** 2
            out.append(((logits.argmax(1) == yq).float().mean().item(), F.cross_entropy(logits, yq).item()))
    return out


def _ms(xs: List[float]) -> str:
    """mean ± std over tasks; tasks whose inner loop diverged (non-finite loss) are counted, not averaged."""
    ok = [v for v in xs if math.isfinite(v)]
    if not ok:
        return "diverged"
    s = f"{statistics.mean(ok):.3f} ± {statistics.stdev(ok) if len(ok) > 1 else 0.0:.3f}"
    return s + (f" ({len(xs) - len(ok)} diverged)" if len(ok) < len(xs) else "")


def run(cfg: Config, log=print) -> Dict[str, Dict[int, List[Tuple[float, float]]]]:
    """The whole comparison; returns {method: {k: [(acc, loss) per held-out task]}} and prints the table."""
    t0 = time.time()
    fam = TaskFamily(cfg.seed)
    backbone = pretrain_backbone(fam, cfg)
    slots = max(cfg.meta_batch, cfg.eval_batch)
    model = FewShotLoRA(backbone, slots, cfg.rank, cfg.seed, cfg.backend)
    std = standard_init(model, cfg.seed)
    log(f"backbone pretrained on {N_BASE} base classes ({time.time() - t0:.1f} s); meta-training "
        f"{cfg.meta_iters} Reptile iterations × {cfg.meta_batch} tasks in one batched pass each")
    meta = reptile(model, std, fam, cfg, log)
    g = torch.Generator().manual_seed(cfg.seed + 5)
    held_out = [fam.task(g, cfg, novel=True) for _ in range(cfg.eval_tasks)]
    res: Dict[str, Dict[int, List[Tuple[float, float]]]] = {"(a) LoRA, standard init": {}, "(b) LoRA, Reptile init": {}}
    for name, init in zip(res, (std, meta)):
        for k in cfg.steps:
            rows = []
            for i in range(0, len(held_out), cfg.eval_batch):
                rows += adapt(model, init, held_out[i:i + cfg.eval_batch], k, cfg.inner_lr)
            res[name][k] = rows
    proto = protonet(backbone, held_out)
    res["(c) ProtoNet, frozen features"] = {k: proto for k in cfg.steps}
    log(f"\n{cfg.eval_tasks} held-out {N_WAY}-way {cfg.shots}-shot tasks on novel classes, {cfg.queries} queries per "
        f"class; inner loop: SGD lr {cfg.inner_lr} on LoRA (r={cfg.rank}) only; mean ± std over tasks")
    hdr = f"{'method':32s} " + " ".join(f"{'k=' + str(k) + ' acc':>15s} {'k=' + str(k) + ' loss':>15s}" for k in cfg.steps)
    log(hdr)
    log("-" * len(hdr))
    for name, by_k in res.items():
        cells = []
        for k in cfg.steps:
            cells.append(f"{_ms([a for a, _ in by_k[k]]):>15s} {_ms([lo for _, lo in by_k[k]]):>15s}")
        log(f"{name:32s} " + " ".join(cells))
    log("(ProtoNet has no adaptation steps: its row repeats)")
    log(f"({time.time() - t0:.0f} s)")
    return res


def time_inner_loop(cfg: Config, tasks_n: int = 16, steps: int = 5, repeats: int = 3) -> Dict[str, float]:
    """Seconds for ``tasks_n`` tasks' inner loops: all in one batched MultiLoRALinear pass per step, vs one
    task at a time (the same module, one slot)."""
    fam = TaskFamily(cfg.seed)
    backbone = pretrain_backbone(fam, Config(pretrain_steps=1, seed=cfg.seed))
    model = FewShotLoRA(backbone, tasks_n, cfg.rank, cfg.seed, cfg.backend)
    init = standard_init(model, cfg.seed)
    g = torch.Generator().manual_seed(1)
    tasks = [fam.task(g, cfg, novel=True) for _ in range(tasks_n)]
    best = {"batched": float("inf"), "one task at a time": float("inf")}
    for _ in range(repeats):
        t = time.perf_counter()
        adapt(model, init, tasks, steps, cfg.inner_lr)
        best["batched"] = min(best["batched"], time.perf_counter() - t)
        t = time.perf_counter()
        for task in tasks:
            adapt(model, init, [task], steps, cfg.inner_lr)
        best["one task at a time"] = min(best["one task at a time"], time.perf_counter() - t)
    return best
