"""(IA)³: the op against the reference (forward, gradients, dtypes, odd shapes, 3-D / non-contiguous input,
bias / no bias, both scalings, every backend: Triton in the interpreter), the module, PEFT parity and
checkpoints, errors."""
import copy

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels import IA3Linear, LoRALinear, ia3_linear
from peft_kernels.ops.ia3 import SUPPORTED
from peft_kernels.reference import ia3_linear_ref

from helpers import arg, assert_close, backend_params, dtype_params, spy_triton_launches


def _case(M, K, N, dtype, ff, bias=True, three_d=False, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (3, M, K) if three_d else (M, K)
    x = torch.randn(*shape[:-1], 2 * K if noncontig else K, generator=g).to(dtype)
    if noncontig:
        x = x[..., ::2]
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    l = (1 + 0.5 * torch.randn(K if ff else N, generator=g)).float()
    return x, W, b, l


CASES = [  # (M, K, N): odd sizes, several tiles in each dim (interpreter tiles are 32), tiny
    (37, 45, 29), (70, 33, 67), (1, 5, 3)]


@pytest.mark.parametrize("backend", backend_params(supported=SUPPORTED))
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("MKN", CASES, ids=lambda c: "x".join(map(str, c)))
def test_forward_and_grads_match_reference(backend, dtype, ff, MKN):
    M, K, N = MKN
    x, W, b, l = _case(M, K, N, dtype, ff)
    xs, ls = x.clone().requires_grad_(), l.clone().requires_grad_()
    y = ia3_linear(xs, W, b, ls, feedforward=ff, backend=backend)
    x64, l64 = x.double().requires_grad_(), l.double().requires_grad_()
    y64 = ia3_linear_ref(x64, W.double(), b.double(), l64, ff)
    xt, lt = x.clone().requires_grad_(), l.clone().requires_grad_()
    yt = ia3_linear_ref(xt, W, b, lt, ff).to(dtype)  # plain torch at the same precision
    assert y.dtype == dtype
    assert_close(y, y64, yt, f"{backend} y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    gx, gl = torch.autograd.grad(y, [xs, ls], dy)
    rx, rl = torch.autograd.grad(y64, [x64, l64], dy.double())
    tx, tl = torch.autograd.grad(yt, [xt, lt], dy)
    assert_close(gx, rx, tx, f"{backend} dx")
    assert_close(gl, rl, tl, f"{backend} dl")


@pytest.mark.parametrize("backend", backend_params(supported=SUPPORTED))
@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
def test_3d_noncontiguous_no_bias(backend, ff):
    x, W, _, l = _case(9, 21, 13, torch.float32, ff, bias=False, three_d=True, noncontig=True)
    assert not x.is_contiguous()
    xs, ls = x.detach().requires_grad_(), l.clone().requires_grad_()  # a clone of x would be contiguous
    y = ia3_linear(xs, W, None, ls, feedforward=ff, backend=backend)
    x64, l64 = x.double().requires_grad_(), l.double().requires_grad_()
    y64 = ia3_linear_ref(x64, W.double(), None, l64, ff)
    assert y.shape == (3, 9, 13)
    assert_close(y, y64, ia3_linear_ref(x, W, None, l, ff), "y")
    dy = torch.randn_like(y)
    gx, gl = torch.autograd.grad(y, [xs, ls], dy)
    rx, rl = torch.autograd.grad(y64, [x64, l64], dy.double())
    x32, l32 = x.clone().requires_grad_(), l.clone().requires_grad_()
    lx, ll = torch.autograd.grad(ia3_linear_ref(x32, W, None, l32, ff), [x32, l32], dy)
    assert_close(gx, rx, lx, "dx")
    assert_close(gl, rl, ll, "dl")


def test_gradcheck_torch_backend_fp64():
    for ff in (False, True):
        x, W, b, l = _case(5, 7, 6, torch.float64, ff)
        x.requires_grad_()
        l = l.double().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, l: ia3_linear(x, W, b, l, feedforward=ff, backend="torch"), (x, l))


@pytest.mark.parametrize("backend", backend_params(supported=SUPPORTED))
def test_triton_keeps_only_what_backward_needs(backend):
    """Output scaling keeps y₀ = x·Wᵀ + b (for dl); input scaling keeps x: what PEFT's graph keeps, no more."""
    from peft_kernels.bench.common import saved_activation_bytes

    for ff in (False, True):
        x, W, b, l = _case(16, 24, 20, torch.float32, ff)
        x.requires_grad_()
        l.requires_grad_()
        n = saved_activation_bytes(lambda: ia3_linear(x, W, b, l, feedforward=ff, backend=backend), [W, b, l])
        assert n == (16 * 24 * 4 if ff else 16 * 20 * 4), (ff, n)


def test_triton_launches_one_kernel_each_way(monkeypatch):
    from peft_kernels import dispatch
    from peft_kernels.kernels import ia3 as K

    from helpers import count_launches

    if dispatch.unavailable_reason("triton", torch.device("cpu")):
        pytest.skip(dispatch.unavailable_reason("triton", torch.device("cpu")))
    launches = count_launches(monkeypatch, [K._ia3_gemm_kernel])
    for ff in (False, True):
        x, W, b, l = _case(8, 12, 10, torch.float32, ff)
        x.requires_grad_()
        l.requires_grad_()
        ia3_linear(x, W, b, l, feedforward=ff, backend="triton").sum().backward()
    assert launches == ["_ia3_gemm_kernel"] * 4


@pytest.mark.parametrize("backend", backend_params(supported=SUPPORTED))
def test_module_matches_peft_and_loads_its_checkpoint(tmp_path, backend):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)

    def model():
        torch.manual_seed(0)
        m = nn.Module()
        m.k_proj, m.down = nn.Linear(12, 10), nn.Linear(10, 7)
        return m

    cfg = peft.IA3Config(target_modules=["k_proj", "down"], feedforward_modules=["down"], init_ia3_weights=False)
    pm = peft.get_peft_model(model(), cfg)
    pm.eval()
    x = torch.randn(4, 5, 12)
    inner = pm.base_model.model
    ref = inner.down(inner.k_proj(x))
    pm.save_pretrained(tmp_path)
    ours = model()
    assert pk.load_peft_adapter(ours, tmp_path, backend=backend) == ["down", "k_proj"]
    assert isinstance(ours.k_proj, IA3Linear) and not ours.k_proj.feedforward and ours.down.feedforward
    torch.testing.assert_close(ours.down(ours.k_proj(x)), ref, rtol=1e-5, atol=1e-6)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["k_proj.ia3_l", "down.ia3_l"]
    # gradients equal PEFT's
    pm.train()
    ours.train()
    ref = inner.down(inner.k_proj(x)).square().sum()
    out = ours.down(ours.k_proj(x)).square().sum()
    ref.backward()
    out.backward()
    for name in ("k_proj", "down"):
        torch.testing.assert_close(getattr(ours, name).ia3_l.grad, getattr(inner, name).ia3_l["default"].grad,
                                   rtol=1e-5, atol=1e-5)
    # merged: a plain linear with the same output
    lin = ours.k_proj.to_linear()
    torch.testing.assert_close(lin(x), ours.k_proj(x), rtol=1e-5, atol=1e-6)
    # our save -> PEFT loads it, same output
    with torch.no_grad():
        ours.down.ia3_l.mul_(1.5)
    assert sorted(pk.save_peft_adapter(ours, tmp_path / "ours")) == ["down", "k_proj"]
    back = peft.PeftModel.from_pretrained(model(), tmp_path / "ours").eval()
    ours.eval()
    torch.testing.assert_close(back.base_model.model.down(back.base_model.model.k_proj(x)),
                               ours.down(ours.k_proj(x)), rtol=1e-5, atol=1e-6)
    mixed = nn.Sequential(IA3Linear(4, 3), LoRALinear(3, 2))
    with pytest.raises(ValueError, match="both IA3 and LoRA"):
        pk.save_peft_adapter(mixed, tmp_path / "mixed")


