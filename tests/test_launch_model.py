"""The GPU launch model (peft_kernels.bench.launch_model): its arithmetic, its FLOPs against the traffic
model's independent formulas, and the CLI on the Llama-3-8B shapes (grids from the real launchers)."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from peft_kernels.bench import launch_model as LM
from peft_kernels.bench import traffic

GPU = LM.GPU("test", sms=100, tflops=100.0, tbs=1.0)  # 1e14 FLOP/s, 1e12 B/s


def test_per_launch_arithmetic():
    # a library call fills the machine: the larger of compute and memory time
    lib = LM.Launch("peft", "mm", flops=1e10, bytes=5e7).model(GPU)
    assert lib.modelled["compute_us"] == pytest.approx(100.0) and lib.modelled["memory_us"] == pytest.approx(50.0)
    assert lib.modelled["us"] == pytest.approx(100.0) and lib.modelled["bound"] == "compute"
    # our Triton GEMM launches run at the measured fraction of cuBLAS's rate; a library GEMM at the full rate
    g = LM.GPU("test", 100, 100.0, 1.0, triton_gemm_eff=0.5)
    ours = LM.Launch("triton", "fwd_gemm", flops=1e10, bytes=0.0, programs=100).model(g)
    other = LM.Launch("triton", "shrink", flops=1e10, bytes=0.0, programs=100).model(g)
    assert ours.modelled["compute_us"] == pytest.approx(200.0) and other.modelled["compute_us"] == pytest.approx(100.0)
    assert LM.Launch("peft", "fwd_gemm", flops=1e10, bytes=0.0).model(g).modelled["us"] == pytest.approx(100.0)
    assert LM.GPUS["h200"].triton_gemm_eff == pytest.approx(0.66)
    # half a wave: half the machine, so twice the time
    half = LM.Launch("triton", "k", flops=1e10, bytes=0.0, programs=50).model(GPU)
    assert half.modelled["utilisation"] == 0.5 and half.modelled["us"] == pytest.approx(200.0)
    # 1.5 waves: the last wave costs a whole one (padded-wave factor 2 / 1.5)
    pad = LM.Launch("triton", "k", flops=0.0, bytes=1e8, programs=150).model(GPU)
    assert pad.modelled["waves"] == 1.5 and pad.modelled["padded_wave_factor"] == pytest.approx(2 / 1.5)
    assert pad.modelled["us"] == pytest.approx(100.0 * 2 / 1.5) and pad.modelled["bound"] == "memory"
    # a tiny launch costs at least the launch floor
    tiny = LM.Launch("peft", "add", flops=0.0, bytes=10.0).model(GPU)
    assert tiny.modelled["us"] == LM.MIN_KERNEL_US


@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 16), (4096, 4096, 14336, 16), (77, 300, 500, 8)])
def test_graph_flops_match_the_traffic_model(M, K, N, r):
    want = traffic.lora(M, K, N, r, 2)
    for launches in (LM.peft_lora_launches(M, K, N, r, 2, backward=False), LM.torch_lora_launches(M, K, N, r, 2, False)):
        assert sum(la.flops for la in launches) == pytest.approx(want["fwd"].flops)
    for launches in (LM.peft_lora_launches(M, K, N, r, 2), LM.torch_lora_launches(M, K, N, r, 2)):
        assert sum(la.flops for la in launches) == pytest.approx(want["full"].flops)


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """The CLI's output folder and stdout (it re-executes itself without the interpreter: the real configs)."""
    out = tmp_path_factory.mktemp("model")
    env = dict(os.environ)  # the CLI re-executes itself without TRITON_INTERPRET (the conftest sets it)
    proc = subprocess.run([sys.executable, "-m", "peft_kernels.bench", "--model", "h200", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(scope="module")
def model_rows(model_run):
    out, stdout = model_run
    assert "LAUNCH MODEL (a model, not a measurement" in stdout
    assert (out / "model.csv").read_text().count("\n") == 1 + 3 * 4 * 2 * 4  # shapes × M × modes × providers
    return json.loads((out / "model.json").read_text()), stdout


def test_cli_rows_use_the_launchers_grids(model_rows):
    rows, _ = model_rows
    tri = {(r["shape"], r["M"], r["mode"]): r for r in rows if r["provider"] == "triton"}
    assert len(tri) == 24
    for (shape, M, mode), r in tri.items():
        kernels = [p["kernel"] for p in r["per_launch"]]
        if M <= 64:  # the fused decode path: S inside the GEMM, dS inside dX, dB inside the dA launch
            assert kernels == ["fwd_gemm"] + (["bwd_dx", "bwd_da"] if mode == "fwd+bwd" else [])
        else:  # sm_90: the persistent TMA GEMMs, whose programs are their output tiles (the grid is ≤ the SMs)
            assert kernels == (["shrink", "fwd_gemm_tma"]
                               + (["bwd_dy", "bwd_dx_tma", "bwd_da"] if mode == "fwd+bwd" else []))
        for p in r["per_launch"]:
            if p["kernel"].endswith("_tma"):
                assert p["grid"] == [min(132, p["programs"])]
            else:
                assert p["programs"] == math.prod(p["grid"])
            assert p["waves"] == pytest.approx(p["programs"] / 132)
    # FLOPs of the recorded launches equal the traffic model's (independent formulas)
    for (shape, M, mode), r in tri.items():
        want = traffic.lora(M, r["K"], r["N"], 16, 2)["full" if mode == "fwd+bwd" else "fwd"].flops
        assert sum(p["flops"] for p in r["per_launch"]) == pytest.approx(want)
    # decode q_proj: the 16×32 tile's 128 programs would be under one wave; 16×16 gives 256, for dX too;
    # the dA launch 128 + 64 programs at a 32-wide K tile
    q1 = tri[("q_proj", 1, "fwd+bwd")]["per_launch"]
    assert [p["programs"] for p in q1] == [256, 256, 192]
    # prefill q_proj: 64 row blocks × 3 K splits; the GEMM 32 × 32 tiles of 128; dY 64 row programs × 3 N splits
    q4k = tri[("q_proj", 4096, "fwd+bwd")]["per_launch"]
    assert q4k[0]["grid"] == [64, 1, 3] and q4k[1]["programs"] == 1024 and q4k[2]["grid"] == [64, 1, 3]
    # every launch at these shapes fills the H200's 132 SMs
    under = [(key, p["kernel"], p["programs"]) for key, r in tri.items() for p in r["per_launch"] if p["programs"] < 132]
    assert under == [] and all(r["under_one_wave"] == [] for r in tri.values()), under


def test_auto_never_loses_to_peft_in_the_model(model_rows):
    rows, out = model_rows
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["M"], r["mode"]), {})[r["provider"]] = r["modelled_us"]
    for key, t in by.items():
        assert t["auto"] == min(t["triton"], t["torch"]), key
        assert t["auto"] <= t["peft"], key
    assert "auto against PEFT: worst case" in out and "Triton launches under one wave: 0" in out


