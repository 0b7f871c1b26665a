"""Shared test helpers: backend/dtype parametrization and verbose, reference-relative allclose."""
from __future__ import annotations

import pytest
import torch

from peft_kernels import dispatch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def backend_params(device="cpu", supported=dispatch.DEFAULT_SUPPORTED):
    """Every concrete backend the op has; one that cannot run here is skipped with dispatch's reason."""
    out = []
    for name in supported:
        why = dispatch.unavailable_reason(name, torch.device(device))
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def dtype_params():
    return [pytest.param(d, id=i) for d, i in zip(DTYPES, DTYPE_IDS)]


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double() - ref.detach().double()).abs().max().item()


def assert_close(actual, ref64, same_prec, name: str, mult: float = 4.0):
    """Require ``actual`` (a kernel's output) to be as close to the fp64 ``ref64`` as plain PyTorch
    at the same precision (``same_prec``) gets, within a small multiple.

    The floor is one ulp of the output dtype at the reference's scale, so a lucky same-precision
    result can't make the bound absurdly tight. No blanket atol.
    """
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = ref64.abs().max().item()
    ulp = torch.finfo(actual.dtype).eps * scale
    err = max_err(actual, ref64)
    base = max_err(same_prec, ref64) if same_prec is not None else 0.0
    bound = mult * max(base, ulp)
    assert err <= bound, (
        f"{name}: max |err| = {err:.3e} vs fp64 reference exceeds {mult}× max(same-precision torch error "
        f"{base:.3e}, 1 ulp {ulp:.3e}) = {bound:.3e} (dtype {actual.dtype}, ref scale {scale:.3e})")


CPU_ISAS = ("avx512", "avx2", "base")


def cpu_isa_unsupported(isa: str):
    """Why the C++ CPU micro-kernel variant ``isa`` cannot run here (None when it can)."""
    from peft_kernels import _ext

    if not _ext.available():
        return f"extension: {_ext.unavailable_reason()}"
    prev = _ext.ops().cpu_isa("")
    try:
        _ext.ops().cpu_isa(isa)
    except RuntimeError as e:
        return str(e)
    finally:
        _ext.ops().cpu_isa(prev)
    return None


def isa_params():
    """Every CPU micro-kernel variant; one this machine cannot run is skipped with the reason."""
    out = []
    for isa in CPU_ISAS:
        why = cpu_isa_unsupported(isa)
        out.append(pytest.param(isa, id=isa, marks=[pytest.mark.skip(reason=why)] if why else []))
    return out


@pytest.fixture
def cpu_isa(request):
    """Pin the C++ CPU kernels to the variant ``request.param`` for one test, then restore."""
    from peft_kernels import _ext

    prev = _ext.ops().cpu_isa(request.param)
    try:
        assert _ext.ops().cpu_isa("") == request.param
        yield request.param
    finally:
        _ext.ops().cpu_isa(prev)


def count_launches(monkeypatch, kernels) -> list:
    """Names of the Triton ``kernels`` launched from now on, in order (each still runs)."""
    launches = []
    for k in kernels:
        real = k.run

        def counting(*a, _real=real, _name=k.__name__, **kw):
            launches.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(k, "run", counting)
    return launches


from peft_kernels.testing import HostSyncSpy  # noqa: E402,F401  (re-exported for the tests)


def record_triton_launches(monkeypatch, kernels) -> list:
    """Replace the ``kernels``' launches by a recorder: [(name, kwargs)] in order; nothing runs (so a test
    of the Python side never enters the interpreter)."""
    calls = []
    for k in kernels:
        def fake(*a, _name=k.__name__, **kw):
            calls.append((_name, a, kw))

        monkeypatch.setattr(k, "run", fake)
    return calls
