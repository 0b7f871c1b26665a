"""The one place that decides which backend runs an op, and can say why.

Backends:
    ``"torch"``  plain PyTorch (any device); the fastest CPU path.
    ``"triton"`` fused Triton kernels: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
                 was set before triton was imported (that is how the test suite runs them).
    ``"cuda"``   the hand-written CUDA kernels of ``peft_kernels._C`` (csrc/cuda), for the ops that
                 have them (multi_lora_linear); needs the extension built with CUDA and CUDA tensors.
    ``"auto"``   on CUDA: the measured choice. The first call of an op in a new (op, shape bucket,
                 dtypes, grad mode, device) runs every backend that can take the inputs a few times
                 (CUDA events), keeps the fastest, and caches the winner in memory and on disk (see
                 "Measured dispatch" below). Elsewhere: torch (on the CPU the Triton kernels only run
                 under the interpreter, which is never the fast choice).

The environment variable ``PEFT_KERNELS_BACKEND`` (one of the names above) overrides the backend an
op or module asked for. Nothing here touches a GPU at import time.

Measured dispatch
-----------------
* Shape bucket: the row count M (x's leading dims) rounded up to a power of two, with every other
  dimension exact (a model has few distinct K, N, r), the dtypes, whether there is a bias, dropout on
  or off, and forward-only (no grad) or forward+backward. The first call in a bucket is measured at
  its own M. For multi_lora_linear the segment layout of the ids is not in the key (reading it would
  be a host sync): the first batch of a bucket stands for the rest.
* Measuring times each candidate with CUDA events, 2 warm-up calls (they include Triton's JIT
  compile) then the median of 3, forward (+ backward with all-ones dY when the call needs grad), on
  detached copies of the call's tensors, with the RNG state restored afterwards. A candidate that
  raises is recorded with its error and not chosen.
* Never inside ``torch.compile`` tracing or CUDA-graph capture, and never when
  ``PEFT_KERNELS_AUTOTUNE=0``. While tracing, "auto" is ``"torch"``: the compiler fuses torch's ops
  itself, and a cache lookup (a lock, file IO) cannot be traced; multi_lora_linear takes its masked
  graph path there and never asks. Under capture a cached choice is used when there is one; with
  ``PEFT_KERNELS_AUTOTUNE=0`` (or nothing cached) the op's static rule:
  ``"torch"`` (cuBLAS, the unfused graph PEFT runs, so never slower than PEFT) for the single-adapter
  ops; for multi_lora_linear ``"cuda"``, else ``"triton"`` (they make no host syncs, so a capture
  works), and under capture a cached ``"torch"`` is not used for the same reason.
* The disk cache: ``$PEFT_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/peft_kernels``, else
  ``~/.cache/peft_kernels``; one JSON file per (peft_kernels, torch, triton, CUDA) versions, entries
  keyed by the device name, op and bucket. A file that does not parse, or whose versions differ, is
  ignored and replaced; an entry naming a backend that cannot run now is measured again. Writes are
  atomic (temporary file, then rename).
* ``explain()`` and ``python -m peft_kernels info`` list every choice with its timings.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
DEFAULT_SUPPORTED = ("torch", "triton")  # what an op runs unless it says otherwise
ENV_VAR = "PEFT_KERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """Raised when an explicitly requested backend cannot run on the given inputs."""


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "the `triton` package is not installed (pip install triton)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "tensors are on CUDA but torch.cuda.is_available() is False"
        return None
    if device.type == "cpu":
        if not interpreting():
            return ("tensors are on the CPU; Triton kernels run on CPU only under the interpreter "
                    "(set TRITON_INTERPRET=1 before triton is imported)")
        from .kernels import _common  # imported lazily: importing triton is not free

        if not _common.INTERPRETED:
            return ("TRITON_INTERPRET=1 is set now, but peft_kernels' Triton kernels were compiled "
                    "before it was set; set it before the first import of triton")
        return None
    return f"Triton kernels do not support device type {device.type!r}"


def cuda_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the compiled CUDA kernels cannot run on ``device`` (None when they can)."""
    from . import _ext

    why = _ext.unavailable_reason()
    if why is not None:
        return why
    if not _ext.build_info().startswith("cuda"):
        return ("peft_kernels._C was built without CUDA (install with a CUDA torch and toolkit, "
                "PEFT_KERNELS_CUDA=1; see the README)")
    if device.type != "cuda":
        return f"the CUDA kernels take CUDA tensors, these are on {device}"
    if not torch.cuda.is_available():
        return "tensors are on CUDA but torch.cuda.is_available() is False"
    return None


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        return triton_unavailable_reason(device)
    if backend == "cuda":
        return cuda_unavailable_reason(device)
    raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")


