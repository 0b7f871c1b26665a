"""LoRA on nn.Embedding (issue #18): ``lora_embedding`` against ``reference.lora_embedding_ref`` (forward and
gradients, every dtype, padding_idx, scale_grad_by_freq, ranks 1 and 80, 3-D and strided ids), the
``LoRAEmbedding`` module against HF PEFT's ``lora.Embedding`` (outputs, gradients, checkpoints both ways,
merge), and its errors."""
import copy

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk
from peft_kernels.reference import lora_embedding_ref

from helpers import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(V, D, r, shape, dtype, ldtype=None, seed=0, strided=False, pad=None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g).to(dtype)
    A = torch.randn(r, V, generator=g).to(ldtype or dtype)
    B = torch.randn(D, r, generator=g).to(ldtype or dtype)
    big = torch.randint(0, V, (shape[-1], 2 * shape[0]) if strided else shape, generator=g)
    if pad is not None:
        big.view(-1)[::3] = pad  # padding rows in the batch
    if strided:  # every other id of a wider tensor, transposed: really not contiguous
        ids = big[:, ::2].t()
        assert not ids.is_contiguous()
    else:
        ids = big
    return ids, W, A, B


def _grads(fn, ids, W, A, B, dy, **kw):
    A = A.detach().clone().requires_grad_()
    B = B.detach().clone().requires_grad_()
    y = fn(ids, W, A, B, 0.7, **kw)
    y.backward(dy.to(y.dtype))
    return y.detach(), A.grad, B.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,D,r,shape,strided,pad,freq", [
    (37, 24, 4, (5, 7), False, None, False),
    (50, 33, 1, (9,), False, 3, False),
    (29, 40, 80, (3, 4), False, None, True),
    (64, 17, 8, (6, 11), True, 0, True),
    (20, 8, 4, (0, 5), False, None, False),
], ids=["3d", "rank1-pad", "rank80-freq", "strided-pad-freq", "no-ids"])
@pytest.mark.parametrize("ladapter", ["same", "fp32"])
def test_op_matches_reference(dtype, V, D, r, shape, strided, pad, freq, ladapter):
    ldt = torch.float32 if ladapter == "fp32" else dtype
    ids, W, A, B = _case(V, D, r, shape, dtype, ldt, strided=strided, pad=pad)
    dy = torch.randn(*ids.shape, D, generator=torch.Generator().manual_seed(9))

    def ref_fn(i, w, a, b, s, **kw):  # the spec, with F.embedding's gradient rules
        base = nn.functional.embedding(i, w, padding_idx=pad, scale_grad_by_freq=freq)
        upd = nn.functional.embedding(i, a.t(), padding_idx=pad, scale_grad_by_freq=freq) @ b.t() * s
        return (base.to(upd.dtype) + upd).to(w.dtype)

    got = _grads(pk.lora_embedding, ids, W, A, B, dy, padding_idx=pad, scale_grad_by_freq=freq)
    same = _grads(ref_fn, ids, W, A, B, dy)
    ref64 = _grads(ref_fn, ids, W.double(), A.double(), B.double(), dy.double())
    for name, a, s_, r64 in zip(("y", "dA", "dB"), got, same, ref64):
        assert a.dtype == s_.dtype, name
        assert_close(a, r64, s_, f"{dtype}/{ladapter} {name}")
    if pad is not None:
        assert torch.all(got[1][:, pad] == 0)  # no gradient for the padding row
    # the spec in reference.py agrees with the F.embedding form used above (no grad-rule options)
    if not freq:
        torch.testing.assert_close(lora_embedding_ref(ids, W.double(), A.double(), B.double(), 0.7, pad), ref64[0])


def test_table_gradient_when_it_requires_grad():
    ids, W, A, B = _case(20, 8, 2, (4, 5), torch.float64)
    W1, W2 = W.clone().requires_grad_(), W.clone().requires_grad_()
    pk.lora_embedding(ids, W1, A, B, 0.5, padding_idx=2).square().sum().backward()
    lora_embedding_ref(ids, W2, A, B, 0.5, padding_idx=2).square().sum().backward()
    torch.testing.assert_close(W1.grad, W2.grad)


def test_gradcheck():
    ids, W, A, B = _case(11, 5, 3, (2, 6), torch.float64)
    A.requires_grad_()
    B.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: pk.lora_embedding(ids, W, a, b, 1.3), (A, B))
    # scale_grad_by_freq's gradient is F.embedding's rule (not the derivative), so its check is against F.embedding


