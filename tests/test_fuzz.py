"""The fuzz suite (cases in tests/fuzz_cases.py), each group in a child process so that a segfault or an abort
is a failure naming the case that was running, never a dead pytest. ``make test`` runs a bounded number of
hypothesis examples (PEFT_KERNELS_FUZZ_EXAMPLES, default 120); ``make fuzz`` runs many more. ``make asan-test``
runs the same groups against an AddressSanitizer/UBSan build of the extension."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import peft_kernels as pk
from peft_kernels import _ext
from peft_kernels.ops.multi_lora import AdapterMapping

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = int(os.environ.get("PEFT_KERNELS_FUZZ_EXAMPLES", "120"))


def run_group(group: str, examples: int, timeout: int = 900) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_cases.py"), group, str(examples)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0:
        last = next((ln for ln in reversed(lines) if ln.startswith("CASE ")), "before the first case")
        how = (f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        pytest.fail(f"fuzz group {group!r} died ({how}) in {last}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _needs_ext():
    if not _ext.available():
        if os.environ.get("PEFT_KERNELS_REQUIRE_EXT") == "1":
            pytest.fail(f"PEFT_KERNELS_REQUIRE_EXT=1 but {_ext.unavailable_reason()}")
        pytest.skip(_ext.unavailable_reason())


@pytest.mark.parametrize("group,examples,min_checked", [("raw_bad", 0, 0), ("raw_random", EXAMPLES, 0.5),
                                                        ("public", EXAMPLES // 2, 0.2),
                                                        ("checkpoint", EXAMPLES, 0.02),
                                                        ("dequant", EXAMPLES, 0.2)])
def test_fuzz_group_is_clean(group, examples, min_checked):
    if group.startswith("raw") or group == "dequant":
        _needs_ext()
    res = run_group(group, examples)
    assert not res["failures"], f"{len(res['failures'])} of {res['cases']} cases failed:\n" + "\n".join(
        res["failures"][:20])
    assert res["cases"] >= max(examples, 1)
    # most random cases must get as far as a comparison with the reference (not all refused or skipped)
    assert res["checked"] >= min_checked * examples, res


def test_adapter_mapping_is_immutable():
    """The kernels index memory with a mapping's values: its tensors cannot be changed from outside, and one
    constructed by hand is checked before any kernel sees it."""
    ids = torch.tensor([1, -1, 0, 1, 2])
    m = pk.build_mapping(ids, 5, 3)
    before = m.perm.tolist()
    m.perm[0] = 99            # a copy: the mapping keeps its own
    m.seg_starts[-1] = 10 ** 6
    assert m.perm.tolist() == before and m.seg_starts.tolist()[-1] == 4
    with pytest.raises(AttributeError):
        m.perm = torch.zeros(4, dtype=torch.int32)
    x, W = torch.randn(5, 6), torch.randn(4, 6)
    A, B = torch.randn(3, 2, 6), torch.randn(3, 4, 2)
    y = pk.multi_lora_linear(x, W, None, A, B, [1.0] * 3, m, backend="torch")
    assert torch.equal(y, pk.multi_lora_linear(x, W, None, A, B, [1.0] * 3, ids, backend="torch"))

    def make(**kw):
        f = dict(num_tokens=5, num_slots=3, _perm=m.perm, _pos_slots=m.pos_slots, _seg_slots=m.seg_slots,
                 _seg_starts=m.seg_starts, slots=m.slots, starts=m.starts, checked=True)
        f.update(kw)
        return AdapterMapping(**f)

    make()  # a consistent hand-made mapping is accepted
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    assert m.perm.tolist() == [2, 0, 3, 4] and m.pos_slots.tolist() == [0, 1, 1, 2]
    bad = {"perm-range": dict(_perm=i32([2, 0, 3, 9])), "perm-repeat": dict(_perm=i32([2, 2, 0, 3])),
           "pos_slots": dict(_pos_slots=i32([0, 0, 1, 2])), "seg_slots": dict(_seg_slots=i32([0, 1, 7])),
           "slots": dict(slots=(0, 1, 3)), "starts": dict(starts=(0, 1, 3, 9)),
           "num_tokens": dict(num_tokens=-1), "int32": dict(_perm=m.perm.long())}
    for what, kw in bad.items():
        with pytest.raises((ValueError, TypeError), match="AdapterMapping"):
            make(**kw)
            print(what)


def test_asan_run_loads_the_sanitized_extension():
    """Under `make asan-test` the package and its _C come from build/asan, with ASan in the process."""
    pkg = os.environ.get("PEFT_KERNELS_ASAN_PACKAGE")
    if not pkg:
        pytest.skip("only under make asan-test (PEFT_KERNELS_ASAN_PACKAGE)")
    _needs_ext()
    assert os.path.realpath(pk.__file__).startswith(os.path.realpath(pkg)), pk.__file__
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert "libasan" in maps and "libubsan" in maps