def test_multi_adapter_model(model_run):
    """32 adapters: every Triton launch fills the H200 and is priced below the per-adapter loop; the CLI prints
    the table; the path is the one choose_path picks (SGMV for 128-token segments, BGMV at decode)."""
    folder, out = model_run
    rows = json.loads((folder / "model_multi.json").read_text())
    assert (folder / "model_multi.csv").read_text().count("\n") == 1 + 3 * 2 * 2  # batches × modes × providers
    tri = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == "triton"}
    assert len(tri) == 6 and all(r["under_one_wave"] == [] for r in tri.values())
    assert all(r["vs_loop"] < 0.5 for r in tri.values())  # the target, in the model
    assert tri[("distinct 32×128", "fwd")]["path"] == "sgmv" and tri[("decode 32×1", "fwd")]["path"] == "bgmv"
    shrink = [p for p in tri[("decode 32×1", "fwd")]["per_launch"] if p["kernel"] == "bgmv_shrink"]
    assert [p["grid"] for p in shrink] == [[32, 8]]  # rank tile 2: 32 tokens × 8 rank blocks
    # FLOPs: the base GEMM and the LoRA terms, as the traffic model counts them for T tokens
    d = tri[("distinct 32×128", "fwd+bwd")]
    assert sum(p["flops"] for p in d["per_launch"]) == pytest.approx(traffic.lora(4096, 4096, 4096, 16, 2)["full"].flops)
    assert "MULTI-ADAPTER LAUNCH MODEL" in out and "Triton launches under one wave: 0" in out.split("MULTI")[1]


