"""Sibling projections (q/k/v, gate/up) as one op: ``lora_siblings`` against the separate projections' fp64
reference (forward and every gradient, fp32/fp16/bf16, fp32 adapters on half bases, ranks 1 and 80, bias / no
bias / mixed, 3-D and strided x, dropout with each member's own mask), and ``fuse_siblings`` in models: the same
outputs, gradients, state dicts and checkpoints as unfused layers, one packed copy of the frozen weights, a group
that turns itself off when its members do not share their input, repacking after a re-bind, threads, compile,
merge / unload."""
import contextlib
import copy
import threading
import types

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels import _ext, reference
from peft_kernels.nn.siblings import SiblingGroup
from peft_kernels.ops import _torch_dropout
from peft_kernels.ops import siblings as siblings_op

from helpers import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _members(dtype, K=40, widths=(48, 16, 16), ranks=(4, 4, 4), bias=(True, True, True), lora_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ms = []
    for n, r, b in zip(widths, ranks, bias):
        ldt = lora_dtype or dtype
        ms.append(dict(W=(torch.randn(n, K, generator=g) / K ** 0.5).to(dtype),
                       b=(torch.randn(n, generator=g) * 0.1).to(dtype) if b else None,
                       A=(torch.randn(r, K, generator=g) / K ** 0.5).to(ldt),
                       B=(torch.randn(n, r, generator=g) * 0.5).to(ldt), s=0.5 + r / 8))
    return ms


def _stack(ms):
    W = torch.cat([m["W"] for m in ms])
    has_b = any(m["b"] is not None for m in ms)
    b = torch.cat([m["b"] if m["b"] is not None else torch.zeros(m["W"].shape[0], dtype=W.dtype) for m in ms]) \
        if has_b else None
    return W, b


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


CASES = {
    "qkv": dict(), "gate/up": dict(widths=(64, 64), ranks=(8, 8), bias=(False, False)),
    "rank 1 and 80": dict(ranks=(1, 80, 4)), "mixed bias": dict(bias=(True, False, True)),
    "fp32 adapters": dict(lora_dtype=torch.float32),
}


@pytest.mark.parametrize("xshape", ["2-D", "3-D strided"])
@pytest.mark.parametrize("dtype,case", [pytest.param(d, c, id=f"{d}-{c}") for d in DTYPES for c in CASES
                                        if not (d == torch.float32 and c == "fp32 adapters")])
def test_op_against_the_separate_projections(dtype, case, xshape):
    ms = _members(dtype, **CASES[case])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 40, generator=g) if xshape == "2-D" else torch.randn(3, 40, 7, generator=g).transpose(1, 2)
    x = x.to(dtype)
    gy = [torch.randn(*x.shape[:-1], m["W"].shape[0], generator=g) for m in ms]

    def run(dt, fused):
        xx = x.to(dt).requires_grad_()
        As = [_leaf(m["A"].to(dt if m["A"].dtype == dtype else m["A"].dtype)) for m in ms]
        Bs = [_leaf(m["B"].to(dt if m["B"].dtype == dtype else m["B"].dtype)) for m in ms]
        if dt == torch.float64:
            As, Bs = [_leaf(a.double()) for a in As], [_leaf(b.double()) for b in Bs]
        Ws = [m["W"].to(dt) for m in ms]
        bs = [None if m["b"] is None else m["b"].to(dt) for m in ms]
        if fused:
            W, b = _stack([dict(W=w, b=bb) for w, bb in zip(Ws, bs)])
            y = pk.lora_siblings(xx, W, b, As, Bs, [m["s"] for m in ms])
            ys = y.split([m["W"].shape[0] for m in ms], dim=-1)
        else:
            ys = [reference.lora_linear_ref(xx, w, bb, a, bq, m["s"]) for w, bb, a, bq, m in zip(Ws, bs, As, Bs, ms)]
        grads = torch.autograd.grad(ys, [xx, *As, *Bs], [t.to(ys[0].dtype) for t in gy])
        return [y.detach() for y in ys], grads
    ref_y, ref_g = run(torch.float64, False)
    same_y, same_g = run(dtype, False)
    got_y, got_g = run(dtype, True)
    for i, (a, r, s) in enumerate(zip(got_y, ref_y, same_y)):
        assert a.dtype == dtype
        assert_close(a, r, s, f"{case} y[{i}]")
    names = ["dx"] + [f"dA{i}" for i in range(len(ms))] + [f"dB{i}" for i in range(len(ms))]
    for n, a, r, s in zip(names, got_g, ref_g, same_g):
        assert_close(a, r, s, f"{case} {n}")


