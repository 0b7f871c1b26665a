"""Serving from several threads and asyncio tasks: adapter_ids() is per thread and per task, a hot swap with
set_adapter/clear_adapter is atomic for concurrent forwards, a failed set_adapter changes nothing, and ids
changed in place inside an adapter_ids block are seen (no stale grouping)."""
import asyncio
import copy
import threading
import time

import pytest
import torch
import torch.nn as nn

import peft_kernels as pk

from peft_kernels.ops.multi_lora import SUPPORTED

from helpers import backend_params

# The Triton interpreter keeps its grid index in global state, so it cannot run kernels from two threads at
# once; threaded tests run every other backend (on a GPU, Triton launches from several threads are fine).
THREADED = [p for p in backend_params(supported=SUPPORTED) if p.values[0] != "triton"]

K, H, N, S, R = 24, 40, 16, 4, 8


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(K, H)
        self.down = nn.Linear(H, N)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _model(backend):
    torch.manual_seed(0)
    model = _Two()
    for name in ("up", "down"):
        lin = getattr(model, name)
        ml = pk.MultiLoRALinear.from_linear(lin, max_adapters=S, max_rank=R, backend=backend)
        for a in range(S):
            r = a + 2
            ml.set_adapter(a, torch.randn(r, lin.in_features), torch.randn(lin.out_features, r), 1.0 + a)
        setattr(model, name, ml)
    return model.eval()


def _expected(model, x, ids):
    tok = ids.repeat_interleave(x.shape[1]) if x.dim() == 3 else ids
    with torch.no_grad():
        return model.down(torch.relu(model.up(x, tok)), tok)


def _run_threads(fn, n):
    errors = []

    def wrap(i):
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("backend", THREADED)
def test_adapter_ids_is_per_thread(backend):
    """Four threads open adapter_ids() blocks on one model with different ids and run forwards at the same time:
    each gets its own adapters, every time."""
    model = _model(backend)
    x = torch.randn(3, 5, K)
    ids_of = [torch.tensor([t % S, (t + 1) % S, -1]) for t in range(4)]
    want = [_expected(model, x, i) for i in ids_of]
    assert not torch.equal(want[0], want[1])
    wrong = []
    barrier = threading.Barrier(4)

    def serve(t):
        barrier.wait()
        for _ in range(60):
            with torch.no_grad(), pk.adapter_ids(model, ids_of[t]):
                y = model(x)
            if not torch.equal(y, want[t]):
                wrong.append(t)

    _run_threads(serve, 4)
    assert not wrong, f"{len(wrong)} of 240 forwards used another thread's adapters"


def test_adapter_ids_is_per_asyncio_task():
    """Tasks interleaved on one event loop (each awaiting inside its block) keep their own ids."""
    model = _model("torch")
    x = torch.randn(2, 3, K)
    ids_of = [torch.tensor([a, -1]) for a in range(S)]
    want = [_expected(model, x, i) for i in ids_of]

    async def serve(a):
        outs = []
        with pk.adapter_ids(model, ids_of[a]):  # (grad mode is per thread, not per task: no no_grad here)
            for _ in range(5):
                await asyncio.sleep(0)  # every other task runs here, inside its own block
                outs.append(model(x).detach())
        return all(torch.equal(o, want[a]) for o in outs)

    async def main():
        return await asyncio.gather(*(serve(a) for a in range(S)))

    assert asyncio.run(main()) == [True] * S


@pytest.mark.parametrize("backend", backend_params(supported=SUPPORTED))
@pytest.mark.parametrize("how", ["setitem", "data", "copy_"])
def test_ids_changed_in_place_inside_the_block_are_seen(backend, how):
    model = _model(backend)
    x = torch.randn(4, 3, K)
    ids = torch.tensor([0, 1, -1, 2])
    new = torch.tensor([3, 3, 0, -1])
    with torch.no_grad(), pk.adapter_ids(model, ids):
        assert torch.equal(model(x), _expected(model, x, ids.clone()))
        if how == "setitem":
            ids[:] = new
        elif how == "data":
            ids.data[:] = new  # no version bump
        else:
            ids.copy_(new)
        assert torch.equal(model(x), _expected(model, x, new))


