"""The measured "auto" dispatch (peft_kernels.dispatch.Tuner), driven on the CPU with injected timings:
the choice, its memory and disk caches, their invalidation, the static rules where measuring is not
allowed (torch.compile tracing, CUDA-graph capture, PEFT_KERNELS_AUTOTUNE=0), and the ops' integration."""
import json
import os
import threading

import pytest
import torch

import peft_kernels as pk
from peft_kernels import dispatch
from peft_kernels.ops import lora as lora_ops

CPU = torch.device("cpu")
V1 = {"peft_kernels": "0.1.0", "torch": "2.13.0", "triton": "3.8.0", "cuda": "None", "tma": "1"}


class FakeTimer:
    """Returns the injected milliseconds per backend, after running the candidate once (so a failing
    candidate fails as it would under the real timer)."""

    def __init__(self, ms):
        self.ms = dict(ms)
        self.calls = []

    def __call__(self, fn, device, name):
        fn()
        self.calls.append(name)
        return self.ms[name]


def make_tune(ran=None, key=("M<=64",), op="op", fail=(), static=("torch",), capture_ok=None):
    ran = [] if ran is None else ran

    def run(name):
        if name in fail:
            raise RuntimeError(f"{name} cannot compile this")
        ran.append(name)
    return dispatch.Tune(op, key, run, static, capture_ok)


def tuner(tmp_path, ms, **kw):
    kw.setdefault("rounds", 1)  # one timing per candidate: the call counts below are per round
    return dispatch.Tuner(cache_dir=str(tmp_path), timer=FakeTimer(ms), devices=("cpu",),
                          version_info=kw.pop("version_info", V1), **kw)


@pytest.mark.parametrize("ms,expect", [({"torch": 2.0, "triton": 1.0}, "triton"),
                                       ({"torch": 1.0, "triton": 2.0}, "torch"),
                                       ({"torch": 1.0, "triton": 1.0, "cuda": 0.5}, "cuda")])
def test_the_fastest_candidate_wins_and_is_measured_once(tmp_path, ms, expect):
    t = tuner(tmp_path, ms)
    cands = list(ms)
    assert t.choose(CPU, make_tune(), cands) == expect
    assert sorted(t.timer.calls) == sorted(cands) and t.measurements == 1
    for _ in range(3):  # memory hit: no new timing
        assert t.choose(CPU, make_tune(), cands) == expect
    assert len(t.timer.calls) == len(cands)
    # a different bucket is measured on its own
    t.timer.ms = {k: -v for k, v in ms.items()}  # reversed speeds
    other = t.choose(CPU, make_tune(key=("M<=128",)), cands)
    assert other == min(t.timer.ms, key=t.timer.ms.get) and t.measurements == 2


def test_choices_persist_on_disk_keyed_by_versions_and_device(tmp_path):
    t = tuner(tmp_path, {"torch": 3.0, "triton": 1.0})
    assert t.choose(CPU, make_tune(), ["torch", "triton"]) == "triton"
    data = json.loads(open(t.path()).read())
    assert data["versions"] == V1
    (entry, rec), = data["choices"].items()
    assert entry == "cpu|op|M<=64" and rec["choice"] == "triton" and rec["timings_ms"] == {"torch": 3.0, "triton": 1.0}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # the atomic write left no temp file

    # a new process (a new Tuner) reads it: no measuring, even if the timer now says otherwise
    t2 = tuner(tmp_path, {"torch": 1.0, "triton": 9.0})
    assert t2.choose(CPU, make_tune(), ["torch", "triton"]) == "triton" and t2.timer.calls == []

    # another torch (or triton, library, CUDA) version: a different file, so measured again
    for field in V1:
        t3 = tuner(tmp_path, {"torch": 1.0, "triton": 9.0}, version_info=dict(V1, **{field: "other"}))
        assert t3.path() != t.path()
        assert t3.choose(CPU, make_tune(), ["torch", "triton"]) == "torch" and len(t3.timer.calls) == 2

    # another device name: another entry, measured
    t4 = tuner(tmp_path, {"torch": 1.0, "triton": 9.0}, device_name=lambda d: "NVIDIA H200")
    assert t4.choose(CPU, make_tune(), ["torch", "triton"]) == "torch" and len(t4.timer.calls) == 2
    assert set(json.loads(open(t.path()).read())["choices"]) == {"cpu|op|M<=64", "NVIDIA H200|op|M<=64"}