class _CountingOps:
    """``_ext.ops()`` that records which ops the sibling op looks up."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(_ext.ops(), name)


@pytest.mark.parametrize("split", [False, True], ids=["stacked", "split"])
@pytest.mark.parametrize("dtype,lora_dtype,ext", [(torch.float32, None, True), (torch.float32, None, False),
                                                  (torch.bfloat16, torch.float32, True), (torch.float16, None, True)],
                         ids=["fp32", "fp32-no-extension", "bf16-fp32-adapters", "fp16"])
def test_dropout_each_member_has_its_own_mask(dtype, lora_dtype, ext, split, monkeypatch):
    """Members with dropout (two of three, each its own mask; the third without) against each member's reference fed
    that mask: fp64, bounded by the same reference in the op's precision; the outputs stacked, or split (backward
    then takes each member's dY). In fp32 on CPU with the extension the two run as a group in the C++ kernels (one
    shrink call, one backward call), else each on its own."""
    if ext and not _ext.available():
        pytest.skip(f"extension: {_ext.unavailable_reason()}")
    if not ext:
        monkeypatch.setenv("PEFT_KERNELS_DISABLE_EXT", "1")
    counting = _CountingOps()
    monkeypatch.setattr(siblings_op, "_ext", types.SimpleNamespace(ops=lambda: counting))
    ms = _members(dtype, ranks=(4, 2, 3), lora_dtype=lora_dtype)
    x = torch.randn(11, 40).to(dtype)
    ps = (0.3, 0.0, 0.5)
    torch.manual_seed(8)
    seeds = [_torch_dropout.draw_seed("cpu") if p else None for p in ps]
    masks = [None if p == 0 else _torch_dropout.dropout_mask(s, tuple(x.shape), p, "cpu") for s, p in zip(seeds, ps)]
    gy = [torch.randn(11, m["W"].shape[0]).to(dtype) for m in ms]
    refs = {}
    for rdt in (torch.float64, dtype):  # the spec in fp64, and in the op's precision (the bound's yardstick)
        xx = x.to(rdt).requires_grad_()
        As = [_leaf(m["A"] if rdt == dtype else m["A"].to(rdt)) for m in ms]
        Bs = [_leaf(m["B"] if rdt == dtype else m["B"].to(rdt)) for m in ms]
        ys = [reference.lora_linear_ref(xx, m["W"].to(rdt), m["b"].to(rdt), a, b, m["s"],
                                        None if mk is None else mk.to(a.dtype)) for m, a, b, mk in
              zip(ms, As, Bs, masks)]
        ys = [y.to(rdt) for y in ys]
        refs[rdt] = [y.detach() for y in ys] + list(torch.autograd.grad(ys, [xx, *As, *Bs],
                                                                       [g.to(rdt) for g in gy]))
    xf = x.clone().requires_grad_()
    Af = [_leaf(m["A"]) for m in ms]
    Bf = [_leaf(m["B"]) for m in ms]
    W, b = _stack(ms)
    torch.manual_seed(8)
    y = pk.lora_siblings(xf, W, b, Af, Bf, [m["s"] for m in ms], ps, training=True, split=split)
    got = y if split else y.split([m["W"].shape[0] for m in ms], dim=-1)
    got = [t.detach() for t in got] + list(torch.autograd.grad(got, [xf, *Af, *Bf], gy))
    names = ["y_q", "y_k", "y_v", "dx", "dA_q", "dA_k", "dA_v", "dB_q", "dB_k", "dB_v"]
    assert len(got) == len(names) == len(refs[dtype])
    for name, a, r64, rl in zip(names, got, refs[torch.float64], refs[dtype]):
        assert a.dtype == rl.dtype, name
        assert_close(a, r64, rl, name)
    assert masks[0] is not None and not torch.equal(masks[0] != 0, masks[2] != 0)
    grouped = ext and dtype == torch.float32
    assert counting.calls == (["lora_dropout_shrink_group", "lora_dropout_bwd_group"] if grouped else [])


@pytest.mark.parametrize("unused,frozen_a,x_grad", [(1, None, True), (None, 2, True), (None, None, False),
                                                     (0, 1, False)])
def test_dropout_group_with_partial_gradients(unused, frozen_a, x_grad, monkeypatch):
    """Three members with dropout (the C++ group in fp32 with the extension) when not every gradient is wanted: a
    member's output unused (autograd hands the op zeros for it), a member's A frozen (its dA not asked for), x
    without grad (no dx). Against each member's fp64 reference fed its mask, bounded by the same reference in fp32;
    the unused member's factors get zero gradients."""
    counting = _CountingOps()
    monkeypatch.setattr(siblings_op, "_ext", types.SimpleNamespace(ops=lambda: counting))
    ms = _members(torch.float32, ranks=(4, 1, 3))
    x = torch.randn(13, 40)
    ps = (0.3, 0.2, 0.5)
    torch.manual_seed(9)
    seeds = [_torch_dropout.draw_seed("cpu") for _ in ps]
    masks = [_torch_dropout.dropout_mask(sd, tuple(x.shape), p, "cpu") for sd, p in zip(seeds, ps)]
    gy = [torch.randn(13, m["W"].shape[0]) for m in ms]
    used = [i for i in range(3) if i != unused]

    def grads(rdt, op):
        xx = x.to(rdt).requires_grad_(x_grad)
        As = [m["A"].to(rdt).requires_grad_(i != frozen_a) for i, m in enumerate(ms)]
        Bs = [_leaf(m["B"].to(rdt)) for m in ms]
        if op:
            W, b = _stack(ms)
            torch.manual_seed(9)
            ys = pk.lora_siblings(xx, W, b, As, Bs, [m["s"] for m in ms], ps, training=True, split=True)
        else:
            ys = [reference.lora_linear_ref(xx, m["W"].to(rdt), m["b"].to(rdt), a, bb, m["s"], mk.to(rdt))
                  for m, a, bb, mk in zip(ms, As, Bs, masks)]
        wrt = ([xx] if x_grad else []) + [a for a in As if a.requires_grad] + Bs
        got = torch.autograd.grad([ys[i] for i in used], wrt, [gy[i].to(rdt) for i in used], allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(got, wrt)]
    got, ref64, ref32 = grads(torch.float32, True), grads(torch.float64, False), grads(torch.float32, False)
    assert len(got) == len(ref64) == (1 if x_grad else 0) + (2 if frozen_a is not None else 3) + 3
    for k, (a, r64, r32) in enumerate(zip(got, ref64, ref32)):
        assert_close(a, r64, r32, f"grad {k}")
    if unused is not None:  # its factors: exactly zero
        assert not got[-3 + unused].any()
    if _ext.available():
        assert counting.calls == ["lora_dropout_shrink_group", "lora_dropout_bwd_group"]


def test_gradcheck_fp64_with_dropout():
    ms = _members(torch.float64, K=6, widths=(5, 3), ranks=(2, 3))
    W, b = _stack(ms)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ab = [_leaf(m["A"]) for m in ms] + [_leaf(m["B"]) for m in ms]

    def f(xx, *t):
        torch.manual_seed(4)
        return pk.lora_siblings(xx, W, b, list(t[:2]), list(t[2:]), [0.5, 1.5], [0.3, 0.4], training=True)
    assert torch.autograd.gradcheck(f, (x, *ab))


