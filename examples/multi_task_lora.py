"""Train one LoRA adapter per task, for several few-shot tasks, in ONE batched pass.

Every task's examples go into the same batch; ``peft_kernels.adapter_ids`` tells each
MultiLoRALinear which adapter slot a row belongs to. Each slot's gradient comes only from its own
task's rows, so the batched run takes exactly the optimizer steps that separate per-task training
takes: this script trains both ways from the same initialisation and checks the losses match.

    python examples/multi_task_lora.py [--tasks 6] [--shots 16] [--steps 60]

Runs on CPU in seconds. Exits non-zero if the batched and separate losses disagree.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn as nn

import peft_kernels as pk


class Base(nn.Module):
    """A small frozen model: the "pretrained" network every task adapts."""

    def __init__(self, d_in=24, d_hidden=48, d_out=6):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_tasks(base: Base, n_tasks: int, shots: int, g: torch.Generator):
    """Few-shot regression tasks: the base network with a task-specific low-rank weight change."""
    tasks = []
    for _ in range(n_tasks):
        teacher = copy.deepcopy(base)
        with torch.no_grad():
            for lin in (teacher.fc1, teacher.fc2):
                u = torch.randn(lin.out_features, 2, generator=g)
                v = torch.randn(2, lin.in_features, generator=g)
                lin.weight += 0.3 * (u @ v) / lin.in_features ** 0.5
        x = torch.randn(shots, base.fc1.in_features, generator=g)
        with torch.no_grad():
            tasks.append((x, teacher(x)))
    return tasks


def init_adapters(base: Base, n_tasks: int, r: int, g: torch.Generator):
    """Per task, per layer: (lora_A [r, in], lora_B [out, r]); B starts small but nonzero."""
    out = []
    for _ in range(n_tasks):
        out.append({name: (torch.randn(r, lin.in_features, generator=g) / lin.in_features ** 0.5,
                           torch.randn(lin.out_features, r, generator=g) * 0.01)
                    for name, lin in (("fc1", base.fc1), ("fc2", base.fc2))})
    return out


def train_separately(base, tasks, adapters, r, alpha, steps, lr):
    losses = [[] for _ in tasks]
    for t, ((x, y), ad) in enumerate(zip(tasks, adapters)):
        model = copy.deepcopy(base)
        params = []
        for name in ("fc1", "fc2"):
            layer = pk.LoRALinear.from_linear(getattr(model, name), r=r, lora_alpha=alpha)
            with torch.no_grad():
                layer.lora_A.copy_(ad[name][0])
                layer.lora_B.copy_(ad[name][1])
            setattr(model, name, layer)
            params += [layer.lora_A, layer.lora_B]
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[t].append(loss.item())
    return losses


def train_batched(base, tasks, adapters, r, alpha, steps, lr):
    model = copy.deepcopy(base)
    for name in ("fc1", "fc2"):
        layer = pk.MultiLoRALinear.from_linear(getattr(model, name), max_adapters=len(tasks), max_rank=r)
        for slot, ad in enumerate(adapters):
            layer.set_adapter(slot, ad[name][0], ad[name][1], alpha / r)
        setattr(model, name, layer)
    x = torch.cat([x for x, _ in tasks])
    y = torch.cat([y for _, y in tasks])
    sizes = [len(x_) for x_, _ in tasks]
    ids = torch.repeat_interleave(torch.arange(len(tasks)), torch.tensor(sizes))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = [[] for _ in tasks]
    for _ in range(steps):
        with pk.adapter_ids(model, ids):  # one token grouping, shared by both layers and backward
            out = model(x)
        per_task = [((o - t) ** 2).mean() for o, t in zip(out.split(sizes), y.split(sizes))]
        opt.zero_grad()
        torch.stack(per_task).sum().backward()  # slot a's gradient = d(loss_a)/d(adapter a)
        opt.step()
        for t, l in enumerate(per_task):
            losses[t].append(l.item())
    return losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.02)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base = Base().requires_grad_(False)
    tasks = make_tasks(base, a.tasks, a.shots, g)
    adapters = init_adapters(base, a.tasks, a.rank, g)
    alpha = 2 * a.rank

    train_separately(base, tasks[:1], adapters[:1], a.rank, alpha, 1, a.lr)  # warm-up (lazy loads), not timed
    train_batched(base, tasks, adapters, a.rank, alpha, 1, a.lr)
    t0 = time.perf_counter()
    sep = train_separately(base, tasks, adapters, a.rank, alpha, a.steps, a.lr)
    t_sep = time.perf_counter() - t0
    t0 = time.perf_counter()
    bat = train_batched(base, tasks, adapters, a.rank, alpha, a.steps, a.lr)
    t_bat = time.perf_counter() - t0

    marks = sorted({0, a.steps // 4, a.steps // 2, a.steps - 1})
    print(f"{a.tasks} tasks × {a.shots} shots, rank {a.rank}, Adam lr {a.lr}, {a.steps} steps")
    print(f"{'task':>4s} " + " ".join(f"{'step ' + str(s) + ' sep/batched':>24s}" for s in marks))
    worst = 0.0
    for t in range(a.tasks):
        cells = []
        for s in marks:
            cells.append(f"{sep[t][s]:11.5f}/{bat[t][s]:<11.5f}")
        worst = max(worst, max(abs(p - q) / max(abs(p), 1e-12) for p, q in zip(sep[t], bat[t])))
        print(f"{t:4d} " + " ".join(f"{c:>24s}" for c in cells))
    print(f"max relative loss difference over all tasks and steps: {worst:.2e}")
    print(f"time: separate {t_sep:.2f} s ({a.tasks} models, {a.tasks * a.steps} steps), "
          f"batched {t_bat:.2f} s (1 model, {a.steps} steps)")
    ok = worst < 1e-4
    print("MATCH" if ok else "MISMATCH: batched training diverged from separate training")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