def test_inject_ia3_and_errors(tmp_path):
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    before = copy.deepcopy(m)
    assert pk.inject_ia3(m, ["0", "2"], feedforward_modules=["2"]) == ["0", "2"]
    assert m[2].feedforward and not m[0].feedforward
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), before(x))  # l = 1 at init: the layer equals the base
    with pytest.raises(ValueError, match="already is a IA3Linear"):
        pk.inject_ia3(m, ["0"])
    W, b = torch.randn(5, 6), torch.randn(5)
    with pytest.raises(ValueError, match="ia3_l must hold 5"):
        ia3_linear(x, W, b, torch.ones(6))
    with pytest.raises(ValueError, match="ia3_l must hold 6"):
        ia3_linear(x, W, b, torch.ones(5), feedforward=True)
    with pytest.raises(TypeError, match="feedforward must be a bool"):
        ia3_linear(x, W, b, torch.ones(5), feedforward=1)
    with pytest.raises(ValueError, match="x must have last dim"):
        ia3_linear(torch.randn(3, 7), W, b, torch.ones(5))
    with pytest.raises(TypeError, match="weight/bias dtype"):
        ia3_linear(x, W.half(), b, torch.ones(5))


def test_bad_ia3_checkpoint_changes_nothing(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    def model():
        torch.manual_seed(0)
        m = nn.Module()
        m.fc = nn.Linear(6, 5)
        return m

    pm = peft.get_peft_model(model(), peft.IA3Config(target_modules=["fc"], feedforward_modules=[]))
    pm.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    sd = load_file(f)
    (k,) = sd
    save_file({k: torch.ones(1, 6)}, f)  # input-scaling shape on an output-scaled module
    m = model()
    state = copy.deepcopy(m.state_dict())
    with pytest.raises(pk.CheckpointError, match="ia3_l has shape"):
        pk.load_peft_adapter(m, tmp_path)
    assert isinstance(m.fc, nn.Linear) and all(torch.equal(v, m.state_dict()[k2]) for k2, v in state.items())
    save_file({k: torch.full((5, 1), float("nan"))}, f)
    with pytest.raises(pk.CheckpointError, match="finite"):
        pk.load_peft_adapter(m, tmp_path)
    with pytest.raises(pk.CheckpointError, match="slot= applies to LoRA"):
        pk.load_peft_adapter(m, tmp_path, slot=0)


@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
def test_strided_x_reaches_the_triton_kernel(monkeypatch, ff):
    """A really strided x (last-dim stride 2) reaches the GEMM through its strides (test_3d_noncontiguous_no_bias
    checks the values)."""
    from peft_kernels.kernels import ia3 as I

    calls = spy_triton_launches(monkeypatch, [I._ia3_gemm_kernel])
    x, W, _, l = _case(9, 21, 13, torch.float32, ff, bias=False, three_d=False, noncontig=True)
    assert x.stride() == (42, 2)
    ia3_linear(x.detach().requires_grad_(), W, None, l.clone().requires_grad_(), feedforward=ff,
               backend="triton").sum().backward()
    fwd = calls[0][1]
    assert arg(I._ia3_gemm_kernel, fwd, "s_ak") == 2 and arg(I._ia3_gemm_kernel, fwd, "s_am") == 42
    if ff:  # input scaling: the backward's dl partials read x through its strides too
        assert arg(I._ia3_gemm_kernel, calls[1][1], "s_xn") == 2


@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
def test_to_linear_both_scalings(ff):
    """to_linear() folds the scaling into a plain nn.Linear, for input (feedforward) and output scaling."""
    torch.manual_seed(0)
    m = IA3Linear(13, 9, feedforward=ff)
    with torch.no_grad():
        m.ia3_l.uniform_(0.5, 1.5)
    x = torch.randn(7, 13)
    lin = m.to_linear()
    assert isinstance(lin, torch.nn.Linear) and lin.weight.shape == (9, 13)
    y64 = ia3_linear_ref(x.double(), m.weight.double(), m.bias.double(), m.ia3_l.double(), ff)
    with torch.no_grad():
        # the same-precision yardstick: torch folding l into W in fp32, then a plain linear
        l = m.ia3_l.reshape(-1)
        Wf = m.weight * (l[None, :] if ff else l[:, None])
        bf = m.bias if ff else m.bias * l
        assert_close(lin(x), y64, torch.nn.functional.linear(x, Wf, bf), "to_linear")
        assert_close(m(x), y64, ia3_linear_ref(x, m.weight, m.bias, m.ia3_l, ff), "module")


@pytest.mark.parametrize("backend", backend_params(supported=SUPPORTED))
@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
def test_trainable_base_gets_gradients(backend, ff):
    """An unfrozen base (not the PEFT case) gets dW and db, on the torch and the Triton backend, vs fp64."""
    x, W, b, l = _case(11, 17, 10, torch.float32, ff)
    ins = [x.clone().requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_(),
           l.clone().requires_grad_()]
    y = ia3_linear(*ins, feedforward=ff, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    r64 = [v.double().requires_grad_() for v in (x, W, b, l)]
    ia3_linear_ref(*r64, ff).backward(dy.double())
    rlp = [v.clone().requires_grad_() for v in (x, W, b, l)]
    ia3_linear_ref(*rlp, ff).backward(dy)
    for name, got, a, c in zip(("dx", "dW", "db", "dl"), ins, r64, rlp):
        assert got.grad is not None, name
        assert_close(got.grad, a.grad, c.grad, name)
