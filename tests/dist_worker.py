"""Worker for tests/test_distributed.py: trains an injected model for a few steps under DDP or FSDP2
(fully_shard) on 2 CPU processes (gloo), or alone on the global batch, and saves losses + LoRA params.

Teardown: torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is
imported. DistributedDataParallel imports it (through torch._dynamo/torch._inductor) on first use, so
imported after init_process_group it captures the live default group, and destroy_process_group cannot
free it: gloo's worker and tcp-loop threads then stay alive into interpreter finalization, where rank 1
aborted about 1 run in 5 ("terminate called without an active exception"). Importing it before
init_process_group binds None instead. `main` checks after destroy_process_group that no gloo thread is
left under DDP, so a regression fails every run instead of 1 in 5."""
import os
import sys

import torch
import torch.distributed.nn  # noqa: F401  before init_process_group: see the module docstring
import torch.distributed as dist
import torch.nn as nn

import peft_kernels as pk

STEPS, GLOBAL_B, DIM = 4, 8, 16


def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    pk.inject_lora(net, ["0", "2", "4"], r=4, lora_alpha=8, init_lora_weights=False, backend="torch")
    return net


def data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(STEPS, GLOBAL_B, DIM, generator=g), torch.randn(STEPS, GLOBAL_B, 4, generator=g)


def run(mode: str, rank: int, world: int, out: str):
    net = model()
    if mode == "ddp":
        net = nn.parallel.DistributedDataParallel(net)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for sub in list(net):
            if isinstance(sub, pk.LoRALinear):
                fully_shard(sub)
        fully_shard(net)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    X, Y = data()
    per = GLOBAL_B // world
    losses = []
    for s in range(STEPS):
        x, y = X[s, rank * per:(rank + 1) * per], Y[s, rank * per:(rank + 1) * per]
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        full = loss.detach().clone()
        if world > 1:
            dist.all_reduce(full)
            full /= world
        losses.append(full.item())
    state = {}
    for n, p in net.named_parameters():
        if "lora_" in n:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            state[n.replace("module.", "")] = t.detach().clone()
    if rank == 0:
        torch.save({"losses": losses, "state": state}, out)


def gloo_threads():
    """Names of this process's threads that belong to gloo (Linux /proc; [] elsewhere)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


def main():
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "single":
        run(mode, 0, 1, out)
        return
    dist.init_process_group("gloo")
    try:
        run(mode, dist.get_rank(), dist.get_world_size(), out)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    # FSDP2 is not checked: DTensor's sharding caches in torch keep the DeviceMesh, and with it the
    # group, alive after destroy_process_group (a torch behaviour we do not patch around).
    left = gloo_threads() if mode == "ddp" else []
    if left:
        sys.exit(f"gloo threads still alive after destroy_process_group: {left}; the default group was "
                 "captured (see the module docstring), and such threads can abort interpreter teardown")


if __name__ == "__main__":
    main()
