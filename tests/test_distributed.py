"""An injected model trains under torch.distributed on 2 CPU processes (gloo): DDP, and FSDP2
(fully_shard) where this torch supports it on CPU. Losses and LoRA parameters match one process on the
same global batch."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from helpers import real_jit_env

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(args, tmp_path, name):
    out = str(tmp_path / f"{name}.pt")
    env = real_jit_env(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
                       PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([*args, os.path.join(HERE, "dist_worker.py"), name, out], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_training_matches_one_process(tmp_path, mode):
    single = _run([sys.executable], tmp_path, "single")
    with socket.socket() as sk:  # a free loopback port for the rendezvous (no hostname lookups)
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    dist = _run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
                 "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"], tmp_path, mode)
    assert len(dist["losses"]) == len(single["losses"]) and single["losses"][-1] < single["losses"][0]
    for a, b in zip(dist["losses"], single["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (mode, dist["losses"], single["losses"])
    assert set(dist["state"]) == set(single["state"]) and dist["state"]
    for k, v in single["state"].items():
        assert torch.allclose(dist["state"][k], v, rtol=1e-5, atol=1e-6), (mode, k)
