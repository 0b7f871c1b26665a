"""With no working C++ compiler the package still installs (pure Python + Triton) and every op runs on
the torch path, saying why the extension is missing."""
import os
import subprocess
import sys
import tarfile

from helpers import real_jit_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r"""
import sys
# the development checkout may be installed in editable mode: hide its finder so the copy under test loads
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import torch
import peft_kernels as pk
from peft_kernels import _ext
assert pk.__file__.startswith(sys.argv[1]), pk.__file__
assert not _ext.available() and "was not built" in _ext.unavailable_reason(), _ext.unavailable_reason()
x = torch.randn(6, 8)
y = pk.lora_linear(x, torch.randn(5, 8), None, torch.randn(2, 8), torch.randn(5, 2), 1.0, dropout_p=0.1, training=True)
m = pk.multi_lora_linear(x, torch.randn(5, 8), None, torch.randn(2, 3, 8), torch.randn(2, 5, 3), [1.0, 2.0],
                         torch.tensor([0, 1, -1, 1, 0, 0]))
assert y.shape == m.shape == (6, 5)
print("OK", _ext.unavailable_reason())
"""


def test_installs_and_runs_without_a_compiler(tmp_path):
    src, target = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    skip = (".git", ".venv", "build", "__pycache__", ".pytest_cache")

    def keep(info):
        parts = info.name.split("/")
        if any(p.startswith(skip) or p.endswith(".egg-info") for p in parts) or (
                parts[-1].startswith("_C") and parts[-1].endswith(".so")):
            return None
        return info

    tar_path = tmp_path / "src.tar"
    with tarfile.open(tar_path, "w") as tf:
        tf.add(ROOT, arcname=".", filter=keep)
    with tarfile.open(tar_path) as tf:
        tf.extractall(src, filter="data")
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not list((target / "peft_kernels").glob("_C*.so"))
    run = subprocess.run([sys.executable, "-c", CHECK, str(target)], capture_output=True, text=True,
                         env=real_jit_env(PYTHONPATH=str(target)),
                         timeout=300, cwd=str(tmp_path))
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