@pytest.mark.parametrize("split", [False, True], ids=["stacked", "split"])
def test_second_order_and_an_unfrozen_base_fp64(split):
    """gradcheck and gradgradcheck through every input, the base weight and bias included (an unfrozen base), without
    and with dropout (one member without: a stack of one): the gradients of the op's gradients are exact (under
    create_graph the saved S must not be a constant). Split: one member's output unused (its dY is None)."""
    ms = _members(torch.float64, K=6, widths=(5, 3, 2), ranks=(2, 3, 1))
    W, b = (_leaf(t) for t in _stack(ms))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ab = [_leaf(m["A"]) for m in ms] + [_leaf(m["B"]) for m in ms]
    for ps in ([0.0, 0.0, 0.0], [0.3, 0.0, 0.4]):
        def f(xx, WW, bb, *t):
            torch.manual_seed(4)
            out = pk.lora_siblings(xx, WW, bb, list(t[:3]), list(t[3:]), [0.5, 1.5, 2.0], ps, training=True,
                                   split=split)
            return torch.cat([out[0], out[2]], -1) if split else out
        assert torch.autograd.gradcheck(f, (x, W, b, *ab)), ps
        assert torch.autograd.gradgradcheck(f, (x, W, b, *ab)), ps

@pytest.mark.parametrize("split", [False, True], ids=["stacked", "split"])
def test_every_tensor_backward_reads_goes_through_saved_tensor_hooks(split):
    """CPU offload (``save_on_cpu``) and activation accounting see what the op keeps for backward through
    saved-tensor hooks: here the hooks hand backward copies, and it must read only those, the stacked A's (the
    forward's concatenation, reused by backward) included; the gradients equal those without hooks."""
    ms = _members(torch.float32, ranks=(4, 2, 3))
    W, b = _stack(ms)
    x = torch.randn(9, 40, requires_grad=True)
    As, Bs = [_leaf(m["A"]) for m in ms], [_leaf(m["B"]) for m in ms]
    gy = torch.randn(9, sum(m["W"].shape[0] for m in ms))

    def run(hooks):
        packed, unpacked = [], []

        def pack(t):
            packed.append(t.detach().clone())
            return len(packed) - 1

        def unpack(i):
            unpacked.append(i)
            return packed[i]
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack) if hooks else contextlib.nullcontext():
            out = pk.lora_siblings(x, W, b, As, Bs, [m["s"] for m in ms], split=split)
        y = torch.cat(out, -1) if split else out
        return torch.autograd.grad(y, [x, *As, *Bs], gy), packed, unpacked

    ref, _, _ = run(False)
    got, packed, unpacked = run(True)
    A_cat = torch.cat([a.detach() for a in As])
    assert any(p.shape == A_cat.shape and torch.equal(p, A_cat) for p in packed), [tuple(p.shape) for p in packed]
    assert sorted(set(unpacked)) == list(range(len(packed)))
    for r, g in zip(ref, got):
        assert torch.equal(r, g)



def test_a_member_with_an_unfrozen_base_runs_alone_and_trains_it(monkeypatch):
    """A member whose base weight or bias requires grad gets its gradient (the packed buffer carries none): the group
    runs its members alone while that holds, with the unfused layers' gradients, and fuses again once refrozen."""
    import peft_kernels.nn.siblings as nsib

    calls = []
    monkeypatch.setattr(nsib, "lora_siblings", lambda *a, **k: calls.append(1) or pk.lora_siblings(*a, **k))

    torch.manual_seed(0)
    base = _QKV(8, (6, 4, 4))
    fused, plain = copy.deepcopy(base), copy.deepcopy(base)
    for m, fuse in ((fused, True), (plain, False)):
        torch.manual_seed(1)
        pk.inject_lora(m, ["q_proj", "k_proj", "v_proj"], r=2, init_lora_weights=False, fuse_siblings=fuse)
        m.q_proj.weight.requires_grad_(True)
        m.v_proj.bias.requires_grad_(True)
    x = torch.randn(3, 8)
    for m in (fused, plain):
        sum((o * o).sum() for o in m(x)).backward()
    assert not calls
    for name in ("q_proj.weight", "v_proj.bias", "v_proj.lora_A", "q_proj.lora_B"):
        g, ref = fused.get_parameter(name).grad, plain.get_parameter(name).grad
        assert g is not None and torch.equal(g, ref), name
    fused.q_proj.weight.requires_grad_(False)
    fused.v_proj.bias.requires_grad_(False)
    fused(x)
    assert calls and fused.q_proj._siblings.enabled


def test_op_errors():
    ms = _members(torch.float32)
    W, b = _stack(ms)
    x = torch.randn(3, 40)
    As, Bs, s = [m["A"] for m in ms], [m["B"] for m in ms], [1.0] * 3
    with pytest.raises(ValueError, match="one entry per member"):
        pk.lora_siblings(x, W, b, As, Bs[:2], s)
    with pytest.raises(ValueError, match="weight must have shape"):
        pk.lora_siblings(x, W[:-1], b, As, Bs, s)
    with pytest.raises(ValueError, match="bias must have shape"):
        pk.lora_siblings(x, W, b[:-1], As, Bs, s)
    with pytest.raises(ValueError, match="member 1"):
        pk.lora_siblings(x, W, b, [As[0], As[1][:, :5], As[2]], Bs, s)
    with pytest.raises(TypeError, match="member 0"):
        pk.lora_siblings(x, W, b, [As[0].double()] + As[1:], Bs, s)
    with pytest.raises(ValueError, match="dropout_ps"):
        pk.lora_siblings(x, W, b, As, Bs, s, [0.1, 1.0, 0.0], training=True)


# ------------------------------------------------------------------------------------ models
def _llama(fuse, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96)
    m = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    pk.inject_lora(m, list(targets), r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                   fuse_siblings=fuse)
    return m


def _loss_and_grads(m, ids):
    loss = m(input_ids=ids, labels=ids).loss
    ps = [p for p in m.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, ps)


def _storages(m):
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in m.parameters()}


