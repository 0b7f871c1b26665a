"""Test setup: Triton kernels run on CPU under the interpreter, set before triton is imported."""
import os

os.environ["TRITON_INTERPRET"] = "1"
# The suite chooses backends explicitly; a user's override must not leak in.
os.environ.pop("PEFT_KERNELS_BACKEND", None)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