def test_saves_only_the_ids():
    ids, W, A, B = _case(100, 64, 8, (16, 32), torch.float32)
    A.requires_grad_()
    B.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pk.lora_embedding(ids, W, A, B, 1.0)
    activations = [t for t in saved if t.data_ptr() not in (A.data_ptr(), B.data_ptr())]
    assert sum(t.numel() * t.element_size() for t in activations) == ids.numel() * 8  # the int64 ids


@pytest.mark.parametrize("bad,err,match", [
    (dict(ids=torch.tensor([0.5])), TypeError, "ids must be an int32/int64"),
    (dict(ids=torch.tensor([40])), ValueError, r"ids must be in \[0, num_embeddings=37\)"),
    (dict(ids=torch.tensor([-1])), ValueError, "ids must be in"),
    (dict(A=torch.randn(4, 36)), ValueError, "lora_A must have shape"),
    (dict(B=torch.randn(24, 3)), ValueError, "lora_B must have shape"),
    (dict(W=torch.randn(37)), ValueError, "weight must be the 2-D table"),
    (dict(B=torch.randn(24, 4, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(pad=37), ValueError, "padding_idx"),
    (dict(scaling="1"), TypeError, "scaling"),
    (dict(backend="triton"), pk.BackendUnavailable, "no triton kernels"),
])
def test_op_errors(bad, err, match):
    ids, W, A, B = _case(37, 24, 4, (3,), torch.float32)
    args = dict(ids=ids, W=W, A=A, B=B, pad=None, scaling=1.0, backend="auto")
    args.update(bad)
    with pytest.raises(err, match=match):
        pk.lora_embedding(args["ids"], args["W"], args["A"], args["B"], args["scaling"], padding_idx=args["pad"],
                          backend=args["backend"])


def test_module_errors():
    with pytest.raises(ValueError, match="max_norm"):
        pk.LoRAEmbedding.from_embedding(nn.Embedding(5, 3, max_norm=1.0))
    with pytest.raises(ValueError, match="sparse"):
        pk.LoRAEmbedding.from_embedding(nn.Embedding(5, 3, sparse=True))
    with pytest.raises(ValueError, match="use_dora"):
        pk.LoRAEmbedding.from_embedding(nn.Embedding(5, 3), use_dora=True)
    with pytest.raises(ValueError, match="r must be"):
        pk.LoRAEmbedding.from_embedding(nn.Embedding(5, 3), r=0)

    class Scaled(nn.Embedding):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="nn.Embedding's forward"):
        pk.LoRAEmbedding.from_embedding(Scaled(5, 3))


# ------------------------------------------------------------------------------------ PEFT parity
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_inject import IDS, llama  # noqa: E402


def test_module_matches_peft_outputs_and_gradients():
    torch.manual_seed(0)
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                      init_lora_weights=False))
    ours = copy.deepcopy(pm.get_base_model())
    ours = pk.from_peft(copy.deepcopy(pm))
    emb = ours.model.embed_tokens
    assert isinstance(emb, pk.LoRAEmbedding) and emb.r == 4 and emb.scaling == 2.0
    pm.train()
    ours.train()
    la, lb = pm(IDS).logits, ours(IDS).logits
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    la.square().sum().backward()
    lb.square().sum().backward()
    pe = pm.base_model.model.model.embed_tokens
    torch.testing.assert_close(emb.lora_embedding_A.grad, pe.lora_embedding_A["default"].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(emb.lora_embedding_B.grad, pe.lora_embedding_B["default"].grad, rtol=1e-4, atol=1e-6)


def test_checkpoints_both_ways(tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"],
                                                      init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    ours = llama()
    names = pk.load_peft_adapter(ours, tmp_path / "peft")
    assert "model.embed_tokens" in names and isinstance(ours.model.embed_tokens, pk.LoRAEmbedding)
    with torch.no_grad():
        want = pm(IDS).logits
        torch.testing.assert_close(ours(IDS).logits, want, rtol=1e-5, atol=1e-6)
    pk.save_peft_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, want, rtol=1e-5, atol=1e-6)


def test_inject_merge_unmerge_and_init():
    m = llama()
    with torch.no_grad():
        base = m(IDS).logits
    names = pk.inject_lora(m, ["embed_tokens"], r=3, lora_alpha=6)
    emb = m.model.embed_tokens
    assert names == ["model.embed_tokens"] and torch.all(emb.lora_embedding_A == 0)  # PEFT's init: A zero
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, base)  # starts equal to the base
        emb.lora_embedding_A.normal_()
        adapted = m(IDS).logits
        table = emb.weight.clone()
        pk.merge_lora(m)
        assert emb.merged and not torch.equal(emb.weight, table)
        # a state dict holds the unmerged table (to the rounding of (W + Δ) − Δ), as LoRALinear's does
        torch.testing.assert_close(m.state_dict()["model.embed_tokens.weight"], table, rtol=0, atol=1e-6)
        torch.testing.assert_close(m(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
        pk.unmerge_lora(m)
        torch.testing.assert_close(emb.weight, table, rtol=0, atol=1e-6)
    assert emb.lora_embedding_A.requires_grad and not emb.weight.requires_grad
    assert set(pk.lora_state_dict(m)) == {"model.embed_tokens.lora_embedding_A", "model.embed_tokens.lora_embedding_B"}


def test_the_table_peft_saves_beside_an_embedding_lora_is_applied(tmp_path):
    """PEFT saves the embedding table with an embedding LoRA (new tokens' rows) and loads it back: ours too."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("embed_tokens.base_layer.weight"))
    sd[key][5] += 0.5  # a row trained (or added) with the adapter; IDS uses token 5
    save_file(sd, f)
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    ours = llama()
    pk.load_peft_adapter(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ many adapters
def test_multi_lora_embedding_matches_one_adapter_per_token():
    """Each token gets its own slot's update (or none): equal to LoRAEmbedding per adapter, forward and each
    slot's gradients (only from its own tokens), in fp64 and fp32 against fp64."""
    g = torch.Generator().manual_seed(0)
    V, D, S, R = 40, 12, 3, 6
    table = nn.Embedding(V, D, padding_idx=2)
    mods = []
    for a, r in enumerate((6, 2, 4)):
        single = pk.LoRAEmbedding.from_embedding(copy.deepcopy(table), r=r, lora_alpha=2.0 * r + a,
                                                 init_lora_weights=False)
        mods.append(single)
    multi = pk.nn.embedding.MultiLoRAEmbedding.from_embedding(copy.deepcopy(table), max_adapters=S, max_rank=R)
    for a, single in enumerate(mods):
        multi.set_adapter(a, single.lora_embedding_A.detach(), single.lora_embedding_B.detach(), single.scaling)
    ids = torch.randint(0, V, (4, 9), generator=g)
    ids[0, 0] = 2
    aid = torch.randint(-1, S, (4, 9), generator=g)
    dy = torch.randn(4, 9, D, generator=g)
    y = multi(ids, aid)
    y.backward(dy)
    for a, single in enumerate(mods):
        want = single(ids)
        want.backward(dy * (aid == a)[..., None])
        sel = aid == a
        torch.testing.assert_close(y[sel], want[sel], rtol=1e-5, atol=1e-6)
        r = single.r
        torch.testing.assert_close(multi.lora_A.grad[a, :r], single.lora_embedding_A.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(multi.lora_B.grad[a, :, :r], single.lora_embedding_B.grad, rtol=1e-5, atol=1e-6)
        assert not multi.lora_A.grad[a, r:].any() and not multi.lora_B.grad[a, :, r:].any()
    torch.testing.assert_close(y[aid == -1], table(ids)[aid == -1])


def test_multi_lora_embedding_from_peft_and_slots(tmp_path):
    """Two PEFT adapters with embedding LoRA: from_peft serves them in one mixed batch (PEFT's adapter_names),
    and a PEFT embedding adapter loads into / saves from a slot."""
    torch.manual_seed(0)
    cfg = dict(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(llama(), peft.LoraConfig(**cfg), adapter_name="a").eval()
    pm.add_adapter("b", peft.LoraConfig(**dict(cfg, r=2)))
    ids2 = torch.cat([IDS, IDS.flip(1)])
    with torch.no_grad():
        want = pm(ids2, adapter_names=["a", "b"]).logits
    ours = pk.from_peft(copy.deepcopy(pm))
    assert isinstance(ours.model.embed_tokens, pk.nn.embedding.MultiLoRAEmbedding)
    with torch.no_grad(), pk.adapter_ids(ours, pk.adapter_names_to_ids(ours, ["a", "b"])):
        torch.testing.assert_close(ours(ids2).logits, want, rtol=1e-5, atol=1e-6)
    pm.set_adapter("b")
    pm.save_pretrained(tmp_path / "p")  # adapter b in the subfolder "b"
    m = llama()
    pk.inject_multi_lora(m, ["embed_tokens", "q_proj"], max_adapters=2, max_rank=4)
    pk.load_peft_adapter(m, tmp_path / "p", adapter_name="b", slot=1)
    with torch.no_grad(), pk.adapter_ids(m, torch.tensor([1])):
        torch.testing.assert_close(m(IDS.flip(1)).logits, want[1:], rtol=1e-5, atol=1e-6)
    pk.save_peft_adapter(m, tmp_path / "ours", slot=1)
    back = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(IDS.flip(1)).logits, want[1:], rtol=1e-5, atol=1e-6)
