"""MultiLoRALinear and adapter_ids(): slots, errors, model-wide ids, parity with HF PEFT's mixed
batch, and batched multi-adapter training against separate single-adapter training."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels.reference import multi_lora_linear_ref

from helpers import assert_close, backend_params


def _layer(K=12, N=10, S=4, R=6, backend="torch", bias=True):
    torch.manual_seed(0)
    return pk.MultiLoRALinear.from_linear(nn.Linear(K, N, bias=bias), max_adapters=S, max_rank=R, backend=backend)


def test_state_and_slots():
    lin = nn.Linear(12, 10)
    m = pk.MultiLoRALinear.from_linear(lin, max_adapters=4, max_rank=6)
    assert m.weight is lin.weight and not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.shape == (4, 6, 12) and m.lora_B.shape == (4, 10, 6)
    assert m.scalings.shape == (4,) and m.ranks.dtype == torch.int32 and not m.ranks.any()
    assert set(m.state_dict()) == {"weight", "bias", "lora_A", "lora_B", "scalings", "ranks"}
    A, B = torch.randn(3, 12), torch.randn(10, 3)
    m.set_adapter(2, A, B, 0.75)
    a2, b2, s2 = m.get_adapter(2)
    assert torch.equal(a2, A) and torch.equal(b2, B) and s2 == 0.75 and int(m.ranks[2]) == 3
    assert not m.lora_A[2, 3:].any() and not m.lora_B[2, :, 3:].any()  # zero-padded
    m.set_adapter(2, torch.randn(6, 12), torch.randn(10, 6), 1.0)       # a larger rank replaces it
    m.set_adapter(2, A, B, 0.75)                                          # and a smaller one re-pads
    assert not m.lora_A[2, 3:].any() and not m.lora_B[2, :, 3:].any()
    x = torch.randn(5, 12)
    ids = torch.tensor([2, 2, -1, 2, 2])
    y = m(x, ids)
    ref = lin(x) + 0.75 * (x @ A.t() @ B.t())
    ref[2] = lin(x[2])
    x64, W64, b64 = x.double(), lin.weight.double(), lin.bias.double()
    ref64 = torch.nn.functional.linear(x64, W64, b64) + 0.75 * (x64 @ A.double().t() @ B.double().t())
    ref64[2] = torch.nn.functional.linear(x64[2], W64, b64)
    assert_close(y, ref64, ref, "y")
    m.clear_adapter(2)
    assert torch.equal(m(x, ids), lin(x))  # a cleared slot adds exactly nothing
    # a state dict round-trips into a fresh layer
    m.set_adapter(1, A, B, 2.0)
    m2 = pk.MultiLoRALinear(12, 10, max_adapters=4, max_rank=6)
    m2.load_state_dict(m.state_dict())
    ids = torch.tensor([1, 0, -1, 1, 3])
    assert torch.equal(m2(x, ids), m(x, ids))


def test_slot_and_rank_errors():
    m = _layer()
    with pytest.raises(ValueError, match=r"adapter rank r=7 .* max_rank=6"):
        m.set_adapter(0, torch.randn(7, 12), torch.randn(10, 7), 1.0)
    with pytest.raises(ValueError, match=r"slot must be in \[0, 4\)"):
        m.set_adapter(4, torch.randn(2, 12), torch.randn(10, 2), 1.0)
    with pytest.raises(ValueError, match=r"slot must be in \[0, 4\)"):
        m.clear_adapter(-1)
    with pytest.raises(TypeError, match="slot must be an int"):
        m.get_adapter(1.0)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[out_features=10, r=2\]"):
        m.set_adapter(0, torch.randn(2, 12), torch.randn(10, 3), 1.0)
    with pytest.raises(ValueError, match=r"lora_A must have shape \[r, in_features=12\]"):
        m.set_adapter(0, torch.randn(2, 11), torch.randn(10, 2), 1.0)
    with pytest.raises(ValueError, match="scaling must be a finite float"):
        m.set_adapter(0, torch.randn(2, 12), torch.randn(10, 2), float("nan"))
    with pytest.raises(ValueError, match="max_rank must be a positive int"):
        pk.MultiLoRALinear(4, 4, max_rank=0)
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        pk.MultiLoRALinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="path must be one of"):
        pk.MultiLoRALinear(4, 4, path="fast")


def test_id_errors_leave_nothing_changed():
    m = _layer()
    x = torch.randn(5, 12)
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 4\).*\[4\]"):
        m(x, torch.tensor([0, 1, 4, -1, 2]))
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 4\).*\[-2\]"):
        m(x, torch.tensor([0, 1, -2, -1, 2]))
    with pytest.raises(TypeError, match="adapter_ids must be int32 or int64"):
        m(x, torch.tensor([0.0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="one id per token"):
        m(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="adapter_ids is required"):
        m(x)
    # a checkpoint with a rank above max_rank is refused at load time, and the layer keeps its state
    sd = m.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    sd["ranks"] = torch.tensor([1, 9, 0, 0], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"ranks must be in \[0, max_rank=6\], got min 0, max 9"):
        m.load_state_dict(sd)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    sd["ranks"] = before["ranks"]
    sd["scalings"] = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(RuntimeError, match="scalings must be finite"):
        m.load_state_dict(sd)
    # a rank written straight into the buffer is caught by a call that builds its mapping (the same sync)
    with torch.no_grad():
        m.ranks[1] = 9
    with pytest.raises(ValueError, match=r"ranks must be in \[0, max_rank=6\]"):
        m(x, torch.zeros(5, dtype=torch.long))


def test_functional_argument_errors():
    x, W = torch.randn(4, 6), torch.randn(5, 6)
    A, B = torch.randn(3, 2, 6), torch.randn(3, 5, 2)
    ids = torch.tensor([0, 1, 2, -1])
    f = pk.multi_lora_linear
    with pytest.raises(ValueError, match=r"lora_B must have shape \[slots=3, out_features=5, max_rank=2\]"):
        f(x, W, None, A, torch.randn(3, 5, 3), [1.0] * 3, ids)
    with pytest.raises(ValueError, match=r"lora_A must have shape \[slots, max_rank, in_features=6\]"):
        f(x, W, None, torch.randn(2, 6), B, [1.0] * 3, ids)
    with pytest.raises(ValueError, match=r"scalings must have shape \[3\]"):
        f(x, W, None, A, B, [1.0] * 2, ids)
    with pytest.raises(ValueError, match=r"ranks must have shape \[3\]"):
        f(x, W, None, A, B, [1.0] * 3, ids, ranks=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"ranks must be in \[0, max_rank=2\]"):
        f(x, W, None, A, B, [1.0] * 3, ids, ranks=torch.tensor([1, 3, 0]))
    with pytest.raises(TypeError, match="lora_A/lora_B must be x's dtype"):
        f(x, W, None, A.half(), B.half(), [1.0] * 3, ids)
    with pytest.raises(TypeError, match="adapter_ids must be an int tensor or an AdapterMapping"):
        f(x, W, None, A, B, [1.0] * 3, [0, 1, 2, -1])
    m = pk.build_mapping(ids, 4, 3)
    with pytest.raises(ValueError, match="covers 4 tokens but x has 3"):
        f(x[:3], W, None, A, B, [1.0] * 3, m)
    with pytest.raises(ValueError, match="built for 3 slots but lora_A has 2"):
        f(x, W, None, A[:2], B[:2], [1.0] * 2, m)
    with pytest.raises(pk.BackendUnavailable, match="float64"):
        f(x.double(), W.double(), None, A.double(), B.double(), [1.0] * 3, ids, backend="triton")


class _Block(nn.Module):
    def __init__(self, K=16, H=20, N=12):
        super().__init__()
        self.up = nn.Linear(K, H)
        self.down = nn.Linear(H, N)
        self.head = nn.Linear(N, N)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


@pytest.mark.parametrize("backend", backend_params())
def test_model_wide_ids_build_the_mapping_once(backend):
    torch.manual_seed(1)
    model = _Block()
    for name in ("up", "down", "head"):
        lin = getattr(model, name)
        ml = pk.MultiLoRALinear.from_linear(lin, max_adapters=3, max_rank=4, backend=backend)
        for a in range(3):
            ml.set_adapter(a, torch.randn(a + 2, lin.in_features) * 0.3, torch.randn(lin.out_features, a + 2) * 0.3,
                           0.5 + a)
        setattr(model, name, ml)
    x = torch.randn(4, 5, 16)
    ids = torch.tensor([2, -1, 0, 1])  # per batch row
    with pk.adapter_ids(model, ids) as state:
        y = model(x)
        assert state.builds == 1
    tok = ids.repeat_interleave(5)
    manual = model.head(model.down(torch.relu(model.up(x, tok)), tok), tok)
    assert torch.equal(y, manual)
    with pytest.raises(ValueError, match="adapter_ids is required"):
        model(x)  # the ids are gone after the block
    with pytest.raises(ValueError, match="no MultiLoRALinear layers"):
        with pk.adapter_ids(nn.Linear(2, 2), ids):
            pass


def _peft_model(K=16, H=20, N=12):
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    base = _Block(K, H, N)
    cfgs = {"a0": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"], init_lora_weights=False),
            "a1": peft.LoraConfig(r=8, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False,
                                  use_rslora=True),
            "a2": peft.LoraConfig(r=5, lora_alpha=10, target_modules=["up", "down"], init_lora_weights=False)}
    pm = peft.get_peft_model(base, cfgs["a0"], adapter_name="a0")
    for n in ("a1", "a2"):
        pm.add_adapter(n, cfgs[n])
    return pm.eval(), list(cfgs)


def _ours_from_peft(pm, names, max_rank=8, backend="torch"):
    """A copy of the base model whose LoRA layers are MultiLoRALinear holding PEFT's adapters."""
    model = copy.deepcopy(pm.get_base_model())
    for name in ("up", "down"):
        pl = getattr(model, name)
        ml = pk.MultiLoRALinear.from_linear(pl.base_layer, max_adapters=len(names), max_rank=max_rank, backend=backend)
        for slot, n in enumerate(names):
            ml.set_adapter(slot, pl.lora_A[n].weight, pl.lora_B[n].weight, pl.scaling[n])
        setattr(model, name, ml)
    return model


