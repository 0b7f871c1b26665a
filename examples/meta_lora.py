"""PEFT inside meta-learning: a LoRA initialisation meta-learned with Reptile (every task's inner loop in
one batched MultiLoRALinear pass) vs LoRA from PEFT's standard init vs a prototypical network on the
frozen model's features, on held-out few-shot tasks after k ∈ {0, 1, 5, 20} adaptation steps.

    python examples/meta_lora.py            # the full comparison (about 30 s on 2 CPU cores)
    python examples/meta_lora.py --quick    # a smoke run (seconds)

The code is ``peft_kernels.meta`` (also run by ``python -m peft_kernels.bench --op meta``). First-order
only: the fused ops' backward passes are not differentiable again, so second-order MAML through them
raises instead of returning wrong gradients; Reptile needs no second derivatives.
"""
import argparse
import sys

from peft_kernels import meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few meta-iterations and tasks (a smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--meta-iters", type=int, default=None)
    ap.add_argument("--eval-tasks", type=int, default=None)
    ap.add_argument("--backend", default="auto", help="MultiLoRALinear backend (auto, torch, triton, cuda)")
    a = ap.parse_args(argv)
    cfg = meta.Config.quick() if a.quick else meta.Config()
    cfg.seed, cfg.backend = a.seed, a.backend
    if a.meta_iters is not None:
        cfg.meta_iters = a.meta_iters
    if a.eval_tasks is not None:
        cfg.eval_tasks = a.eval_tasks
    meta.run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
