"""DoRA: the op against the reference (PEFT's math with B·A materialised), the norm without B·A, the
module's eval cache, merge, PEFT parity (forward, gradients, dropout) and checkpoints."""
import copy

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels import LoRALinear, dora_linear
from peft_kernels.ops.dora import dora_weight_norm
from peft_kernels.reference import dora_linear_ref

from helpers import assert_close, backend_params, dtype_params


def _case(M, K, N, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    A = (torch.randn(r, K, generator=g) / K ** 0.5).to(dtype)
    B = (torch.randn(N, r, generator=g) / r ** 0.5).to(dtype)
    m = (1 + 0.3 * torch.rand(N, generator=g)).to(dtype)
    return x, W, b, A, B, m


def test_weight_norm_without_materialising_BA():
    for r in (1, 5, 80):
        _, W, _, A, B, _ = _case(3, 37, 29, r, torch.float64)
        want = torch.linalg.norm(W + 0.7 * (B @ A), dim=1)
        got = dora_weight_norm(W, A, B, 0.7)
        assert got.dtype == torch.float64 and not got.requires_grad  # float64 weights: a float64 norm
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        got32 = dora_weight_norm(W.float(), A.float(), B.float(), 0.7)
        assert got32.dtype == torch.float32
        torch.testing.assert_close(got32.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", backend_params(supported=("torch", "triton")))
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", [(37, 45, 29, 5), (9, 33, 40, 1), (20, 70, 66, 72)],
                         ids=["odd", "rank1", "rank72"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_and_grads_match_reference(backend, dtype, shape, bias):
    M, K, N, r = shape
    x, W, b, A, B, m = _case(M, K, N, r, dtype, bias)
    s = 2.0
    leaves = [t.clone().requires_grad_() for t in (x, A, B, m)]
    y = dora_linear(leaves[0], W, b, leaves[1], leaves[2], s, leaves[3], backend=backend)
    l64 = [t.double().requires_grad_() for t in (x, A, B, m)]
    y64 = dora_linear_ref(l64[0], W.double(), None if b is None else b.double(), l64[1], l64[2], s, l64[3])
    lt = [t.clone().requires_grad_() for t in (x, A, B, m)]
    yt = dora_linear_ref(lt[0], W, b, lt[1], lt[2], s, lt[3])
    assert_close(y, y64, yt, f"{backend} y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = torch.autograd.grad(y, leaves, dy)
    want = torch.autograd.grad(y64, l64, dy.double())
    same = torch.autograd.grad(yt, lt, dy)
    for name, g_, w_, t_ in zip(("dx", "dA", "dB", "dm"), got, want, same):
        assert_close(g_, w_, t_, f"{backend} {name}", mult=8)


def test_module_matches_peft_forward_backward_and_dropout():
    peft = pytest.importorskip("peft")

    def model():
        torch.manual_seed(0)
        h = nn.Module()
        h.fc = nn.Linear(24, 18)
        return h

    for p in (0.0, 0.2):
        pm = peft.get_peft_model(model(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["fc"],
                                                          use_dora=True, init_lora_weights=False))
        pl = pm.base_model.model.fc
        with torch.no_grad():
            pl.lora_magnitude_vector["default"].weight.mul_(1.2)
        ours = pk.from_peft(copy.deepcopy(pm)).fc
        assert isinstance(ours, LoRALinear) and ours.use_dora and ours.lora_dropout == p
        pm.train()
        ours.train()
        x = torch.randn(2, 5, 24)
        torch.manual_seed(7)
        ref = pl(x)
        torch.manual_seed(7)  # the same dropout mask (both draw it with F.dropout from the global generator)
        out = ours(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        (ref * ref).sum().backward()
        (out * out).sum().backward()
        for a, b_ in ((ours.lora_A, pl.lora_A["default"].weight), (ours.lora_B, pl.lora_B["default"].weight),
                      (ours.lora_magnitude_vector, pl.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(a.grad, b_.grad, rtol=1e-4, atol=1e-5)


def test_init_equals_plain_lora():
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    d = LoRALinear.from_linear(copy.deepcopy(lin), r=4, use_dora=True, init_lora_weights=False)
    plain = LoRALinear.from_linear(copy.deepcopy(lin), r=4, init_lora_weights=False)
    with torch.no_grad():
        plain.lora_A.copy_(d.lora_A)
        plain.lora_B.copy_(d.lora_B)
    x = torch.randn(5, 16)
    x64 = x.double()
    ref64 = torch.nn.functional.linear(x64, plain.weight.double(), plain.bias.double()) + plain.scaling * (
        x64 @ plain.lora_A.double().t() @ plain.lora_B.double().t())
    with torch.no_grad():
        assert_close(d(x), ref64, plain(x), "DoRA at init (m = ‖W + sBA‖: g = 1)")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("how", ["data-sub", "init-on-data", "data-copy", "weight-data", "in-place"])
def test_updates_of_every_kind_are_seen(train, how):
    """The norm follows every way PyTorch code changes W, A or B, in eval and in training. The eval cache it
    had, keyed on ``_version``/``data_ptr``, missed the ``.data`` ones (outputs off by 35)."""
    torch.manual_seed(0)
    d = LoRALinear.from_linear(nn.Linear(16, 12), r=4, use_dora=True, init_lora_weights=False)
    d.train(train)
    x = torch.randn(5, 16)
    d(x).sum().backward()
    if how == "data-sub":
        d.lora_A.data -= 0.5 * d.lora_A.grad
    elif how == "init-on-data":
        nn.init.normal_(d.lora_B.data, std=2.0)
    elif how == "data-copy":
        d.lora_A.data.copy_(torch.randn_like(d.lora_A) * 3)
    elif how == "weight-data":
        d.weight.data.mul_(0.25)  # the frozen base, as a merge or a reload would change it
    else:
        with torch.no_grad():
            d.lora_B.mul_(3.0)
    with torch.no_grad():
        t = [v.detach() for v in (d.weight, d.bias, d.lora_A, d.lora_B, d.lora_magnitude_vector)]
        ref64 = dora_linear_ref(x.double(), *(v.double() for v in t[:4]), d.scaling, t[4].double())
        lp = dora_linear_ref(x, *t[:4], d.scaling, t[4])
        assert_close(d(x), ref64, lp, f"after {how}")


def test_norm_is_accurate_when_the_update_cancels_a_row_of_w():
    """‖W_n + s·B_n·A‖ where the update nearly cancels W_n: the expanded form's terms are ~1e4× the result.
    In fp32 the norm came out 27% off; summed in fp64 it is right to fp32 precision."""
    torch.manual_seed(0)
    N, K, r, s = 6, 64, 4, 2.0
    A, B = torch.randn(r, K), torch.randn(N, r)
    delta = 1e-3 * torch.randn(N, K)
    W = -s * (B @ A) + delta  # every row: W_n ≈ −s·B_n·A
    W[0] = torch.randn(K)     # and one ordinary row
    got = dora_weight_norm(W, A, B, s)
    exact = (W.double() + s * (B.double() @ A.double())).norm(dim=1)
    rel = ((got.double() - exact).abs() / exact).max().item()
    assert rel < 1e-5, rel
    fp32_expanded = ((W * W).sum(1) + 2 * s * ((W @ A.t()) * B).sum(1) + s * s * ((B @ (A @ A.t())) * B).sum(1))
    old = fp32_expanded.clamp_min(0).sqrt().double()
    assert ((old - exact).abs() / exact).max().item() > 1e-2  # the case really is ill-conditioned in fp32


def test_merge_unmerge_to_linear():
    torch.manual_seed(0)
    d = LoRALinear.from_linear(nn.Linear(16, 12), r=4, use_dora=True, init_lora_weights=False)
    with torch.no_grad():
        d.lora_magnitude_vector.mul_(1.3)
    x = torch.randn(5, 16)
    y = d(x)
    torch.testing.assert_close(d.to_linear()(x), y, rtol=1e-5, atol=1e-5)
    w0 = d.weight.clone()
    d.merge()
    torch.testing.assert_close(d(x), y, rtol=1e-5, atol=1e-5)
    d.unmerge()
    torch.testing.assert_close(d.weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d(x), y, rtol=1e-5, atol=1e-5)


def test_peft_dora_checkpoint_roundtrip_and_bad_files(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    def model():
        torch.manual_seed(0)
        h = nn.Module()
        h.fc, h.out = nn.Linear(10, 8), nn.Linear(8, 3)
        return h

    pm = peft.get_peft_model(model(), peft.LoraConfig(r=2, target_modules=["fc"], use_dora=True,
                                                      init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.fc.lora_magnitude_vector["default"].weight.mul_(0.8)
    pm.eval()
    x = torch.randn(4, 10)
    inner = pm.base_model.model
    ref = inner.out(inner.fc(x))
    pm.save_pretrained(tmp_path / "a")
    m = model()
    pk.load_peft_adapter(m, tmp_path / "a")
    assert m.fc.use_dora and m.fc.lora_magnitude_vector.requires_grad
    torch.testing.assert_close(m.out(m.fc(x)), ref)
    pk.save_peft_adapter(m, tmp_path / "b")
    back = peft.PeftModel.from_pretrained(model(), tmp_path / "b")
    back.eval()
    torch.testing.assert_close(back.base_model.model.out(back.base_model.model.fc(x)), ref)
    # a magnitude of the wrong shape, or missing: refused, the model unchanged
    f = tmp_path / "a" / "adapter_model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("lora_magnitude_vector"))
    for bad in ({**sd, key: torch.ones(7)}, {k: v for k, v in sd.items() if k != key}):
        save_file(bad, f)
        m = model()
        before = copy.deepcopy(m.state_dict())
        with pytest.raises(pk.CheckpointError, match="lora_magnitude_vector"):
            pk.load_peft_adapter(m, tmp_path / "a")
        assert isinstance(m.fc, nn.Linear) and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_errors():
    with pytest.raises(ValueError, match="use_dora=True with lora_bias"):
        LoRALinear(4, 3, use_dora=True, lora_bias=True)
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        LoRALinear(4, 3, use_dora="yes")
    x, W, b, A, B, m = _case(3, 4, 5, 2, torch.float32)
    with pytest.raises(ValueError, match="magnitude must be a \\[5\\]"):
        dora_linear(x, W, b, A, B, 1.0, torch.ones(4))
    with pytest.raises(RuntimeError, match="use_dora=False"):
        LoRALinear(4, 3).reset_dora_magnitude()


def test_triton_rescale_is_in_the_gemm_epilogue(monkeypatch):
    """Forward: LoRA's 2 kernels and nothing else on the device side (the rescale and bias are the GEMM's
    epilogue); backward: LoRA's 3 kernels on dZ = dY ⊙ g."""
    from peft_kernels import dispatch
    from peft_kernels.bench.common import count_launches as count_ops, timed_call
    from peft_kernels.kernels import lora as K

    from helpers import count_launches

    if dispatch.unavailable_reason("triton", torch.device("cpu")):
        pytest.skip(dispatch.unavailable_reason("triton", torch.device("cpu")))
    x, W, b, A, B, m = _case(24, 40, 36, 4, torch.float32)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    m.requires_grad_()
    norm = dora_weight_norm(W, A, B, 2.0)
    launches = count_launches(monkeypatch, [K._shrink_kernel, K._fwd_gemm_kernel, K._bwd_dy_kernel,
                                            K._bwd_dx_kernel, K._bwd_da_kernel])
    y = dora_linear(x, W, b, A, B, 2.0, m, backend="triton", weight_norm=norm)
    assert launches == ["_shrink_kernel", "_fwd_gemm_kernel"]
    y.backward(torch.randn_like(y))
    assert launches[2:] == ["_bwd_dy_kernel", "_bwd_dx_kernel", "_bwd_da_kernel"]
    monkeypatch.undo()
    # no elementwise ATen op runs in the forward besides the [N] factor g = m / ‖·‖
    _, ops, _ = count_ops(timed_call(lambda: dora_linear(x, W, b, A, B, 2.0, m, backend="triton", weight_norm=norm),
                                     "fwd", x, None, []))
    assert ops == ["aten::div", "triton::_shrink_kernel", "triton::_fwd_gemm_kernel"], ops


def test_inject_dora_and_merge_whole_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))
    assert pk.inject_lora(m, ["0", "2"], r=2, use_dora=True, init_lora_weights=False) == ["0", "2"]
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"{i}.{k}" for i in (0, 2) for k in ("lora_A", "lora_B", "lora_magnitude_vector")}
    with torch.no_grad():
        m[0].lora_magnitude_vector.mul_(1.2)
    x = torch.randn(4, 10)
    y = m(x)
    assert pk.merge_lora(m, safe_merge=True) == ["0", "2"]
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    pk.unmerge_lora(m)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    sd = pk.lora_state_dict(m)
    assert "0.lora_magnitude_vector" in sd and "2.lora_magnitude_vector" in sd


@pytest.mark.parametrize("backend", backend_params(supported=("torch", "triton")))
def test_unfrozen_base_gets_correct_weight_and_bias_grads(backend):
    """Not the PEFT case, but correct: dW = (dY ⊙ g)ᵀ·x through the rescale, db = Σ dY (norm detached)."""
    x, W, b, A, B, m = _case(13, 21, 17, 3, torch.float32)
    norm = dora_weight_norm(W, A, B, 1.5)
    Wl, bl = W.clone().requires_grad_(), b.clone().requires_grad_()
    y = dora_linear(x, Wl, bl, A, B, 1.5, m, backend=backend, weight_norm=norm)
    W64, b64 = W.double().requires_grad_(), b.double().requires_grad_()
    Wt, bt = W.clone().requires_grad_(), b.clone().requires_grad_()
    g64, gt = m.double() / norm.double(), m / norm

    def spec(x, W, b, A, B, g):
        return g * (x @ W.t() + 1.5 * (x @ A.t()) @ B.t()) + b
    y64 = spec(x.double(), W64, b64, A.double(), B.double(), g64)
    yt = spec(x, Wt, bt, A, B, gt)  # plain torch at the same precision
    assert_close(y, y64, yt, f"{backend} y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    gw, gb = torch.autograd.grad(y, [Wl, bl], dy)
    rw, rb = torch.autograd.grad(y64, [W64, b64], dy.double())
    tw, tb = torch.autograd.grad(yt, [Wt, bt], dy)
    assert_close(gw, rw, tw, f"{backend} dW", mult=8)
    assert_close(gb, rb, tb, f"{backend} db", mult=8)


def test_eval_cache_follows_weight_and_scaling_changes():
    """The eval-mode norm cache is recomputed after the frozen W or the scaling change (not only A or B)."""
    torch.manual_seed(0)
    d = LoRALinear.from_linear(nn.Linear(16, 12), r=4, use_dora=True, init_lora_weights=False)
    d.eval()
    x = torch.randn(5, 16)

    def check(what):
        with torch.no_grad():
            ref64 = dora_linear_ref(x.double(), d.weight.double(), d.bias.double(), d.lora_A.double(),
                                    d.lora_B.double(), d.scaling, d.lora_magnitude_vector.double())
            lp = dora_linear_ref(x, d.weight, d.bias, d.lora_A, d.lora_B, d.scaling, d.lora_magnitude_vector)
            assert_close(d(x), ref64, lp, what)

    check("fresh")
    with torch.no_grad():
        d.weight.mul_(1.5)  # the frozen base changed in place (a merge, a reload)
    check("after W *= 1.5")
    d.scaling = d.scaling * 3
    check("after scaling *= 3")