@pytest.mark.parametrize("content", ["{not json", "[]", '{"versions": {}, "choices": {}}',
                                     json.dumps({"versions": V1, "choices": {"cpu|op|M<=64": {"choice": "rm -rf",
                                                                                             "timings_ms": {}}}}),
                                     json.dumps({"versions": V1, "choices": {"cpu|op|M<=64": "triton"}}),
                                     "[" * 100000])
def test_a_bad_cache_file_is_ignored_and_replaced(tmp_path, content):
    t = tuner(tmp_path, {"torch": 1.0, "triton": 2.0})
    os.makedirs(tmp_path, exist_ok=True)
    with open(t.path(), "w") as f:
        f.write(content)
    assert t.choose(CPU, make_tune(), ["torch", "triton"]) == "torch" and len(t.timer.calls) == 2
    data = json.loads(open(t.path()).read())
    assert data["versions"] == V1 and data["choices"]["cpu|op|M<=64"]["choice"] == "torch"


def test_a_cached_backend_that_cannot_run_now_is_measured_again(tmp_path):
    t = tuner(tmp_path, {"torch": 2.0, "triton": 1.0})
    assert t.choose(CPU, make_tune(), ["torch", "triton"]) == "triton"
    t2 = tuner(tmp_path, {"torch": 2.0, "cuda": 1.5})
    assert t2.choose(CPU, make_tune(), ["torch", "cuda"]) == "cuda" and sorted(t2.timer.calls) == ["cuda", "torch"]


def test_a_failing_candidate_is_recorded_and_not_chosen(tmp_path):
    t = tuner(tmp_path, {"torch": 5.0, "triton": 1.0})
    assert t.choose(CPU, make_tune(fail=("triton",)), ["torch", "triton"]) == "torch"
    rec = t.choices()["cpu|op|M<=64"]
    assert "triton" not in rec["timings_ms"] and "cannot compile" in rec["errors"]["triton"]
    assert "triton failed: RuntimeError: triton cannot compile this" in dispatch.describe_choices(t)
    # every candidate failing: the static rule, and nothing cached
    t2 = tuner(tmp_path / "b", {"torch": 1.0, "triton": 1.0})
    assert t2.choose(CPU, make_tune(fail=("torch", "triton"), static=("triton", "torch")), ["torch", "triton"]) == "triton"
    assert t2.choices() == {} and "every candidate failed" in dispatch.describe_choices(t2)


@pytest.mark.parametrize("where", ["compiling", "autotune-off"])
def test_no_measuring_while_compiling_or_switched_off(tmp_path, monkeypatch, where):
    t = tuner(tmp_path, {"torch": 2.0, "triton": 1.0})
    if where == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setenv(dispatch.AUTOTUNE_VAR, "0")
    ran = []
    assert t.choose(CPU, make_tune(ran, static=("torch",)), ["torch", "triton"]) == "torch"
    assert t.choose(CPU, make_tune(ran, static=("triton", "torch")), ["torch", "triton"]) == "triton"
    assert ran == [] and t.timer.calls == [] and t.measurements == 0
    assert ("inside torch.compile tracing" if where == "compiling" else "PEFT_KERNELS_AUTOTUNE=0") \
        in dispatch.describe_choices(t)
    # a choice measured earlier: used while compiling; PEFT_KERNELS_AUTOTUNE=0 always takes the static rule
    monkeypatch.undo()
    t.choose(CPU, make_tune(key=("M<=8",)), ["torch", "triton"])  # measured: triton
    if where == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert t.choose(CPU, make_tune(key=("M<=8",)), ["torch", "triton"]) == "triton"
    else:
        monkeypatch.setenv(dispatch.AUTOTUNE_VAR, "off")
        assert t.choose(CPU, make_tune(key=("M<=8",)), ["torch", "triton"]) == "torch"