@pytest.mark.parametrize("backend", backend_params())
def test_parity_with_peft_mixed_batch(backend):
    pm, names = _peft_model()
    ours = _ours_from_peft(pm, names, backend=backend)
    x = torch.randn(5, 3, 16)
    row_names = ["a2", "__base__", "a0", "a1", "a2"]
    with torch.no_grad():
        ref = pm(x, adapter_names=row_names)
        ids = torch.tensor([names.index(n) if n != "__base__" else -1 for n in row_names])
        with pk.adapter_ids(ours, ids):
            got = ours(x)
        # the same adapters one at a time through PEFT's own single-adapter path
        singles = []
        for i, n in enumerate(row_names):
            if n == "__base__":
                with pm.disable_adapter():
                    singles.append(pm(x[i:i + 1]))
            else:
                pm.set_adapter(n)
                singles.append(pm(x[i:i + 1]))
    pm64 = copy.deepcopy(pm).double()  # the truth: PEFT's own math in fp64
    with torch.no_grad():
        ref64 = pm64(x.double(), adapter_names=row_names)
    assert_close(got, ref64, ref, "vs PEFT adapter_names (fp32 PEFT as the same-precision baseline)")
    assert_close(got, ref64, torch.cat(singles), "vs PEFT one adapter at a time")


