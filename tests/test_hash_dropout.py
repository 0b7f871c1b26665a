"""hash_dropout (the model's own dropout on the keyed-hash mask), HashDropout, the "peft_kernels_sdpa" attention and
use_hash_dropout: every backend against the mask's definition (bit for bit) and the reference, the keep rate, a
backward that regenerates forward's mask (gradcheck), nothing stored, torch.compile, and whole models (BERT,
Llama) whose outputs and masks match SDPA's."""
import copy

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels import _ext, reference
from peft_kernels.nn.dropout import ATTENTION, HashDropout, hash_sdpa_attention
from peft_kernels.ops import _torch_dropout
from peft_kernels.ops import hash_dropout as hd

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _factors(seed, shape, p):
    """The definition: keep = hash(flat index) ≥ thr in plain torch integer ops, times the exact keep scale."""
    n = 1
    for d in shape:
        n *= d
    keep = _torch_dropout.keep_mask_ops(seed, n, p, "cpu").view(shape)
    return keep.to(torch.float32) * _torch_dropout.keep_scale(p)


def _seeded(fn, s=1234):
    """fn's result with the generator at ``s``, and the seed hash_dropout draws there (its first draw)."""
    torch.manual_seed(s)
    seed = _torch_dropout.draw_seed("cpu")
    torch.manual_seed(s)
    return fn(), seed


def _inputs():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 37, 10, generator=g)
    return {"odd 2-D": torch.randn(7, 13, generator=g), "3-D": torch.randn(3, 5, 129, generator=g),
            "transposed view": base.transpose(0, 2), "strided slice": base[:, ::3, 1:],
            "one element": torch.randn(1, generator=g), "empty": torch.randn(0, 4, generator=g),
            "several 4096-element chunks": torch.randn(3, 3001, generator=g)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(_inputs()))
@pytest.mark.parametrize("ext", [True, False], ids=["cpp", "torch-ops"])
def test_forward_is_the_masks_definition_bit_for_bit(dtype, case, ext, monkeypatch):
    if ext and not _ext.available():
        pytest.skip(_ext.why_unavailable() if hasattr(_ext, "why_unavailable") else "extension not built")
    if not ext:
        monkeypatch.setattr(_ext, "available", lambda: False)
    x = _inputs()[case].to(dtype)
    p = 0.3
    y, seed = _seeded(lambda: pk.hash_dropout(x, p))
    want = (x * _factors(seed, tuple(x.shape), p)).to(dtype)  # torch's x * m, rounded once to x's dtype
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, want)
    ref = reference.dropout_ref(x.double(), _factors(seed, tuple(x.shape), p).double())
    assert torch.equal(y.double(), ref.to(dtype).double())