def test_under_cuda_graph_capture_only_capture_safe_backends(tmp_path, monkeypatch):
    t = tuner(tmp_path, {"torch": 1.0, "triton": 5.0, "cuda": 4.0})
    tune = make_tune(static=("cuda", "triton", "torch"), capture_ok=("cuda", "triton"))
    assert t.choose(CPU, tune, ["torch", "triton", "cuda"]) == "torch"  # measured outside capture
    monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
    # the cached torch would sync the host inside the capture: the static rule instead, and no measuring
    assert t.choose(CPU, tune, ["torch", "triton", "cuda"]) == "cuda"
    assert t.choose(CPU, tune, ["torch", "triton"]) == "triton"
    assert len(t.timer.calls) == 3


def test_measuring_leaves_the_rng_alone(tmp_path):
    def run(name):
        torch.rand(100)  # a candidate that draws (dropout seeds do)
    t = tuner(tmp_path, {"torch": 1.0, "triton": 2.0})
    torch.manual_seed(7)
    t.choose(CPU, dispatch.Tune("op", ("k",), run), ["torch", "triton"])
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))


def test_racing_threads_measure_a_bucket_once(tmp_path):
    t = tuner(tmp_path, {"torch": 2.0, "triton": 1.0})
    out, barrier = [], threading.Barrier(4)

    def worker():
        barrier.wait()
        out.append(t.choose(CPU, make_tune(), ["torch", "triton"]))
    ths = [threading.Thread(target=worker) for _ in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert out == ["triton"] * 4 and t.measurements == 1 and len(t.timer.calls) == 2


def test_clear_forgets_memory_and_disk(tmp_path):
    t = tuner(tmp_path, {"torch": 2.0, "triton": 1.0})
    t.choose(CPU, make_tune(), ["torch", "triton"])
    t.clear(disk=True)
    assert not os.path.exists(t.path()) and t.choices() == {}
    t.choose(CPU, make_tune(), ["torch", "triton"])
    assert t.measurements == 2


def test_buckets():
    assert [dispatch.m_bucket(m) for m in (0, 1, 2, 3, 64, 65, 4096, 4097)] == [1, 1, 2, 4, 64, 128, 4096, 8192]
    w, A, B = torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
    k = lambda x: dispatch.op_tune("lora_linear", (x, w, None, A, B), ("d",), lambda t, be: None).key  # noqa: E731
    assert k(torch.randn(33, 16)) == k(torch.randn(2, 32, 16)) == k(torch.randn(64, 16))  # same M bucket
    assert k(torch.randn(65, 16)) != k(torch.randn(64, 16))
    assert k(torch.randn(64, 16, dtype=torch.float64)) != k(torch.randn(64, 16))
    assert k(torch.randn(64, 16, requires_grad=True))[-1] == "fwd+bwd" and k(torch.randn(64, 16))[-1] == "fwd"
    with torch.no_grad():
        assert k(torch.randn(64, 16, requires_grad=True))[-1] == "fwd"


def test_cpu_auto_is_not_measured_by_default():
    assert dispatch.TUNER.devices == ("cuda",)
    assert dispatch.resolve("auto", CPU, tune=lambda: pytest.fail("CPU auto must not build a Tune")) == "torch"


# -- the ops, measured on the CPU (Triton under the interpreter) -------------------------------------
@pytest.fixture
def cpu_tuner(tmp_path, monkeypatch):
    if dispatch.unavailable_reason("triton", CPU) is not None:
        pytest.skip(dispatch.unavailable_reason("triton", CPU))

    def install(ms):
        t = tuner(tmp_path, ms)
        monkeypatch.setattr(dispatch, "TUNER", t)
        return t
    return install


@pytest.mark.parametrize("winner", ["torch", "triton"])
def test_lora_linear_auto_runs_the_measured_winner(cpu_tuner, monkeypatch, winner):
    t = cpu_tuner({"torch": 1.0, "triton": 2.0} if winner == "torch" else {"torch": 2.0, "triton": 1.0})
    used = []
    real = lora_ops.LoRALinearFunction.apply
    monkeypatch.setattr(lora_ops.LoRALinearFunction, "apply", lambda *a: used.append(a[-1].backend) or real(*a))
    x = torch.randn(2, 5, 16, requires_grad=True)
    w, b = torch.randn(12, 16), torch.randn(12)
    A, B = torch.randn(3, 16, requires_grad=True), torch.randn(12, 3, requires_grad=True)
    y = pk.lora_linear(x, w, b, A, B, 2.0)
    assert used[-1] == winner and sorted(used[:-1]) == ["torch", "triton"]  # measured both, ran the winner
    assert x.grad is None and A.grad is None and B.grad is None  # measuring left the caller's grads alone
    assert list(t.choices().values())[0]["choice"] == winner
    (entry,) = t.choices()
    assert "lora_linear" in entry and entry.endswith("fwd+bwd")
    ref = pk.reference.lora_linear_ref(x.double(), w.double(), b.double(), A.double(), B.double(), 2.0)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    used.clear()
    pk.lora_linear(x, w, b, A, B, 2.0)
    assert used == [winner]  # cached: no measuring


@pytest.mark.parametrize("op", ["multi", "ia3", "bottleneck", "adapter_linear", "dora"])
def test_every_op_measures_its_candidates(cpu_tuner, op):
    t = cpu_tuner({"torch": 2.0, "triton": 1.0, "cuda": 3.0})
    x = torch.randn(6, 16)
    w = torch.randn(12, 16)
    if op == "multi":
        pk.multi_lora_linear(x, w, None, torch.randn(3, 4, 16), torch.randn(3, 12, 4), torch.ones(3),
                             torch.tensor([0, 1, 2, -1, 0, 1]))
    elif op == "ia3":
        pk.ia3_linear(x, w, None, torch.rand(12))
    elif op == "bottleneck":
        pk.bottleneck_adapter(x, torch.randn(4, 16), None, torch.randn(16, 4), None, torch.tensor(0.5))
    elif op == "adapter_linear":
        pk.adapter_linear(x, w, None, torch.randn(4, 12), None, torch.randn(12, 4), None, 0.5)
    else:
        from peft_kernels.ops.dora import dora_linear
        dora_linear(x, w, None, torch.randn(2, 16), torch.randn(12, 2), 1.0, torch.rand(12) + 0.5)
    names = {"multi": "multi_lora_linear", "ia3": "ia3_linear", "bottleneck": "bottleneck_adapter",
             "adapter_linear": "adapter_linear", "dora": "dora_linear"}
    ch = t.choices()
    mine = [v for k, v in ch.items() if f"|{names[op]}|" in k]
    assert len(mine) == 1 and mine[0]["choice"] == "triton", ch
    assert set(mine[0]["timings_ms"]) == {"torch", "triton"}  # the CPU build has no CUDA kernels


def test_explain_and_info_show_the_choices(cpu_tuner):
    cpu_tuner({"torch": 2.5, "triton": 1.25})
    pk.lora_linear(torch.randn(4, 16), torch.randn(8, 16), None, torch.randn(2, 16), torch.randn(8, 2), 1.0)
    text = dispatch.explain("auto", "cpu")
    assert "measured choices (1;" in text and "-> triton (triton 1.25 ms, torch 2.5 ms)" in text
    from peft_kernels.__main__ import info
    assert "-> triton (triton 1.25 ms, torch 2.5 ms)" in info()


def test_while_tracing_auto_is_torch_without_touching_the_tuner(cpu_tuner, monkeypatch):
    t = cpu_tuner({"torch": 2.0, "triton": 1.0})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.resolve("auto", CPU, tune=lambda: pytest.fail("no Tune while tracing")) == "torch"
    assert t.choices() == {} and t.timer.calls == []
    # an explicit backend is still honoured while tracing
    assert dispatch.resolve("triton", CPU, tune=lambda: pytest.fail("no Tune for an explicit backend")) == "triton"


# -- interleaved rounds and the per-process fast path ---------------------------------------------
class RoundsTimer(FakeTimer):
    """Per-backend timings that differ by round: ``ms[name]`` is a list, one value per round."""

    def __call__(self, fn, device, name):
        fn()
        self.calls.append(name)
        return self.ms[name][sum(c == name for c in self.calls) - 1]


def test_rounds_are_interleaved_and_each_candidate_keeps_its_fastest(tmp_path):
    # triton's first round is slow (a clock ramp, a compile): one round would pick torch, three pick triton
    t = dispatch.Tuner(cache_dir=str(tmp_path), devices=("cpu",), version_info=V1, rounds=3,
                       timer=RoundsTimer({"torch": [2.0, 2.1, 2.2], "triton": [9.0, 1.5, 1.4]}))
    assert t.choose(CPU, make_tune(), ["torch", "triton"]) == "triton"
    assert t.timer.calls == ["torch", "triton"] * 3
    (entry,) = t.choices().values()
    assert entry["timings_ms"] == {"torch": 2.0, "triton": 1.4}
    # a candidate that fails in a later round is dropped, not kept with its earlier time
    t2 = dispatch.Tuner(cache_dir=None, devices=("cpu",), version_info=V1, rounds=2,
                        timer=RoundsTimer({"torch": [2.0, 2.0], "triton": [1.0, float("nan")]}))
    assert t2.choose(CPU, make_tune(), ["torch", "triton"]) == "triton"  # nan in round 2: round 1 stands

    class FailSecond(FakeTimer):
        def __call__(self, fn, device, name):
            self.calls.append(name)
            if name == "triton" and self.calls.count("triton") == 2:
                raise RuntimeError("illegal memory access")
            return self.ms[name]
    t3 = dispatch.Tuner(cache_dir=None, devices=("cpu",), version_info=V1, rounds=3,
                        timer=FailSecond({"torch": 2.0, "triton": 1.0}))
    assert t3.choose(CPU, make_tune(), ["torch", "triton"]) == "torch"
    assert t3.timer.calls == ["torch", "triton", "torch", "triton", "torch"]  # not timed again after failing


def test_a_chosen_bucket_skips_the_availability_checks(tmp_path, monkeypatch):
    t = tuner(tmp_path, {"torch": 2.0, "triton": 1.0})
    monkeypatch.setattr(dispatch, "TUNER", t)
    t.devices = ("cpu",)
    reasons = []

    def op_reason(name):
        reasons.append(name)
        return None
    assert dispatch.resolve("auto", CPU, op_reason, tune=make_tune) == "triton"
    assert reasons and t.measurements == 1
    reasons.clear()
    for _ in range(3):
        assert dispatch.resolve("auto", CPU, op_reason, tune=make_tune) == "triton"
    assert reasons == [] and t.measurements == 1 and len(t.timer.calls) == 2  # the fast path answered
    # another bucket, or the cache cleared, goes through the checks again
    assert dispatch.resolve("auto", CPU, op_reason, tune=lambda: make_tune(key=("M<=128",))) == "triton"
    assert reasons
    t.clear()
    reasons.clear()
    assert dispatch.resolve("auto", CPU, op_reason, tune=make_tune) == "triton" and reasons
    # PEFT_KERNELS_AUTOTUNE=0 is honoured at once: the static rule, not the remembered choice
    monkeypatch.setenv(dispatch.AUTOTUNE_VAR, "0")
    assert dispatch.resolve("auto", CPU, op_reason, tune=make_tune) == "torch"
    monkeypatch.delenv(dispatch.AUTOTUNE_VAR)
    # under capture the fast path steps aside, so only capture-safe backends are returned
    monkeypatch.setattr(dispatch, "_capturing", lambda device: True)
    assert dispatch.resolve("auto", CPU, op_reason, tune=lambda: make_tune(capture_ok=("torch",))) == "torch"


def test_the_tma_switch_is_part_of_the_cache_key(monkeypatch):
    """PEFT_KERNELS_TMA changes which Triton GEMMs the triton candidate runs on sm_90: a choice measured with them
    on is not reused with them off."""
    monkeypatch.delenv("PEFT_KERNELS_TMA", raising=False)
    on = dispatch.versions()
    monkeypatch.setenv("PEFT_KERNELS_TMA", "0")
    off = dispatch.versions()
    assert on["tma"] == "1" and off["tma"] == "0" and {k: v for k, v in on.items() if k != "tma"} == \
        {k: v for k, v in off.items() if k != "tma"}
