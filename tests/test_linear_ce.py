"""linear_cross_entropy (the head loss without the M×V logits), head_cross_entropy and causal_lm_loss: loss and
every gradient against the fp64 unfused reference, within a small multiple of what the unfused computation gets at
the same precision (fp32/fp16/bf16); ignore_index, label smoothing, z-loss, the three reductions, LoRA (rank 1 and
80, fp32 adapters on half heads, dropout), bias, 3-D and strided hidden states; no tensor of M×V elements; errors;
transformers causal LMs' own loss."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import peft_kernels as pk
from peft_kernels import reference
from peft_kernels.ops import _torch_dropout

from helpers import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(dtype, M=(3, 13), H=24, V=97, r=4, bias=True, lora=True, lora_dtype=None, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*M, H, generator=g)
    if strided:  # a real non-contiguous view: the tokens of a transposed [.., H, ..] layout
        h = torch.randn(M[0], H, M[1], generator=g).transpose(1, 2)
    W = torch.randn(V, H, generator=g) / H ** 0.5
    args = dict(weight=W.to(dtype), bias=(torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None)
    if lora:
        ldt = lora_dtype or dtype
        args.update(lora_A=(torch.randn(r, H, generator=g) / H ** 0.5).to(ldt),
                    lora_B=(torch.randn(V, r, generator=g) * 0.3).to(ldt), scaling=0.75)
    labels = torch.randint(0, V, M, generator=g)
    labels.view(-1)[::4] = -100
    return h.to(dtype), args, labels


def _leaves(h, args):
    h = h.detach().clone().requires_grad_() if h.is_contiguous() else h.detach().transpose(1, 2).clone() \
        .requires_grad_().transpose(1, 2)
    out = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    return h, out


def _unfused(h, args, labels, dropout_mask=None, **kw):
    """The unfused computation at the inputs' precision, as a transformers training loop runs it: logits in the
    model's dtype, the loss on their fp32 upcast."""
    if "lora_A" in args:
        logits = reference.lora_linear_ref(h, args["weight"], args["bias"], args["lora_A"], args["lora_B"],
                                           args["scaling"], dropout_mask)
    else:
        logits = F.linear(h, args["weight"], args["bias"])
    return reference.linear_cross_entropy_ref(logits.float(), torch.eye(logits.shape[-1]), labels, **kw)


def _grads(loss, h, args, g=None):
    names = ["hidden"] + [k for k, v in args.items() if isinstance(v, torch.Tensor)]
    ts = [h] + [args[k] for k in names[1:]]
    return dict(zip(names, torch.autograd.grad(loss, ts, g)))


CONFIGS = {
    "lora+bias": dict(), "no bias": dict(bias=False), "head only": dict(lora=False),
    "rank 1": dict(r=1), "rank 80": dict(r=80), "strided 3-D": dict(strided=True),
    "fp32 adapters": dict(lora_dtype=torch.float32),
}
LOSSES = {"plain": dict(), "smoothing+z": dict(label_smoothing=0.1, z_loss=1e-3)}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss_kw", list(LOSSES))
@pytest.mark.parametrize("dtype,cfg", [pytest.param(d, c, id=f"{d}-{c}") for d in DTYPES for c in CONFIGS
                                       if not (d == torch.float32 and c == "fp32 adapters")])
