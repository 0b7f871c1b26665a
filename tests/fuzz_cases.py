"""The fuzz cases, run by tests/test_fuzz.py in child processes (a segfault or an abort there is a test
failure that names the case, not a dead test run): ``python tests/fuzz_cases.py GROUP [EXAMPLES]``.

Each case prints ``CASE <name>`` before it runs; the last line is a JSON summary. A case passes when the call
either raises the documented ValueError/TypeError (naming the argument) or returns what an fp64 reference built
from the same inputs says. Groups:
  raw_bad     hand-picked bad calls to every raw C++ op (index values, shapes, dtypes, devices)
  raw_random  hypothesis: valid mappings with one random corruption (or none) for every gather/multi op,
              checked against a float64 reference of the contract (perm distinct rows, slots in range,
              seg_starts from 0 to len(perm), ranks clamped to [0, R]); expand ops leave other rows untouched
  public      hypothesis: lora_linear / multi_lora_linear / MultiLoRALinear over shapes, dtypes, strides,
              ids (bad ones too), ranks and non-finite values, every CPU backend
  dequant     hypothesis: the 4-bit dequantize op with random sizes and short or mistyped buffers
  checkpoint  hypothesis: PEFT adapter folders with random JSON values in random config fields, corrupted
              weights and adapter names: a load succeeds or raises CheckpointError/ValueError/TypeError and
              then leaves the model unchanged
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft_kernels as pk  # noqa: E402
from peft_kernels import _ext  # noqa: E402

OK_ERRORS = (ValueError, TypeError)
results = {"cases": 0, "failures": [], "checked": 0, "refused": 0}


def case(name):
    print(f"CASE {name}", flush=True)
    results["cases"] += 1


def fail(name, msg):
    results["failures"].append(f"{name}: {msg}")


def expect_error(name, fn, match=None):
    case(name)
    try:
        fn()
    except OK_ERRORS as e:
        if match and match.lower() not in str(e).lower():
            fail(name, f"error does not name {match!r}: {e}")
        return
    except Exception as e:  # noqa: BLE001
        fail(name, f"raised {type(e).__name__} (expected ValueError/TypeError): {e}")
        return
    fail(name, "no error")


# ------------------------------------------------------------------------------------------ references
def i32(v):
    return torch.tensor(v, dtype=torch.int32)


def mapping_valid(perm, T, slot_lists, S, starts=None, n_active=None):
    """The contract the ops check: perm distinct rows of T, every slot in [0, S), starts from 0 to len(perm)."""
    p = perm.tolist()
    if any(not 0 <= v < T for v in p) or len(set(p)) != len(p):
        return False
    if any(not 0 <= v < S for sl in slot_lists for v in sl.tolist()):
        return False
    if starts is not None:
        st = starts.tolist()
        if st[0] != 0 or st[-1] != len(p) or any(a > b for a, b in zip(st, st[1:])):
            return False
    return True


def slots_of_positions(seg_slots, seg_starts):
    out = []
    st = seg_starts.tolist()
    for g, a in enumerate(seg_slots.tolist()):
        out += [a] * (st[g + 1] - st[g])
    return out


def ref_shrink(x, w, perm, pos, ranks, scal):
    R = w.shape[1]
    S = torch.zeros(len(pos), R, dtype=torch.float64)
    for p, (t, a) in enumerate(zip(perm.tolist(), pos)):
        r = min(max(int(ranks[a]), 0), R)
        s = float(scal[a]) if scal is not None else 1.0
        S[p, :r] = s * (w[a, :r].double() @ x[t].double())
    return S


def ref_expand(y, S, w, perm, pos, ranks, scal):
    out = y.double().clone()
    R = w.shape[2]
    for p, (t, a) in enumerate(zip(perm.tolist(), pos)):
        r = min(max(int(ranks[a]), 0), R)
        s = float(scal[a]) if scal is not None else 1.0
        out[t] += s * (w[a, :, :r].double() @ S[p, :r].double())
    return out


def close(got, want, name, what):
    got = got.double()
    scale = max(1.0, want.abs().max().item() if want.numel() else 1.0)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    if not (err <= 1e-4 * scale) or got.shape != want.shape:
        fail(name, f"{what}: max |err| {err:.3e} (scale {scale:.3e}), shapes {tuple(got.shape)} vs {tuple(want.shape)}")


# ------------------------------------------------------------------------------------------ raw_bad
def group_raw_bad(_examples):
    ops = _ext.ops()
    T, K, N, S_, R = 6, 8, 5, 3, 4
    x, y = torch.randn(T, K), torch.zeros(T, N)
    wA, wB = torch.randn(S_, R, K), torch.randn(S_, N, R)
    perm, pos = i32([0, 2, 4, 1]), i32([0, 0, 2, 2])
    seg_slots, seg_starts = i32([0, 2]), i32([0, 2, 4])
    ranks, scal = i32([4, 0, 2]), torch.ones(S_)
    Sbuf = torch.zeros(4, R)
    bad_perms = {"perm=T": [0, 2, 4, T], "perm=-1": [0, -1, 4, 1], "perm=2^31-1": [0, 2, 4, 2**31 - 1],
                 "perm-duplicate": [0, 2, 2, 1]}
    for n, v in bad_perms.items():
        expect_error(f"bgmv_shrink {n}", lambda v=v: ops.bgmv_shrink(x, wA, i32(v), pos, ranks, scal), "perm")
        expect_error(f"bgmv_expand {n}", lambda v=v: ops.bgmv_expand(y, Sbuf, wB, i32(v), pos, ranks, scal), "perm")
        expect_error(f"sgmv_shrink {n}", lambda v=v: ops.sgmv_shrink(x, wA, i32(v), seg_slots, seg_starts, ranks,
                                                                     scal, 2), "perm")
        expect_error(f"sgmv_expand {n}", lambda v=v: ops.sgmv_expand(y, Sbuf, wB, i32(v), seg_slots, seg_starts,
                                                                     ranks, scal, 2), "perm")
        expect_error(f"multi_lora_fwd {n}", lambda v=v: ops.multi_lora_fwd(y, x, wA, wB, i32(v), seg_slots, seg_starts,
                                                                           ranks, scal, None), "perm")
        expect_error(f"multi_lora_bwd {n}", lambda v=v: ops.multi_lora_bwd(y, x, Sbuf, wA, wB, i32(v), seg_slots,
                                                                           seg_starts, ranks, scal, torch.zeros(T, K),
                                                                           True, True, None), "perm")
    for n, v in {"slot=S": [0, 0, 3, 2], "slot=-1": [0, -1, 2, 2], "slot=2^31-1": [0, 0, 2**31 - 1, 2]}.items():
        expect_error(f"bgmv_shrink pos_slots {n}", lambda v=v: ops.bgmv_shrink(x, wA, perm, i32(v), ranks, scal),
                     "pos_slots")
        expect_error(f"bgmv_expand pos_slots {n}", lambda v=v: ops.bgmv_expand(y, Sbuf, wB, perm, i32(v), ranks, scal),
                     "pos_slots")
    for n, v in {"seg_slot=S": [0, 3], "seg_slot=-5": [-5, 2]}.items():
        expect_error(f"sgmv_shrink {n}", lambda v=v: ops.sgmv_shrink(x, wA, perm, i32(v), seg_starts, ranks, scal, 2),
                     "seg_slots")
        expect_error(f"sgmv_expand {n}", lambda v=v: ops.sgmv_expand(y, Sbuf, wB, perm, i32(v), seg_starts, ranks,
                                                                     scal, 2), "seg_slots")
        expect_error(f"multi_lora_fwd {n}", lambda v=v: ops.multi_lora_fwd(y, x, wA, wB, perm, i32(v), seg_starts,
                                                                           ranks, scal, None), "seg_slots")
        expect_error(f"multi_lora_bwd {n}", lambda v=v: ops.multi_lora_bwd(y, x, Sbuf, wA, wB, perm, i32(v), seg_starts,
                                                                           ranks, scal, None, True, True, None),
                     "seg_slots")
    expect_error("multi_lora_bwd seg_slots duplicate", lambda: ops.multi_lora_bwd(
        y, x, Sbuf, wA, wB, perm, i32([2, 2]), seg_starts, ranks, scal, torch.zeros(T, K), True, True, None),
        "seg_slots")
    for n, v in {"starts-past-end": [0, 2, 9], "starts-negative": [-3, 2, 4], "starts-decreasing": [0, 3, 2],
                 "starts-short": [0, 2, 3], "starts-huge": [0, 2**31 - 1, 4]}.items():
        expect_error(f"sgmv_shrink {n}", lambda v=v: ops.sgmv_shrink(x, wA, perm, seg_slots, i32(v), ranks, scal, 2),
                     "seg_starts")
        expect_error(f"sgmv_expand {n}", lambda v=v: ops.sgmv_expand(y, Sbuf, wB, perm, seg_slots, i32(v), ranks,
                                                                     scal, 2), "seg_starts")
        expect_error(f"multi_lora_fwd {n}", lambda v=v: ops.multi_lora_fwd(y, x, wA, wB, perm, seg_slots, i32(v),
                                                                           ranks, scal, None), "seg_starts")
        expect_error(f"multi_lora_bwd {n}", lambda v=v: ops.multi_lora_bwd(y, x, Sbuf, wA, wB, perm, seg_slots, i32(v),
                                                                           ranks, scal, None, True, True, None),
                     "seg_starts")
    # shapes the backward trusts
    bwd = lambda dy=y, S=Sbuf, dx=None, bt=None: ops.multi_lora_bwd(dy, x, S, wA, wB, perm, seg_slots,  # noqa: E731
                                                                      seg_starts, ranks, scal, dx, True, True, bt)
    expect_error("multi_lora_bwd dy rows", lambda: bwd(dy=torch.zeros(T - 1, N)), "dy")
    expect_error("multi_lora_bwd dy cols", lambda: bwd(dy=torch.zeros(T, N + 3)), "dy")
    expect_error("multi_lora_bwd S rows", lambda: bwd(S=torch.zeros(2, R)), "S")
    expect_error("multi_lora_bwd S cols", lambda: bwd(S=torch.zeros(4, R + 1)), "S")
    expect_error("multi_lora_bwd dx rows", lambda: bwd(dx=torch.zeros(T - 2, K)), "dx")
    expect_error("multi_lora_bwd dx cols", lambda: bwd(dx=torch.zeros(T, K + 1)), "dx")
    expect_error("multi_lora_bwd lora_B_t slots", lambda: bwd(bt=torch.zeros(1, R, N)), "lora_B_t")
    expect_error("multi_lora_bwd lora_B_t dims", lambda: bwd(bt=torch.zeros(S_, R, N + 1)), "lora_B_t")
    expect_error("multi_lora_fwd lora_B_t slots", lambda: ops.multi_lora_fwd(y, x, wA, wB, perm, seg_slots, seg_starts,
                                                                             ranks, scal, torch.zeros(1, R, N)),
                 "lora_B_t")
    expect_error("multi_lora_fwd y shape", lambda: ops.multi_lora_fwd(torch.zeros(T - 1, N), x, wA, wB, perm, seg_slots,
                                                                      seg_starts, ranks, scal, None), "y")
    expect_error("multi_lora_fwd x int", lambda: ops.multi_lora_fwd(y, x.long(), wA, wB, perm, seg_slots, seg_starts,
                                                                    ranks, scal, None), "floating")
    expect_error("multi_lora_fwd perm float", lambda: ops.multi_lora_fwd(y, x, wA, wB, perm.float(), seg_slots,
                                                                         seg_starts, ranks, scal, None), "perm")
    expect_error("multi_lora_fwd ranks short", lambda: ops.multi_lora_fwd(y, x, wA, wB, perm, seg_slots, seg_starts,
                                                                          ranks[:2], scal, None), "ranks")
    # outputs written in place whose elements share memory: expanded rows, or as_strided rows that overlap
    for n, mk in {"expanded": lambda r, c, dt: torch.zeros(1, c, dtype=dt).expand(r, c),
                  "overlapping": lambda r, c, dt: torch.zeros(r + c, dtype=dt).as_strided((r, c), (1, 1))}.items():
        for dt in (torch.float32, torch.bfloat16):
            xs, As, Bs = x.to(dt), wA.to(dt), wB.to(dt)
            expect_error(f"multi_lora_fwd y {n} {dt}", lambda mk=mk, dt=dt, xs=xs, As=As, Bs=Bs: ops.multi_lora_fwd(
                mk(T, N, dt), xs, As, Bs, perm, seg_slots, seg_starts, ranks, scal.double(), None), "y")
            expect_error(f"multi_lora_bwd dx {n} {dt}", lambda mk=mk, dt=dt, xs=xs, As=As, Bs=Bs: ops.multi_lora_bwd(
                torch.zeros(T, N, dtype=dt), xs, Sbuf.to(dt), As, Bs, perm, seg_slots, seg_starts, ranks,
                scal.double(), mk(T, K, dt), True, True, None), "dx")
            expect_error(f"bgmv_expand y {n} {dt}", lambda mk=mk, dt=dt, Bs=Bs: ops.bgmv_expand(
                mk(T, N, dt), Sbuf, Bs, perm, pos, ranks, scal), "y")
            expect_error(f"sgmv_expand y {n} {dt}", lambda mk=mk, dt=dt, Bs=Bs: ops.sgmv_expand(
                mk(T, N, dt), Sbuf, Bs, perm, seg_slots, seg_starts, ranks, scal, 2), "y")
            expect_error(f"lora_expand y {n} {dt}", lambda mk=mk, dt=dt: ops.lora_expand(
                mk(T, N, dt), torch.zeros(T, R), torch.randn(N, R).to(dt), None, 1.0), "y")
    expect_error("bgmv_shrink perm int64", lambda: ops.bgmv_shrink(x, wA, perm.long(), pos, ranks, scal), "perm")
    expect_error("bgmv_shrink pos_slots short", lambda: ops.bgmv_shrink(x, wA, perm, pos[:3], ranks, scal), "pos_slots")
    expect_error("bgmv_shrink w dims", lambda: ops.bgmv_shrink(x, wA[0], perm, pos, ranks, scal), "w")
    expect_error("bgmv_expand S rows", lambda: ops.bgmv_expand(y, torch.zeros(3, R), wB, perm, pos, ranks, scal), "perm")
    expect_error("bgmv_expand S fp16", lambda: ops.bgmv_expand(y, Sbuf.half(), wB, perm, pos, ranks, scal), "S")
    expect_error("sgmv_shrink scalings short", lambda: ops.sgmv_shrink(x, wA, perm, seg_slots, seg_starts, ranks,
                                                                       scal[:2], 2), "scalings")
    expect_error("sgmv_shrink max_count<0", lambda: ops.sgmv_shrink(x, wA, perm, seg_slots, seg_starts, ranks, scal,
                                                                    -1), "max_count")
    expect_error("lora_expand S rows", lambda: ops.lora_expand(y, torch.zeros(T + 1, R), torch.randn(N, R), None, 1.0),
                 "S")
    expect_error("lora_expand B cols", lambda: ops.lora_expand(y, torch.zeros(T, R), torch.randn(N, R + 1), None, 1.0),
                 "w")
    expect_error("lora_expand bias", lambda: ops.lora_expand(y, torch.zeros(T, R), torch.randn(N, R),
                                                             torch.randn(N + 1), 1.0), "bias")
    expect_error("group_by_adapter num_slots=0", lambda: ops.group_by_adapter(i32([0, 1]), 0), "num_slots")
    expect_error("group_by_adapter num_slots huge", lambda: ops.group_by_adapter(i32([0, 1]), 2**40), "num_slots")
    expect_error("group_by_adapter float ids", lambda: ops.group_by_adapter(torch.zeros(3), 2), "ids")
    expect_error("group_by_adapter 2-D ids", lambda: ops.group_by_adapter(torch.zeros(2, 2, dtype=torch.long), 2), "ids")
    expect_error("lora_dropout_shrink fp16", lambda: ops.lora_dropout_shrink(x.half(), wA[0].half(), 1, 2, 3, 5), "x")
    expect_error("lora_dropout_shrink K", lambda: ops.lora_dropout_shrink(x, torch.randn(R, K + 1), 1, 2, 3, 5), "columns")
    expect_error("lora_dropout_shrink key<0", lambda: ops.lora_dropout_shrink(x, wA[0], -1, 2, 3, 5), "")
    expect_error("lora_dropout_shrink thr>=2^32", lambda: ops.lora_dropout_shrink(x, wA[0], 1, 2, 3, 2**32), "")
    expect_error("lora_dropout_bwd dS rows", lambda: ops.lora_dropout_bwd(torch.zeros(T + 1, R), x, wA[0], 1, 2, 3, 5,
                                                                          True, True), "dS")
    expect_error("lora_dropout_bwd dS cols", lambda: ops.lora_dropout_bwd(torch.zeros(T, R + 1), x, wA[0], 1, 2, 3, 5,
                                                                          True, True), "dS")
    gk = [1, 2, 3, 5, 6, 7, 8, 9]  # two members' keys
    gA = [wA[0], wA[1]]
    expect_error("lora_dropout_shrink_group no members", lambda: ops.lora_dropout_shrink_group(x, [], []), "member")
    expect_error("lora_dropout_shrink_group keys short", lambda: ops.lora_dropout_shrink_group(x, gA, gk[:7]), "keys")
    expect_error("lora_dropout_shrink_group keys long", lambda: ops.lora_dropout_shrink_group(x, gA, gk + [1]), "keys")
    expect_error("lora_dropout_shrink_group key>=2^32", lambda: ops.lora_dropout_shrink_group(
        x, gA, gk[:6] + [2**32, 9]), "uint32")
    expect_error("lora_dropout_shrink_group A K", lambda: ops.lora_dropout_shrink_group(
        x, [wA[0], torch.randn(R, K + 1)], gk), "columns")
    expect_error("lora_dropout_shrink_group A 1-D", lambda: ops.lora_dropout_shrink_group(x, [wA[0], wA[1][0]], gk), "")
    expect_error("lora_dropout_shrink_group A int", lambda: ops.lora_dropout_shrink_group(
        x, [wA[0], wA[1].int()], gk), "float32")
    expect_error("lora_dropout_shrink_group x 3-D", lambda: ops.lora_dropout_shrink_group(x[None], gA, gk), "")
    gdS = [torch.zeros(T, R), torch.zeros(T, R)]
    expect_error("lora_dropout_bwd_group dS count", lambda: ops.lora_dropout_bwd_group(gdS[:1], x, gA, gk, True,
                                                                                        [1, 1]), "dS")
    expect_error("lora_dropout_bwd_group need_da count", lambda: ops.lora_dropout_bwd_group(gdS, x, gA, gk, True, [1]),
                 "need_da")
    expect_error("lora_dropout_bwd_group need_da value", lambda: ops.lora_dropout_bwd_group(gdS, x, gA, gk, True,
                                                                                             [1, -1]), "need_da")
    expect_error("lora_dropout_bwd_group dS rows", lambda: ops.lora_dropout_bwd_group(
        [gdS[0], torch.zeros(T + 1, R)], x, gA, gk, True, [1, 1]), "dS")
    expect_error("lora_dropout_bwd_group dS cols", lambda: ops.lora_dropout_bwd_group(
        [torch.zeros(T, R - 1), gdS[1]], x, gA, gk, False, [1, 1]), "dS")
    expect_error("lora_dropout_bwd_group dS 1-D", lambda: ops.lora_dropout_bwd_group(
        [gdS[0], torch.zeros(T)], x, gA, gk, True, [0, 0]), "")
    # valid calls at edge sizes: no rows, one column, many members of rank 1
    for M_, K_, n_ in ((0, K, 2), (5, 1, 3), (T, K, 9)):
        xs_ = torch.randn(M_, K_)
        As_ = [torch.randn(1, K_) for _ in range(n_)]
        ks_ = [v for i in range(n_) for v in (i, 2 * i, 3 * i, 2**31)]
        Ss = ops.lora_dropout_shrink_group(xs_, As_, ks_)
        dx_, dA_ = ops.lora_dropout_bwd_group([torch.ones(M_, 1)] * n_, xs_, As_, ks_, True, [1] * n_)
        case(f"lora_dropout_group M={M_} K={K_} n={n_}")
        if len(Ss) != n_ or any(s.shape != (M_, 1) for s in Ss) or dx_.shape != (M_, K_) or len(dA_) != n_:
            fail(f"lora_dropout_group M={M_} K={K_} n={n_}", "wrong output shapes")
    expect_error("dropout_keep_mask M<0", lambda: ops.dropout_keep_mask(-1, 4, 1, 2, 3, 5), "")
    expect_error("hash_dropout int", lambda: ops.hash_dropout(torch.ones(3, dtype=torch.int32), 1, 2, 3, 5, 1.5), "x")
    expect_error("hash_dropout bool", lambda: ops.hash_dropout(torch.ones(3, dtype=torch.bool), 1, 2, 3, 5, 1.5), "x")
    expect_error("hash_dropout key<0", lambda: ops.hash_dropout(x, 1, -2, 3, 5, 1.5), "uint32")
    expect_error("hash_dropout key>=2^32", lambda: ops.hash_dropout(x, 1, 2, 2**32, 5, 1.5), "uint32")
    expect_error("hash_dropout thr>=2^32", lambda: ops.hash_dropout(x, 1, 2, 3, 2**32, 1.5), "uint32")
    for bad in (0.5, float("nan"), float("inf"), -1.0):
        expect_error(f"hash_dropout scale={bad}", lambda bad=bad: ops.hash_dropout(x, 1, 2, 3, 5, bad), "scale")
    # any shape, stride and size (0-d and empty included): the definition, element by element
    from peft_kernels.ops import _torch_dropout as _td
    for name, t in {"0-d": torch.tensor(2.5), "empty": torch.zeros(0, 7), "strided": torch.randn(9, 31)[::2, 1::3],
                    "transposed 3-D": torch.randn(4, 5, 6).transpose(0, 2), "bf16": torch.randn(33).bfloat16(),
                    "odd 1-D": torch.randn(4099)}.items():
        case(f"hash_dropout {name}")
        got = ops.hash_dropout(t, 7, 8, 9, 2**31, 2.0)
        k = _td.Keys(7, 8, 9, 2**31)
        idx = torch.arange(t.numel(), dtype=torch.int64)
        h = _td._fmix32(_td._fmix32(_td._fmix32((idx & 0xFFFFFFFF) ^ k.k0) ^ (idx >> 32) ^ k.k1) ^ k.k2)
        want = (t.contiguous().reshape(-1) * ((h >= k.thr).float() * 2.0)).to(t.dtype).view(t.shape)
        if got.shape != t.shape or not torch.equal(got, want):
            fail(f"hash_dropout {name}", "differs from the mask's definition")
        results["checked"] += 1
    # ranks past R (or negative) are clamped to [0, R]: the same result as the clamped ranks, no error
    for n, rk in {"ranks>R": [9, 0, 2**31 - 1], "ranks<0": [-4, 0, -2**31]}.items():
        clamped = i32([min(max(v, 0), R) for v in rk])
        for op, args in (("bgmv_shrink", (x, wA, perm, pos)), ("sgmv_shrink", (x, wA, perm, seg_slots, seg_starts))):
            case(f"{op} {n}")
            tail = (scal, 2) if op == "sgmv_shrink" else (scal,)
            got = getattr(ops, op)(*args, i32(rk), *tail)
            want = getattr(ops, op)(*args, clamped, *tail)
            if not torch.equal(got, want):
                fail(f"{op} {n}", "not the clamped result")
        case(f"multi_lora_fwd {n}")
        y1, y2 = torch.zeros(T, N), torch.zeros(T, N)
        s1 = ops.multi_lora_fwd(y1, x, wA, wB, perm, seg_slots, seg_starts, i32(rk), scal, None)
        s2 = ops.multi_lora_fwd(y2, x, wA, wB, perm, seg_slots, seg_starts, clamped, scal, None)
        if not (torch.equal(y1, y2) and torch.equal(s1, s2)):
            fail(f"multi_lora_fwd {n}", "not the clamped result")


# ------------------------------------------------------------------------------------------ raw_random
def group_raw_random(examples):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ops = _ext.ops()
    cfg = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))

    @st.composite
    def problems(draw):
        T = draw(st.integers(0, 40))
        S_ = draw(st.integers(1, 5))
        R = draw(st.integers(1, 9))
        K = draw(st.integers(1, 20))
        N = draw(st.integers(1, 20))
        ids = draw(st.lists(st.integers(-1, S_ - 1), min_size=T, max_size=T))
        ranks = draw(st.lists(st.integers(-2, R + 3), min_size=S_, max_size=S_))
        # one corruption (or none): which index tensor, where, what value
        target = draw(st.sampled_from(["none", "perm", "pos_slots", "seg_slots", "seg_starts"]))
        where = draw(st.integers(0, 1000))
        value = draw(st.one_of(st.integers(-3, 45), st.sampled_from([2**31 - 1, -2**31])))
        op = draw(st.sampled_from(["bgmv_shrink", "bgmv_expand", "sgmv_shrink", "sgmv_expand", "multi_lora_fwd",
                                   "multi_lora_bwd"]))
        strided = draw(st.booleans())
        return T, S_, R, K, N, ids, ranks, target, where, value, op, strided

    @cfg
    @given(problems())
    def run(p):
        T, S_, R, K, N, ids, ranks, target, where, value, op, strided = p
        name = f"raw_random {op} T={T} S={S_} R={R} K={K} N={N} {target}@{where}={value} strided={strided}"
        case(name)
        g = torch.Generator().manual_seed(where * 7919 + T)
        perm, pos, seg_slots, seg_starts, _ = ops.group_by_adapter(torch.tensor(ids, dtype=torch.long), S_)
        idx = {"perm": perm.clone(), "pos_slots": pos.clone(), "seg_slots": seg_slots.clone(),
               "seg_starts": seg_starts.clone()}
        if target != "none" and idx[target].numel():
            idx[target][where % idx[target].numel()] = value
        perm, pos, seg_slots, seg_starts = idx["perm"], idx["pos_slots"], idx["seg_slots"], idx["seg_starts"]
        rk, scal = i32(ranks), torch.rand(S_, generator=g) + 0.5
        x = torch.randn(T, 2 * K if strided else K, generator=g)
        x = x[:, ::2] if strided else x  # a real column stride
        A = torch.randn(S_, R, K, generator=g)
        B = torch.randn(S_, N, R, generator=g)
        Ta = perm.numel()
        if op.startswith("bgmv"):
            valid = mapping_valid(perm, T, [pos], S_)
            pos_list = pos.tolist()
        else:
            valid = mapping_valid(perm, T, [seg_slots], S_, seg_starts)
            pos_list = slots_of_positions(seg_slots, seg_starts) if valid else None
        try:
            if op in ("bgmv_shrink", "sgmv_shrink"):
                out = (ops.bgmv_shrink(x, A, perm, pos, rk, scal) if op == "bgmv_shrink" else
                       ops.sgmv_shrink(x, A, perm, seg_slots, seg_starts, rk, scal, max(1, Ta)))
                want = ref_shrink(x, A, perm, pos_list, rk, scal) if valid else None
            elif op in ("bgmv_expand", "sgmv_expand"):
                Sb = torch.randn(Ta, R, generator=g)
                y0 = torch.randn(T, N, generator=g)
                out = y0.clone()
                if op == "bgmv_expand":
                    ops.bgmv_expand(out, Sb, B, perm, pos, rk, scal)
                else:
                    ops.sgmv_expand(out, Sb, B, perm, seg_slots, seg_starts, rk, scal, 1)  # max_count too small
                want = ref_expand(y0, Sb, B, perm, pos_list, rk, scal) if valid else None
            elif op == "multi_lora_fwd":
                y0 = torch.randn(T, N, generator=g)
                out = y0.clone()
                Sg = ops.multi_lora_fwd(out, x, A, B, perm, seg_slots, seg_starts, rk, torch.ones(S_), None)
                if valid:
                    S64 = ref_shrink(x, A, perm, pos_list, rk, None)
                    close(Sg, S64, name, "S")
                    want = ref_expand(y0, S64, B, perm, pos_list, rk, torch.ones(S_))
            else:
                dy = torch.randn(T, N, generator=g)
                Sg = torch.randn(Ta, R, generator=g)
                dx = torch.zeros(T, K)
                dA, dB = ops.multi_lora_bwd(dy, x, Sg, A, B, perm, seg_slots, seg_starts, rk, scal, dx, True, True,
                                            None)
                if valid:
                    dA64, dB64 = torch.zeros(S_, R, K, dtype=torch.float64), torch.zeros(S_, N, R, dtype=torch.float64)
                    dx64 = torch.zeros(T, K, dtype=torch.float64)
                    for p_, (t, a) in enumerate(zip(perm.tolist(), pos_list)):
                        r = min(max(ranks[a], 0), R)
                        s = float(scal[a])
                        dS = s * (B[a, :, :r].double().t() @ dy[t].double())
                        dx64[t] += A[a, :r].double().t() @ dS
                        dA64[a, :r] += torch.outer(dS, x[t].double())
                        dB64[a, :, :r] += s * torch.outer(dy[t].double(), Sg[p_, :r].double())
                    close(dA, dA64, name, "dA")
                    close(dB, dB64, name, "dB")
                    out, want = dx, dx64
        except OK_ERRORS as e:
            results["refused"] += 1
            if valid:
                fail(name, f"a valid call raised {type(e).__name__}: {e}")
            return
        except Exception as e:  # noqa: BLE001
            fail(name, f"raised {type(e).__name__}: {e}")
            return
        if not valid:
            fail(name, "an invalid mapping was accepted")
            return
        close(out, want, name, "output")
        results["checked"] += 1

    run()


# ------------------------------------------------------------------------------------------ public
def group_public(examples):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from peft_kernels.reference import lora_linear_ref, multi_lora_linear_ref

    cfg = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))
    backends = [b for b in ("torch", "triton") if pk.dispatch.unavailable_reason(b, torch.device("cpu")) is None]

    @st.composite
    def problems(draw):
        return dict(
            lead=draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)),
            K=draw(st.integers(1, 24)), N=draw(st.integers(1, 24)), r=draw(st.integers(1, 9)),
            S=draw(st.integers(1, 4)), dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16,
                                                                   torch.float64])),
            backend=draw(st.sampled_from(backends)), bias=draw(st.booleans()), strided=draw(st.booleans()),
            scaling=draw(st.sampled_from([0.5, 2.0, 0.0, -1.5, float("nan"), float("inf")])),
            poison=draw(st.sampled_from(["none", "nan_x", "inf_w"])),
            bad_id=draw(st.sampled_from([None, -2, 99])), op=draw(st.sampled_from(["lora", "multi", "module"])),
            grad=draw(st.booleans()))

    @cfg
    @given(problems())
    def run(p):
        name = "public " + " ".join(f"{k}={v}" for k, v in p.items())
        case(name)
        g = torch.Generator().manual_seed(len(name))
        dt, K, N, r, S_ = p["dtype"], p["K"], p["N"], p["r"], p["S"]
        x = torch.randn(*p["lead"], 2 * K if p["strided"] else K, generator=g)
        x = (x[..., ::2] if p["strided"] else x).to(dt)
        if p["poison"] == "nan_x" and x.numel():
            x.view(-1)[0] = float("nan")
        W = torch.randn(N, K, generator=g).to(dt)
        if p["poison"] == "inf_w":
            W[0, 0] = float("inf")
        b = torch.randn(N, generator=g).to(dt) if p["bias"] else None
        T = x.numel() // K if K else 0
        try:
            if p["op"] == "lora":
                A = (torch.randn(r, K, generator=g) * 0.3).to(dt).requires_grad_(p["grad"])
                Bm = (torch.randn(N, r, generator=g) * 0.3).to(dt).requires_grad_(p["grad"])
                y = pk.lora_linear(x, W, b, A, Bm, p["scaling"], backend=p["backend"])
                want = lora_linear_ref(x.double(), W.double(), None if b is None else b.double(), A.double(),
                                       Bm.double(), p["scaling"])
                if p["grad"] and y.numel():
                    y.float().sum().backward()
            else:
                A = (torch.randn(S_, r, K, generator=g) * 0.3).to(dt)
                Bm = (torch.randn(S_, N, r, generator=g) * 0.3).to(dt)
                ids = torch.randint(-1, S_, (T,), generator=g)
                if p["bad_id"] is not None and T:
                    ids[0] = p["bad_id"]
                scal = [p["scaling"]] * S_
                if p["op"] == "multi":
                    y = pk.multi_lora_linear(x, W, b, A, Bm, scal, ids, backend=p["backend"])
                else:
                    lin = torch.nn.Linear(K, N, bias=p["bias"], dtype=dt)
                    with torch.no_grad():
                        lin.weight.copy_(W)
                        if b is not None:
                            lin.bias.copy_(b)
                    m = pk.MultiLoRALinear.from_linear(lin, max_adapters=S_, max_rank=r, backend=p["backend"])
                    for a in range(S_):
                        m.set_adapter(a, A[a], Bm[a], p["scaling"])
                    y = m(x, ids)
                want = multi_lora_linear_ref(x.double(), W.double(), None if b is None else b.double(), A.double(),
                                             Bm.double(), torch.tensor(scal, dtype=torch.float64), ids)
        except (OK_ERRORS + (pk.BackendUnavailable,)):
            results["refused"] += 1  # a documented refusal (bad ids, non-finite scaling, a dtype the backend lacks)
            return
        except Exception as e:  # noqa: BLE001
            fail(name, f"raised {type(e).__name__}: {e}")
            return
        if p["bad_id"] is not None and T and p["op"] != "lora":
            fail(name, "a bad adapter id was accepted")
        if y.shape != want.shape or y.dtype != dt:
            fail(name, f"shape/dtype {tuple(y.shape)} {y.dtype}, want {tuple(want.shape)} {dt}")
            return
        # same non-finite pattern as the reference where it is all finite; a loose bound elsewhere
        fin = torch.isfinite(want)
        if p["poison"] == "none" and math.isfinite(p["scaling"]):
            if not torch.isfinite(y.double()[fin]).all():
                fail(name, "non-finite output where the reference is finite")
            tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dt]
            err = (y.double() - want).abs()[fin]
            scale = 1.0 + (want.abs()[fin].max().item() if fin.any() else 0.0)
            if err.numel() and err.max().item() > tol * scale * max(1, K):
                fail(name, f"max |err| {err.max().item():.3e} > {tol * scale * max(1, K):.3e}")
            results["checked"] += 1

    run()


# ------------------------------------------------------------------------------------------ checkpoint
def group_checkpoint(examples):
    import copy
    import tempfile

    import torch.nn as nn
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from safetensors.torch import save_file

    from peft_kernels import checkpoint as ck

    cfg_settings = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                            suppress_health_check=list(HealthCheck))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(6, 6)
            self.v = nn.Linear(6, 4)

    torch.manual_seed(0)
    src = Net()
    pk.inject_lora(src, ["q", "v"], r=2, lora_alpha=4, init_lora_weights=False)
    base_dir = tempfile.mkdtemp()
    pk.save_peft_adapter(src, base_dir)
    base_cfg = json.load(open(os.path.join(base_dir, "adapter_config.json")))
    base_sd = ck._read_weights(base_dir)
    json_values = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-10 ** 40, 10 ** 40), st.floats(allow_nan=True),
                  st.text(max_size=8), st.sampled_from(["(", "[", ".*", "q", "v", "false", "true", "../x"])),
        lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=4), kids, max_size=3)),
        max_leaves=6)
    keys = sorted(base_cfg) + ["exclude_modules", "layers_to_transform"]

    @cfg_settings
    @given(st.dictionaries(st.sampled_from(keys), json_values, max_size=3),
           st.sampled_from(["none", "shape", "dtype", "nan", "extra", "drop"]), st.integers(0, 3),
           st.sampled_from(["plain", "slot"]), st.sampled_from([None, "../x", "sub", "/tmp", ".."]))
    def run(changes, weights, which, target, adapter_name):
        name = f"checkpoint {changes!r} weights={weights}@{which} {target} adapter_name={adapter_name!r}"[:400]
        case(name)
        with tempfile.TemporaryDirectory() as d:
            cfg = dict(base_cfg)
            cfg.update(changes)
            with open(os.path.join(d, "adapter_config.json"), "w") as f:
                json.dump(cfg, f)
            sd = {k: v.clone() for k, v in base_sd.items()}
            k = sorted(sd)[which % len(sd)]
            if weights == "shape":
                sd[k] = torch.zeros(3, 3)
            elif weights == "dtype":
                sd[k] = sd[k].to(torch.int32)
            elif weights == "nan":
                sd[k][0, 0] = float("nan")
            elif weights == "extra":
                sd["base_model.model.q.lora_C.weight"] = torch.zeros(1)
            elif weights == "drop":
                del sd[k]
            save_file(sd, os.path.join(d, "adapter_model.safetensors"))
            torch.manual_seed(1)
            m = Net()
            if target == "slot":
                for n in ("q", "v"):
                    setattr(m, n, pk.MultiLoRALinear.from_linear(getattr(m, n), max_adapters=2, max_rank=4))
            before = copy.deepcopy(m.state_dict())
            kinds = [type(x) for x in m.modules()]
            try:
                pk.load_peft_adapter(m, d, slot=0 if target == "slot" else None, adapter_name=adapter_name)
            except (pk.CheckpointError, ValueError, TypeError):
                results["refused"] += 1
                if [type(x) for x in m.modules()] != kinds or any(
                        not torch.equal(before[kk], vv) for kk, vv in m.state_dict().items()):
                    fail(name, "a refused load changed the model")
                return
            except Exception as e:  # noqa: BLE001
                fail(name, f"raised {type(e).__name__} (not a CheckpointError): {e}")
                return
            results["checked"] += 1
            if adapter_name is not None:
                fail(name, "loaded with an adapter_name whose subfolder does not exist")
            if weights != "none":
                fail(name, f"accepted corrupted weights ({weights})")

    run()


def group_dequant(examples):
    """dequantize_4bit (csrc/cpu/dequant.cpp) with random sizes, block sizes and buffers that may be too short or
    mistyped: it raises ValueError/TypeError, or returns what a float64 torch reference of the same formula says
    (bit for bit in fp32: one product, as the op computes it)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    op = _ext.ops().dequantize_4bit
    cfg = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))

    @cfg
    @given(N=st.integers(0, 9), K=st.integers(0, 70), bs=st.sampled_from([1, 2, 3, 16, 32, 64, 4096]),
           dpack=st.integers(-2, 2), dabs=st.integers(-2, 2), ncode=st.sampled_from([16, 16, 16, 15, 17]),
           dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
           pdt=st.sampled_from([torch.uint8, torch.uint8, torch.int8]), strided=st.booleans(), seed=st.integers(0, 99))
    def run(N, K, bs, dpack, dabs, ncode, dtype, pdt, strided, seed):
        name = f"dequant N={N} K={K} bs={bs} dpack={dpack} dabs={dabs} code={ncode} {dtype} {pdt} strided={strided}"
        case(name)
        g = torch.Generator().manual_seed(seed)
        nbytes = max(0, (N * K + 1) // 2 + dpack)
        nblk = max(0, -(-(N * K) // bs) + dabs)
        packed = torch.randint(0, 256, (2 * nbytes if strided else nbytes,), generator=g).to(torch.uint8)
        packed = packed[::2] if strided else packed
        packed = packed.view(torch.int8) if pdt == torch.int8 else packed
        absmax = torch.rand(nblk, generator=g) * 4
        code = torch.randn(ncode, generator=g)
        try:
            out = op(packed, absmax, code, bs, N, K, dtype)
        except OK_ERRORS:
            results["refused"] += 1
            if dpack >= 0 and dabs >= 0 and ncode == 16 and pdt == torch.uint8 and dtype != torch.float64:
                fail(name, "a valid call was refused")
            return
        except Exception as e:  # noqa: BLE001
            fail(name, f"raised {type(e).__name__}: {e}")
            return
        if dpack < 0 and N * K or dabs < 0 and N * K or ncode != 16 or pdt != torch.uint8 or dtype == torch.float64:
            fail(name, "an invalid call was accepted")
            return
        e = torch.arange(N * K)
        byte = packed[e // 2].to(torch.int64)
        nib = torch.where(e % 2 == 0, byte >> 4, byte & 15)
        want = (code[nib] * absmax[e // bs]).to(dtype).reshape(N, K)
        results["checked"] += 1
        if out.dtype != dtype or out.shape != (N, K) or not torch.equal(out, want):
            fail(name, f"wrong result: dtype {out.dtype} shape {tuple(out.shape)}")

    run()


GROUPS = {"raw_bad": group_raw_bad, "raw_random": group_raw_random, "public": group_public,
          "checkpoint": group_checkpoint, "dequant": group_dequant}

if __name__ == "__main__":
    group = sys.argv[1]
    examples = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    torch.manual_seed(0)
    try:
        GROUPS[group](examples)
    except Exception:  # noqa: BLE001  (a harness error is a failure too)
        results["failures"].append("harness: " + traceback.format_exc())
    print(json.dumps(results), flush=True)
