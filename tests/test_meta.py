"""The meta-learning hybrid: the batched inner loop is exactly the per-task loops, Reptile's init helps on
held-out tasks, the example runs end to end, and second-order gradients through the fused ops are
refused (first-order only, as documented) while the reference supports them."""
import math
import os
import subprocess
import sys

import pytest
import torch

import peft_kernels as pk
from peft_kernels import meta
from peft_kernels.reference import lora_linear_ref, multi_lora_linear_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batched_inner_loop_equals_one_task_at_a_time():
    cfg = meta.Config.quick()
    fam = meta.TaskFamily(0)
    backbone = meta.pretrain_backbone(fam, meta.Config(pretrain_steps=5))
    model = meta.FewShotLoRA(backbone, 4, cfg.rank, 0)
    init = meta.standard_init(model, 0)
    init[1].normal_(0, 0.1)  # a non-zero B so every parameter moves in the first step
    g = torch.Generator().manual_seed(9)
    tasks = [fam.task(g, cfg, novel=True) for _ in range(4)]
    batched = meta.adapt(model, init, tasks, 3, cfg.inner_lr)
    slots = model.read_slots(4)
    for s, task in enumerate(tasks):
        alone = meta.adapt(model, init, [task], 3, cfg.inner_lr)
        mine = model.read_slots(1)
        for a, b in zip(slots, mine):
            torch.testing.assert_close(a[s], b[0], rtol=1e-5, atol=1e-6)
        assert math.isclose(batched[s][0], alone[0][0]) and math.isclose(batched[s][1], alone[0][1], rel_tol=1e-5)


def test_reptile_init_beats_standard_init_after_one_step():
    res = meta.run(meta.Config.quick(), log=lambda *a: None)
    loss = {name: sum(lo for _, lo in by_k[1]) / len(by_k[1]) for name, by_k in res.items()}
    std, rep = loss["(a) LoRA, standard init"], loss["(b) LoRA, Reptile init"]
    assert rep < std - 0.5, (rep, std)
    acc = {name: [a for a, _ in by_k[20]] for name, by_k in res.items()}
    assert all(0 <= a <= 1 for v in acc.values() for a in v)


def test_example_runs_end_to_end():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "meta_lora.py"), "--quick"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("(")]
    names = [r for r in rows if r[:3] in ("(a)", "(b)", "(c)")]
    assert len(names) == 3, p.stdout
    for r in names:
        assert r.count("±") == 8, r  # acc and loss at k = 0, 1, 5, 20


def test_second_order_through_fused_ops_is_refused_reference_supports_it():
    """First-order only: differentiating the fused ops' gradients again raises (never a silent zero), while
    the reference (plain autograd) passes gradgradcheck, so second-order MAML can run on the spec."""
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 6, dtype=torch.float64)
    A = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    y = pk.lora_linear(x, W, None, A, B, 0.5, backend="torch")
    (gB,) = torch.autograd.grad(y.square().sum(), B, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gB.sum(), A)
    assert torch.autograd.gradgradcheck(lambda x, A, B: lora_linear_ref(x, W, None, A, B, 0.5), (x, A, B))
    ids = torch.tensor([0, 1, 1, -1, 0])
    As = torch.randn(2, 2, 6, dtype=torch.float64, requires_grad=True)
    Bs = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    sc = torch.tensor([0.5, 2.0], dtype=torch.float64)
    y = pk.multi_lora_linear(x, W, None, As, Bs, sc, ids, backend="torch")
    (gB,) = torch.autograd.grad(y.square().sum(), Bs, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gB.sum(), As)
    assert torch.autograd.gradgradcheck(lambda x, A, B: multi_lora_linear_ref(x, W, None, A, B, sc, ids), (x, As, Bs))