@pytest.mark.parametrize("backend", backend_params())
def test_batched_training_matches_separate_training(backend):
    """4 adapters trained in one batched pass (each task's tokens on its own slot) take the same
    Adam steps as 4 separate single-adapter LoRALinear models."""
    torch.manual_seed(3)
    K, N, T, tasks, r = 14, 9, 6, 4, 3
    base = nn.Linear(K, N)
    xs = [torch.randn(T, K) for _ in range(tasks)]
    ts = [torch.randn(T, N) for _ in range(tasks)]
    singles = [pk.LoRALinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=6, init_lora_weights=False,
                                         backend=backend) for _ in range(tasks)]
    truth = [copy.deepcopy(s).double() for s in singles]  # the same training in fp64 (the torch backend)
    for t in truth:
        t.backend = "torch"
    opt_t = [torch.optim.Adam([s.lora_A, s.lora_B], lr=0.05) for s in truth]
    multi = pk.MultiLoRALinear.from_linear(copy.deepcopy(base), max_adapters=tasks, max_rank=4, backend=backend)
    for a, s in enumerate(singles):
        multi.set_adapter(a, s.lora_A.detach(), s.lora_B.detach(), s.scaling)
    opt_s = [torch.optim.Adam([s.lora_A, s.lora_B], lr=0.05) for s in singles]
    opt_m = torch.optim.Adam([multi.lora_A, multi.lora_B], lr=0.05)
    x = torch.cat(xs)
    ids = torch.arange(tasks).repeat_interleave(T)
    for step in range(3):
        sep = []
        for s, o, xt, tt in zip(singles, opt_s, xs, ts):
            loss = ((s(xt) - tt) ** 2).mean()
            o.zero_grad()
            loss.backward()
            o.step()
            sep.append(loss.item())
        for s, o, xt, tt in zip(truth, opt_t, xs, ts):
            o.zero_grad()
            ((s(xt.double()) - tt.double()) ** 2).mean().backward()
            o.step()
        y = multi(x, ids)
        losses = [((y[a * T:(a + 1) * T] - ts[a]) ** 2).mean() for a in range(tasks)]
        opt_m.zero_grad()
        torch.stack(losses).sum().backward()
        opt_m.step()
        for a in range(tasks):
            assert math.isclose(losses[a].item(), sep[a], rel_tol=1e-5), (step, a, losses[a].item(), sep[a])
    for a, (s, t) in enumerate(zip(singles, truth)):
        A, B, _ = multi.get_adapter(a)
        assert_close(A, t.lora_A, s.lora_A, f"slot {a} lora_A after 3 steps")
        assert_close(B, t.lora_B, s.lora_B, f"slot {a} lora_B after 3 steps")
        assert not multi.lora_A[a, r:].any()  # padding stays zero through training


