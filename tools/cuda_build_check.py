"""`make cuda-build-check`: the CUDA build of peft_kernels._C (a CUDAExtension against a CUDA torch,
built as a wheel and installed into .venv-cuda) compiles, links, imports and behaves on a machine
with no GPU. Run with the CUDA venv's python from outside the source tree, so the installed wheel is
what gets imported. Exits non-zero on any failure."""
import os
import sys

import torch


def main() -> int:
    import peft_kernels as pk
    from peft_kernels import _ext, dispatch

    src = os.path.dirname(pk.__file__)
    assert "site-packages" in src, f"imported peft_kernels from {src}, not the installed wheel"
    why = _ext.unavailable_reason()
    assert why is None, f"peft_kernels._C did not load: {why}"
    info = _ext.build_info()
    want = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", ",").replace(" ", ",")
    assert info.startswith("cuda "), f"built without CUDA: build_info() = {info!r}"
    assert not want or info == f"cuda {want}", f"archs {info!r} != TORCH_CUDA_ARCH_LIST {want!r}"
    lib = [f for f in os.listdir(src) if f.startswith("_C") and f.endswith(".so")]
    assert lib, f"no _C*.so in {src}"
    blob = open(os.path.join(src, lib[0]), "rb").read()
    for k in (b"bgmv_shrink_kernel", b"bgmv_expand_kernel", b"sgmv_shrink_kernel", b"sgmv_expand_kernel"):
        assert k in blob, f"{k.decode()} is not in {lib[0]}"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); peft_kernels._C: {info}; {lib[0]} "
          f"{len(blob) / 2**20:.1f} MiB with the BGMV/SGMV kernels")

    # The CPU kernels of the same build still work (and match a plain einsum).
    g = torch.Generator().manual_seed(0)
    x, A = torch.randn(5, 12, generator=g), torch.randn(3, 4, 12, generator=g)
    perm = torch.tensor([4, 0, 2], dtype=torch.int32)
    slots = torch.tensor([1, 1, 2], dtype=torch.int32)
    ranks = torch.tensor([4, 4, 2], dtype=torch.int32)
    S = torch.ops.peft_kernels.bgmv_shrink(x, A, perm, slots, ranks, None)
    ref = torch.einsum("pk,prk->pr", x[perm.long()], A[slots.long()])
    ref[2, 2:] = 0  # slot 2 has rank 2
    assert torch.allclose(S, ref, atol=1e-5), (S, ref)

    if torch.cuda.is_available():
        print("a GPU is present: run `make test` in this venv for the CUDA numerical tests")
        return 0
    # No GPU: asking for the CUDA kernels gives a clean error that says why, never a crash.
    B = torch.randn(3, 7, 4, generator=g)
    try:
        pk.multi_lora_linear(x, torch.randn(7, 12), None, A, B, [1.0, 1.0, 1.0], torch.tensor([0, 1, -1, 2, 1]),
                             backend="cuda")
    except pk.BackendUnavailable as e:
        assert "CUDA tensors" in str(e), e
        print(f"backend='cuda' on CPU tensors: BackendUnavailable: {e}")
    else:
        raise AssertionError("backend='cuda' on CPU tensors did not raise")
    why = dispatch.cuda_unavailable_reason(torch.device("cuda"))
    assert why is not None and "is_available() is False" in why, why
    print(f"backend='cuda' on a CUDA device without a GPU: {why}")
    print("cuda-build-check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