def requested_backend(backend: str = "auto") -> str:
    """The backend asked for, after the ``PEFT_KERNELS_BACKEND`` override."""
    _check_name(backend, "backend")
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return backend


def resolve(backend: str, device: torch.device, op_reason: Optional[Callable[[str], Optional[str]]] = None,
            supported=DEFAULT_SUPPORTED, tune: Optional[Callable[[], "Tune"]] = None) -> str:
    """Pick the concrete backend for tensors on ``device``; raise if an explicit one can't run.

    ``supported``: the backends the op has. ``op_reason(name)`` lets an op add why ``name`` cannot
    take these particular inputs (a dtype it has no kernel for, say); "auto" then falls back to torch.
    ``tune``: builds the op's :class:`Tune` (called only when "auto" is measured), see the module doc.
    """
    req = requested_backend(backend)

    def why(name):
        if name not in supported:
            return f"this op has no {name} kernels (it runs on: {', '.join(supported)})"
        r = unavailable_reason(name, device)
        return r if r is not None or op_reason is None else op_reason(name)

    if req == "auto":
        if device.type not in TUNER.devices:
            return "torch"
        if tune is not None and torch.compiler.is_compiling():
            # no lookup while tracing (a lock and file IO have no place in a graph): torch's ops, which the
            # compiler fuses itself; multi_lora_linear runs its masked graph path before it gets here
            return "torch"
        t = None
        if tune is not None:
            # the hot path: a bucket already chosen in this process skips the availability checks (they
            # depend only on the device and the dtypes, which the bucket holds) and the lock
            t = tune()
            hit = TUNER.fast_choice(device, t)
            if hit is not None:
                return hit
        candidates = [name for name in ("torch", "triton", "cuda") if why(name) is None]
        if len(candidates) == 1:
            return candidates[0]
        if t is None:  # an op without a Tune: the first compiled backend, as before measuring existed
            return next((n for n in ("triton", "cuda") if n in candidates), "torch")
        return TUNER.choose(device, t, candidates)
    reason = why(req)
    if reason is not None:
        src = f" (from {ENV_VAR})" if os.environ.get(ENV_VAR, "").strip() else ""
        raise BackendUnavailable(f"backend {req!r}{src} cannot run: {reason}")
    return req


def explain(backend: str = "auto", device="cpu", choices: bool = True) -> str:
    """A human-readable account of what ``backend`` resolves to on ``device`` and why; with ``choices``,
    the measured "auto" choices and their timings where "auto" is measured."""
    device = torch.device(device)
    lines = []
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        lines.append(f"{ENV_VAR}={env!r} overrides the requested backend {backend!r}")
    try:
        chosen = resolve(backend, device)
        lines.append(f"on {device}: {requested_backend(backend)!r} -> {chosen!r}")
    except (BackendUnavailable, ValueError) as e:
        lines.append(f"on {device}: {e}")
    for name in BACKENDS[1:]:
        why = unavailable_reason(name, device)
        lines.append(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}")
    if choices and device.type in TUNER.devices:
        lines.append(f"  'auto' is measured per (op, shape bucket, dtypes, grad mode) on {device.type}; "
                     + describe_choices())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Measured dispatch (see the module docstring)