def test_reference_never_aliases_the_last_slot():
    """The spec itself: -1 must not read lora_A[-1] (the last slot)."""
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    A, B = torch.randn(2, 2, 4), torch.randn(2, 5, 2)
    y = multi_lora_linear_ref(x, W, None, A, B, torch.ones(2), torch.tensor([-1, -1, -1]))
    assert torch.equal(y, x @ W.t())


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("how", ["data-sub", "init-on-data", "data-copy", "data-assign", "in-place"])
def test_updates_of_every_kind_are_seen(backend, how):
    """Every way PyTorch code changes a parameter (``p.data -= lr·g``, ``nn.init.*_(p.data)``,
    ``p.data.copy_()``, ``p.data = t``, an in-place op) reaches the next forward and backward. A cache of
    lora_B's transpose keyed on ``_version``/``data_ptr`` missed the ``.data`` ones (outputs off by 38.8)."""
    m = _layer(K=8, N=70, S=2, R=3)
    m.backend = backend
    m.set_adapter(0, torch.randn(3, 8), torch.randn(70, 3), 1.0)
    m.set_adapter(1, torch.randn(2, 8), torch.randn(70, 2), 0.5)
    x, ids = torch.randn(6, 8), torch.tensor([0, 1, 0, -1, 1, 0])
    m(x, ids).sum().backward()  # a first forward/backward (anything it keeps must not go stale)
    new_B = torch.randn_like(m.lora_B) * 3
    if how == "data-sub":
        m.lora_B.data -= 0.5 * m.lora_B.grad
    elif how == "init-on-data":
        nn.init.normal_(m.lora_B.data, std=2.0)
    elif how == "data-copy":
        m.lora_B.data.copy_(new_B)
    elif how == "data-assign":
        m.lora_B.data = new_B
    else:
        with torch.no_grad():
            m.lora_B.mul_(2.0)
    m.lora_A.grad = m.lora_B.grad = None
    xg = x.clone().requires_grad_()
    y = m(xg, ids)
    dy = torch.randn_like(y)
    y.backward(dy)
    t = [v.detach() for v in (m.weight, m.bias, m.lora_A, m.lora_B, m.scalings)]
    x64 = x.double().requires_grad_()
    p64 = [v.double().requires_grad_() for v in t[2:4]]
    y64 = multi_lora_linear_ref(x64, t[0].double(), t[1].double(), *p64, t[4].double(), ids, m.ranks)
    y64.backward(dy.double())
    x32, p32 = x.clone().requires_grad_(), [v.clone().requires_grad_() for v in t[2:4]]
    y32 = multi_lora_linear_ref(x32, t[0], t[1], *p32, t[4], ids, m.ranks)
    y32.backward(dy)
    assert_close(y, y64, y32, f"y after {how}")
    assert_close(xg.grad, x64.grad, x32.grad, f"dx after {how}")
    assert_close(m.lora_A.grad, p64[0].grad, p32[0].grad, f"dA after {how}")
    assert_close(m.lora_B.grad, p64[1].grad, p32[1].grad, f"dB after {how}")