def test_loss_and_gradients_against_fp64(dtype, cfg, loss_kw, reduction):
    c = CONFIGS[cfg]
    kw = dict(LOSSES[loss_kw], reduction=reduction)
    h, args, labels = _case(dtype, **c)
    h64, a64 = _leaves(h.double(), {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    ref = reference.linear_cross_entropy_ref(h64, labels=labels, **a64, **kw)
    gout = torch.rand(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
    gref = _grads(ref, h64, a64, gout)
    hs, as_ = _leaves(h, args)
    same = _unfused(hs, as_, labels, **kw)
    gsame = _grads(same, hs, as_, gout.float())
    ho, ao = _leaves(h, args)
    out = pk.linear_cross_entropy(ho, labels=labels, chunk_size=5, **ao, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    gout_o = _grads(out, ho, ao, gout.float())
    if reduction == "none":
        assert_close(out, ref, same, f"{cfg} loss")
    else:  # a scalar: its bound is the same-precision per-token errors added up (a lucky cancellation of them
        # must not make it tighter than the per-token losses' own accuracy)
        kw_none = dict(kw, reduction="none")
        tok64 = reference.linear_cross_entropy_ref(h64, labels=labels, **a64, **kw_none)
        tok_err = (_unfused(hs, as_, labels, **kw_none).double() - tok64).abs().sum()
        bound = 4.0 * (tok_err / (labels != -100).sum() if reduction == "mean" else tok_err)
        assert (out.double() - ref).abs() <= bound + 1e-7 * ref.abs(), (cfg, out.item(), ref.item(), bound.item())
    for k in gref:
        assert gout_o[k].dtype == (h.dtype if k == "hidden" else args[k].dtype), k
        assert_close(gout_o[k], gref[k], gsame[k], f"{cfg} d{k}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_under_autocast_like_the_unfused_head(reduction):
    """Under CPU bf16 autocast the fused loss computes the head (and its LoRA) in bf16, as the unfused head's
    ``F.linear`` does there: loss and every gradient against the fp64 reference of the bf16-rounded inputs, within
    4× the unfused computation in bf16; the loss fp32 and the gradients in the fp32 leaves' dtype. Before, it
    computed the head in fp32 (a GPU's bf16 tensor cores unused, and not the unfused numerics)."""
    h, args, labels = _case(torch.float32)

    def rounded(dt):
        return _leaves(h.to(torch.bfloat16).to(dt), {k: v.to(torch.bfloat16).to(dt) if isinstance(v, torch.Tensor)
                                                     else v for k, v in args.items()})
    h64, a64 = rounded(torch.float64)
    ref = reference.linear_cross_entropy_ref(h64, labels=labels, reduction=reduction, **a64)
    gout = torch.rand(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
    gref = _grads(ref, h64, a64, gout)
    hb, ab = rounded(torch.bfloat16)
    same = _unfused(hb, ab, labels, reduction="none")
    ho, ao = _leaves(h, args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pk.linear_cross_entropy(ho, labels=labels, chunk_size=5, reduction=reduction, **ao)
    assert out.dtype == torch.float32
    got = _grads(out, ho, ao, gout.float())
    tok64 = reference.linear_cross_entropy_ref(h64, labels=labels, reduction="none", **a64)
    if reduction == "none":
        assert_close(out, ref, same, "loss")
    else:  # bound: the unfused bf16 per-token errors, averaged (as in test_loss_and_gradients_against_fp64)
        bound = 4.0 * (same.double() - tok64).abs().sum() / (labels != -100).sum()
        assert (out.double() - ref).abs() <= bound, (out.item(), ref.item(), bound.item())
    same_m = _unfused(hb, ab, labels, reduction=reduction)
    gsame = _grads(same_m, hb, ab, gout.to(torch.bfloat16) if reduction == "none" else gout.float())
    for k in gref:
        assert got[k].dtype == torch.float32, k
        assert_close(got[k], gref[k], gsame[k], f"d{k}")


def test_dropout_on_the_lora_input_is_the_references():
    h, args, labels = _case(torch.float32)
    torch.manual_seed(5)
    seed = _torch_dropout.draw_seed("cpu")
    mask = _torch_dropout.dropout_mask(seed, (labels.numel(), h.shape[-1]), 0.3, "cpu").view(h.shape)
    h64, a64 = _leaves(h.double(), {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
    ref = reference.linear_cross_entropy_ref(h64, labels=labels, dropout_mask=mask.double(), **a64)
    gref = _grads(ref, h64, a64)
    ho, ao = _leaves(h, args)
    torch.manual_seed(5)
    out = pk.linear_cross_entropy(ho, labels=labels, dropout_p=0.3, training=True, chunk_size=7, **ao)
    g = _grads(out, ho, ao)
    for k in gref:
        torch.testing.assert_close(g[k].double(), gref[k], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    # not training: no dropout
    ho, ao = _leaves(h, args)
    plain = pk.linear_cross_entropy(ho, labels=labels, dropout_p=0.3, training=False, **ao)
    assert abs(plain.item() - out.item()) > 1e-4


def test_gradcheck_fp64_every_reduction():
    h, args, labels = _case(torch.float64, M=(2, 5), H=6, V=11, r=2)
    h, args = _leaves(h, args)
    names = ["weight", "bias", "lora_A", "lora_B"]

    def f(hh, *ts):
        return pk.linear_cross_entropy(hh, labels=labels, scaling=0.75, label_smoothing=0.2, z_loss=0.01,
                                       reduction=red, chunk_size=3, **dict(zip(names, ts)))
    for red in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(f, (h, *[args[n] for n in names]))


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


@pytest.mark.parametrize("M", [256, 1024])
def test_no_tensor_holds_the_logits(M):
    """Peak extra memory does not grow with M: no tensor of the forward or backward has more than C×V elements
    (C = 16 tokens per chunk), while the unfused logits would have M×V."""
    V, H, C = 300, 16, 16
    h, args, labels = _case(torch.float32, M=(M,), H=H, V=V, r=4)
    h, args = _leaves(h, args)
    with _MaxNumel() as mode:
        loss = pk.linear_cross_entropy(h, labels=labels, chunk_size=C, **args)
        loss.backward()
    assert mode.max <= max(C * V, V * H, M * H), (mode.max, C * V)
    with _MaxNumel() as unfused:
        _unfused(h, args, labels).backward()
    assert unfused.max >= M * V  # the check sees the logits when they exist


def test_ignored_tokens_and_errors():
    h, args, labels = _case(torch.float32)
    every = torch.full_like(labels, -100)
    assert torch.isnan(pk.linear_cross_entropy(h, labels=every, **args))  # as F.cross_entropy's mean over nothing
    assert pk.linear_cross_entropy(h, labels=every, reduction="sum", **args).item() == 0.0
    custom = torch.where(labels == -100, 7, labels)
    a = pk.linear_cross_entropy(h, labels=torch.where(labels == -100, -1, labels), ignore_index=-1, **args)
    b = pk.linear_cross_entropy(h, labels=labels, **args)
    torch.testing.assert_close(a, b)
    assert custom.max() < 97
    W = args["weight"]
    cases = [
        (dict(labels=torch.where(labels == -100, 97, labels)), ValueError, r"labels must be in \[0, 97\)"),
        (dict(labels=labels[:, :5]), ValueError, "labels must have hidden's leading shape"),
        (dict(labels=labels.float()), TypeError, "labels must be int64"),
        (dict(weight=W[:, :5]), ValueError, "weight must have shape"),
        (dict(weight=W.double()), TypeError, "weight must have hidden's dtype"),
        (dict(bias=torch.zeros(5)), ValueError, "bias must have shape"),
        (dict(lora_A=None), ValueError, "given together"),
        (dict(lora_B=torch.zeros(97, 3)), ValueError, "lora_B must have shape"),
        (dict(lora_B=args["lora_B"].double()), TypeError, "lora_A and lora_B"),
        (dict(scaling=float("inf")), ValueError, "scaling"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
    ]
    for over, exc, msg in cases:
        kw = dict(args, labels=labels)
        kw.update(over)
        with pytest.raises(exc, match=msg):
            pk.linear_cross_entropy(h, **kw)
    with pytest.raises(TypeError, match="hidden must be"):
        pk.linear_cross_entropy(h.long(), labels=labels, **args)


# ------------------------------------------------------------------------------------ models
def _llama(lm_head_lora: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64)
    m = transformers.LlamaForCausalLM(cfg)
    pk.inject_lora(m, ["q_proj", "v_proj"] + (["lm_head"] if lm_head_lora else []), r=4, lora_alpha=8,
                   init_lora_weights=False)
    return m


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4,
                                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    pk.inject_lora(m, ["c_attn"], r=4, lora_alpha=8, init_lora_weights=False)
    return m


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 120, (3, 11), generator=g)
    am = torch.ones_like(ids)
    am[2, 8:] = 0
    labels = ids.clone()
    labels[2, 8:] = -100
    return ids, am, labels


def _same_loss_and_grads(m, want_fn, got_fn):
    params = [p for p in m.parameters() if p.requires_grad]
    want = want_fn()
    gw = torch.autograd.grad(want, params)
    got = got_fn()
    gg = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: _llama(True), lambda: _llama(False), _gpt2],
                         ids=["llama lm_head LoRA", "llama frozen head", "gpt2 tied head"])
def test_causal_lm_loss_is_the_models_loss(make):
    m = make().train()
    ids, am, labels = _batch()
    _same_loss_and_grads(m, lambda: m(input_ids=ids, attention_mask=am, labels=labels).loss,
                         lambda: pk.causal_lm_loss(m, ids, labels, attention_mask=am, chunk_size=7))
    # labels default to input_ids
    torch.testing.assert_close(pk.causal_lm_loss(m, ids, attention_mask=am),
                               m(input_ids=ids, attention_mask=am, labels=ids).loss, rtol=2e-6, atol=0)


def test_causal_lm_loss_num_items_in_batch_and_shift_labels():
    """transformers' loss options a Trainer uses: ``num_items_in_batch`` (gradient accumulation: the sum over this
    micro-batch's counted tokens divided by the whole batch's count; a tensor or an int) and precomputed
    ``shift_labels``. Before, both went to the decoder and were ignored: the mean of this micro-batch, silently."""
    m = _llama(True).train()
    ids, am, labels = _batch()
    for n in (torch.tensor(57), 57):
        _same_loss_and_grads(m, lambda: m(input_ids=ids, attention_mask=am, labels=labels, num_items_in_batch=n).loss,
                             lambda: pk.causal_lm_loss(m, ids, labels, attention_mask=am, num_items_in_batch=n))
    sl = torch.randint(0, 120, ids.shape, generator=torch.Generator().manual_seed(8))
    sl[0, :4] = -100
    _same_loss_and_grads(m, lambda: m(input_ids=ids, attention_mask=am, labels=labels, shift_labels=sl).loss,
                         lambda: pk.causal_lm_loss(m, ids, attention_mask=am, shift_labels=sl))
    with pytest.raises(ValueError, match="shift_labels must have"):
        pk.causal_lm_loss(m, ids, shift_labels=sl[:, 1:])


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_causal_lm_loss_adds_the_moe_router_loss(kind):
    """An MoE model with ``output_router_logits`` on adds ``router_aux_loss_coef`` × its load-balancing loss to
    ``.loss``; so does ``causal_lm_loss`` (loss and every gradient, the routers' included; before, it left the
    router loss out silently), and off when the call turns it off."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.3)
    if kind == "mixtral":
        m = transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=24, num_local_experts=4,
                                                                       **common))
    else:
        m = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=16, num_experts=4, head_dim=8, decoder_sparse_step=1,
            **common))
    m.train()
    ids, am, labels = _batch()
    out = m(input_ids=ids, attention_mask=am, labels=labels)
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    _same_loss_and_grads(m, lambda: m(input_ids=ids, attention_mask=am, labels=labels).loss,
                         lambda: pk.causal_lm_loss(m, ids, labels, attention_mask=am))
    _same_loss_and_grads(m, lambda: m(input_ids=ids, attention_mask=am, labels=labels,
                                      output_router_logits=False).loss,
                         lambda: pk.causal_lm_loss(m, ids, labels, attention_mask=am, output_router_logits=False))


def test_causal_lm_loss_refuses_what_it_cannot_match():
    m = _llama(False)
    m.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        pk.causal_lm_loss(m, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="transformers causal LM"):
        pk.causal_lm_loss(torch.nn.Linear(2, 2), torch.zeros(1, 4, dtype=torch.long))
    m.config.final_logit_softcapping = None
    m.config.output_router_logits = True  # a router loss this (dense) model cannot compute
    with pytest.raises(ValueError, match="load_balancing_loss_func"):
        pk.causal_lm_loss(m, torch.zeros(1, 4, dtype=torch.long))
    m = _llama(True)
    with pytest.raises(ValueError, match="labels must have"):
        pk.causal_lm_loss(m, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="the head must be"):
        pk.head_cross_entropy(torch.randn(2, 32), torch.nn.Conv1d(32, 5, 1), torch.zeros(2, dtype=torch.long))
    with pk.disable_adapters(m):  # a disabled LoRA head is its base
        x = torch.randn(4, 32)
        lab = torch.tensor([1, 2, 3, 4])
        torch.testing.assert_close(pk.head_cross_entropy(x, m.lm_head, lab),
                                   F.cross_entropy(F.linear(x, m.lm_head.weight), lab))


def test_trainer_with_the_fused_loss_trains_as_with_the_models_loss(tmp_path):
    """transformers' Trainer with gradient accumulation (2 micro-batches of unequal token counts per step), its
    ``compute_loss`` replaced by ``causal_lm_loss`` as the README shows (``num_items_in_batch`` passed on), trains a
    LoRA'd Llama to the same weights as the model's own loss. Without ``num_items_in_batch`` each micro-batch's
    mean would weigh its tokens differently, and the weights would differ (checked too)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    g = torch.Generator().manual_seed(4)
    rows = []
    for i in range(8):
        ids = torch.randint(0, 120, (10,), generator=g)
        labels = ids.clone()
        labels[: 1 + 2 * (i % 4)] = -100  # unequal counted tokens per micro-batch
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})

    class Fused(transformers.Trainer):
        pass_count = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return pk.causal_lm_loss(model, inputs["input_ids"], inputs["labels"],
                                     attention_mask=inputs["attention_mask"],
                                     num_items_in_batch=num_items_in_batch if self.pass_count else None)

    def train(cls, pass_count=True):
        m = _llama(True)
        args = transformers.TrainingArguments(str(tmp_path / cls.__name__), per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2,
                                              report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                              seed=0, dataloader_num_workers=0)
        tr = cls(model=m, args=args, train_dataset=rows)
        if cls is Fused:
            tr.pass_count = pass_count
        tr.train()
        return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    want, got, without = train(transformers.Trainer), train(Fused), train(Fused, pass_count=False)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(not torch.allclose(without[n], want[n], rtol=1e-4, atol=1e-6) for n in want)
