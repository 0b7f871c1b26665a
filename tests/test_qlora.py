"""Quantized frozen bases (QLoRA): bitsandbytes 4-bit (NF4/FP4, double quantization) and 8-bit layers,
torchao weight-only int8/int4 tensors.

- the dequantization (csrc/cpu/dequant.cpp, ``quant.QuantBase``) against the quantizers' own, bit for bit;
- ``qlora_linear`` against the reference (dequantize, then ``lora_linear_ref``) in fp64, forward and every
  gradient, within a multiple of what same-precision torch gets;
- ``QLoRALinear`` / ``inject_lora`` / ``from_peft`` / checkpoints against HF PEFT's QLoRA layers;
- refusal of quantization types we do not support, before the model is touched; merge as PEFT does it.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels import _ext, quant, reference
from peft_kernels.gpucheck.cases import dequantize_operand
from peft_kernels.ops import qlora as Q
from peft_kernels.ops.lora import dropout_mask

from helpers import assert_close, bnb_reference_kernels, real_jit_env

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency (make test installs it)")
BF = pytest.importorskip("bitsandbytes.functional")
tq = pytest.importorskip("torchao.quantization", reason="torchao is a test dependency (make test installs it)")

KINDS = ("nf4", "fp4", "nf4-dq", "fp4-dq", "int8", "ao-int8", "ao-int4")
EXPECT_KIND = {"nf4": "bnb-nf4", "fp4": "bnb-fp4", "nf4-dq": "bnb-nf4", "fp4-dq": "bnb-fp4", "int8": "bnb-int8",
               "ao-int8": "torchao-int8", "ao-int4": "torchao-intx"}


@pytest.fixture(autouse=True)
def _quiet(request, monkeypatch):
    """Warnings off; bitsandbytes' CPU 4-bit ops on its reference math (``helpers.bnb_reference_kernels``: its
    AVX-512 kernels are not the spec), and its 4-bit layers made here without its AVX512-BF16 eval path (which
    repacks the weight and computes in bf16: ``quant.bnb_4bit_standard``; tested on its own below), except for the
    tests marked ``bnb_native``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if request.node.get_closest_marker("bnb_native"):
            yield
        else:
            monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
            with bnb_reference_kernels():
                yield


def _format_dequantize(layer, absmax_dtype=torch.float32) -> torch.Tensor:
    """A bitsandbytes 4-bit weight dequantized from its format by hand (fp32): each byte holds two codes, the high
    nibble first; value = code[nibble] · absmax of its block (rounded to ``absmax_dtype``), the blocks running over
    the flattened weight."""
    w = layer.weight
    qs = w.quant_state
    absmax = (BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset) if qs.nested else qs.absmax
    data = w.data.reshape(-1).view(torch.uint8).long()
    nib = torch.stack([data >> 4, data & 15], 1).reshape(-1)[:qs.shape.numel()]
    blocks = torch.arange(nib.numel()) // qs.blocksize
    return (qs.code.float()[nib] * absmax.float().to(absmax_dtype).float()[blocks]).view(qs.shape)


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq"])
def test_a_weight_bitsandbytes_repacked_for_its_cpu_kernels_is_read_as_it_now_holds(kind):
    """bitsandbytes repacks a Linear4bit's weight in place on its first eval forward on a CPU with AVX512-BF16
    (codes interleaved by 32 rows, absmax de-nested, transposed and rounded to bf16), on every such CPU; here that
    repacking is applied by hand (bitsandbytes' own function), so the test runs on any CPU. Our reading of the
    weight must give its codes times that bf16 absmax (not the standard layout misread: off by up to 0.18 here),
    through the chunk reader, the kernels' operand and a LoRA layer; the float dtype stays the one it had."""
    K, N = 128, 64
    layer = quantized(kind, K, N)
    want = _format_dequantize(layer, absmax_dtype=torch.bfloat16)  # before the repacking, absmax as it will be
    model = nn.Sequential(layer)
    pk.inject_lora(model, ["0"], r=4, init_lora_weights=False)
    lora = model[0]
    w = layer.weight
    w.data, w.quant_state = BF._convert_weight_packed_for_cpu(w.data, w.quant_state)
    assert w.quant_state.packing_format_for_cpu and w.quant_state.dtype == torch.bfloat16
    qb = quant.QuantBase(layer)
    assert torch.equal(qb.dequantize(torch.float32), want)
    assert torch.equal(dequantize_operand(qb.kernel_operand()).float(), want)
    assert qb.float_dtype() == torch.float32 and lora._float_dtype() == torch.float32
    x = torch.randn(5, K)
    with torch.no_grad():
        ref = reference.lora_linear_ref(x.double(), want.double(), layer.bias.double(), lora.lora_A.double(),
                                        lora.lora_B.double(), lora.scaling)
        same = reference.lora_linear_ref(x, want, layer.bias, lora.lora_A, lora.lora_B, lora.scaling)
        assert_close(lora(x), ref, same, "a LoRA layer on the repacked weight")