def test_slot_dropout_from_inject_load_and_from_peft(tmp_path):
    """Each slot's dropout p: inject_multi_lora's default, a PEFT checkpoint's lora_dropout (load into a slot),
    PEFT's per-adapter dropout (from_peft); applied in training only, per slot (issue #18)."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from test_inject import IDS, llama

    m = llama()
    pk.inject_multi_lora(m, ["q_proj"], max_adapters=3, max_rank=4, lora_dropout=0.1)
    q = m.model.layers[0].self_attn.q_proj
    assert q.lora_dropout == [0.1, 0.1, 0.1]
    torch.manual_seed(0)
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.25,
                                                      init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    pk.load_peft_adapter(m, tmp_path, slot=1)
    assert q.lora_dropout == [0.1, 0.25, 0.1]
    q.clear_adapter(1)
    assert q.lora_dropout[1] == 0.1
    with pytest.raises(ValueError, match="lora_dropout"):
        q.set_adapter(0, torch.randn(2, 32), torch.randn(32, 2), 1.0, dropout=1.5)

    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.3,
                                                      init_lora_weights=False), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0, init_lora_weights=False))
    ours = pk.from_peft(pm)
    q = ours.model.layers[0].self_attn.q_proj
    assert q.lora_dropout == [0.3, 0.0]
    ids = torch.tensor([0])
    with pk.adapter_ids(ours, ids), torch.no_grad():
        ours.eval()
        e1, e2 = ours(IDS).logits, ours(IDS).logits
        ours.train()
        t1, t2 = ours(IDS).logits, ours(IDS).logits
    assert torch.equal(e1, e2) and not torch.equal(t1, e1) and not torch.equal(t1, t2)
    with pk.adapter_ids(ours, torch.tensor([1])), torch.no_grad():  # slot b has p = 0: no dropout in training
        tb = ours(IDS).logits
        ours.eval()  # (equal to summation order: a training call with dropout on any slot takes the torch-op path)
        torch.testing.assert_close(ours(IDS).logits, tb, rtol=1e-5, atol=1e-6)


class _CkptBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x):
        return self.q_proj(x).sum(-1) + self.k_proj(x).sum(-1) * self.v_proj(x).sum(-1)


class _CkptModel(nn.Module):
    def __init__(self, checkpoint_kwargs=None):
        super().__init__()
        self.block, self.kw = _CkptBlock(), checkpoint_kwargs

    def forward(self, x):
        if self.kw is None:
            return self.block(x)
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False, **self.kw)


def _ckpt_grads(checkpoint_kwargs, fuse):
    """Two forwards in two adapter_ids blocks (other ids each: gradient accumulation), one backward after both
    blocks closed; per-slot dropout, so the recompute must also regenerate the same masks."""
    torch.manual_seed(0)
    m = _CkptModel(checkpoint_kwargs)
    pk.inject_multi_lora(m, ["q_proj", "k_proj", "v_proj"], max_adapters=2, max_rank=4, fuse_siblings=fuse)
    g = torch.Generator().manual_seed(1)
    for lay in (m.block.q_proj, m.block.k_proj, m.block.v_proj):
        for s in range(2):
            lay.set_adapter(s, torch.randn(4, 16, generator=g), torch.randn(lay.out_features, 4, generator=g),
                            0.5 + s, dropout=0.3)
    m.train()
    x = torch.randn(6, 16, generator=g, requires_grad=True)
    torch.manual_seed(5)
    loss = 0
    for ids in ([0, 1, 1, 0, -1, 1], [1, 1, 0, -1, 0, 0]):
        with pk.adapter_ids(m, torch.tensor(ids)):
            loss = loss + m(x).square().sum()
    loss.backward()
    return [x.grad] + [p.grad for _, p in sorted(m.named_parameters()) if p.requires_grad]


@pytest.mark.parametrize("fuse", [False, True], ids=["layers", "sibling group"])
def test_activation_checkpointing_recomputes_with_each_forwards_ids(fuse):
    """torch.utils.checkpoint with context_fn=checkpoint_context: the recompute in backward (after the blocks
    closed) uses the ids of the forward it recomputes, and the same dropout masks: every gradient equals the
    uncheckpointed run's. Without the context_fn the recompute has no ids and says how to fix it."""
    want = _ckpt_grads(None, fuse)
    got = _ckpt_grads({"context_fn": pk.checkpoint_context}, fuse)
    assert len(got) == len(want) == 7 and all(g is not None for g in got)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda s: f"tensor {i}: {s}")
    with pytest.raises(ValueError, match="checkpoint_context"):
        _ckpt_grads({}, fuse)


