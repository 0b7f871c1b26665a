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


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: start only what will run
def pytest_collection_modifyitems(session, config, items):
    # the long subprocess checks of the selected tests start now, beside the rest of the suite, and those tests
    # run last, so the jobs have the whole suite's time (tests/background.py)
    import background

    started = background.start_selected({item.nodeid for item in items})
    items.sort(key=lambda item: item.nodeid in started)  # stable: the rest keep their order


def pytest_sessionfinish(session, exitstatus):
    import background

    background.stop_all()