@pytest.mark.bnb_native
@pytest.mark.parametrize("kind", ["nf4", "fp4-dq"])
def test_bnb_op_fallback_dequantizes_as_the_format_with_bitsandbytes_own_cpu_kernels(kind, monkeypatch):
    """Without our extension, QuantBase dequantizes through ``torch.ops.bitsandbytes.dequantize_4bit``, here with
    whatever kernel bitsandbytes registered for this CPU (on AVX-512, its native one, which indexes each absmax per
    row): rows of 96 with blocks of 64 (blocks that straddle rows), whole and in chunks, equal the format by hand."""
    layer = quantized(kind, 96, 40)
    monkeypatch.setattr(quant._ext, "available", lambda: False)
    qb = quant.QuantBase(layer)
    want = _format_dequantize(layer)
    assert torch.equal(qb.dequantize(torch.float32), want)
    r = qb.reader(torch.float32)
    step = qb.row_align() * 3
    assert torch.equal(torch.cat([r.rows(n0, min(n0 + step, 40)) for n0 in range(0, 40, step)]), want)


def quantized(kind: str, K: int, N: int, *, bias: bool = True, compute_dtype=None, seed: int = 0) -> nn.Module:
    """A quantized layer of ``kind`` made from a seeded float nn.Linear(K, N)."""
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    if kind in ("nf4", "fp4", "nf4-dq", "fp4-dq"):
        q = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute_dtype, quant_type=kind[:3],
                              compress_statistics=kind.endswith("-dq"))
        q.load_state_dict(lin.state_dict())
        return q.to("cpu")
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(K, N, bias=bias, has_fp16_weights=False)
        q.load_state_dict(lin.state_dict())
        return q.to("cpu")
    if kind == "ao-int8":
        tq.quantize_(lin, tq.Int8WeightOnlyConfig())
    else:
        # asymmetric: nonzero zero points (the kernels' WQ=3)
        tq.quantize_(lin, tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32),
                                                  mapping_type=tq.MappingType.ASYMMETRIC))
    return lin


def own_dequantize(layer: nn.Module) -> torch.Tensor:
    """The quantizer's own dequantized weight (fp32)."""
    w = layer.weight
    if type(w).__name__ == "Params4bit":
        return BF.dequantize_4bit(w.data, w.quant_state).float()
    if type(w).__name__ == "Int8Params":
        scb = w.SCB if w.SCB is not None else layer.state.SCB
        return w.data.float() * (scb.unsqueeze(1) * (1.0 / 127.0))
    return w.dequantize().float()