# --------------------------------------------------------------------------------------------
AUTOTUNE_VAR = "PEFT_KERNELS_AUTOTUNE"
CACHE_DIR_VAR = "PEFT_KERNELS_CACHE_DIR"


@dataclass(frozen=True)
class Tune:
    """What "auto" needs to measure one call of an op.

    ``op``: the op's name. ``key``: the shape bucket (JSON scalars). ``run(name)``: runs the op once on
    backend ``name`` (forward, and backward when the call needs grad), on copies of the call's tensors.
    ``static``: backends in order of preference when measuring is not allowed. ``capture_ok``: the
    backends that may run under CUDA-graph capture (None: all).
    """
    op: str
    key: tuple
    run: Callable[[str], None]
    static: Sequence[str] = ("torch",)
    capture_ok: Optional[Sequence[str]] = None

    def entry(self, device_name: str) -> str:
        return "|".join([device_name, self.op, *map(_key_str, self.key)])


def _key_str(item) -> str:
    """One bucket item as the cache file spells it: dtypes without "torch.", (shape, dtype) pairs as
    "(a, b):float32", ("x", dtype) as "x:float32", None as "none". Buckets are kept as raw tuples and spelled
    only when an entry is written or shown: the per-call lookup never formats strings."""
    if item is None:
        return "none"
    if isinstance(item, torch.dtype):
        return str(item).replace("torch.", "")
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.dtype):
        head = item[0] if isinstance(item[0], str) else tuple(item[0])
        return f"{head}:{_key_str(item[1])}"
    return str(item)


def m_bucket(m: int) -> int:
    """The row-count bucket of the measured dispatch: M rounded up to a power of two (at least 1)."""
    return 1 << max(0, int(m) - 1).bit_length()


def op_tune(op: str, tensors: Sequence[Optional[torch.Tensor]], extra: tuple,
            call: Callable[[list, str], torch.Tensor], static: Sequence[str] = ("torch",),
            capture_ok: Optional[Sequence[str]] = None) -> Tune:
    """A :class:`Tune` for an op whose first tensor is x ([..., K]); ``call(tensors, name)`` runs the op
    on backend ``name`` and returns its output. The bucket: m_bucket(M), the other tensors' shapes, every
    dtype, ``extra``, and whether the call needs grad (then ``run`` also runs the backward)."""
    x = tensors[0]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    k = x.shape[-1]
    key = ("M<=%d" % m_bucket(x.numel() // max(1, k)), "K=%d" % k,
           *(None if t is None else (t.shape, t.dtype) for t in tensors[1:]),
           ("x", x.dtype), *extra, "fwd+bwd" if grad else "fwd")

    def run(name: str) -> None:
        leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad and grad) for t in tensors]
        out = call(leaves, name)
        if grad:
            ins = [t for t in leaves if t is not None and t.requires_grad]
            torch.autograd.grad(out, ins, torch.ones_like(out), allow_unused=True)
    return Tune(op, key, run, tuple(static), None if capture_ok is None else tuple(capture_ok))


def cuda_timer(fn: Callable[[], None], device: torch.device, name: str = "", warmup: int = 2, iters: int = 3) -> float:
    """Median milliseconds of ``fn`` on ``device``'s current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_timer(fn: Callable[[], None], device: torch.device, name: str = "", warmup: int = 1, iters: int = 3) -> float:
    """Median milliseconds of ``fn`` by the host clock (non-CUDA devices)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _autotune_off() -> bool:
    """``PEFT_KERNELS_AUTOTUNE`` turns measuring off (0/false/no/off): the static rule answers."""
    return os.environ.get(AUTOTUNE_VAR, "").strip().lower() in ("0", "false", "no", "off")


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # no CUDA runtime: nothing can be capturing
        return False


def default_cache_dir() -> str:
    d = os.environ.get(CACHE_DIR_VAR, "").strip()
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "peft_kernels")