def test_threads_do_not_change_the_result():
    if not _ext.available():
        pytest.skip("extension not built")
    x = torch.randn(300, 1000)
    seed = torch.tensor([987654321], dtype=torch.int64)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hd.apply_mask(x, seed, 0.25)
        torch.set_num_threads(max(2, n))
        many = hd.apply_mask(x, seed, 0.25)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, many)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_unbiased(p):
    x = torch.ones(1000, 1000)
    y = pk.hash_dropout(x, p)
    kept = (y != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.005, kept
    assert abs(y.double().mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation
    assert not torch.equal(pk.hash_dropout(x, p) != 0, y != 0)  # a fresh seed per call


def test_backward_regenerates_forwards_mask_gradcheck():
    x = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)

    def f(t):
        torch.manual_seed(7)  # the same seed on every call: gradcheck's numeric side sees one mask
        return pk.hash_dropout(t, 0.4)
    assert torch.autograd.gradcheck(f, (x,))
    y, seed = _seeded(lambda: pk.hash_dropout(x, 0.4), 7)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(dx, g * _factors(seed, (5, 11), 0.4).double())


def test_nothing_the_size_of_x_is_saved():
    x = torch.randn(64, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = pk.hash_dropout(x * 1.0, 0.2)
    assert sum(t.numel() * t.element_size() for t in saved) <= 8, [t.shape for t in saved]  # the int64 seed
    y.sum().backward()
    assert x.grad is not None


def test_identity_zero_and_errors():
    x = torch.randn(4, 4)
    assert pk.hash_dropout(x, 0.0) is x
    assert pk.hash_dropout(x, 0.5, training=False) is x
    assert torch.equal(pk.hash_dropout(x, 1.0), torch.zeros_like(x))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p must be in"):
            pk.hash_dropout(x, bad)
    for bad in ("0.1", True, None):
        with pytest.raises(TypeError, match="p must be a float"):
            pk.hash_dropout(x, bad)
    with pytest.raises(TypeError, match="floating-point"):
        pk.hash_dropout(torch.ones(3, dtype=torch.int64), 0.1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        pk.hash_dropout([1.0], 0.1)


def test_cpp_op_validates_its_arguments():
    if not _ext.available():
        pytest.skip("extension not built")
    ops = _ext.ops()
    with pytest.raises(TypeError, match="float32, float64"):
        ops.hash_dropout(torch.ones(3, dtype=torch.int32), 1, 2, 3, 4, 1.5)
    with pytest.raises(ValueError, match="uint32"):
        ops.hash_dropout(torch.ones(3), -1, 2, 3, 4, 1.5)
    with pytest.raises(ValueError, match="scale"):
        ops.hash_dropout(torch.ones(3), 1, 2, 3, 4, 0.5)


def test_compiled_equals_eager_no_graph_break_and_opcheck():
    mod = nn.Sequential(nn.Linear(16, 16), HashDropout(0.3), nn.Tanh(), HashDropout(0.2))
    x = torch.randn(9, 16)
    ex = torch._dynamo.explain(mod)(x)
    assert ex.graph_break_count == 0, [str(b.reason)[:200] for b in ex.break_reasons]
    torch._dynamo.reset()
    cm = torch.compile(copy.deepcopy(mod), backend="aot_eager", fullgraph=True)
    outs = []
    for m in (mod, cm):
        torch.manual_seed(3)
        y = m(x)
        y.square().sum().backward()
        outs.append((y, [p.grad for p in m.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)
    torch.library.opcheck(hd._hash_dropout_op, (torch.randn(5, 7, requires_grad=True),
                                               torch.tensor([42], dtype=torch.int64), 0.3))


def test_hashdropout_module_is_a_dropout():
    m = HashDropout(0.25)
    assert isinstance(m, nn.Dropout) and m.p == 0.25 and "mask=hash" in repr(m)
    x = torch.randn(8, 8)
    m.eval()
    assert m(x) is x
    m.train()
    assert (m(x) == 0).any()


# ------------------------------------------------------------------------------------ attention
def _qkv(B=2, H=3, L=6, S=6, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, H, n, D, generator=g, dtype=dtype) for n in (L, S, S)]


class _Attn(nn.Module):
    def __init__(self, groups=1, causal=False):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, causal


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive", "bool with a hidden row"])
def test_attention_with_dropout_is_the_reference(mask_kind):
    pytest.importorskip("transformers")
    q, k, v = _qkv()
    mask, causal = None, False
    if mask_kind == "causal":
        causal = True
    elif mask_kind.startswith("bool"):
        mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(2)) > 0.3
        if mask_kind == "bool with a hidden row":
            mask[0, 0, 2] = False
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    mod = _Attn(causal=causal).train()
    (out, w), seed = _seeded(lambda: hash_sdpa_attention(mod, q, k, v, mask, dropout=0.3, scaling=0.2))
    assert w is None and out.shape == (2, 6, 3, 8)
    fac = _factors(seed, (2, 3, 6, 6), 0.3).double()
    ref = reference.sdpa_attention_ref(q, k, v, mask, is_causal=causal, scale=0.2, dropout_mask=fac)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()
    if mask_kind == "bool with a hidden row":
        assert torch.equal(out[0, 2, 0], torch.zeros(8, dtype=torch.float64))
    # without dropout it is SDPA itself
    out0, _ = hash_sdpa_attention(mod, q, k, v, mask, dropout=0.0, scaling=0.2)
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.2)
    torch.testing.assert_close(out0, sd.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_attention_gqa_repeats_kv():
    pytest.importorskip("transformers")
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, 5, 8, dtype=torch.float64), torch.randn(1, 2, 5, 8, dtype=torch.float64)
    mod = _Attn(groups=2, causal=True).train()
    (out, _), seed = _seeded(lambda: hash_sdpa_attention(mod, q, k, v, None, dropout=0.2))
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = reference.sdpa_attention_ref(q, kk, vv, None, is_causal=True,
                                       dropout_mask=_factors(seed, (1, 4, 5, 5), 0.2).double())
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ whole models
def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).double()


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, attention_dropout=0.1,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double()


@pytest.mark.parametrize("make", [_bert, _llama], ids=["bert", "llama"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_model_outputs_match_sdpa(make, padded):
    """With a vanishing p (no element dropped, scale 1 + 1e-9), the hash path's outputs equal the model's own SDPA
    path without dropout: the masks (padding, causal) and the layout are SDPA's. In eval, outputs are identical."""
    model = make()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    am = torch.ones_like(ids)
    if padded:
        am[1, 6:] = 0
    ours = copy.deepcopy(model)
    info = pk.use_hash_dropout(ours)
    n_drop = sum(type(m) is nn.Dropout for m in model.modules())
    assert info == {"dropout_layers": n_drop, "attention": ATTENTION}
    assert not any(type(m) is nn.Dropout for m in ours.modules())
    for m in (model, ours):
        m.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=am).logits, ours(input_ids=ids, attention_mask=am).logits)
    tiny = 1e-9
    for m in ours.modules():
        if isinstance(m, nn.Dropout):
            m.p = tiny
    ours.config.attention_probs_dropout_prob = tiny
    ours.config.attention_dropout = tiny
    for m in ours.modules():  # Llama's attention reads its own float
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = tiny
    ours.train()
    seen = []
    orig = hd._hash_dropout_op
    try:  # count the attention-probability calls (the hash path ran, not SDPA's dropout)
        hd._hash_dropout_op = lambda x, s, p: seen.append(tuple(x.shape)) or orig(x, s, p)
        out = ours(input_ids=ids, attention_mask=am).logits
    finally:
        hd._hash_dropout_op = orig
    assert any(len(s) == 4 and s[-1] == 9 and s[-2] == 9 for s in seen), seen
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(out, want, rtol=1e-7, atol=1e-7)
    out.double().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)


