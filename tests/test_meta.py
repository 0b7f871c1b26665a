"""The meta-learning hybrid: the batched inner loop is exactly the per-task loops, Reptile's init helps on
held-out tasks, the example runs end to end, and second-order gradients: exact through the torch backend of
lora_linear and multi_lora_linear (gradgradcheck, MAML meta-gradients against the reference), a clear error
from every first-order-only backend (never a silent first-order answer)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import peft_kernels as pk
from peft_kernels import meta
from peft_kernels.reference import lora_linear_ref

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


def _f64(*shape, grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_(grad)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("shape", ["2d", "3d-strided"])
def test_lora_linear_double_backward_on_the_torch_backend(bias, dropout, shape):
    """gradgradcheck (fp64) through the fused op: x, W, b, A and B all differentiable; dropout with a fixed
    seed (the same mask in every call), 3-D strided inputs."""
    torch.manual_seed(0)
    x = (_f64(3, 4, 12, grad=False)[:, :, ::2].detach().requires_grad_() if shape == "3d-strided"
         else _f64(5, 6))
    assert shape == "2d" or x.stride(-1) == 2
    W, b = _f64(4, 6), (_f64(4) if bias else None)
    A, B = _f64(3, 6), _f64(4, 3)
    seed = torch.tensor([1234])

    def f(x, W, b, A, B):
        return pk.ops.lora.LoRALinearFunction.apply(x, W, b, A, B, pk.ops.lora.LoRACall(0.7, dropout, seed if dropout
                                                                                           else None, "torch"))

    fn = (lambda x, W, b, A, B: f(x, W, b, A, B)) if bias else (lambda x, W, A, B: f(x, W, None, A, B))
    inputs = (x, W, b, A, B) if bias else (x, W, A, B)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_lora_linear_public_op_double_backward_matches_the_reference():
    """Through pk.lora_linear (backend="torch"): a MAML-style meta-gradient (inner SGD step with
    create_graph=True, outer loss at the adapted weights) equals the reference's, including when the inner
    loss's dY needs no grad (the case that used to be silently first-order)."""
    torch.manual_seed(1)
    x, W = _f64(7, 6, grad=False), _f64(4, 6, grad=False)
    t = _f64(7, 4, grad=False)
    for inner in ("mse", "sum"):
        grads = []
        for op in (lambda *a: pk.lora_linear(*a, backend="torch"), lora_linear_ref):
            torch.manual_seed(2)
            A, B = _f64(3, 6, scale=0.5), _f64(4, 3, scale=0.5)
            y = op(x, W, None, A, B, 0.5)
            loss = (y - t).square().sum() if inner == "mse" else (y * t).sum()
            gA, gB = torch.autograd.grad(loss, (A, B), create_graph=True)
            A2, B2 = A - 0.1 * gA, B - 0.1 * gB
            outer = (op(x, W, None, A2, B2, 0.5) - t).square().sum()
            grads.append(torch.autograd.grad(outer, (A, B)))
        for g, r in zip(*grads):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-12), (inner, (g - r).abs().max())


@pytest.mark.parametrize("ext", [False, True], ids=["torch-ops", "cpp-ext"])
def test_multi_lora_linear_double_backward_on_the_torch_backend(ext, monkeypatch):
    """gradgradcheck (fp64) of multi_lora_linear on the torch backend, mixed ranks and -1 tokens, whichever
    path (C++ kernels or torch ops) runs the first-order pass."""
    from peft_kernels.ops import multi_lora as ML

    if ext and not pk._ext.available():
        pytest.skip(pk._ext.unavailable_reason())
    monkeypatch.setattr(ML, "_use_ext", lambda x: ext and x.device.type == "cpu")
    torch.manual_seed(0)
    x, W, b = _f64(6, 5), _f64(4, 5), _f64(4)
    As, Bs = _f64(3, 3, 5), _f64(3, 4, 3)
    ids = torch.tensor([0, 2, 2, -1, 0, 1])
    ranks = torch.tensor([3, 1, 2], dtype=torch.int32)
    sc = [0.5, 2.0, -1.0]

    def fn(x, W, b, A, B):
        return pk.multi_lora_linear(x, W, b, A, B, sc, ids, ranks=ranks, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, W, b, As, Bs))
    assert torch.autograd.gradgradcheck(fn, (x, W, b, As, Bs))


