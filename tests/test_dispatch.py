"""Backend choice: auto, explicit, the env override, and reasons when a backend can't run."""
import pytest
import torch

import peft_kernels as pk
from peft_kernels import dispatch


def test_auto_is_torch_on_cpu():
    assert dispatch.resolve("auto", torch.device("cpu")) == "torch"


def test_explicit_triton_on_cpu_under_interpreter():
    assert dispatch.resolve("triton", torch.device("cpu")) == "triton"


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(pk.BackendUnavailable, match="TRITON_INTERPRET=1"):
        dispatch.resolve("triton", torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in dispatch.explain("triton", "cpu")


def test_triton_on_cuda_without_cuda_says_why():
    if torch.cuda.is_available():
        pytest.skip("this check is for machines without CUDA")
    why = dispatch.unavailable_reason("triton", torch.device("cuda"))
    assert why is not None and "cuda.is_available() is False" in why


@pytest.mark.parametrize("env,expect", [("torch", "torch"), ("triton", "triton")])
def test_env_override(monkeypatch, env, expect):
    monkeypatch.setenv(dispatch.ENV_VAR, env)
    assert dispatch.resolve("auto", torch.device("cpu")) == expect
    other = "torch" if expect == "triton" else "triton"
    assert dispatch.resolve(other, torch.device("cpu")) == expect
    assert f"{dispatch.ENV_VAR}='{env}' overrides" in dispatch.explain("auto", "cpu")


def test_env_override_bad_value(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.resolve("auto", torch.device("cpu"))


def test_env_override_that_cannot_run(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(pk.BackendUnavailable, match=f"from {dispatch.ENV_VAR}"):
        pk.lora_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(1, 3), torch.randn(4, 1), 1.0)


def test_env_override_reaches_the_op(monkeypatch):
    """With the override set, the op really runs the named backend (the triton kernels here)."""
    from peft_kernels.kernels import lora as K

    calls = []
    real = K.lora_forward
    monkeypatch.setattr(K, "lora_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    pk.lora_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(1, 3), torch.randn(4, 1), 1.0)
    assert calls == [1]


def test_info_cli(capsys):
    from peft_kernels.__main__ import main

    main(["info"])
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "peft_kernels" in out
    assert "cuda" in out and ("built without CUDA" in out or "built with CUDA for archs" in out)
    assert "persistent TMA GEMMs (16-bit LoRA/DoRA past decode) on cpu: not used: device cpu is not CUDA" in out
    assert "quantized frozen bases (QLoRA; bitsandbytes " in out and "Linear8bitLt" in out
    assert "qlora_linear (LoRALinear on a quantized base)" in out


def test_cuda_backend_says_why_it_cannot_run():
    """On this machine the CUDA kernels cannot run; every way of asking says why, never crashes."""
    if torch.cuda.is_available():
        pytest.skip("this check is for machines without a GPU")
    why = dispatch.unavailable_reason("cuda", torch.device("cuda"))
    assert why is not None and ("without CUDA" in why or "is_available() is False" in why or "_C" in why)
    x, W = torch.randn(4, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 3, 8), torch.randn(2, 6, 3)
    with pytest.raises(pk.BackendUnavailable, match="backend 'cuda' cannot run"):
        pk.multi_lora_linear(x, W, None, A, B, [1.0, 1.0], torch.tensor([0, 1, -1, 0]), backend="cuda")
    assert "cuda    unavailable" in dispatch.explain("auto", "cpu")


def test_op_without_cuda_kernels_says_so(monkeypatch):
    """lora_linear has no CUDA kernels: asking for them names the backends it has, even where CUDA could run."""
    monkeypatch.setattr(dispatch, "cuda_unavailable_reason", lambda device: None)
    with pytest.raises(pk.BackendUnavailable, match=r"this op has no cuda kernels \(it runs on: torch, triton\)"):
        pk.lora_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(1, 3), torch.randn(4, 1), 1.0,
                       backend="cuda")


def test_auto_prefers_triton_then_cuda_on_gpu(monkeypatch):
    """On a CUDA device "auto" for a call that brings no Tune (nothing to measure with) takes triton when it
    can run, else the CUDA kernels (for ops that have them); the ops' measured choice is in
    test_dispatch_measured.py."""
    dev = torch.device("cuda")
    monkeypatch.setattr(dispatch, "cuda_unavailable_reason", lambda device: None)
    monkeypatch.setattr(dispatch, "triton_unavailable_reason", lambda device: None)
    sup = ("torch", "triton", "cuda")
    assert dispatch.resolve("auto", dev, supported=sup) == "triton"
    monkeypatch.setattr(dispatch, "triton_unavailable_reason", lambda device: "no triton here")
    assert dispatch.resolve("auto", dev, supported=sup) == "cuda"
    assert dispatch.resolve("auto", dev) == "torch"  # an op without CUDA kernels
