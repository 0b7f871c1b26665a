"""Shared test helpers: backend/dtype parametrization and verbose, reference-relative allclose."""
from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch

from peft_kernels import dispatch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def real_jit_env(**extra) -> dict:
    """The environment for a child process that compiles Triton kernels for real (AOT, the gpu-check orchestrator,
    an installed copy): ``os.environ`` plus ``extra``, without the suite's ``TRITON_INTERPRET=1``."""
    env = dict(os.environ, **extra)
    env.pop("TRITON_INTERPRET", None)
    return env


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


def half_ulp(ref64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """½ ulp in ``dtype`` of each reference value: the rounding any result stored in that dtype must allow,
    element by element (never the ulp of the largest value)."""
    fi = torch.finfo(dtype)
    a = ref64.detach().double().abs().clamp_min(fi.tiny)
    return 0.5 * fi.eps * torch.exp2(torch.floor(torch.log2(a)))


def assert_close(actual, ref64, same_prec, name: str, mult: float = 4.0, systematic: float = 0.0):
    """Require ``actual`` (a kernel's output) to be as close to the fp64 ``ref64`` as plain PyTorch at the
    same precision (``same_prec``, the same math on the same rounded inputs) gets, within ``mult``×.

    Element by element: |actual − ref64| ≤ mult · max|same_prec − ref64| + ½ ulp(ref64) in actual's dtype.
    The ½ ulp is each element's own unavoidable rounding (a lucky same-precision result, e.g. of a single
    scalar, must not make the bound smaller than storing the exact value allows); for bf16 it is a whole ulp,
    because Triton's interpreter truncates fp32 → bf16 (a GPU rounds to nearest; tests run the interpreter).
    No blanket atol and no floor scaled by the largest value: a 3% error on the large elements is caught.

    ``systematic``: a known relative error of the implementation, per element (|ref64| × systematic added to
    the bound). Only for a documented, bounded limitation; 0 everywhere else.
    """
    assert same_prec is not None, f"{name}: a same-precision reference is required (the bound is relative to it)"
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}"
    assert same_prec.shape == ref64.shape, f"{name}: same-precision reference shape {tuple(same_prec.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if not actual.numel():
        return
    scale = ref64.abs().max().item()
    diff = (actual.detach().double() - ref64.detach().double()).abs()
    base = max_err(same_prec, ref64)
    bound = mult * base + half_ulp(ref64, actual.dtype) * (2.0 if actual.dtype == torch.bfloat16 else 1.0)
    if systematic:
        bound = bound + systematic * ref64.detach().double().abs()
    bad = diff > bound
    if bad.any():
        i = int(torch.argmax((diff - bound).reshape(-1)))
        assert False, (
            f"{name}: {int(bad.sum())} of {diff.numel()} elements off by more than {mult}× the same-precision torch "
            f"error {base:.3e} + ½ ulp; worst: got {actual.reshape(-1)[i].item():.6g}, fp64 reference "
            f"{ref64.reshape(-1)[i].item():.6g} (|err| {diff.reshape(-1)[i].item():.3e} > {bound.reshape(-1)[i].item():.3e}); "
            f"max |err| {diff.max().item():.3e}, dtype {actual.dtype}, ref scale {scale:.3e}")


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


def spy_triton_launches(monkeypatch, kernels) -> list:
    """Like count_launches, but records (name, positional args) of each launch; the kernels still run."""
    calls = []
    for k in kernels:
        real = k.run

        def spying(*a, _real=real, _name=k.__name__, **kw):
            calls.append((_name, a))
            return _real(*a, **kw)

        monkeypatch.setattr(k, "run", spying)
    return calls


def arg(kernel, args, name):
    """The launch argument ``name`` of ``kernel`` from its positional ``args``."""
    return args[kernel.arg_names.index(name)]


def check_controls(model, base, ids, adapter_type) -> None:
    """An injected ``model`` against its untouched ``base`` (a transformers LM): its trainable parameters are what
    ``lora_state_dict`` returns; the adapter changes the logits; ``disable_adapters`` gives the base's;
    ``merge_and_unload`` leaves no ``adapter_type`` and the adapter's logits; ``unload`` gives the base's and makes
    what the injection froze trainable again."""
    import copy

    import peft_kernels as pk

    assert set(pk.lora_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        lora = model(input_ids=ids).logits
        assert (lora - plain).abs().max() > 1e-3
        with pk.disable_adapters(model):
            torch.testing.assert_close(model(input_ids=ids).logits, plain)
        merged = pk.merge_and_unload(copy.deepcopy(model))
        assert not any(isinstance(x, adapter_type) for x in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, lora, rtol=1e-4, atol=1e-5)
        un = pk.unload(model)
        torch.testing.assert_close(un(input_ids=ids).logits, plain)
    assert all(p.requires_grad for p in un.parameters())


@contextlib.contextmanager
def bnb_reference_kernels():
    """bitsandbytes' CPU 4-bit ops computed by its own reference math (``backends/default/ops.py``) inside the block.

    On a CPU with AVX-512, bitsandbytes 0.50 registers native CPU kernels instead, which a test cannot take as the
    spec: ``dequantize_4bit`` indexes each block's absmax per row, so it is wrong wherever a row's length is not a
    multiple of the blocksize (the blocks of the format run over the flattened weight; ``quant.py`` calls the op with
    one flat row for that reason), and ``gemv_4bit`` computes in bf16. The block re-registers the reference math for
    the CPU (``torch.library`` fragment, removed on exit, which restores bitsandbytes' own kernels); on other CPUs
    the reference is what runs anyway."""
    import torch.nn.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        return _dequantize_4bit_compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize,
                                        shape, dtype)

    def gemv_4bit(A, B, shapeB, absmax, code, blocksize):
        qt = "fp4" if code[1] > 0 else "nf4"
        return F.linear(A, torch.ops.bitsandbytes.dequantize_4bit.default(B, absmax, blocksize, qt, shapeB, A.dtype))

    lib = torch.library.Library("bitsandbytes", "FRAGMENT")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
            torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit, lib=lib)
            torch.library.register_kernel("bitsandbytes::gemv_4bit", "cpu", gemv_4bit, lib=lib)
        yield
    finally:
        lib._destroy()
