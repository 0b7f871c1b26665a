"""float64 stays float64 end to end on the torch backend: every op's output and gradients agree with the
float64 reference to float64 accuracy (1e-12 relative), far below what any fp32 rounding on the way (a
scaling, a norm, a bias-gradient sum) would leave (about 1e-7)."""
import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels import reference as ref

F64 = torch.float64
TOL = 1e-12


def _rel(got, want):
    return ((got.detach() - want.detach()).abs().max() / (1.0 + want.detach().abs().max())).item()


def _check(name, got, want):
    assert got.dtype == F64, f"{name} is {got.dtype}"
    err = _rel(got, want)
    assert err < TOL, f"{name}: relative error {err:.2e} (an fp32 rounding on the way leaves ~1e-7)"


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("ext", [True, False], ids=["cpp-ext", "torch-ops"])
def test_multi_lora_linear(ext, monkeypatch):
    from peft_kernels.ops import multi_lora as ML

    if ext and not pk._ext.available():
        pytest.skip(pk._ext.unavailable_reason())
    monkeypatch.setattr(ML, "_use_ext", lambda x: ext and x.device.type == "cpu")
    torch.manual_seed(0)
    x, W, b = torch.randn(70, 9, dtype=F64), torch.randn(7, 9, dtype=F64), torch.randn(7, dtype=F64)
    A, B = torch.randn(3, 4, 9, dtype=F64), torch.randn(3, 7, 4, dtype=F64)
    ids = torch.randint(-1, 3, (70,))
    sc = [0.1, 1.0 / 3.0, 0.7]  # not representable in fp32
    dy = torch.randn(70, 7, dtype=F64)
    outs = []
    for f in (lambda *a: pk.multi_lora_linear(*a, sc, ids, backend="torch"),
              lambda *a: ref.multi_lora_linear_ref(*a, torch.tensor(sc, dtype=F64), ids)):
        leaves = _leaves(x, A, B)
        y = f(leaves[0], W, b, leaves[1], leaves[2])
        y.backward(dy)
        outs.append([y] + [t.grad for t in leaves])
    for name, g, w in zip(["y", "dx", "dA", "dB"], *outs):
        _check(name, g, w)


def test_multi_lora_module():
    torch.manual_seed(1)
    lin = nn.Linear(9, 7, dtype=F64)
    m = pk.MultiLoRALinear.from_linear(lin, max_adapters=2, max_rank=3)
    assert m.scalings.dtype == F64
    A, B = torch.randn(3, 9, dtype=F64), torch.randn(7, 3, dtype=F64)
    m.set_adapter(1, A, B, 0.1)
    assert m.scalings[1].item() == 0.1
    x, ids = torch.randn(5, 9, dtype=F64), torch.tensor([1, 1, -1, 1, 0])
    want = ref.multi_lora_linear_ref(x, lin.weight, lin.bias, torch.stack([torch.zeros_like(A), A]),
                                     torch.stack([torch.zeros_like(B), B]), torch.tensor([0.0, 0.1], dtype=F64), ids)
    _check("y", m(x, ids), want)


def test_dora_linear_and_module():
    torch.manual_seed(2)
    x, W, b = torch.randn(6, 8, dtype=F64), torch.randn(5, 8, dtype=F64), torch.randn(5, dtype=F64)
    A, B, mag = torch.randn(3, 8, dtype=F64), torch.randn(5, 3, dtype=F64), torch.rand(5, dtype=F64) + 0.5
    n = pk.ops.dora.dora_weight_norm(W, A, B, 0.1)
    assert n.dtype == F64
    _check("norm", n, (W + 0.1 * B @ A).norm(dim=1))
    dy = torch.randn(6, 5, dtype=F64)
    outs = []
    for f in (lambda x, A, B, m: pk.dora_linear(x, W, b, A, B, 0.1, m, backend="torch"),
              lambda x, A, B, m: ref.dora_linear_ref(x, W, b, A, B, 0.1, m)):
        leaves = _leaves(x, A, B, mag)
        y = f(*leaves)
        y.backward(dy)
        outs.append([y] + [t.grad for t in leaves])
    for name, g, w in zip(["y", "dx", "dA", "dB", "dm"], *outs):
        _check(name, g, w)
    lay = pk.LoRALinear.from_linear(nn.Linear(8, 5, dtype=F64), r=3, lora_alpha=0.3, use_dora=True,
                                    init_lora_weights=False)
    assert lay.lora_magnitude_vector.dtype == F64 and lay.dora_weight_norm().dtype == F64


@pytest.mark.parametrize("mode", ["bottleneck", "sequential", "parallel"])
def test_bottleneck_adapters(mode):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 8, dtype=F64)
    W, bias = torch.randn(6, 8, dtype=F64), torch.randn(6, dtype=F64)
    a_in = 8 if mode in ("bottleneck", "parallel") else 6
    a_out = 8 if mode == "bottleneck" else 6
    D, db = torch.randn(3, a_in, dtype=F64), torch.randn(3, dtype=F64)
    U, ub = torch.randn(a_out, 3, dtype=F64), torch.randn(a_out, dtype=F64)
    s = torch.rand(a_out, dtype=F64) + 0.5
    dy = torch.randn(2, 5, a_out, dtype=F64)
    outs = []
    for which in ("op", "ref"):
        leaves = _leaves(x, D, db, U, ub, s)
        if mode == "bottleneck":
            y = (pk.bottleneck_adapter(leaves[0], *leaves[1:5], leaves[5], backend="torch") if which == "op"
                 else leaves[0] + ref.bottleneck_ref(leaves[0], *leaves[1:5], "relu", leaves[5]))
        elif which == "op":
            y = pk.adapter_linear(leaves[0], W, bias, *leaves[1:5], leaves[5], mode=mode, backend="torch")
        else:
            y = ref.adapter_linear_ref(leaves[0], W, bias, *leaves[1:5], "relu", leaves[5], mode)
        y.backward(dy)
        outs.append([y] + [t.grad for t in leaves])
    for name, g, w in zip(["y", "dx", "dD", "db_d", "dU", "db_u", "ds"], *outs):
        _check(name, g, w)