@pytest.mark.parametrize("backend", THREADED)
def test_hot_swap_is_atomic_for_concurrent_forwards(backend):
    """One thread swaps slot 1 between two adapters of different ranks (and clears it) while three threads serve
    it: every forward equals the output of one whole state, never a mix."""
    model = _model(backend)
    x = torch.randn(6, K)
    ids = torch.full((6,), 1)
    torch.manual_seed(5)
    states = []
    for r, s in ((2, 0.5), (R, 3.0)):
        states.append({name: (torch.randn(r, getattr(model, name).in_features),
                              torch.randn(getattr(model, name).out_features, r), s) for name in ("up", "down")})

    def load(st):
        for name, (A, B, s) in st.items():
            if A is None:
                getattr(model, name).clear_adapter(1)
            else:
                getattr(model, name).set_adapter(1, A, B, s)

    # with two layers the torn state could also mix layers; each layer is checked on its own
    layer = model.up
    outs = []
    for st in states:
        load(st)
        with torch.no_grad():
            outs.append(layer(x, ids))
    layer.clear_adapter(1)
    with torch.no_grad():
        outs.append(layer(x, ids))
    stop = threading.Event()
    wrong = []
    swaps = [0]
    served = []

    def swapper(_):
        i = 0
        while not stop.is_set():
            st = i % 3
            if st == 2:
                layer.clear_adapter(1)
            else:
                A, B, s = states[st]["up"]
                layer.set_adapter(1, A, B, s)
            i += 1
            swaps[0] = i

    def server(_):
        # at least 150 forwards, and on until the swapper has made 300 swaps (a loaded machine slows it: the
        # race needs swaps to overlap forwards), at most 20 s
        n, t0 = 0, time.monotonic()
        while n < 150 or (swaps[0] < 300 and time.monotonic() - t0 < 20):
            with torch.no_grad():
                y = layer(x, ids)
            if not any(torch.equal(y, o) for o in outs):
                wrong.append(y)
            n += 1
        served.append(n)

    t = threading.Thread(target=swapper, args=(0,))
    t.start()
    try:
        _run_threads(server, 3)
    finally:
        stop.set()
        t.join()
    assert swaps[0] >= 3, "the swapper never ran"
    assert not wrong, f"{len(wrong)} of {sum(served)} forwards saw a torn slot ({swaps[0]} swaps)"


@pytest.mark.parametrize("bad", ["nan-scaling", "fp32-overflow-scaling", "shape", "rank", "nan-weights", "dtype"])
def test_a_failed_set_adapter_leaves_the_slot_as_it_was(bad):
    m = _model("torch").up
    before = {k: v.clone() for k, v in m.state_dict().items()}
    A, B = torch.randn(3, K), torch.randn(H, 3)
    args = {"nan-scaling": (A, B, float("nan")), "fp32-overflow-scaling": (A, B, 1e40),
            "shape": (A, torch.randn(H + 1, 3), 1.0), "rank": (torch.randn(R + 1, K), torch.randn(H, R + 1), 1.0),
            "nan-weights": (A, B.index_fill(0, torch.tensor([4]), float("nan")), 1.0),
            "dtype": (A.long(), B, 1.0)}[bad]
    with pytest.raises((ValueError, TypeError), match="scaling|lora_A|lora_B|rank"):
        m.set_adapter(2, *args)
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_layers_deepcopy_and_pickle_with_their_own_lock():
    m = _model("torch")
    c = copy.deepcopy(m)
    assert c.up._slots_lock is not m.up._slots_lock
    x, ids = torch.randn(2, K), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(c.up(x, ids), m.up(x, ids))
    c.up.clear_adapter(0)  # the copy's lock works
    import io
    buf = io.BytesIO()
    torch.save(m.up, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(m2(x, ids), m.up(x, ids))
