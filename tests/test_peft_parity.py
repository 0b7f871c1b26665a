"""Parity with HF PEFT's lora.Linear carrying the same weights."""
import copy

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk

from helpers import assert_close, backend_params

peft = pytest.importorskip("peft")  # installed by `make test`; a hard dependency of the suite there


def peft_and_ours(dtype, r, alpha, rslora, backend, bias=True):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("fc", nn.Linear(37, 23, bias=bias))
    base = base.to(dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc"], init_lora_weights=False,
                          use_rslora=rslora, lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    layer = pm.base_model.model.fc
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    ours = pk.LoRALinear.from_linear(copy.deepcopy(base.fc), r=r, lora_alpha=alpha, use_rslora=rslora,
                                     backend=backend, lora_dtype=a.dtype)
    with torch.no_grad():
        ours.lora_A.copy_(a)
        ours.lora_B.copy_(b)
    return pm, layer, ours


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("r,alpha,rslora", [(8, 16, False), (1, 4, True), (70, 32, False)])
def test_matches_peft(backend, dtype, r, alpha, rslora):
    pm, layer, ours = peft_and_ours(dtype, r, alpha, rslora, backend)
    assert ours.scaling == layer.scaling["default"]
    x = torch.randn(3, 5, 37).to(dtype)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp = pm(xp)
    yo = ours(xo)
    dy = torch.randn_like(yp)
    yp.backward(dy)
    yo.backward(dy)
    assert yo.dtype == yp.dtype == dtype
    # fp64 truth from the same weights
    w64 = {n: t.detach().double() for n, t in ours.named_parameters()}
    x64 = x.double().requires_grad_()
    A64, B64 = w64["lora_A"].requires_grad_(), w64["lora_B"].requires_grad_()
    y64 = pk.reference.lora_linear_ref(x64, w64["weight"], w64["bias"], A64, B64, ours.scaling)
    y64.backward(dy.double())
    # ours is at least as close to the truth as PEFT is (within a small multiple)
    assert_close(yo, y64, yp, "y vs PEFT")
    assert_close(xo.grad, x64.grad, xp.grad, "dx vs PEFT")
    assert_close(ours.lora_A.grad, A64.grad, layer.lora_A["default"].weight.grad, "dA vs PEFT")
    assert_close(ours.lora_B.grad, B64.grad, layer.lora_B["default"].weight.grad, "dB vs PEFT")


def test_merge_matches_peft():
    pm, layer, ours = peft_and_ours(torch.float32, 4, 8, False, "torch")
    layer.merge()
    ours.merge()
    assert torch.allclose(layer.base_layer.weight, ours.weight, atol=1e-6, rtol=0)
