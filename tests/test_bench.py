"""The benchmark runs end to end (tiny shapes) and its memory accounting is right.

No timing assertions here: speed targets live in the benchmark report, never in tests.
"""
import json

import torch

from peft_kernels.bench import lora
from peft_kernels.bench.__main__ import main
from peft_kernels.bench.common import saved_activation_bytes


def test_cli_quick_runs(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("nn.Linear (frozen)", "PEFT LoRA", "reference", "ours (torch)"):
        assert name in text
    rows = json.loads(out.read_text())["rows"]
    timed = [r for r in rows if "skipped" not in r and r["op"] == "lora"]
    assert {r["mode"] for r in timed} == {"fwd", "fwd+bwd"} and {r["p"] for r in timed} == {0.0, 0.1}
    assert all(r["median_ms"] > 0 and r["ratio_to_frozen"] > 0 for r in timed)
    # the multi-adapter section: PEFT's adapter_names path, ours, LoRA parts, and ours agreeing with PEFT
    assert "PEFT adapter_names" in text and "LoRA part" in text
    multi = [r for r in rows if "skipped" not in r and r["op"] == "multi_lora"]
    assert {r["adapters"] for r in multi} == {1, 5}
    ours = [r for r in multi if r["provider"] == "ours (torch)" and r["mode"] == "fwd"]
    assert ours and all(r["max_abs_diff_vs_peft"] < 1e-4 and "peft_part_over_ours" in r for r in ours)
    assert any(r["provider"] == "ours (torch)" and r["mode"] == "fwd+bwd" for r in multi)
    # the bottleneck-adapter section: both placements, every provider, both modes, with the FLOP floor
    ad = [r for r in rows if r["op"] == "adapter"]
    assert {(r["adapter_mode"], r["provider"], r["mode"]) for r in ad} == {
        (am, p, m) for am in ("sequential", "parallel") for m in ("fwd", "fwd+bwd")
        for p in ("nn.Linear (frozen)", "nn.Linear (frozen, control)", "unfused nn modules", "ours (AdapterLinear)")}
    assert all(r["flop_floor"] > 1 and r["median_ms"] > 0 for r in ad)


def test_saved_bytes_accounting():
    """Ours saves x + S only (at any p); PEFT saves an extra dropped copy at p > 0; frozen saves none."""
    M, K, N, r = 48, 40, 24, 4
    rows = lora.run(M, K, N, r, rounds=1, warmup=0, modes=("fwd",), backends=("torch",))
    saved = {(row["provider"], row["p"]): row["saved_bytes"] for row in rows if "skipped" not in row}
    xb = M * K * 4
    for p in (0.0, 0.1):
        assert saved[(lora.FROZEN, p)] == 0
        assert saved[("ours (torch)", p)] == xb + M * r * 4
    assert saved[("PEFT LoRA", 0.1)] >= 2 * xb


def test_saved_bytes_dedups_views_and_skips_params():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    # x is saved twice through views; w is a parameter
    n = saved_activation_bytes(lambda: (x[:2] * x[2:]).sum() + (x @ w).sum(), [w])
    assert n == x.numel() * 4


def test_multi_bytes_model():
    from peft_kernels.bench.multi_lora import bytes_model

    # 2 adapters of rank 4 and 8, K=10, N=6, 3 active tokens, fp16: A+B per adapter at its true rank
    assert bytes_model(3, 10, 6, [4, 8], 2) == (4 * 16 + 8 * 16) * 2 + 3 * 10 * 2 + 2 * 3 * 8 * 4 + 2 * 3 * 6 * 2


def test_adapter_flop_floor():
    from peft_kernels.bench.adapter import flop_floor

    assert abs(flop_floor(4096, 4096, 256, "sequential", fwd_only=False) - (1 + 3 * 256 / 4096)) < 1e-12
    assert abs(flop_floor(4096, 4096, 256, "parallel", fwd_only=True) - (1 + 2 * 256 / 4096)) < 1e-12
