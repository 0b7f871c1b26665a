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
from peft_kernels.ops import qlora as Q
from peft_kernels.ops.lora import dropout_mask

from helpers import assert_close

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency (make test installs it)")
BF = pytest.importorskip("bitsandbytes.functional")
tq = pytest.importorskip("torchao.quantization", reason="torchao is a test dependency (make test installs it)")

KINDS = ("nf4", "fp4", "nf4-dq", "fp4-dq", "int8", "ao-int8", "ao-int4")
EXPECT_KIND = {"nf4": "bnb-nf4", "fp4": "bnb-fp4", "nf4-dq": "bnb-nf4", "fp4-dq": "bnb-fp4", "int8": "bnb-int8",
               "ao-int8": "torchao-int8", "ao-int4": "torchao-intx"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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
        tq.quantize_(lin, tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32)))
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", ["2d-bias", "3d-nobias-r1", "strided-r80-dropout"])
def test_qlora_op_matches_reference(kind, dtype, case, monkeypatch):
    monkeypatch.setattr(quant, "CHUNK_BYTES", 96 * 4 * 8)  # several chunks at this size
    bias = case == "2d-bias"
    r = 1 if "r1" in case else 80 if "r80" in case else 8
    layer = quantized(kind, 96, 40, bias=bias)
    qb = quant.QuantBase(layer)
    torch.manual_seed(1)
    if case == "3d-nobias-r1":
        x = torch.randn(3, 5, 96, dtype=dtype)
    elif case == "strided-r80-dropout":
        x = torch.randn(7, 2 * 96, dtype=dtype)[:, ::2]  # really strided: every other column
        assert not x.is_contiguous()
    else:
        x = torch.randn(13, 96, dtype=dtype)
    x.requires_grad_()
    A = (torch.randn(r, 96) * 0.1).requires_grad_()
    B = (torch.randn(40, r) * 0.1).requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().to(dtype)
    p, s = (0.3 if "dropout" in case else 0.0), 0.7
    torch.manual_seed(5)
    seed = Q._draw_seed(x.device) if p else None
    torch.manual_seed(5)
    y = Q.qlora_linear(x, qb, b, A, B, s, dropout_p=p, training=True)
    mask = dropout_mask("torch", seed, (x.reshape(-1, 96).shape), p, x.device).reshape(x.shape) if p else None
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
    with pytest.raises(pk.BackendUnavailable, match="dequantize-in-the-mainloop GEMM is not written yet"):
        Q.qlora_linear(x, qb, None, A, B, 1.0, backend="triton")


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
    assert not torch.equal(y, nn.functional.linear(x, w64.float(), layer.bias.float()))  # x was rounded to bf16


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


def test_dora_on_quantized_base_is_refused_clearly():
    with pytest.raises(ValueError, match="use_dora=True on a quantized base"):
        pk.LoRALinear.from_linear(quantized("nf4", 64, 16), r=4, use_dora=True)


def _peft_model(kind, r=8, alpha=16, dropout=0.0):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Tiny(kind)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)
    return peft.get_peft_model(base, cfg)


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8", "ao-int8"])
def test_from_peft_matches_peft_qlora(kind):
    """PEFT QLoRA layers (bitsandbytes / torchao) converted by from_peft: equal outputs and gradients (train mode:
    bitsandbytes' 8-bit layer dequantizes then, as we do) within same-precision tolerance."""
    pm = _peft_model(kind)
    pm.train()
    ours = from_copy = pk.from_peft(copy.deepcopy(pm))
    assert isinstance(from_copy.q_proj, pk.LoRALinear) and from_copy.q_proj.quant_base.kind == EXPECT_KIND[kind]
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


@pytest.mark.parametrize("kind", ["nf4", "int8", "ao-int8", "ao-int4"])
def test_merge_requantizes_as_peft_does(kind):
    torch.manual_seed(0)
    m = pk.LoRALinear.from_linear(quantized(kind, 64, 48), r=4, init_lora_weights=False)
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
    assert_close(m(x), reference.qlora_linear_ref(x.double(), m.quant_base, m.bias.double(), m.lora_A.double(),
                                                  m.lora_B.double(), m.scaling, dtype=torch.float64),
                 reference.qlora_linear_ref(x, m.quant_base, m.bias, m.lora_A, m.lora_B, m.scaling), "y unmerged")


@pytest.mark.parametrize("inject", ["multi", "ia3"])
def test_other_adapters_refuse_a_quantized_base_before_any_change(inject):
    model = Tiny("nf4")
    before = {n: type(mod) for n, mod in model.named_modules()}
    fn = (lambda: pk.inject_multi_lora(model, ["q_proj", "v_proj"])) if inject == "multi" else (
        lambda: pk.inject_ia3(model, ["q_proj", "v_proj"]))
    with pytest.raises(quant.UnsupportedQuantization, match="on a quantized base .bnb-nf4. is not supported yet"):
        fn()
    assert {n: type(mod) for n, mod in model.named_modules()} == before