def test_transformers_gradient_checkpointing_with_checkpoint_context():
    """A transformers Llama with gradient_checkpointing_enable(context_fn=checkpoint_context) and two adapters
    trained in one mixed batch: loss and gradients equal the same model without checkpointing."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    out = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        pk.inject_multi_lora(model, ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
        g = torch.Generator().manual_seed(1)
        for name, lay in model.named_modules():
            if isinstance(lay, pk.MultiLoRALinear):
                for s in range(2):
                    lay.set_adapter(s, torch.randn(4, lay.in_features, generator=g) / 4,
                                    torch.randn(lay.out_features, 4, generator=g) / 4, 2.0, dropout=0.1)
        if ckpt:  # transformers 5's name for it, or the older one
            kw = {"use_reentrant": False, "context_fn": pk.checkpoint_context}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        model.train()
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
        torch.manual_seed(3)
        with pk.adapter_ids(model, torch.tensor([0, 1])):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out[ckpt] = [loss.detach()] + [p.grad for _, p in sorted(model.named_parameters()) if p.requires_grad]
    assert len(out[True]) == len(out[False]) == 9 and all(t is not None for t in out[True])
    for i, (a, b) in enumerate(zip(out[True], out[False])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda s: f"tensor {i}: {s}")


def test_generate_with_beams_per_row_adapters():
    """generate() with num_beams repeats each batch row: ids.repeat_interleave(num_beams) serves each row with its
    adapter (equal to generating that row alone with it), and the ids as given raise naming the fix."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    pk.inject_multi_lora(model, ["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    g = torch.Generator().manual_seed(1)
    for lay in model.modules():
        if isinstance(lay, pk.MultiLoRALinear):
            for s in range(2):
                lay.set_adapter(s, torch.randn(4, lay.in_features, generator=g),
                                torch.randn(lay.out_features, 4, generator=g), 4.0)
    prompts = torch.randint(0, 64, (3, 5), generator=g)
    ids = torch.tensor([1, 0, -1])
    kw = dict(num_beams=2, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with pk.adapter_ids(model, ids.repeat_interleave(2)):
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
    alone = []
    for i in range(3):
        with pk.adapter_ids(model, ids[i:i + 1].repeat_interleave(2)):
            alone.append(model.generate(prompts[i:i + 1], attention_mask=torch.ones_like(prompts[i:i + 1]), **kw))
    assert torch.equal(out, torch.cat(alone))
    with pk.disable_adapters(model):
        base = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
    assert torch.equal(out[2], base[2])  # id -1 is the base model
    assert not torch.equal(out[:2], base[:2])  # and the adapters change the generated tokens
    with pytest.raises(ValueError, match=r"repeat_interleave\(2\)"), pk.adapter_ids(model, ids):
        model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