def test_use_hash_dropout_round_trip_and_other_models():
    model = _bert()
    before = {n: type(m) for n, m in model.named_modules()}
    pk.use_hash_dropout(model)
    back = pk.use_hash_dropout(model, enable=False)
    assert back["attention"] == "sdpa"
    assert {n: type(m) for n, m in model.named_modules()} == before
    # a plain model: the layers only; a Dropout subclass and Dropout2d are left alone
    class Mine(nn.Dropout):
        pass
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), Mine(0.2), nn.Dropout2d(0.1)).eval()
    assert pk.use_hash_dropout(net) == {"dropout_layers": 1, "attention": None}
    assert type(net[1]) is HashDropout and not net[1].training and type(net[2]) is Mine
    with pytest.raises(TypeError, match="nn.Module"):
        pk.use_hash_dropout("model")
    with pytest.raises(TypeError, match="enable"):
        pk.use_hash_dropout(net, enable=1)


def test_lora_training_step_with_hash_dropout_learns():
    model = _bert().float()
    pk.inject_lora(model, ["query", "value"], r=4, lora_alpha=8, lora_dropout=0.1, task_type="SEQ_CLS")
    pk.use_hash_dropout(model)
    ids = torch.randint(3, 100, (4, 9), generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses  # nn.Dropout's run: 0.693 -> 0.028; this one: -> 0.038