def versions() -> Dict[str, str]:
    """What a cached choice depends on besides the device: library, torch, triton and CUDA versions, and the
    ``PEFT_KERNELS_TMA`` switch (it changes which Triton GEMMs the triton candidate runs on sm_90)."""
    from . import __version__

    tri = "none"
    if importlib.util.find_spec("triton") is not None:
        try:
            from importlib.metadata import version

            tri = version("triton")
        except Exception:
            tri = "unknown"
    return {"peft_kernels": __version__, "torch": torch.__version__, "triton": tri,
            "cuda": str(torch.version.cuda), "tma": os.environ.get("PEFT_KERNELS_TMA", "1").strip().lower()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


class Tuner:
    """The measured choices: in memory, and on disk under ``cache_dir`` (None: memory only).

    ``timer(fn, device, name) -> ms`` and ``devices`` (the device types measured) are injectable, which is how the
    CPU tests drive the selection logic. Thread-safe: one lock around lookups and measurements (a bucket is
    measured once even when threads race to it).

    ``rounds``: the candidates are timed in turn, ``rounds`` times over (A, B, A, B, ...), and each keeps its
    fastest round, so a clock ramp or a stray host stall in one round does not decide the choice."""

    def __init__(self, cache_dir: Optional[str] = "default", timer=None, devices=("cuda",),
                 version_info: Optional[Dict[str, str]] = None, device_name=_device_name, rounds: int = 3):
        self.cache_dir = default_cache_dir() if cache_dir == "default" else cache_dir
        self.timer = timer
        self.devices = tuple(devices)
        self._versions = version_info
        self._device_name = device_name
        self._lock = threading.RLock()
        self._mem: Dict[str, dict] = {}
        self._fast: Dict[tuple, str] = {}  # (device, op, bucket) -> a choice made here (see fast_choice)
        self.rounds = max(1, int(rounds))
        self._loaded = False
        self.measurements = 0  # how many buckets were measured in this process
        self.notes: Dict[str, str] = {}  # entry -> why the last lookup did not measure (static rule)

    # -- disk ------------------------------------------------------------------------------------
    def meta(self) -> Dict[str, str]:
        if self._versions is None:
            self._versions = versions()
        return dict(self._versions)

    def path(self) -> Optional[str]:
        if not self.cache_dir:
            return None
        h = hashlib.sha256(json.dumps(self.meta(), sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, f"dispatch-{h}.json")

    def _read(self) -> Dict[str, dict]:
        p = self.path()
        if p is None or not os.path.isfile(p):
            return {}
        try:
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict) or data.get("versions") != self.meta() or not isinstance(data.get("choices"), dict):
            return {}
        out = {}
        for k, v in data["choices"].items():
            if (isinstance(k, str) and isinstance(v, dict) and v.get("choice") in BACKENDS[1:]
                    and isinstance(v.get("timings_ms"), dict)):
                out[k] = v
        return out

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for k, v in self._read().items():
                self._mem.setdefault(k, v)

    def _save(self) -> None:
        p = self.path()
        if p is None:
            return
        try:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            merged = self._read()  # another process may have added entries since we loaded
            merged.update(self._mem)
            fd, tmp = tempfile.mkstemp(prefix=".dispatch-", suffix=".tmp", dir=os.path.dirname(p))
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"versions": self.meta(), "choices": merged}, f, indent=1, sort_keys=True)
                os.replace(tmp, p)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        except OSError:  # a read-only home: the choice still holds for this process
            pass

    # -- choosing --------------------------------------------------------------------------------
    def _measure_allowed(self, capturing: bool) -> Optional[str]:
        if _autotune_off():
            return f"{AUTOTUNE_VAR}=0"
        if torch.compiler.is_compiling():
            return "inside torch.compile tracing"
        if capturing:
            return "inside CUDA-graph capture"
        return None

    def fast_choice(self, device: torch.device, tune: Tune) -> Optional[str]:
        """The choice ``choose`` already made for this bucket in this process, without the lock or the
        device-name lookup; None where ``choose`` must decide (not seen yet, CUDA-graph capture, or
        ``PEFT_KERNELS_AUTOTUNE=0``, which ``choose`` answers by the static rule)."""
        hit = self._fast.get((device, tune.op, tune.key))
        if hit is None or _capturing(device) or _autotune_off():
            return None
        return hit

    def choose(self, device: torch.device, tune: Tune, candidates: Sequence[str]) -> str:
        entry = tune.entry(self._device_name(device))
        capturing = _capturing(device)
        allowed = [c for c in candidates if not capturing or tune.capture_ok is None or c in tune.capture_ok]
        allowed = allowed or list(candidates)
        with self._lock:
            no_measure = self._measure_allowed(capturing)
            if no_measure is None or not no_measure.startswith(AUTOTUNE_VAR):
                self._load()
                hit = self._mem.get(entry)
                if hit is not None and hit["choice"] in allowed:
                    if not capturing and hit["choice"] in candidates:
                        self._fast[(device, tune.op, tune.key)] = hit["choice"]
                    return hit["choice"]
            if no_measure is not None:
                self.notes[entry] = no_measure
                return next((c for c in tune.static if c in allowed), allowed[0])
            timings, errors = {}, {}
            timer = self.timer or (cuda_timer if device.type == "cuda" else host_timer)
            for _ in range(self.rounds):  # interleaved rounds; each candidate keeps its fastest
                for name in candidates:
                    if name in errors:
                        continue
                    try:
                        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                            ms = float(timer(lambda: tune.run(name), device, name))
                    except Exception as e:  # a backend that fails here is simply not chosen
                        errors[name] = f"{type(e).__name__}: {e}"[:300]
                        timings.pop(name, None)
                        continue
                    if math.isfinite(ms):
                        timings[name] = min(timings.get(name, math.inf), ms)
                    else:
                        timings.setdefault(name, ms)
            ok = {k: v for k, v in timings.items() if math.isfinite(v)}
            if not ok:
                self.notes[entry] = "every candidate failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
                return next((c for c in tune.static if c in allowed), allowed[0])
            choice = min(ok, key=lambda k: (ok[k], candidates.index(k)))
            self._mem[entry] = {"choice": choice, "timings_ms": {k: round(v, 5) for k, v in ok.items()},
                                "errors": errors}
            self.measurements += 1
            self.notes.pop(entry, None)
            if not capturing:
                self._fast[(device, tune.op, tune.key)] = choice
            self._save()
            return choice if choice in allowed else next((c for c in tune.static if c in allowed), allowed[0])

    def choices(self) -> Dict[str, dict]:
        """Every choice known to this process (measured here or loaded from disk)."""
        with self._lock:
            self._load()
            return {k: dict(v) for k, v in sorted(self._mem.items())}

    def clear(self, disk: bool = False) -> None:
        """Forget the choices (and, with ``disk``, delete this version's cache file)."""
        with self._lock:
            self._mem.clear()
            self._fast.clear()
            self.notes.clear()
            self._loaded = disk  # with the file deleted there is nothing to load back
            p = self.path()
            if disk and p is not None and os.path.exists(p):
                os.unlink(p)


TUNER = Tuner()


def describe_choices(tuner: Optional[Tuner] = None) -> str:
    """The measured choices, one line each with their timings (used by explain() and info)."""
    tuner = tuner or TUNER
    ch = tuner.choices()
    head = f"measured choices ({len(ch)}; cache file: {tuner.path() or 'none, memory only'}):"
    lines = [head]
    for k, v in ch.items():
        t = ", ".join(f"{b} {ms:.4g} ms" for b, ms in sorted(v["timings_ms"].items(), key=lambda kv: kv[1]))
        err = "".join(f"; {b} failed: {e}" for b, e in v.get("errors", {}).items())
        lines.append(f"  {k} -> {v['choice']} ({t}{err})")
    for k, why in sorted(tuner.notes.items()):
        lines.append(f"  {k} -> static rule ({why})")
    return "\n".join(lines)
