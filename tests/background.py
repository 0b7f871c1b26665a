"""The suite's two longest checks are subprocesses (the AOT compile of every shipped Triton config, and the
gpu-check dry run) that the rest of the suite does not wait on. Most of the suite runs on one core (the Triton
interpreter is Python), so when a session selects one of them, conftest starts its subprocess at collection,
at a lower priority, and moves the test to the end of the session, where it waits for the result. The test checks
the same output as if it had run the command itself; a session that does not select the test starts nothing, and a test
called without a started job runs its command then (``run``)."""
import os
import shutil
import subprocess
import sys
import tempfile

from helpers import real_jit_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# key: (the test's node id, the command; "{out}" is a fresh folder of the job's own)
JOBS = {
    "aot": ("tests/test_aot.py::test_shipped_configs_compile_without_spills",
            [sys.executable, "-m", "peft_kernels.kernels.aot"]),
    # its time budget (450 s by default, a GPU run's safeguard) counts wall-clock, and at low priority beside the
    # suite the dry run takes longer than that
    "gpucheck-dry": ("tests/test_gpucheck.py::test_dry_run_end_to_end",
                     [sys.executable, "-m", "peft_kernels.gpucheck", "--dry-run", "--budget", "2400",
                      "--out", "{out}"]),
}

_started = {}  # key -> (Popen, stdout file, stderr file, out folder)
_folders = []  # removed when the session ends


def _argv(key, out):
    return [a.replace("{out}", out) for a in JOBS[key][1]]


def start_selected(nodeids):
    """Start the job of every selected test (called once, from conftest, after collection); returns those tests'
    node ids."""
    for key, (nodeid, _) in JOBS.items():
        if nodeid not in nodeids or key in _started:
            continue
        out = tempfile.mkdtemp(prefix=f"pk-bg-{key}-")
        _folders.append(out)
        so, se = (open(os.path.join(out, f".{n}"), "w+") for n in ("stdout", "stderr"))
        p = subprocess.Popen(_argv(key, out), cwd=ROOT, env=real_jit_env(), stdout=so, stderr=se,
                             preexec_fn=lambda: os.nice(10))
        _started[key] = (p, so, se, out)
    return {JOBS[key][0] for key in _started}


def stop_all():
    """Kill what is still running (a session that ended early, e.g. under -x); remove the jobs' folders."""
    for p, so, se, _ in _started.values():
        if p.poll() is None:
            p.kill()
            p.wait()
        so.close()
        se.close()
    _started.clear()
    for d in _folders:
        shutil.rmtree(d, ignore_errors=True)
    _folders.clear()


def run(key, timeout):
    """(CompletedProcess, out folder) of the key's command: the started job's (waited for), or run now."""
    if key not in _started:
        out = tempfile.mkdtemp(prefix=f"pk-{key}-")
        _folders.append(out)
        p = subprocess.run(_argv(key, out), cwd=ROOT, env=real_jit_env(), capture_output=True, text=True, timeout=timeout)
        return p, out
    p, so, se, out = _started.pop(key)
    try:
        p.wait(timeout=timeout)  # from now: it ran beside the suite until here
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise
    so.seek(0)
    se.seek(0)
    done = subprocess.CompletedProcess(p.args, p.returncode, so.read(), se.read())
    so.close()
    se.close()
    return done, out
