"""The gpu-check correctness groups as pytest cases, for a machine with a CUDA GPU (``pytest -m cuda``).
The same code as ``python -m peft_kernels.gpucheck`` (peft_kernels/gpucheck/cases.py); on a CPU each case
is skipped with its reason (the dry run in test_gpucheck.py runs the same groups at tiny shapes)."""
import pytest
import torch

from peft_kernels.gpucheck import cases

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (run `make gpu-check` or `pytest -m cuda` on one)")]


@pytest.mark.parametrize("group", cases.correctness_groups())
def test_gpu_group(group):
    res = cases.run_group(group, dry=False)
    failed = [f"{c['case']}: err {c.get('err')} > bound {c.get('bound')}; {c.get('note')}" for c in res if not c["ok"]]
    assert res and not failed, "\n".join(failed)