def test_fused_model_equals_unfused_and_keeps_one_copy():
    plain, fused = _llama(False), _llama([["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]])
    attn = fused.model.layers[0].self_attn
    g = attn.q_proj._siblings
    assert g is attn.k_proj._siblings is attn.v_proj._siblings and g.packed()
    assert fused.model.layers[0].mlp.gate_proj._siblings is fused.model.layers[0].mlp.up_proj._siblings
    assert getattr(fused.model.layers[0].mlp.down_proj, "_siblings", None) is None
    assert sum(_storages(fused).values()) == sum(_storages(plain).values())  # packed, not copied
    assert sorted(fused.state_dict()) == sorted(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[k], v), k
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(5))
    for mode in ("eval", "train"):
        for m in (plain, fused):
            m.train(mode == "train")
        lp, gp = _loss_and_grads(plain, ids)
        lf, gf = _loss_and_grads(fused, ids)
        torch.testing.assert_close(lf, lp, rtol=1e-6, atol=0)
        for a, b in zip(gf, gp):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert g.enabled, g.why_off  # the group really ran fused
    calls = []
    orig = SiblingGroup.member_forward
    try:
        SiblingGroup.member_forward = lambda self, mem, x: calls.append(id(self)) or orig(self, mem, x)
        fused(input_ids=ids)
    finally:
        SiblingGroup.member_forward = orig
    assert len(calls) == 2 * (3 + 2)  # every member of the 4 groups went through its group


def test_peft_checkpoint_round_trip_unchanged(tmp_path):
    plain, fused = _llama(False), _llama(True)
    pk.save_peft_adapter(fused, str(tmp_path / "f"))
    pk.save_peft_adapter(plain, str(tmp_path / "p"))
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "f" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "p" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(plain.config)  # the same base weights as _llama's
    pk.load_peft_adapter(other, str(tmp_path / "p"))
    assert len(pk.fuse_siblings(other)) == 4  # 2 layers × (q,k,v) and (gate,up)
    ids = torch.randint(0, 120, (2, 7))
    other.eval()
    plain.eval()
    torch.testing.assert_close(other(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_rebound_weights_are_packed_again_and_load_state_dict_writes_through():
    m = _llama(True)
    q = m.model.layers[0].self_attn.q_proj
    g = q._siblings
    ids = torch.randint(0, 120, (2, 7))
    m.eval()
    new = {k: (v + 0.01) for k, v in m.state_dict().items() if k.endswith("q_proj.weight")}
    m.load_state_dict(new, strict=False)  # copies into the views
    assert g.packed()
    want = _llama(False)
    want.load_state_dict(new, strict=False)
    want.eval()
    torch.testing.assert_close(m(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    m.load_state_dict({k: v + 0.01 for k, v in new.items()}, strict=False, assign=True)  # a re-bind
    assert not g.packed()
    want.load_state_dict({k: v + 0.01 for k, v in new.items()}, strict=False)
    torch.testing.assert_close(m(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert g.packed()
    c = copy.deepcopy(m)
    torch.testing.assert_close(c(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


class _Cross(nn.Module):
    """q from one input, k and v from another (cross-attention): siblings by name, not by input."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x, mem):
        return self.q(x).sum(-1) + self.k(mem).sum(-1) + self.v(mem).sum(-1)


def test_group_that_does_not_share_its_input_turns_itself_off():
    torch.manual_seed(0)
    net = _Cross()
    ref = copy.deepcopy(net)
    for m in (net, ref):
        torch.manual_seed(1)
        pk.inject_lora(m, ["q", "k", "v"], r=2, init_lora_weights=False, fuse_siblings=m is net)
    g = net.q._siblings
    x, mem = torch.randn(3, 16), torch.randn(3, 16)
    for _ in range(2):
        torch.testing.assert_close(net(x, mem), ref(x, mem))
    assert not g.enabled and "different inputs" in g.why_off


def test_a_forward_that_stopped_early_does_not_turn_the_group_off():
    m = _llama(True).eval()
    q = m.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        q(x)  # the group computed q, k and v and left k's and v's: then the "forward" stopped
        m(input_ids=torch.randint(0, 120, (1, 4)))  # a new forward starts with q again
    assert q._siblings.enabled, q._siblings.why_off


def test_threads_each_get_their_own_outputs():
    m = _llama(True).eval()
    ids = [torch.randint(0, 120, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        want = [m(input_ids=i).logits for i in ids]
    got, errors = {}, []
    barrier = threading.Barrier(4)

    def run(k):
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(3):
                    got[k] = m(input_ids=ids[k]).logits
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for k in range(4):
        torch.testing.assert_close(got[k], want[k])
    assert m.model.layers[0].self_attn.q_proj._siblings.enabled


def test_disable_merge_unload_and_compile():
    ids = torch.randint(0, 120, (2, 7))
    fused, plain = _llama(True).eval(), _llama(False).eval()
    with pk.disable_adapters(fused), pk.disable_adapters(plain):
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    explain = torch._dynamo.explain(fused)(input_ids=ids)
    assert explain.graph_break_count == 0
    torch._dynamo.reset()
    cm = torch.compile(fused, backend="eager", fullgraph=True)
    torch.testing.assert_close(cm(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    merged_f, merged_p = pk.merge_and_unload(copy.deepcopy(fused)), pk.merge_and_unload(copy.deepcopy(plain))
    ptrs = [mod.weight.untyped_storage().data_ptr() for mod in merged_f.modules() if type(mod) is nn.Linear]
    assert len(ptrs) == len(set(ptrs))  # every plain layer owns its weight (transformers saves disjoint tensors)
    torch.testing.assert_close(merged_f(input_ids=ids).logits, merged_p(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    un = pk.unload(fused)
    assert not any(getattr(mod, "_siblings", None) for mod in un.modules())
    ptrs = [mod.weight.untyped_storage().data_ptr() for mod in un.modules() if type(mod) is nn.Linear]
    assert len(ptrs) == len(set(ptrs))


def test_group_errors():
    with pytest.raises(ValueError, match="fuse_siblings must be"):
        _llama([["q_proj"]])
    with pytest.raises(ValueError, match="fuse_siblings must be"):
        _llama("yes")
    m = _llama(False, targets=("q_proj", "v_proj"))
    attn = m.model.layers[0].self_attn
    with pytest.raises(TypeError, match="must be a LoRALinear"):
        SiblingGroup([attn.q_proj, attn.k_proj], ["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="at least 2"):
        SiblingGroup([attn.q_proj])
    SiblingGroup([attn.q_proj, attn.v_proj])
    with pytest.raises(ValueError, match="already in a group"):
        SiblingGroup([attn.q_proj, attn.v_proj])
    d = pk.LoRALinear(64, 8, r=2, use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        SiblingGroup([d, pk.LoRALinear(64, 8, r=2)])
    assert pk.fuse_siblings(m) == [[f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.self_attn.v_proj"]
                                   for i in (1,)]  # layer 0 was grouped by hand above
    assert pk.unfuse_siblings(m) == 2


# ------------------------------------------------------------------------------------ multi-adapter groups
class _QKV(nn.Module):
    def __init__(self, K=40, widths=(48, 16, 16)):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(K, widths[0]), nn.Linear(K, widths[1], bias=False), \
            nn.Linear(K, widths[2])

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _multi_qkv(fuse, dtype=torch.float32, backend="torch", dropout=(0.0, 0.0, 0.0)):
    torch.manual_seed(0)
    m = _QKV().to(dtype)
    pk.inject_multi_lora(m, ["q_proj", "k_proj", "v_proj"], max_adapters=3, max_rank=8, backend=backend,
                         fuse_siblings=fuse)
    g = torch.Generator().manual_seed(1)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        lay = getattr(m, name)
        for slot, r in enumerate((2, 8, 5)[: 3 - (i == 1)]):  # k_proj leaves slot 2 empty
            lay.set_adapter(slot, torch.randn(r, 40, generator=g) / 6, torch.randn(lay.out_features, r, generator=g),
                            scaling=0.5 + slot + i, dropout=dropout[slot])
    return m


def _multi_run(m, x, ids, gys):
    xx = x.detach().clone().requires_grad_()
    with pk.adapter_ids(m, ids):
        ys = m(xx)
    params = [p for n, p in sorted(m.named_parameters()) if "lora" in n]
    grads = torch.autograd.grad(ys, [xx] + params, gys, allow_unused=True)
    return [y.detach() for y in ys] + [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, [xx] + params)]


@pytest.mark.parametrize("dtype,backend", [(torch.float32, "torch"), (torch.bfloat16, "torch"),
                                           (torch.float32, "triton")])
def test_multi_adapter_group_against_the_reference(dtype, backend):
    """MultiLoRALinear q/k/v as one group (the stacked base GEMM once, each member's per-token update on its block):
    every output and gradient against the same layers run separately in fp64, bounded by the separate layers' own
    error at the same precision; ids mix every slot, an empty slot and -1; x is 3-D and strided; the group ran."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 14, 2 * 40, generator=g)[..., ::2].to(dtype)  # stride 2 in the last dim
    ids = torch.tensor([0, 2, -1])
    gy64 = [torch.randn(3, 14, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
            for n in (48, 16, 16)]
    ref = _multi_run(_multi_qkv(False, torch.float64), x.double(), ids, gy64)
    gys = [t.to(dtype) for t in gy64]
    same = _multi_run(_multi_qkv(False, dtype, "torch"), x, ids, gys)
    fused = _multi_qkv(True, dtype, backend)
    calls = []
    orig = SiblingGroup._multi_outputs
    try:
        SiblingGroup._multi_outputs = lambda self, xx: calls.append(1) or orig(self, xx)
        got = _multi_run(fused, x, ids, gys)
    finally:
        SiblingGroup._multi_outputs = orig
    assert calls == [1] and fused.q_proj._siblings.enabled  # one group call served all three members
    assert len(got) == len(ref) == 3 + 1 + 6
    for i, (a, b, c) in enumerate(zip(got, ref, same)):
        assert_close(a, b, c, f"tensor {i}")


def test_multi_adapter_group_dropout_slots_and_weights():
    """Per-slot dropout: with the same seed the group draws each member's mask as the separate layers do (equal
    outputs and gradients); a slot loaded after grouping is used at once; the packed base is one copy; a member
    called with explicit ids runs alone; groups refuse mixed kinds and unequal max_adapters."""
    x = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([1, 0])
    gys = [torch.randn(2, 9, n, generator=torch.Generator().manual_seed(n)) for n in (48, 16, 16)]
    sep, fused = (_multi_qkv(f, dropout=(0.0, 0.3, 0.1)).train() for f in (False, True))
    assert fused.q_proj.weight.untyped_storage().data_ptr() == fused.v_proj.weight.untyped_storage().data_ptr()
    for step in range(2):
        torch.manual_seed(11)
        a = _multi_run(sep, x, ids, gys)
        torch.manual_seed(11)
        b = _multi_run(fused, x, ids, gys)
        for i, (u, v) in enumerate(zip(a, b)):
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6, msg=f"step {step} tensor {i}")
        nA, nB = torch.randn(3, 40) / 6, torch.randn(16, 3)
        for m in (sep, fused):  # a new adapter into k_proj's slot 1
            m.k_proj.set_adapter(1, nA, nB, scaling=2.0, dropout=0.2)
    assert fused.q_proj._siblings.enabled
    sep.eval()
    fused.eval()
    with pk.adapter_ids(fused, ids):
        alone = fused.k_proj(x, adapter_ids=ids)  # explicit ids: runs alone, same result
    with pk.adapter_ids(sep, ids):
        torch.testing.assert_close(alone, sep.k_proj(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="MultiLoRALinear"):
        SiblingGroup([_multi_qkv(False).q_proj, pk.LoRALinear(40, 16)])
    other = _multi_qkv(False)
    bigger = pk.MultiLoRALinear(40, 16, max_adapters=5, max_rank=8)
    with pytest.raises(ValueError, match="max_adapters"):
        SiblingGroup([other.q_proj, bigger])
    assert getattr(other.q_proj, "_siblings", None) is None  # a refused group changes nothing


def test_multi_lora_delta_arguments():
    """The LoRA-only multi-adapter call: its base output and weight are checked (named), and with them it equals
    multi_lora_linear (forward and dX, which gets the base's dY·W)."""
    from peft_kernels.ops.multi_lora import multi_lora_delta, multi_lora_linear

    g = torch.Generator().manual_seed(6)
    x = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(10, 12, generator=g, dtype=torch.float64)
    A, B = torch.randn(2, 3, 12, generator=g, dtype=torch.float64), torch.randn(2, 10, 3, generator=g,
                                                                             dtype=torch.float64)
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1])
    want = multi_lora_linear(x, W, None, A, B, [0.5, 2.0], ids)
    got = multi_lora_delta(x, A, B, [0.5, 2.0], ids, (x @ W.t()).detach().contiguous(), W)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    gy = torch.randn(7, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(got, x, gy)[0], torch.autograd.grad(want, x, gy)[0], rtol=1e-12,
                               atol=0)
    # the update alone (no base output, no base weight): y - x·Wᵀ, and a dX without the base's dY·W term
    alone = multi_lora_delta(x, A, B, [0.5, 2.0], ids)
    update = multi_lora_linear(x, W, None, A, B, [0.5, 2.0], ids) - x @ W.t()
    torch.testing.assert_close(alone, update, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(alone, x, gy)[0], torch.autograd.grad(update, x, gy)[0],
                               rtol=1e-12, atol=1e-12)
    wide = torch.zeros(7, 16, dtype=torch.float64)  # base_out as a column block of a wider output: added in place
    wide[:, 3:13] = (x @ W.t()).detach()
    got = multi_lora_delta(x, A, B, [0.5, 2.0], ids, wide[:, 3:13], W)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(wide[:, 3:13], want.detach(), rtol=1e-12, atol=0)
    assert not wide[:, :3].any() and not wide[:, 13:].any()  # nothing written outside the block
    with pytest.raises(ValueError, match="base_out"):
        multi_lora_delta(x, A, B, [0.5, 2.0], ids, torch.zeros(7, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="base_out"):
        multi_lora_delta(x, A, B, [0.5, 2.0], ids, torch.zeros(10, 7, dtype=torch.float64).t())
    with pytest.raises(ValueError, match="base_out.*overlap"):  # rows sharing memory: the update would race
        multi_lora_delta(x, A, B, [0.5, 2.0], ids, torch.zeros(1, 10, dtype=torch.float64).expand(7, 10))
    with pytest.raises(ValueError, match="base_weight"):
        multi_lora_delta(x, A, B, [0.5, 2.0], ids, None, W[:, :5])
    Wg = W.clone().requires_grad_()
    with pytest.raises(ValueError, match="base_weight requires grad"):  # its gradient would be silently dropped
        multi_lora_delta(x, A, B, [0.5, 2.0], ids, None, Wg)
    with torch.no_grad():  # outside autograd it is only read
        torch.testing.assert_close(multi_lora_delta(x, A, B, [0.5, 2.0], ids, None, Wg), update, rtol=1e-12,
                                   atol=1e-12)
    with pytest.raises(ValueError, match="lora_A must have shape"):
        multi_lora_delta(x[:, :5], A, B, [0.5, 2.0], ids)


class _InPlaceQKV(_QKV):
    """Modifies its projections' outputs in place (scaling, a slice update, an activation), as some models do."""

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q.mul_(0.5)
        k[..., :4] += 1.0
        return q, k, v.tanh_()


@pytest.mark.parametrize("multi", [False, True], ids=["lora", "multi-adapter"])
def test_member_outputs_can_be_modified_in_place(multi):
    """A group member's output is a tensor of its own, not a view of the stacked output: a model may modify it in
    place, as it may a separate layer's (autograd forbids that on a custom Function's views). fp64, fused against
    unfused: outputs and the gradients of x and every LoRA factor."""
    out = {}
    for fuse in (True, False):
        torch.manual_seed(0)
        m = _InPlaceQKV().double()
        if multi:
            pk.inject_multi_lora(m, ["q_proj", "k_proj", "v_proj"], max_adapters=2, max_rank=4, fuse_siblings=fuse)
            g = torch.Generator().manual_seed(1)
            for lay in (m.q_proj, m.k_proj, m.v_proj):
                for slot in range(2):
                    lay.set_adapter(slot, torch.randn(4, 40, generator=g, dtype=torch.float64) / 6,
                                    torch.randn(lay.out_features, 4, generator=g, dtype=torch.float64), 0.5 + slot)
        else:
            pk.inject_lora(m, ["q_proj", "k_proj", "v_proj"], r=4, init_lora_weights=False, fuse_siblings=fuse)
        x = torch.randn(2, 5, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        gys = [torch.randn(2, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3 + n))
               for n in (48, 16, 16)]
        ids = torch.tensor([0, 1])
        if multi:
            out[fuse] = _multi_run(m, x, ids, gys)
        else:
            xx = x.clone().requires_grad_()
            ys = m(xx)
            params = [p for n, p in sorted(m.named_parameters()) if "lora" in n]
            out[fuse] = [y.detach() for y in ys] + list(torch.autograd.grad(ys, [xx] + params, gys))
        group = m.q_proj.__dict__.get("_siblings")
        assert (group is not None and group.enabled) == fuse  # the group ran fused
    assert len(out[True]) == len(out[False]) >= 9
    for i, (a, b) in enumerate(zip(out[True], out[False])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda s: f"tensor {i}: {s}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multi_lora_delta_into_a_column_block_every_time(dtype):
    """The update added into a row-strided base output (a sibling group's column block) equals the one added into a
    contiguous one, every time: the C++ path for 16-bit inputs index_adds segments from several threads, and on a
    strided y that lost updates in about 2 calls of 5 (it now runs on contiguous rows)."""
    from peft_kernels.ops.multi_lora import multi_lora_delta

    g = torch.Generator().manual_seed(0)
    for trial in range(8):
        T, K, N = 37, 40, 48
        x = torch.randn(T, K, generator=g).to(dtype)
        A, B = (torch.randn(3, 8, K, generator=g) / 6).to(dtype), torch.randn(3, N, 8, generator=g).to(dtype)
        ids = torch.randint(-1, 3, (T,), generator=g)
        want = multi_lora_delta(x, A, B, [1.0, 2.0, 3.0], ids, torch.zeros(T, N, dtype=dtype), backend="torch")
        wide = torch.zeros(T, N + 32, dtype=dtype)
        got = multi_lora_delta(x, A, B, [1.0, 2.0, 3.0], ids, wide[:, 16:16 + N], backend="torch")
        assert torch.equal(got, want), f"trial {trial}: max diff {(got.float() - want.float()).abs().max()}"
        assert not wide[:, :16].any() and not wide[:, 16 + N:].any()


# ------------------------------------------------------------------------------------ autocast and call modes
def _bf16_then(t, dtype):
    return None if t is None else t.detach().to(torch.bfloat16).to(dtype)


@pytest.mark.parametrize("split", [False, True], ids=["stacked", "split"])
def test_under_autocast_like_the_separate_linears(split):
    """Under CPU bf16 autocast the op casts its inputs as the separate layers' ``F.linear`` does: bf16 outputs
    (as an ``nn.Linear`` beside it gives), equal to the fp64 reference of the bf16-rounded inputs within what bf16
    torch gets, and fp32 gradients for the fp32 factors and x, against the same references. Before: backward
    raised a dtype error (autocast had cast forward's GEMMs, not backward's)."""
    ms = _members(torch.float32, ranks=(4, 1, 6), bias=(True, False, True))
    W, b = _stack(ms)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 40, generator=g).requires_grad_()
    As, Bs = [_leaf(m["A"]) for m in ms], [_leaf(m["B"]) for m in ms]
    gys = [torch.randn(7, m["W"].shape[0], generator=g) for m in ms]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = siblings_op.lora_siblings(x, W, b, As, Bs, [m["s"] for m in ms], split=split)
        lin = nn.Linear(40, 3)(x)
    ys = out if split else out.split([m["W"].shape[0] for m in ms], dim=1)
    assert lin.dtype == torch.bfloat16 and all(y.dtype == torch.bfloat16 for y in ys), [y.dtype for y in ys]
    torch.autograd.backward([y.float() for y in ys], gys)
    assert all(t.grad.dtype == torch.float32 for t in [x, *As, *Bs])
    refs = {}
    for dt in (torch.float64, torch.bfloat16):
        xr = _bf16_then(x, dt).requires_grad_()
        dx = 0
        for i, (m, gy) in enumerate(zip(ms, gys)):
            A, B = _bf16_then(m["A"], dt).requires_grad_(), _bf16_then(m["B"], dt).requires_grad_()
            y = reference.lora_linear_ref(xr, _bf16_then(m["W"], dt), _bf16_then(m["b"], dt), A, B, m["s"])
            gA, gB, gx = torch.autograd.grad(y, (A, B, xr), _bf16_then(gy, dt))
            refs[dt, i] = (y, gA, gB)
            dx = dx + gx
        refs[dt, "dx"] = dx
    for i, y in enumerate(ys):
        for name, got, k in (("y", y, 0), ("dA", As[i].grad, 1), ("dB", Bs[i].grad, 2)):
            assert_close(got, refs[torch.float64, i][k], refs[torch.bfloat16, i][k], f"member {i} {name}")
    assert_close(x.grad, refs[torch.float64, "dx"], refs[torch.bfloat16, "dx"], "dx")


def _qkv_pair(dropout=0.0):
    torch.manual_seed(0)
    base = _QKV(24, (24, 8, 8))
    out = []
    for fuse in (True, False):
        m = copy.deepcopy(base)
        torch.manual_seed(1)
        pk.inject_lora(m, ["q_proj", "k_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=dropout,
                       init_lora_weights=False, fuse_siblings=fuse)
        out.append(m)
    return out


def _lora_grads(m, names):
    return [p.grad for n, p in m.named_parameters() if "lora_" in n and n.split(".")[0] in names]


def test_a_member_called_under_another_mode_runs_alone():
    """A sibling's output left by the group's call is taken only under the mode it was computed in. Before, q
    called under no_grad and k, v with grad got no-graph outputs (their LoRA silently without gradient); k under
    no_grad after q with grad got a graph; k outside autocast after q inside it got bf16. Each such member now runs
    alone, as a separate layer (equal to one), and the group stays on."""
    fused, sep = _qkv_pair()
    x = torch.randn(5, 24)
    for m in (fused, sep):
        with torch.no_grad():
            m.q_proj(x)
        (m.k_proj(x).square().sum() + m.v_proj(x).square().sum()).backward()
    gf, gs = _lora_grads(fused, ("k_proj", "v_proj")), _lora_grads(sep, ("k_proj", "v_proj"))
    assert len(gf) == 4 and all(g is not None for g in gf), "k's and v's LoRA got no gradient"
    for a, b in zip(gf, gs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fused.q_proj(x)
    with torch.no_grad():
        k = fused.k_proj(x)
    assert not k.requires_grad
    torch.testing.assert_close(k, sep.k_proj(x).detach(), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.q_proj(x).dtype == torch.bfloat16
    v = fused.v_proj(x)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, sep.v_proj(x), rtol=0, atol=0)
    g = fused.q_proj._siblings
    assert g.enabled, g.why_off
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same mode: taken from the group's call
        ys = [getattr(fused, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
    assert [y.dtype for y in ys] == [torch.bfloat16] * 3 and len({y.untyped_storage().data_ptr() for y in ys}) == 1


def test_fused_model_trains_under_autocast(monkeypatch):
    """A Llama with fused q/k/v and gate/up, trained under CPU bf16 autocast (a PEFT user's usual setting): every
    group runs its op, the loss's error against the fp32 model is within 4× the unfused model's under autocast, and
    the gradients are fp32. Before: a dtype error in backward."""
    import peft_kernels.nn.siblings as nn_siblings

    plain, fused = _llama(False, dropout=0.1), _llama(True, dropout=0.1)
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(5))
    plain.eval()
    fused.eval()
    l32 = plain(input_ids=ids, labels=ids).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, lf = (m(input_ids=ids, labels=ids).loss.item() for m in (plain, fused))
    ulp = torch.finfo(torch.float32).eps * abs(l32)
    assert abs(lf - l32) <= 4 * max(abs(lp - l32), ulp), (l32, lp, lf)
    calls = []
    monkeypatch.setattr(nn_siblings, "lora_siblings", lambda *a, **k: calls.append(1) or siblings_op.lora_siblings(
        *a, **k))
    fused.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused(input_ids=ids, labels=ids).loss
    assert len(calls) == 4  # 2 layers × (q/k/v, gate/up)
    loss.backward()
    trained = [p for p in fused.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in trained)
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj._siblings.enabled, attn.q_proj._siblings.why_off


def test_multi_adapter_member_called_under_another_mode_runs_alone():
    """The multi-adapter group's hand-off keys on the mode too: q called under no_grad, then k with grad, gives k an
    output with a graph and k's slots the separate layer's gradients (before: none)."""
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([0, 1, 2, 0, 1])
    grads = []
    for m in (_multi_qkv(True), _multi_qkv(False)):
        with pk.adapter_ids(m, ids):
            with torch.no_grad():
                m.q_proj(x)
            m.k_proj(x).square().sum().backward()
        grads.append((m.k_proj.lora_A.grad, m.k_proj.lora_B.grad))
    assert all(g is not None for g in grads[0]), "k's slots got no gradient"
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_a_member_moved_to_another_dtype_runs_alone():
    """One member moved to fp16 (``k_proj.half()``) cannot be packed with the others. Before, the next call packed
    it anyway: its weight went back to fp32 (silently undoing the user's cast) and it then refused fp16 inputs.
    Now the group turns itself off and every member runs alone, as a separate layer: the same error for an fp32
    x, the same fp16 output for an fp16 one, its weight still fp16; q and v equal the separate layers'."""
    fused, sep = _qkv_pair()
    x = torch.randn(5, 24)
    for m in (fused, sep):
        m.k_proj.half()
    for m in (fused, sep):
        with pytest.raises(TypeError, match="weight dtype torch.float16 must match x dtype torch.float32"):
            m.k_proj(x)
    assert fused.k_proj.weight.dtype == torch.float16
    g = fused.q_proj._siblings
    assert not g.enabled and "cannot be packed" in g.why_off
    torch.testing.assert_close(fused.k_proj(x.half()), sep.k_proj(x.half()), rtol=0, atol=0)
    for n in ("q_proj", "v_proj"):
        torch.testing.assert_close(getattr(fused, n)(x), getattr(sep, n)(x), rtol=0, atol=0)


class _WideKV(nn.Module):
    """Cross-attention whose memory is wider than the queries: q reads 16 features, k and v 24."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(24, 16), nn.Linear(24, 16)

    def forward(self, x, mem):
        return self.q_proj(x), self.k_proj(mem), self.v_proj(mem)


def test_structure_groups_keep_the_members_that_can_share_one_op():
    """``fuse_siblings=True`` groups by name, then keeps the members that can share one op: here k and v (q reads
    another width). Before, the whole ``inject_lora`` raised, after the model had already been injected. Outputs and
    gradients equal the unfused layers'."""
    torch.manual_seed(0)
    fused = _WideKV()
    plain = copy.deepcopy(fused)
    for m, f in ((fused, True), (plain, False)):
        torch.manual_seed(1)
        pk.inject_lora(m, ["q_proj", "k_proj", "v_proj"], r=2, init_lora_weights=False, fuse_siblings=f)
    g = fused.k_proj._siblings
    assert g is not None and g is fused.v_proj._siblings and getattr(fused.q_proj, "_siblings", None) is None
    x, mem = torch.randn(3, 16), torch.randn(3, 24)
    outs = [m(x, mem) for m in (fused, plain)]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(sum(o.square().sum() for o in out), [p for p in m.parameters() if p.requires_grad])
             for out, m in zip(outs, (fused, plain))]
    for a, b in zip(*grads):  # (as test_fused_model_equals_unfused_and_keeps_one_copy: stacked vs separate GEMMs)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert g.enabled, g.why_off


def test_named_groups_that_cannot_be_made_change_nothing():
    """Groups the caller names must be valid as named; the first that is not raises before anything changes:
    ``inject_lora`` leaves the model as it was (before: injected, and the groups before the bad one made), and
    ``fuse_siblings`` makes no group at all. A layer named in two groups is refused too."""
    m = _WideKV()
    with pytest.raises(ValueError, match="in_features, dtype and device must equal"):
        pk.inject_lora(m, ["q_proj", "k_proj", "v_proj"], r=2, fuse_siblings=[["q_proj", "k_proj", "v_proj"]])
    assert all(type(getattr(m, n)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj"))
    assert all(p.requires_grad for p in m.parameters())  # nothing frozen either
    pk.inject_lora(m, ["q_proj", "k_proj", "v_proj"], r=2)
    with pytest.raises(ValueError, match="in_features"):
        pk.fuse_siblings(m, [["k_proj", "v_proj"], ["q_proj", "k_proj"]])
    assert all(getattr(getattr(m, n), "_siblings", None) is None for n in ("q_proj", "k_proj", "v_proj"))
    with pytest.raises(ValueError, match="named in two groups"):
        pk.fuse_siblings(m, [["k_proj", "v_proj"], ["v_proj", "k_proj"]])
    assert pk.fuse_siblings(m, [["k_proj", "v_proj"]]) == [["k_proj", "v_proj"]]
