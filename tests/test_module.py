"""LoRALinear: drop-in behaviour, parameter names, init, merge/unmerge, training."""
import math

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels.reference import lora_linear_ref

from helpers import assert_close, backend_params


def test_from_linear_reuses_and_freezes_base():
    lin = nn.Linear(12, 7)
    m = pk.LoRALinear.from_linear(lin, r=3, lora_alpha=6)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.shape == (3, 12) and m.lora_B.shape == (7, 3)
    assert m.scaling == 2.0
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_linear_checkpoint_loads_into_base():
    lin = nn.Linear(10, 6)
    m = pk.LoRALinear(10, 6, r=2)
    res = m.load_state_dict(lin.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ["lora_A", "lora_B"] and res.unexpected_keys == []
    assert torch.equal(m.weight, lin.weight) and torch.equal(m.bias, lin.bias)
    assert set(m.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_default_init_starts_equal_to_base():
    lin = nn.Linear(16, 9)
    m = pk.LoRALinear.from_linear(lin, r=4)
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    x = torch.randn(3, 5, 16)
    assert torch.allclose(m(x), lin(x), rtol=0, atol=1e-6)
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in=16
    assert m.lora_A.abs().max() <= bound


def test_gaussian_and_random_init():
    g = pk.LoRALinear(256, 8, r=4, init_lora_weights="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 4) < 0.02 and torch.count_nonzero(g.lora_B) == 0
    f = pk.LoRALinear(16, 8, r=4, init_lora_weights=False)
    assert torch.count_nonzero(f.lora_B) > 0


def test_rslora_scaling():
    assert pk.LoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == 8 / 4
    assert pk.LoRALinear(8, 8, r=16, lora_alpha=8).scaling == 0.5


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_matches_reference_any_leading_dims(backend, dtype):
    m = pk.LoRALinear(23, 17, r=5, lora_alpha=10, init_lora_weights=False, dtype=dtype, backend=backend)
    x = torch.randn(2, 3, 4, 23).to(dtype)
    y = m(x)
    assert y.shape == (2, 3, 4, 17) and y.dtype == dtype
    args = [t.double() for t in (x, m.weight, m.bias, m.lora_A, m.lora_B)]
    y64 = lora_linear_ref(*args, m.scaling)
    ylp = lora_linear_ref(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling)
    assert_close(y, y64, ylp, "module y")


@pytest.mark.parametrize("safe", [False, True])
def test_merge_unmerge_to_linear(safe):
    m = pk.LoRALinear(20, 11, r=3, lora_alpha=3, init_lora_weights=False)
    x = torch.randn(6, 20)
    w0 = m.weight.detach().clone()
    y = m(x)
    lin = m.to_linear()
    assert isinstance(lin, nn.Linear) and not m.merged
    assert torch.allclose(lin(x), y, atol=1e-5, rtol=1e-5)
    m.merge(safe_merge=safe)
    assert m.merged
    assert torch.allclose(m(x), y, atol=1e-5, rtol=1e-5)
    assert torch.allclose(m.to_linear()(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    assert not m.merged and torch.allclose(m.weight, w0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    m = pk.LoRALinear(6, 5, r=2, init_lora_weights=False)
    with torch.no_grad():
        m.lora_B[0, 0] = float("inf")
    w0 = m.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        m.merge(safe_merge=True)
    assert not m.merged and torch.equal(m.weight, w0)


def test_dropout_only_in_training():
    m = pk.LoRALinear(32, 16, r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(8, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


@pytest.mark.parametrize("backend", backend_params())
def test_trains_inside_a_model(backend):
    """Swap nn.Linear layers of an existing model; only LoRA params train and the loss drops."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 3))
    for i in (0, 2):
        model[i] = pk.LoRALinear.from_linear(model[i], r=4, lora_alpha=8, lora_dropout=0.1, backend=backend)
    x, target = torch.randn(64, 12), torch.randn(64, 3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    frozen = [p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad]
    losses = []
    for _ in range(25):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(a, b) for a, b in zip(frozen, [p for p in model.parameters() if not p.requires_grad]))


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("lora_bias", [False, True], ids=["no-lora-bias", "lora-bias"])
@pytest.mark.parametrize("alpha,rs", [(7.5, False), (6.0, True)], ids=["alpha7.5", "rslora"])
def test_merge_unmerge_with_a_scaling_and_lora_bias(safe, lora_bias, alpha, rs):
    """merge/unmerge/to_linear with scaling ≠ 1 (plain and rsLoRA) and PEFT's lora_bias, against fp64."""
    torch.manual_seed(0)
    m = pk.LoRALinear(20, 11, r=3, lora_alpha=alpha, use_rslora=rs, init_lora_weights=False, lora_bias=lora_bias)
    if lora_bias:
        nn.init.normal_(m.lora_B_bias)
    s = m.scaling
    assert s == (alpha / math.sqrt(3) if rs else alpha / 3) and s != 1
    x = torch.randn(6, 20)
    w0, b0 = m.weight.detach().clone(), m.bias.detach().clone()
    bias_eff = b0 + (s * m.lora_B_bias.detach() if lora_bias else 0)
    y64 = lora_linear_ref(x.double(), w0.double(), bias_eff.double(), m.lora_A.double(), m.lora_B.double(), s)
    ylp = lora_linear_ref(x, w0, bias_eff, m.lora_A, m.lora_B, s)
    with torch.no_grad():
        assert_close(m(x), y64, ylp, "unmerged")
        assert_close(m.to_linear()(x), y64, ylp, "to_linear")
        m.merge(safe_merge=safe)
        assert m.merged
        assert_close(m(x), y64, ylp, "merged")
        assert_close(m.to_linear()(x), y64, ylp, "to_linear while merged")
        m.unmerge()
    assert not m.merged
    # the base comes back to within the rounding of (W + Δ) − Δ in fp32, and the bias likewise
    delta = s * (m.lora_B.detach() @ m.lora_A.detach())
    assert_close(m.weight, w0.double(), (w0 + delta) - delta, "restored weight")
    bb = s * m.lora_B_bias.detach() if lora_bias else torch.zeros_like(b0)
    assert_close(m.bias, b0.double(), (b0 + bb) - bb, "restored bias")


def _merge_case(use_dora, lora_bias, fan_in_fan_out=False):
    torch.manual_seed(3)
    base = nn.Linear(12, 9)
    if fan_in_fan_out:  # GPT-2's Conv1D: weight [in, out]
        from transformers.pytorch_utils import Conv1D
        base = Conv1D(9, 12)
        nn.init.normal_(base.weight, std=0.3)
        nn.init.normal_(base.bias)
    m = pk.LoRALinear.from_linear(base, r=3, lora_alpha=5.0, init_lora_weights=False, use_dora=use_dora,
                                  lora_bias=lora_bias)
    assert m.fan_in_fan_out == fan_in_fan_out
    with torch.no_grad():
        if lora_bias:
            nn.init.normal_(m.lora_B_bias)
        if use_dora:
            m.lora_magnitude_vector.mul_(torch.rand(9) + 0.5)
    return m


def _fresh_like(m):
    torch.manual_seed(99)
    f = _merge_case(m.use_dora, m.lora_bias, m.fan_in_fan_out)
    with torch.no_grad():
        for p in f.parameters():
            p.normal_()
    return f


@pytest.mark.parametrize("use_dora,lora_bias,fifo", [(False, False, False), (False, True, False), (True, False, False),
                                                     (False, False, True), (True, False, True)],
                         ids=["lora", "lora-bias", "dora", "lora-conv1d", "dora-conv1d"])
def test_merged_layer_round_trips_through_state_dict(use_dora, lora_bias, fifo):
    """A merged layer's state dict holds the unmerged base (same keys as an unmerged one), so loading it into a
    fresh layer gives the same outputs: the update is not applied twice. Loading into a merged layer folds the
    loaded adapter in."""
    m = _merge_case(use_dora, lora_bias, fifo)
    x = torch.randn(5, 12)
    with torch.no_grad():
        y_unmerged = m(x)
        y_base = nn.functional.linear(x, m.base_weight(), m.bias)
        keys_unmerged = set(m.state_dict())
        m.merge()
        y_merged = m(x)
        tol = 1e-5 * max(1.0, y_unmerged.abs().max().item())  # merge rounding
        assert (y_unmerged - y_base).abs().max() > 1e3 * tol  # a second update would show
        assert (y_merged - y_unmerged).abs().max() < tol
        sd = m.state_dict()
        assert set(sd) == keys_unmerged
        fresh = _fresh_like(m)
        fresh.load_state_dict(sd)
        assert not fresh.merged
        # the fresh layer computes what the merged one does (applied once, not twice)
        assert (fresh(x) - y_merged).abs().max() < tol
        assert (fresh(x) - y_unmerged).abs().max() < tol
        # into a merged layer: it stays merged, with the loaded adapter folded in
        other = _merge_case(use_dora, lora_bias, fifo)
        with torch.no_grad():
            other.lora_B.add_(1.0)  # a different adapter, merged
        other.merge()
        other.load_state_dict(sd)
        assert other.merged
        assert (other(x) - y_unmerged).abs().max() < tol
        other.unmerge()
        assert (other.weight - fresh.weight).abs().max() < 1e-6


@pytest.mark.parametrize("use_dora,lora_bias", [(False, False), (False, True), (True, False)],
                         ids=["lora", "lora-bias", "dora"])
@pytest.mark.parametrize("how", ["data", "copy_", "init", "scaling"])
def test_unmerge_restores_the_base_after_the_adapter_changed_while_merged(use_dora, lora_bias, how):
    """The base tensor is shared with the user's nn.Linear: unmerge() takes out what merge() put in, even when
    A, B, the magnitude or the scaling were changed (by every PyTorch idiom) while merged."""
    lin = nn.Linear(12, 9)
    m = pk.LoRALinear.from_linear(lin, r=3, lora_alpha=5.0, init_lora_weights=False, use_dora=use_dora,
                                  lora_bias=lora_bias)
    assert m.weight is lin.weight
    with torch.no_grad():
        if lora_bias:
            nn.init.normal_(m.lora_B_bias)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    m.merge()
    if how == "data":
        m.lora_A.data -= 0.5 * torch.ones_like(m.lora_A)
        m.lora_B.data = m.lora_B.data * 3
    elif how == "copy_":
        with torch.no_grad():
            m.lora_B.copy_(torch.randn_like(m.lora_B))
            if use_dora:
                m.lora_magnitude_vector.mul_(2)
            if lora_bias:
                m.lora_B_bias.mul_(-4)
    elif how == "init":
        nn.init.normal_(m.lora_A.data)
        nn.init.normal_(m.lora_B.data)
    else:
        m.scaling = 11.0
    m.unmerge()
    # within the rounding of (W + Δ) − Δ in fp32: a few ulp of |W + Δ|, nowhere near the changed update
    delta_scale = (m.lora_B.detach().abs() @ m.lora_A.detach().abs()).max().item() * 20
    assert (lin.weight - w0).abs().max() <= 1e-6 * (1 + delta_scale), (lin.weight - w0).abs().max()
    assert (lin.bias - b0).abs().max() <= 1e-6 * (1 + delta_scale)