# ------------------------------------------------------------------------------------- dequantization
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax32", "double-quant"])
@pytest.mark.parametrize("shape,bs", [((37, 50), 64), ((33, 70), 128), ((5, 7), 32), ((128, 256), 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_dequantize_4bit_bit_for_bit(qt, nested, shape, bs, dtype):
    if not _ext.available():
        pytest.skip(f"the compiled extension is not available: {_ext.unavailable_reason()}")
    N, K = shape
    torch.manual_seed(N * K + bs)
    p = bnb.nn.Params4bit(torch.randn(N, K) * 3, requires_grad=False, quant_type=qt, compress_statistics=nested,
                          blocksize=bs).to("cpu")
    qs = p.quant_state
    absmax = (BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float() if nested else qs.absmax
    theirs = BF.dequantize_4bit(p.data, BF.QuantState(absmax=absmax, shape=qs.shape, code=qs.code, blocksize=bs,
                                                     quant_type=qt, dtype=dtype))
    ours = _ext.ops().dequantize_4bit(p.data.reshape(-1), absmax, qs.code, bs, N, K, dtype)
    assert ours.dtype == dtype and ours.shape == (N, K)
    assert torch.equal(ours, theirs), f"{int((ours != theirs).sum())} of {ours.numel()} values differ"


@pytest.mark.parametrize("kind", KINDS)
def test_quant_base_dequantizes_as_the_quantizer(kind, monkeypatch):
    """Every kind, whole and in row chunks (chunks of 2 blocks: K=96 is not a multiple of 64, so chunks start
    at row multiples of row_align()), equals the quantizer's own dequantize, bit for bit."""
    layer = quantized(kind, 96, 40)
    qb = quant.QuantBase(layer)
    assert qb.kind == EXPECT_KIND[kind]
    theirs = own_dequantize(layer)
    assert torch.equal(qb.dequantize(torch.float32), theirs)
    rd, a = qb.reader(torch.float32), qb.row_align()
    assert (a * 96) % (64 if kind.startswith(("nf4", "fp4")) else 1) == 0
    parts = [rd.rows(n0, min(40, n0 + 2 * a)) for n0 in range(0, 40, 2 * a)]
    assert torch.equal(torch.cat(parts), theirs)


def test_dequantize_op_rejects_bad_input():
    """The C++ op validates at its boundary: short or mistyped buffers raise, never read out of bounds."""
    if not _ext.available():
        pytest.skip(f"the compiled extension is not available: {_ext.unavailable_reason()}")
    op = _ext.ops().dequantize_4bit
    q, am, code = torch.zeros(32, dtype=torch.uint8), torch.ones(1), torch.zeros(16)
    assert op(q, am, code, 64, 8, 8, torch.float32).shape == (8, 8)
    cases = [
        ((q[:31], am, code, 64, 8, 8, torch.float32), ValueError, "packed has 31 bytes"),
        ((q, am[:0], code, 64, 8, 8, torch.float32), ValueError, "absmax has 0 entries"),
        ((q, torch.ones(1), code, 32, 8, 8, torch.float32), ValueError, "absmax has 1 entries, 2 blocks"),
        ((q, am, code[:15], 64, 8, 8, torch.float32), ValueError, "code must have 16"),
        ((q.float(), am, code, 64, 8, 8, torch.float32), TypeError, "packed must be uint8"),
        ((q, am.double(), code, 64, 8, 8, torch.float32), TypeError, "absmax must be float32"),
        ((q, am, code.half(), 64, 8, 8, torch.float32), TypeError, "code must be float32"),
        ((q, am, code, 0, 8, 8, torch.float32), ValueError, "blocksize must be >= 1"),
        ((q, am, code, 64, -1, 8, torch.float32), ValueError, "N and K must be >= 0"),
        ((q, am, code, 64, 2 ** 40, 2 ** 30, torch.float32), ValueError, "overflows"),
        ((q, am, code, 64, 8, 8, torch.int32), TypeError, "dtype must be"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            op(*args)


# ----------------------------------------------------------------------------------------- the op
def _ref_pair(layer, x, bias, A, B, s, mask):
    """(fp64 reference, same-precision torch) outputs and their graphs."""
    qb = quant.QuantBase(layer)
    cdt = qb.compute_dtype(x.dtype)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    b64 = None if bias is None else bias.detach().double()
    y64 = reference.qlora_linear_ref(x64, qb, b64, A64, B64, s, mask, dtype=torch.float64)
    xl, Al, Bl = (t.detach().clone().requires_grad_() for t in (x, A, B))
    yl = reference.qlora_linear_ref(xl, qb, bias, Al, Bl, s, mask, dtype=cdt)
    return (y64, x64, A64, B64), (yl, xl, Al, Bl)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_operand_dequantizes_as_the_quantizer(kind):
    """What the Triton GEMMs read (packed data, scales, zero points, block mapping) gives the quantizer's own
    values, bit for bit (K=96 is not a multiple of the 64-element blocks: blocks span rows)."""
    layer = quantized(kind, 96, 40)
    op = quant.QuantBase(layer).kernel_operand()
    assert op.wq == {"ao-int4": 3}.get(kind, 1 if kind.startswith(("nf4", "fp4")) else 2)
    assert torch.equal(dequantize_operand(op), own_dequantize(layer))


BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", ["2d-bias", "3d-nobias-r1", "strided-r80-dropout"])
def test_qlora_op_matches_reference(kind, dtype, case, backend, monkeypatch):
    """K per case: 128 (whole 64-element blocks per row: the kernels' aligned addressing), 96 (blocks span rows),
    95 (odd: 4-bit rows start mid-byte; torchao's int4 groups need 96)."""
    K = {"2d-bias": 128, "3d-nobias-r1": 96 if kind == "ao-int4" else 95}.get(case, 96)
    monkeypatch.setattr(quant, "CHUNK_BYTES", K * 4 * 8)  # several chunks at this size
    bias = case == "2d-bias"
    r = 1 if "r1" in case else 80 if "r80" in case else 8
    layer = quantized(kind, K, 40, bias=bias)
    qb = quant.QuantBase(layer)
    torch.manual_seed(1)
    if case == "3d-nobias-r1":
        x = torch.randn(3, 5, K, dtype=dtype)
    elif case == "strided-r80-dropout":
        x = torch.randn(7, 2 * K, dtype=dtype)[:, ::2]  # really strided: every other column
        assert not x.is_contiguous()
    else:
        x = torch.randn(13, K, dtype=dtype)
    x.requires_grad_()
    A = (torch.randn(r, K) * 0.1).requires_grad_()
    B = (torch.randn(40, r) * 0.1).requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().to(dtype)
    p, s = (0.3 if "dropout" in case else 0.0), 0.7
    torch.manual_seed(5)
    seed = Q._draw_seed(x.device) if p else None
    torch.manual_seed(5)
    y = Q.qlora_linear(x, qb, b, A, B, s, dropout_p=p, training=True, backend=backend)
    mask = dropout_mask(backend, seed, (x.reshape(-1, K).shape), p, x.device).reshape(x.shape) if p else None
    (y64, x64, A64, B64), (yl, xl, Al, Bl) = _ref_pair(layer, x, b, A, B, s, mask)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], 40)
    assert_close(y, y64, yl, "y")
    g = torch.randn_like(y64)
    y.backward(g.to(dtype))
    y64.backward(g)
    yl.backward(g.to(yl.dtype))
    for name, got, r64, rl in (("dx", x, x64, xl), ("dA", A, A64, Al), ("dB", B, B64, Bl)):
        assert_close(got.grad, r64.grad, rl.grad, name)


def test_qlora_op_errors():
    layer = quantized("nf4", 64, 16)
    qb = quant.QuantBase(layer)
    x, A, B = torch.randn(2, 64), torch.randn(4, 64), torch.randn(16, 4)
    with pytest.raises(ValueError, match="last dim in_features=64"):
        Q.qlora_linear(torch.randn(2, 63), qb, None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_B must have shape"):
        Q.qlora_linear(x, qb, None, A, B[:, :3], 1.0)
    with pytest.raises(TypeError, match="qbase must be"):
        Q.qlora_linear(x, layer.weight, None, A, B, 1.0)
    with pytest.raises(TypeError, match="compute dtype"):
        Q.qlora_linear(x, qb, None, A.double(), B.double(), 1.0)
    with pytest.raises(ValueError, match="bias must have shape"):
        Q.qlora_linear(x, qb, torch.zeros(15), A, B, 1.0)
    with pytest.raises(pk.BackendUnavailable, match="Triton kernels take float32/float16/bfloat16"):
        Q.qlora_linear(x.double(), qb, None, A.double(), B.double(), 1.0, backend="triton")


@pytest.mark.slow
def test_triton_launches_as_lora(monkeypatch):
    """Forward 2 launches (shrink, the GEMM dequantizing W), backward 3 (dY, dX dequantizing W, dA): LoRA's
    counts; the GEMMs get the packed weight (WQ=1), not a dequantized copy."""
    from helpers import spy_triton_launches

    from peft_kernels.kernels import lora as L

    layer = quantized("nf4", 64, 48)
    qb = quant.QuantBase(layer)
    calls = spy_triton_launches(monkeypatch, [L._shrink_kernel, L._fwd_gemm_kernel, L._bwd_dy_kernel,
                                              L._bwd_dx_kernel, L._bwd_da_kernel])
    x = torch.randn(5, 64, requires_grad=True)
    A, B = torch.randn(4, 64, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    y = Q.qlora_linear(x, qb, layer.bias, A, B, 0.5, backend="triton")
    assert [n for n, _ in calls] == ["_shrink_kernel", "_fwd_gemm_kernel"]
    assert calls[1][1][1].dtype == torch.uint8 and calls[1][1][1].numel() == 64 * 48 // 2
    y.sum().backward()
    assert [n for n, _ in calls[2:]] == ["_bwd_dy_kernel", "_bwd_dx_kernel", "_bwd_da_kernel"]


def test_compute_dtype_is_bitsandbytes():
    """A bf16 compute_dtype on fp32 inputs: the base runs on bf16-rounded x, as bitsandbytes' layer does."""
    layer = quantized("nf4", 64, 24, compute_dtype=torch.bfloat16)
    m = pk.LoRALinear.from_linear(layer, r=4)
    x = torch.randn(5, 64)
    y = m(x)
    assert y.dtype == torch.float32
    w64 = quant.QuantBase(layer).dequantize(torch.float32).double()
    y64 = nn.functional.linear(x.bfloat16().double(), w64, layer.bias.bfloat16().double())  # B = 0: the base
    assert_close(y, y64, layer(x).float(), "y")  # as close as bitsandbytes' own bf16 layer
    # computed in bf16 and cast back, as bitsandbytes does: every value is a bf16 one (an fp32 computation is not)
    assert torch.equal(y, y.bfloat16().float())
    assert not torch.equal(y, nn.functional.linear(x, w64.float(), layer.bias.float()))


# ------------------------------------------------------------------------------- modules and models
class Tiny(nn.Module):
    def __init__(self, kind, K=64, H=96, N=32):
        super().__init__()
        self.q_proj = quantized(kind, K, H, seed=1)
        self.v_proj = quantized(kind, H, N, seed=2)
        self.head = nn.Linear(N, 3)

    def forward(self, x):
        return self.head(self.v_proj(torch.relu(self.q_proj(x))))


def test_inject_keeps_the_quantized_weight_and_no_float_copy():
    model = Tiny("nf4")
    w = model.q_proj.weight
    names = pk.inject_lora(model, ["q_proj", "v_proj"], r=8)
    assert names == ["q_proj", "v_proj"]
    m = model.q_proj
    assert isinstance(m, pk.LoRALinear) and m.base_layer.weight is w and m.weight is w
    assert m.lora_A.dtype == torch.float32 and m.lora_A.requires_grad and not w.requires_grad
    big = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
           if t.is_floating_point() and t.numel() >= 64 * 96]
    assert big == [], f"a float tensor the size of a weight is kept: {big}"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"]
    model(torch.randn(4, 64)).sum().backward()
    assert m.lora_A.grad is not None


class FakeGPTQ(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 64, 96
        self.register_buffer("qweight", torch.zeros(8, 96, dtype=torch.int32))


@pytest.mark.parametrize("what", ["gptq", "ao-dynamic-act", "bnb-8bit-fp16-weights"])
def test_unsupported_quantization_is_refused_before_any_change(what):
    model = Tiny("nf4")
    if what == "gptq":
        model.v_proj = FakeGPTQ()
        msg = "FakeGPTQ.*does not support"
    elif what == "ao-dynamic-act":
        lin = nn.Linear(96, 32)
        tq.quantize_(lin, tq.Int8DynamicActivationInt8WeightConfig())
        model.v_proj = lin
        msg = "quantizes activations"
    else:
        model.v_proj = bnb.nn.Linear8bitLt(96, 32, has_fp16_weights=True)
        msg = "has_fp16_weights=True"
    before = {n: type(mod) for n, mod in model.named_modules()}
    with pytest.raises(quant.UnsupportedQuantization, match=msg):
        pk.inject_lora(model, ["q_proj", "v_proj"], r=4)
    assert {n: type(mod) for n, mod in model.named_modules()} == before


@pytest.mark.parametrize("kind", ["nf4-dq", "int8", "ao-int4"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
def test_dora_on_a_quantized_base_matches_reference(kind, dropout):
    """QLoRALinear(use_dora=True) against dora_linear_ref on the dequantized weight (fp64), forward and the
    gradients of x, A, B and the magnitude; with dropout, the mask F.dropout drew (the same RNG state)."""
    from peft_kernels.reference import dora_linear_ref

    m = pk.LoRALinear.from_linear(quantized(kind, 96, 40), r=6, lora_alpha=12, lora_dropout=dropout, use_dora=True,
                                  init_lora_weights=False)
    W64 = m.base_weight().double()
    with torch.no_grad():
        m.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(4, 3, 96, requires_grad=True)
    torch.manual_seed(7)
    y = m.train()(x)
    torch.manual_seed(7)
    mask = nn.functional.dropout(torch.ones_like(x), dropout, True) if dropout else None
    g = torch.randn_like(y)
    y.backward(g)
    ins = [t.detach().double().requires_grad_() for t in (x, m.lora_A, m.lora_B, m.lora_magnitude_vector)]
    lp = [t.detach().clone().requires_grad_() for t in (x, m.lora_A, m.lora_B, m.lora_magnitude_vector)]
    y64 = dora_linear_ref(ins[0], W64, m.bias.double(), ins[1], ins[2], m.scaling, ins[3],
                          None if mask is None else mask.double())
    yl = dora_linear_ref(lp[0], W64.float(), m.bias, lp[1], lp[2], m.scaling, lp[3], mask)
    assert_close(y, y64, yl, "y")
    y64.backward(g.double())
    yl.backward(g)
    for name, got, r64, rl in zip(("dx", "dA", "dB", "dm"), (x, m.lora_A, m.lora_B, m.lora_magnitude_vector),
                                  ins, lp):
        assert_close(got.grad, r64.grad, rl.grad, name)


@pytest.mark.parametrize("kind", ["nf4", "int8", "ao-int8"])
@pytest.mark.parametrize("ff", [False, True], ids=["output", "input"])
def test_ia3_on_a_quantized_base_matches_reference(kind, ff):
    from peft_kernels.reference import ia3_linear_ref

    m = pk.IA3Linear.from_linear(quantized(kind, 96, 40), feedforward=ff, init_ia3_weights=False)
    assert type(m).__name__ == "QIA3Linear" and m.ia3_l.dtype == torch.float32 and not m.weight.requires_grad
    x = torch.randn(6, 96, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    y.backward(g)
    W64 = m.base_weight().double()
    x64, l64 = x.detach().double().requires_grad_(), m.ia3_l.detach().double().requires_grad_()
    xl, ll = x.detach().clone().requires_grad_(), m.ia3_l.detach().clone().requires_grad_()
    y64 = ia3_linear_ref(x64, W64, m.bias.double(), l64, ff)
    yl = ia3_linear_ref(xl, W64.float(), m.bias, ll, ff)
    assert_close(y, y64, yl, "y")
    y64.backward(g.double())
    yl.backward(g)
    assert_close(x.grad, x64.grad, xl.grad, "dx")
    assert_close(m.ia3_l.grad, l64.grad, ll.grad, "dl")
    lin = m.to_linear()
    assert type(lin) is nn.Linear
    torch.testing.assert_close(lin(x.detach()), y.detach(), rtol=1e-5, atol=1e-5)


def _peft_model(kind, r=8, alpha=16, dropout=0.0, use_dora=False):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Tiny(kind)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False, use_dora=use_dora)
    return peft.get_peft_model(base, cfg)


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8", "ao-int8", "nf4-dora", "int8-dora"])
def test_from_peft_matches_peft_qlora(kind):
    """PEFT QLoRA layers (bitsandbytes / torchao; LoRA and DoRA) converted by from_peft: equal outputs and
    gradients (train mode: bitsandbytes' 8-bit layer dequantizes then, as we do) within fp32 summation order."""
    dora = kind.endswith("-dora")
    kind = kind.replace("-dora", "")
    pm = _peft_model(kind, use_dora=dora)
    if dora:
        with torch.no_grad():
            for n in ("q_proj", "v_proj"):
                pm.base_model.model.get_submodule(n).lora_magnitude_vector["default"].weight.mul_(1.3)
    pm.train()
    ours = from_copy = pk.from_peft(copy.deepcopy(pm))
    assert isinstance(from_copy.q_proj, pk.LoRALinear) and from_copy.q_proj.quant_base.kind == EXPECT_KIND[kind]
    assert from_copy.q_proj.use_dora == dora
    torch.manual_seed(3)
    x = torch.randn(6, 64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = pm(xa), ours(xb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    # both are fp32 GEMMs on the same dequantized weights: only the summation order differs
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    pa = dict(pm.named_parameters())
    for name in ("q_proj", "v_proj"):
        for ab in ("A", "B"):
            ga = pa[f"base_model.model.{name}.lora_{ab}.default.weight"].grad
            gb = getattr(getattr(ours, name), f"lora_{ab}").grad
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_checkpoints_round_trip_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    pm = _peft_model("nf4")
    pm.eval()
    pm.save_pretrained(tmp_path / "theirs")
    ours = Tiny("nf4")
    names = pk.load_peft_adapter(ours, tmp_path / "theirs")
    assert names == ["q_proj", "v_proj"] and isinstance(ours.q_proj.base_layer, bnb.nn.Linear4bit)
    ours.eval()
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # train a step's worth of change, then PEFT loads ours
        ours.q_proj.lora_B.add_(0.01)
    pk.save_peft_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(Tiny("nf4"), tmp_path / "ours")
    back.eval()
    torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)


def test_ia3_checkpoints_round_trip_with_peft_on_a_4bit_model(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(Tiny("nf4"), peft.IA3Config(target_modules=["q_proj", "v_proj"],
                                                         feedforward_modules=["v_proj"]))
    with torch.no_grad():
        for prm in pm.parameters():
            if prm.requires_grad:
                prm.normal_(1.0, 0.2)
    pm.save_pretrained(tmp_path / "theirs")
    ours = Tiny("nf4")
    assert pk.load_peft_adapter(ours, tmp_path / "theirs") == ["q_proj", "v_proj"]
    assert type(ours.q_proj).__name__ == "QIA3Linear" and ours.v_proj.feedforward
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)
    pk.save_peft_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(Tiny("nf4"), tmp_path / "ours")
    torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8", "ao-int8", "ao-int4", "nf4-dora"])
def test_merge_requantizes_as_peft_does(kind):
    torch.manual_seed(0)
    dora = kind.endswith("-dora")
    kind = kind.replace("-dora", "")
    m = pk.LoRALinear.from_linear(quantized(kind, 64, 48), r=4, init_lora_weights=False, use_dora=dora)
    orig = m.base_weight()
    x = torch.randn(5, 64)
    y = m(x)
    lin = m.to_linear()
    assert type(lin) is nn.Linear and lin.weight.is_floating_point()
    torch.testing.assert_close(lin(x).float(), y, rtol=1e-4, atol=1e-4)  # float merge: no requantization
    with pytest.warns(UserWarning, match="requantizes"):
        m.merge()
    assert m.merged and quant.kind_of(m.base_layer) == EXPECT_KIND[kind]
    merged = quant.QuantBase(m.base_layer).dequantize(torch.float32)
    want = lin.weight.float()
    err = (merged - want).abs().max().item()
    step = (want.abs().max() / (7 if kind in ("nf4", "ao-int4") else 127)).item()
    assert err <= step, f"the requantized weight is off by {err} (> one quantization step {step})"
    ym = m(x)
    assert not torch.equal(ym, y)
    with pytest.warns(UserWarning, match="requantizes"):
        m.unmerge()
    assert not m.merged
    back = (m.base_weight() - orig).abs().max().item()  # two requantizations: merge's and unmerge's
    assert 0 < back <= 2 * step, f"unmerge left the base {back} away from the original (> 2 steps {2 * step})"
    if dora:
        W = m.base_weight()
        want = [reference.dora_linear_ref(x.to(dt), W.to(dt), m.bias.to(dt), m.lora_A.to(dt), m.lora_B.to(dt),
                                          m.scaling, m.lora_magnitude_vector.to(dt)) for dt in (torch.float64, torch.float32)]
    else:
        want = [reference.qlora_linear_ref(x.to(dt), m.quant_base, m.bias.to(dt), m.lora_A.to(dt), m.lora_B.to(dt),
                                           m.scaling, dtype=dt) for dt in (torch.float64, torch.float32)]
    assert_close(m(x), want[0], want[1], "y unmerged")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["nf4-dq", "int8", "ao-int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_multi_lora_on_a_quantized_base_matches_reference(kind, dtype, backend):
    """MultiLoRALinear.from_linear on a quantized layer (QMultiLoRALinear): a mixed batch (ids -1, 0, 2, ranks 3 and
    7) against multi_lora_linear_ref on the dequantized weight, forward and the gradients of x and the slots."""
    _check_quantized_multi_lora(kind, dtype, backend, compiled=False)


@pytest.mark.parametrize("kind,dtype", [("nf4-dq", torch.float32), ("nf4-dq", torch.bfloat16),
                                        ("int8", torch.float32), ("ao-int4", torch.float32)],
                         ids=["nf4-dq-fp32", "nf4-dq-bf16", "int8-fp32", "ao-int4-fp32"])
def test_compiled_multi_lora_on_a_quantized_base_matches_reference(kind, dtype):
    """The same under torch.compile(fullgraph=True): no graph break (the quantized base is traced, the slots'
    update is the multi-adapter custom op), and the compiled layer matches the fp64 reference."""
    _check_quantized_multi_lora(kind, dtype, "torch", compiled=True)


def _check_quantized_multi_lora(kind, dtype, backend, compiled: bool):
    from peft_kernels.reference import multi_lora_linear_ref

    m = pk.MultiLoRALinear.from_linear(quantized(kind, 96, 40), max_adapters=3, max_rank=8, backend=backend)
    assert type(m).__name__ == "QMultiLoRALinear" and m.lora_A.dtype == torch.float32
    torch.manual_seed(3)
    for slot, r in ((0, 3), (2, 7)):
        m.set_adapter(slot, torch.randn(r, 96) * 0.1, torch.randn(40, r) * 0.1, 0.5 + slot)
    ids = torch.tensor([0, -1, 2, 2, 0, 1, 2, -1, 0, 2, 2])
    x = torch.randn(len(ids), 96, dtype=dtype, requires_grad=True)
    if compiled:
        torch._dynamo.reset()
    y = (torch.compile(m, fullgraph=True) if compiled else m)(x, ids)
    assert y.dtype == dtype
    g = torch.randn_like(y)
    y.backward(g)
    W = m.base_weight()
    ins = [t.detach().double().requires_grad_() for t in (x, m.lora_A, m.lora_B)]
    lp = [t.detach().clone().requires_grad_() for t in (x, m.lora_A, m.lora_B)]
    y64 = multi_lora_linear_ref(ins[0], W.double(), m.bias.double(), ins[1], ins[2], m.scalings.double(), ids, m.ranks)
    yl = multi_lora_linear_ref(lp[0], W.to(dtype), m.bias.to(dtype), lp[1], lp[2], m.scalings, ids, m.ranks)
    assert_close(y, y64, yl, "y")
    y64.backward(g.double())
    yl.backward(g)
    for name, got, r64, rl in zip(("dx", "dA", "dB"), (x, m.lora_A, m.lora_B), ins, lp):
        assert_close(got.grad, r64.grad, rl.grad, name)


def test_from_peft_two_qlora_adapters_serve_a_mixed_batch():
    """A PeftModel with two LoRA adapters on a 4-bit model converts to QMultiLoRALinear slots; each row of a mixed
    batch equals PEFT's output with that row's adapter (and "__base__" the base's)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(Tiny("nf4"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=6, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.eval()
    x = torch.randn(6, 64)
    want = {}
    for name in ("a", "b"):
        pm.set_adapter(name)
        want[name] = pm(x).detach()
    with pm.disable_adapter():
        want["__base__"] = pm(x).detach()
    ours = pk.from_peft(pm)
    assert type(ours.q_proj).__name__ == "QMultiLoRALinear"
    names = ["a", "b", "__base__", "b", "a", "__base__"]
    with pk.adapter_ids(ours, pk.adapter_names_to_ids(ours, names)):
        y = ours(x)
    for i, n in enumerate(names):
        torch.testing.assert_close(y[i], want[n][i], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_adamw_loss_curve_matches_peft_on_a_model_quantized_at_load(tmp_path, monkeypatch):
    """A small Llama saved, then loaded by transformers with BitsAndBytesConfig (NF4, double quantization): PEFT's
    QLoRA and ours (inject_lora, the same initial adapters) take 5 AdamW steps on the same batch; the losses agree
    step by step."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.float32)

    def load():
        return transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=qc, device_map="cpu")
    theirs = peft.get_peft_model(load(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ours = load()
    names = pk.inject_lora(ours, ["q_proj", "v_proj"], r=8, lora_alpha=16)
    assert len(names) == 4 and all(type(ours.get_submodule(n).base_layer).__name__ == "Linear4bit" for n in names)
    with torch.no_grad():
        for n in names:
            pl = theirs.base_model.model.get_submodule(n)
            ours.get_submodule(n).lora_A.copy_(pl.lora_A["default"].weight)
            ours.get_submodule(n).lora_B.copy_(pl.lora_B["default"].weight)
    ids = torch.randint(0, 128, (4, 16))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (theirs, ours)]
    curves = [[], []]
    for _ in range(5):
        for i, (m, opt) in enumerate(zip((theirs, ours), opts)):
            m.train()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curves[i].append(loss.item())
    assert curves[1][-1] < curves[1][0] - 0.05, f"the loss did not go down: {curves[1]}"
    for step, (a, b) in enumerate(zip(*curves)):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: PEFT {a} vs ours {b} ({curves})"


COVERAGE_SCRIPT = r"""
import warnings
warnings.filterwarnings("ignore")
import torch
import bitsandbytes as bnb
from peft_kernels import quant
from peft_kernels.kernels import aot, lora as L

ARCHS = (80, 90)
matrix = {aot._launch_key(c, a) for c in aot.record_qlora_launches() for a in ARCHS}
torch.manual_seed(0)
lin = torch.nn.Linear(4096, 4096, bias=True)
layers = {}
for qt in ("nf4", "fp4"):
    q = bnb.nn.Linear4bit(4096, 4096, quant_type=qt, compress_statistics=True)
    q.load_state_dict(lin.state_dict())
    layers[qt + "-dq"] = q.to("cpu")
q8 = bnb.nn.Linear8bitLt(4096, 4096, has_fp16_weights=False)
q8.load_state_dict(lin.state_dict())
layers["int8"] = q8.to("cpu")
seed = torch.zeros(1, dtype=torch.int64)
missing, n = [], 0
for name, layer in layers.items():
    W = quant.QuantBase(layer).kernel_operand()
    for dt, adt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float32, torch.float32)):
        for M in (16, 512, 16384):
            for p in (0.0, 0.1):
                with aot.record_launches([L._shrink_kernel, L._fwd_gemm_kernel, L._bwd_dy_kernel, L._bwd_dx_kernel,
                                          L._bwd_da_kernel]) as calls:
                    aot.record_quant_gemms(W, dt, adt, 16, p, M, seed)
                for c in calls:
                    if c.kernel.__name__ in ("_fwd_gemm_kernel", "_bwd_dx_kernel"):
                        n += 1
                        for a in ARCHS:
                            if aot._launch_key(c, a) not in matrix:
                                missing.append((name, str(dt), str(adt), M, p, c.kernel.__name__, a))
print("CHECKED", n, "MISSING", len(missing))
print(missing[:8])
"""


@pytest.mark.slow
def test_aot_matrix_covers_the_launches_of_real_quantized_layers():
    """The AOT 0-spill matrix (``aot.qlora_launch_matrix``) holds every quantized GEMM variant that real bitsandbytes
    layers (NF4 and FP4 with double quantization, Linear8bitLt) launch at Llama's q_proj shape, in each M bucket,
    dtype and adapter dtype, with and without dropout: the JIT's own binder gives the same keys."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", COVERAGE_SCRIPT], env=real_jit_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("CHECKED")][0].split()
    assert int(line[1]) >= 3 * 3 * 3 * 2 * 2 and line[3] == "0", out.stdout


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8", "ao-int8", "ao-int4"])
@pytest.mark.parametrize("K", [128, 95], ids=["aligned", "odd"])
def test_triton_gemms_dequantize_bit_for_bit(kind, K):
    """The Triton GEMMs' own dequantization against the quantizer's, bit for bit: with x = I (fp32, IEEE dots, B = 0)
    the forward GEMM returns deq(W)ᵀ exactly (every product is a weight times 1 or 0), and with dY = I dX returns
    deq(W) exactly. K=95: rows that start mid-byte and mid-block (torchao's int4 groups need 96)."""
    from peft_kernels.kernels import lora as L

    K = 96 if (kind == "ao-int4" and K == 95) else K
    layer = quantized(kind, K, 40)
    want = own_dequantize(layer)
    op = quant.QuantBase(layer).kernel_operand()
    A, B = torch.zeros(4, K), torch.zeros(40, 4)
    from peft_kernels.kernels._common import fp32_precision_override

    with fp32_precision_override("ieee"):
        y, S = L.lora_forward(torch.eye(K), op, None, A, B, 1.0, 0.0, None)
        dx, _, _ = L.lora_backward(torch.eye(40), torch.zeros(40, K), op, A, B, torch.zeros(40, 4), 1.0, 0.0, None,
                                   True, False, False)
    assert torch.equal(y, want.t()), f"forward: {int((y != want.t()).sum())} of {y.numel()} values differ"
    assert torch.equal(dx, want), f"dX: {int((dx != want).sum())} of {dx.numel()} values differ"
