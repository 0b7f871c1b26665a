"""Worker for tests/test_distributed.py: trains an injected model for a few steps under DDP or FSDP2
(fully_shard) on 2 CPU processes (gloo), or alone on the global batch, and saves losses + LoRA params."""
import sys

import torch
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


if __name__ == "__main__":
    main()