def test_other_ops_waves(model_run):
    """DoRA's launches (LoRA's kernels) and (IA)³'s fill the machine at every Llama shape; the report covers the
    bottleneck placements too: every launch fills the machine at M = 4096 (the shrink splits K, the dY launch N),
    and at decode the shrink and dY launches run 16 programs (the split cap; 1 before), and the CLI prints it."""
    folder, out = model_run
    rows = json.loads((folder / "model_waves.json").read_text())
    assert len(rows) == 5 * 3 * 4  # ops × shapes × M
    ops = {r["op"] for r in rows}
    assert ops == {"dora", "ia3 (output scaling)", "ia3 (input scaling)", "adapter parallel", "adapter sequential"}
    assert all(r["under_one_wave"] == [] for r in rows if r["op"] == "dora" or r["op"].startswith("ia3"))
    dora1 = next(r for r in rows if r["op"] == "dora" and r["M"] == 1 and r["shape"] == "q_proj")
    assert [la["kernel"] for la in dora1["launches"]] == ["fwd_gemm", "bwd_dx", "bwd_da"]
    for r in rows:
        if r["op"].startswith("adapter"):
            if r["M"] == 4096:
                assert r["under_one_wave"] == [], r
            else:
                assert sorted(r["under_one_wave"]) == sorted(["bwd_dy"] + (["adapter_shrink"] if "parallel" in r["op"]
                                                                           else [])), r
                assert all(la["programs"] == 16 for la in r["launches"] if la["kernel"] in r["under_one_wave"]), r
    dora4k = next(r for r in rows if r["op"] == "dora" and r["M"] == 4096 and r["shape"] == "q_proj")
    assert [la["kernel"] for la in dora4k["launches"]] == ["shrink", "fwd_gemm_tma", "bwd_dy", "bwd_dx_tma", "bwd_da"]
    for r in rows:
        for la in r["launches"]:
            if la["kernel"].endswith("_tma"):  # persistent: programs counts the output tiles the grid walks
                cols = r["N"] if la["kernel"] == "fwd_gemm_tma" else r["K"]
                assert la["grid"] == [min(132, la["programs"])] and la["programs"] == -(-r["M"] // 128) * -(-cols // 128)
            else:
                assert la["programs"] == math.prod(la["grid"])
            assert la["waves"] == pytest.approx(la["programs"] / 132)
    assert "OTHER OPS, LAUNCH WAVES" in out


def test_break_even_gemm_rate(model_rows):
    """Where the fused path loses at prefill, the model states the GEMM rate at which it would tie our torch path:
    re-modelled at that rate the Triton launches take the torch path's time; a rate below it still loses."""
    rows, out = model_rows
    g = LM.GPUS["h200"]
    tri = {(r["shape"], r["M"], r["mode"]): r for r in rows if r["provider"] == "triton"}
    tor = {(r["shape"], r["M"], r["mode"]): r["modelled_us"] for r in rows if r["provider"] == "torch"}
    losing = [k for k, r in tri.items() if r["modelled_us"] > tor[k]]
    assert {k for k in tri if k[1] == 4096} <= set(losing)

    def total(k, rate):
        gg = dataclasses.replace(g, triton_gemm_eff=rate)
        return sum(LM.Launch("triton", p["kernel"], p["flops"], p["bytes"], p["programs"]).model(gg).modelled["us"]
                   for p in tri[k]["per_launch"])

    for k in losing:
        eff = tri[k]["break_even_gemm_eff"]
        if eff is None:  # memory-bound (mlp_up's decode GEMV forward): no GEMM rate up to 2× cuBLAS's ties
            assert k[1] <= 64 and total(k, 2.0) > tor[k], k
            continue
        assert g.triton_gemm_eff < eff < 2.0, (k, eff)
        assert total(k, eff) == pytest.approx(tor[k], rel=1e-6) and total(k, 0.98 * eff) > tor[k]
    assert any(tri[k]["break_even_gemm_eff"] for k in losing) and "at which it would tie" in out
    # a case the fused path wins needs no more than the modelled rate
    assert tri[("q_proj", 1, "fwd+bwd")]["break_even_gemm_eff"] <= g.triton_gemm_eff