def _second_order(op, *args):
    y = op(*args)
    params = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    g = torch.autograd.grad(y.sum(), params, create_graph=True, allow_unused=True)  # dY = 1 needs no grad
    g = [v for v in g if v is not None]
    torch.autograd.grad(sum(v.square().sum() for v in g), params, allow_unused=True)


@pytest.mark.parametrize("case", ["lora-triton", "multi-triton", "dora-triton", "ia3-triton", "bottleneck",
                                  "adapter-linear", "moe-torch", "moe-triton", "linear-ce", "linear-ce-none"])
def test_first_order_backends_raise_when_their_gradients_are_differentiated(case):
    """Backends without double backward raise a clear error under create_graph=True, even when dY needs no
    grad (never a silent first-order answer); with create_graph=False they are untouched."""
    if pk.dispatch.unavailable_reason("triton", torch.device("cpu")) and "triton" in case:
        pytest.skip(pk.dispatch.unavailable_reason("triton", torch.device("cpu")))
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    W = torch.randn(6, 8)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    if case == "lora-triton":
        op, args = (lambda *a: pk.lora_linear(*a, 0.5, backend="triton")), (x, W, None, A, B)
    elif case == "multi-triton":
        As, Bs = torch.randn(2, 2, 8, requires_grad=True), torch.randn(2, 6, 2, requires_grad=True)
        ids = torch.tensor([0, 1, -1, 1])
        op, args = (lambda *a: pk.multi_lora_linear(*a, [1.0, 2.0], ids, backend="triton")), (x, W, None, As, Bs)
    elif case == "dora-triton":
        mag = torch.rand(6, requires_grad=True)
        op = lambda x, A, B, m: pk.dora_linear(x, W, None, A, B, 0.5, m, backend="triton")  # noqa: E731
        args = (x, A, B, mag)
    elif case == "ia3-triton":
        lv = torch.rand(6, 1, requires_grad=True)
        op, args = (lambda x, l: pk.ia3_linear(x, W, None, l, backend="triton")), (x, lv)
    elif case == "bottleneck":
        d, u = torch.randn(3, 8, requires_grad=True), torch.randn(8, 3, requires_grad=True)
        op, args = (lambda h, d, u: pk.bottleneck_adapter(h, d, None, u, None, 0.5)), (x, d, u)
    elif case.startswith("moe"):  # two experts' rows of x (the saved S would make a silent first-order answer)
        We, Ae, Be = torch.randn(2, 6, 8), torch.randn(2, 2, 8, requires_grad=True), torch.randn(2, 6, 2,
                                                                                                  requires_grad=True)
        from peft_kernels.ops.moe import grouped_lora_linear

        op = lambda x, A, B: grouped_lora_linear(x, [0, 3, 4], We, A, B, 0.5, backend=case[4:])  # noqa: E731
        args = (x, Ae, Be)
    elif case.startswith("linear-ce"):  # (its gradients are computed in forward: they were silently constants)
        labels = torch.tensor([1, 5, -100, 0])
        op = lambda h, A, B: pk.linear_cross_entropy(  # noqa: E731
            h, W, labels, lora_A=A, lora_B=B, scaling=0.5, reduction="none" if case.endswith("none") else "mean")
        args = (x, A, B)
    else:
        d, u = torch.randn(3, 6, requires_grad=True), torch.randn(6, 3, requires_grad=True)
        op, args = (lambda x, d, u: pk.adapter_linear(x, W, None, d, None, u, None, 0.5)), (x, d, u)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        _second_order(op, *args)
    y = op(*args)  # plain first-order backward still works
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
