"""Ahead-of-time compilation of the shipped Triton launch configs, with no GPU.

Every kernel launch that a launcher would make is recorded (not run), then compiled for a
``GPUTarget`` with exactly the signature, constexprs and ``tt.divisibility`` attrs that Triton's own
JIT binder derives from those arguments, so the register/spill/shared-memory numbers are the ones
the JIT would get on a real GPU. ptxas (shipped with triton) reports registers and spills.

Must run in a process where TRITON_INTERPRET is not set (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, create_function_from_signature

from ._common import INTERPRETED, TensorDescriptor, fp32_precision_override, tma_override

# Per-block shared memory limit for one CTA (opt-in maximum): sm_80 163 KB, sm_90 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple = ()

    def arg(self, name: str):
        """A launch argument by the kernel's parameter name (positional or keyword)."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[self.kernel.arg_names.index(name)]


@contextlib.contextmanager
def record_launches(kernels):
    """Within the block, launching any of ``kernels`` records the call instead of running it."""
    if INTERPRETED:
        raise RuntimeError("AOT compilation needs real JIT kernels: unset TRITON_INTERPRET before importing triton")
    calls = []
    saved = {}
    for k in kernels:
        saved[k] = k.run

        def fake(*args, grid, warmup, _k=k, **kwargs):
            calls.append(Launch(_k, args, kwargs, tuple(grid) if not callable(grid) else ()))

        k.run = fake
    try:
        yield calls
    finally:
        for k, run in saved.items():
            k.run = run


@dataclass
class Compiled:
    name: str
    arch: int
    num_warps: int
    num_stages: int
    constexprs: dict
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    dtype: str = ""
    offset_problems: tuple = ()  # 32-bit address arithmetic found in the TTGIR (see offset_problems)
    adapter_dtype: str = ""

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def row(self) -> str:
        dt = self.dtype + (f"/{self.adapter_dtype}" if self.adapter_dtype and self.adapter_dtype != self.dtype else "")
        return (f"sm_{self.arch} {self.name:18s} {dt:5s} warps={self.num_warps} stages={self.num_stages} "
                f"regs={self.registers:3d} spills={self.spills} smem={self.shared_bytes / 1024:.1f}KiB "
                f"i32addr={len(self.offset_problems)} {self.constexprs}")


# --------------------------------------------------------------------------------------------
# 64-bit address arithmetic, proven on the compiled IR
# --------------------------------------------------------------------------------------------
_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::(\d+))?\s*=\s*\"?([\w.]+)\"?(.*)$")
_VAL = re.compile(r"%[\w.$-]+(?:#\d+)?")
_FOR = re.compile(r"scf\.for\s+(%[\w.$-]+)\s*=\s*(%[\w.$-]+)\s+to\s+(%[\w.$-]+)\s+step\s+(%[\w.$-]+)"
                  r"(?:\s+iter_args\((.*?)\))?")
_CONST_THROUGH = ("tt.splat", "tt.broadcast", "tt.expand_dims", "ttg.convert_layout", "tt.reshape")


def _i32_result(rest: str) -> bool:
    """Whether an op line's result type (after the last ':') is i32 or a tensor of i32."""
    ty = rest.rsplit(":", 1)[-1]
    ty = ty.split(" loc(")[0].strip()
    return ty == "i32" or bool(re.search(r"x\s*i32\s*[,>]", ty))


def offset_problems(ir: str) -> list:
    """32-bit address arithmetic in a kernel's TTIR/TTGIR: every ``tt.addptr`` whose offset depends on an
    i32 product of two runtime values (``row × stride``, ``block × N × R``, ...).

    Such a product wraps at 2³¹ (M·N ≥ 2³¹ output elements: an lm_head at 16.7k tokens), giving an illegal
    address or silently wrong rows, and no interpreter run can show it (it runs programs one after another
    on small shapes). Products with a compile-time constant (``program_id × BLOCK``) stay below the
    launcher's size bound (``_common.check_dims``) and are allowed; a product computed in i64, or a pointer
    advanced by a 64-bit step, is what the kernels use instead.

    A taint analysis on the MLIR text: sources are i32 ``arith.muli`` of two non-constant operands;
    taint flows through every op to its results, through ``scf.for`` iter_args, yields and results (the
    induction variable follows its lower bound and step), and through ``scf.if`` yields. Returns one line
    per tainted ``tt.addptr`` offset.
    """
    lines = ir.splitlines()
    const: set = set()
    tainted: set = set()

    def vals(text):
        return [v.split("#")[0] for v in _VAL.findall(text)]

    changed = True
    while changed:  # loops carry values backwards: iterate to a fixed point
        changed = False
        stack = []  # open regions: ("for", iter_arg names, result base) | ("if", result base) | ("other",)
        for raw in lines:
            line = raw.strip()
            if line.startswith("}"):
                frame = stack.pop() if stack else ("other",)
                if line.endswith("{"):  # "} else {": the same scf.if's other region
                    stack.append(frame)
                continue
            m = _DEF.match(line)
            res, nres, op, rest = (m.group(1), m.group(2), m.group(3), m.group(4)) if m else (None, None, None, line)
            results = [f"{res}"] if res and not nres else ([f"{res}#{i}" for i in range(int(nres))] if res else [])
            opname = op or (line.split()[0] if line else "")
            if opname == "arith.constant":
                for r in results:
                    const.add(r)
                continue
            if opname in _CONST_THROUGH:
                ops = vals(rest.split(":")[0])
                if ops and all(o in const for o in ops):
                    for r in results:
                        const.add(r)
            if opname == "scf.for":
                f = _FOR.search(line)
                iv, lb, ub, st, iters = f.groups()
                pairs = [p.split("=") for p in (iters or "").split(",") if "=" in p]
                names = [a.strip() for a, _ in pairs]
                srcs = [b.strip().split(" ")[0].split("#")[0] for _, b in pairs]
                if (lb in tainted or st in tainted) and iv not in tainted:
                    tainted.add(iv)
                    changed = True
                for a, b in zip(names, srcs):
                    if b in tainted and a not in tainted:
                        tainted.add(a)
                        changed = True
                stack.append(("for", names, res, nres))
                continue
            if opname == "scf.if":
                stack.append(("if", res, nres))
                continue
            if opname == "scf.yield":
                ys = vals(line.split(":")[0])
                for frame in reversed(stack):
                    if frame[0] == "for":
                        _, names, fres, fn = frame
                        outs = [f"{fres}#{i}" if fn else fres for i in range(len(ys))] if fres else []
                        for i, y in enumerate(ys):
                            if y in tainted:
                                for tgt in ([names[i]] if i < len(names) else []) + ([outs[i]] if i < len(outs) else []):
                                    if tgt not in tainted:
                                        tainted.add(tgt)
                                        changed = True
                        break
                    if frame[0] == "if":
                        _, fres, fn = frame
                        for i, y in enumerate(ys):
                            tgt = (f"{fres}#{i}" if fn else fres) if fres else None
                            if tgt and y in tainted and tgt not in tainted:
                                tainted.add(tgt)
                                changed = True
                        break
                continue
            if line.endswith("{"):
                stack.append(("other",))
            operands = vals(rest.split(" : ")[0]) if rest else []
            if opname == "arith.muli" and _i32_result(rest) and len(operands) == 2 \
                    and not any(o in const for o in operands):
                src = True
            else:
                src = False
            if src or any(o in tainted for o in operands):
                for r in results:
                    if r not in tainted:
                        tainted.add(r)
                        changed = True
    out = []
    for raw in lines:
        m = _DEF.match(raw.strip())
        if m and m.group(3) == "tt.addptr":
            ops = vals(m.group(4).split(" : ")[0])
            if len(ops) == 2 and ops[1] in tainted:
                out.append(f"{m.group(1)} = tt.addptr {ops[0]}, {ops[1]}: the offset comes from 32-bit products "
                           f"of runtime values ({raw.strip().split(' loc(')[0][-120:]})")
    return out


def _ptxas_stats(ptx: str, arch: int):
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"-arch={sm}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(m.group(1)), int(m.group(2)), log


def _bind(launch: Launch, arch: int):
    """What Triton's JIT binder derives from the launch's arguments for ``arch``:
    (backend, kwargs, bound_args, specialization, options)."""
    k = launch.kernel
    backend = triton.compiler.make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(k.signature, k.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    kwargs.setdefault("instrumentation_mode", "")
    return (backend, kwargs) + tuple(binder(*launch.args, **kwargs))


def compile_launch(launch: Launch, arch: int) -> Compiled:
    k = launch.kernel
    backend, kwargs, bound_args, specialization, options = _bind(launch, arch)
    options, signature, constexprs, attrs = k._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(k, signature, constexprs, attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    regs, st, ld, _ = _ptxas_stats(ck.asm["ptx"], arch)
    named = {k.arg_names[i[0]]: v for i, v in constexprs.items() if k.arg_names[i[0]].isupper()}
    # the input dtype: that of x (or dY, or the gathered input / adapter stack / output)
    # (a pointer passed as None compiles as "constexpr": the fused decode GEMM's a_ptr, DB_DIRECT's dy_ptr)
    # (the TMA GEMMs read x and dY through descriptors: "tensordesc<bf16[128, 64]>")
    data = next((signature[k] for k in ("x_ptr", "x_desc", "dy_ptr", "dy_desc", "g_ptr", "in_ptr", "a_ptr",
                                        "out_ptr", "w_ptr") if signature.get(k, "constexpr") != "constexpr"), "?")
    data = re.sub(r"^tensordesc<(\w+)\[.*$", r"\1", data)
    # the adapter weights' (or their gradient's) dtype, when the kernel reads them: "bf16/fp32" rows are
    # fp32 adapters on a bf16 base
    adapter = next((signature[k] for k in ("a_ptr", "b_ptr", "w_ptr", "d_ptr", "da_ptr")
                    if signature.get(k, "constexpr") != "constexpr"), "")
    return Compiled(k.__name__, arch, options.num_warps, options.num_stages, named, regs, st, ld,
                    ck.metadata.shared, data.lstrip("*"), tuple(offset_problems(ck.asm["ttgir"])),
                    adapter.lstrip("*"))


# --------------------------------------------------------------------------------------------
# the shipped configs: every launch the LoRA launchers make for these representative inputs
# --------------------------------------------------------------------------------------------
def lora_launch_matrix():
    """(dtype, adapter dtype, rank, dropout p, M, K, N) classes that cover every shipped config and
    constexpr set: each dtype, fp32 adapters on each 16-bit base (HF PEFT's default adapter dtype), rank
    tiles 16/64/128 (and rank > 128, which loops/tiles), dropout on and off, the split-K shrink (M=512)
    and the unsplit one (M=16384), plus odd sizes (no divisibility-by-16 hints, as the JIT would see for
    K=4095)."""
    import torch

    out = []
    for dt, adt in ((torch.float16, None), (torch.bfloat16, None), (torch.float32, None),
                    (torch.float16, torch.float32), (torch.bfloat16, torch.float32)):
        for R in (16, 64, 128, 256):
            for p in (0.0, 0.1):
                out.append((dt, adt or dt, R, p, 512, 4096, 4096))
        # prefill: enough row blocks to fill the machine, so the shrink does not split K (the forward GEMM's
        # STORE_S=False variant); the M=512 rows above split it (STORE_S=True)
        out.append((dt, adt or dt, 16, 0.0, 16384, 4096, 4096))
        # decode (M ≤ 64): the decode bucket's GEMM tiles, with and without dropout (p=0 adds DoRA's epilogue)
        # (16-bit: the fused decode path; N = 4096 halves the decode tile's columns to fill the machine, 14336
        # keeps 32; rank 64 is the largest the fused path takes)
        for p in (0.0, 0.1):
            out.append((dt, adt or dt, 16, p, 16, 4096, 4096))
        out.append((dt, adt or dt, 16, 0.0, 16, 4096, 14336))
        out.append((dt, adt or dt, 64, 0.0, 64, 4096, 4096))
        out.append((dt, adt or dt, 128, 0.1, 16, 4096, 4096))
    out.append((torch.float16, torch.float16, 16, 0.1, 511, 4095, 4097))
    out.append((torch.bfloat16, torch.bfloat16, 128, 0.1, 511, 4095, 4097))
    out.append((torch.bfloat16, torch.float32, 64, 0.1, 511, 4095, 4097))
    out.append((torch.float16, torch.float16, 16, 0.1, 15, 4095, 4097))  # decode, odd sizes
    return out


def _precisions(dt, adt=None):
    """The fp32 precisions a launch of these dtypes can take: both of torch's settings when an fp32 dot
    is involved (they compile differently), one otherwise."""
    import torch

    return ("ieee", "tf32") if torch.float32 in (dt, adt) else ("ieee",)


def record_lora_launches():
    import torch

    from . import lora as L

    kernels = [L._shrink_kernel, L._fwd_gemm_kernel, L._bwd_dy_kernel, L._bwd_dx_kernel, L._bwd_da_kernel,
               L._fwd_gemm_tma_kernel, L._bwd_dx_tma_kernel]
    seed = torch.zeros(1, dtype=torch.int64)
    with record_launches(kernels) as calls:
        for (dt, adt, R, p, M, K0, N0), tma in itertools.product(lora_launch_matrix(), (False, True)):
            sizes = [(K0, N0)]
            if tma:  # what an sm_90 GPU runs where it takes the persistent TMA GEMMs (compiled for sm_90 only)
                with tma_override(True):
                    if not L.tma_gemm(M, torch.empty(1, K0, dtype=dt), a=torch.empty(0, dtype=adt)):
                        continue
                # The recorded launches keep their tensors, and the compile pool's fork failed (ENOMEM) with full-size
                # copies here: W is a stride-0 expansion of one row (only the TMA kernels read it, through a
                # descriptor, whose specialization has no strides), and past M = 1024 rows K and N are 16× smaller
                # (the same divisibility, splits and constexprs). At M ≤ 1024 the full sizes: there the persistent
                # grid (128 tiles) and the K and N splits (16) are multiples of 16, which the JIT specializes on.
                if M > 1024:
                    sizes = [(K0 // 16, N0 // 16)]
            for (K, N), prec in itertools.product(sizes, _precisions(dt, adt)):
                with fp32_precision_override(prec), tma_override(tma):  # fp32 dots follow torch's TF32 setting
                    x = torch.empty(M, K, dtype=dt)
                    W = torch.empty(1, K, dtype=dt).expand(N, K) if tma else torch.empty(N, K, dtype=dt)
                    b = torch.empty(N, dtype=dt)
                    A = torch.empty(R, K, dtype=adt)
                    B = torch.empty(N, R, dtype=adt)
                    S = torch.empty(M, R)
                    L.lora_forward(x, W, b, A, B, 0.5, p, seed)
                    bits = L.dropout_mask_buffer(M, K, x.device)  # forward's packed mask, read by dX and dA
                    for need_dx in (True, False):  # without dX, dA sums the dY launch's partials of dS itself
                        L.lora_backward(torch.empty(M, N, dtype=dt), x, W, A, B, S, 0.5, p, bits, need_dx, True, True)
                    if p == 0:  # DoRA: the magnitude rescale in the GEMM epilogue, with and without storing z
                        for store_z in (False, True):
                            L.lora_forward(x, W, b, A, B, 0.5, 0.0, None, col_scale=torch.empty(N), store_z=store_z)
    return calls


QLORA_KINDS = ("nf4", "nf4-dq", "int8-row", "int8-group", "int8-zp")


def qlora_operand(kind: str, N: int, K: int):
    """An empty ``QuantOperand`` [N, K] laid out as ``kind``'s real weights are (the dtypes, alignments and
    constexprs the JIT sees): bitsandbytes NF4/FP4 in blocks of 64 with an fp32 absmax ("nf4") or a double-quantized
    one ("nf4-dq"), bitsandbytes Linear8bitLt / torchao int8 with a row scale ("int8-row"), torchao's symmetric intx in
    groups of 64 ("int8-group") and its asymmetric one with zero points ("int8-zp")."""
    import torch

    from .lora import QuantOperand

    blocks = -(-(N * K) // 64)
    if kind.startswith("nf4"):
        dq = kind == "nf4-dq"
        return QuantOperand(1, torch.empty((N * K + 1) // 2, dtype=torch.uint8),
                            torch.empty(blocks, dtype=torch.uint8) if dq else torch.empty(blocks), 64, N, K,
                            code=torch.empty(16), absmax_code=torch.empty(256) if dq else None,
                            absmax2=torch.empty(-(-blocks // 256)) if dq else None, absmax_offset=0.03)
    if kind == "int8-row":
        return QuantOperand(2, torch.empty(N * K, dtype=torch.int8), torch.empty(N), K, N, K, row_scale=True)
    return QuantOperand(2 if kind == "int8-group" else 3, torch.empty(N * K, dtype=torch.int8), torch.empty(blocks),
                        64, N, K, zero=torch.empty(blocks, dtype=torch.int8) if kind == "int8-zp" else None)


def qlora_launch_matrix():
    """(dtype, adapter dtype, kind, rank, dropout p, M, K, N) classes of the quantized-base GEMMs (the shrink, dY
    and dA launches are LoRA's, covered there). The QLoRA layouts (``nf4-dq``: bitsandbytes' default; ``int8-row``:
    Linear8bitLt and torchao int8) take every dtype and adapter dtype at each M bucket (decode 16, the split-K
    shrink's M=512, prefill 16384) with and without dropout, and rank tile 64; the other layouts take bf16;
    odd sizes (rows that do not start on a block). ``tests/test_qlora.py`` checks that the launches of real
    bitsandbytes layers at these buckets are all in here."""
    import torch

    def kn(M):  # the recorded launches keep their tensors (the compile pool forks): prefill at K = N = 256, the same
        return (256, 256) if M > 1024 else (4096, 4096)  # divisibility, tiles and constexprs as 4096 at M = 16384

    out = []
    for dt, adt in ((torch.float16, None), (torch.bfloat16, None), (torch.float32, None),
                    (torch.float16, torch.float32), (torch.bfloat16, torch.float32)):
        for kind in ("nf4-dq", "int8-row"):
            for R, p, M in ((16, 0.0, 16), (16, 0.1, 16), (16, 0.0, 512), (16, 0.1, 512), (16, 0.0, 16384),
                            (16, 0.1, 16384), (64, 0.0, 512)):
                out.append((dt, adt or dt, kind, R, p, M, *kn(M)))
    for kind in ("nf4", "int8-group", "int8-zp"):
        for R, p, M in ((16, 0.1, 512), (16, 0.0, 16), (16, 0.0, 16384)):
            out.append((torch.bfloat16, torch.bfloat16, kind, R, p, M, *kn(M)))
    out.append((torch.float16, torch.float16, "nf4-dq", 16, 0.1, 511, 4095, 4097))
    out.append((torch.bfloat16, torch.float32, "int8-row", 64, 0.1, 511, 4095, 4097))
    out.append((torch.bfloat16, torch.bfloat16, "nf4", 16, 0.0, 15, 4095, 4097))
    return out


def record_quant_gemms(W, dt, adt, R, p, M, seed):
    """One forward and backward of LoRA's launchers on the quantized ``W`` (``QuantOperand``)."""
    import torch

    from . import lora as L

    N, K = W.shape
    x = torch.empty(M, K, dtype=dt)
    A, B = torch.empty(R, K, dtype=adt), torch.empty(N, R, dtype=adt)
    L.lora_forward(x, W, torch.empty(N, dtype=dt), A, B, 0.5, p, seed)
    L.lora_backward(torch.empty(M, N, dtype=dt), x, W, A, B, torch.empty(M, R), 0.5, p,
                    L.dropout_mask_buffer(M, K, x.device), True, True, True)


def record_qlora_launches():
    """LoRA's launches with a quantized W for every ``qlora_launch_matrix`` class."""
    import torch

    from . import lora as L

    seed = torch.zeros(1, dtype=torch.int64)
    with record_launches([L._shrink_kernel, L._fwd_gemm_kernel, L._bwd_dy_kernel, L._bwd_dx_kernel,
                          L._bwd_da_kernel]) as calls:
        for dt, adt, kind, R, p, M, K, N in qlora_launch_matrix():
            W = qlora_operand(kind, N, K)
            for prec in _precisions(dt, adt):
                with fp32_precision_override(prec):
                    record_quant_gemms(W, dt, adt, R, p, M, seed)
    return calls


def multi_lora_launch_matrix():
    """(dtype, adapter dtype, max rank, K, N) classes for the multi-adapter kernels: each dtype, fp32 slot
    stacks on a 16-bit base, rank tiles 16/64 (and a rank above 64, which takes several rank blocks),
    aligned and odd sizes."""
    import torch

    out = [(dt, dt, R, 4096, 4096) for dt in (torch.float16, torch.bfloat16, torch.float32) for R in (16, 64, 128)]
    out += [(dt, torch.float32, R, 4096, 4096) for dt in (torch.float16, torch.bfloat16) for R in (16, 64)]
    out += [(torch.float16, torch.float16, 16, 4095, 4097), (torch.bfloat16, torch.bfloat16, 64, 4095, 4097),
            (torch.float32, torch.float32, 16, 4095, 4097), (torch.bfloat16, torch.float32, 16, 4095, 4097)]
    return out


def record_multi_lora_launches():
    import torch

    from ..ops.multi_lora import build_mapping
    from . import multi_lora as ML

    kernels = [ML._sgmv_shrink_kernel, ML._sgmv_expand_kernel, ML._bgmv_shrink_kernel, ML._bgmv_expand_kernel,
               ML._seg_outer_kernel]
    # batches (T tokens over S slots) for the shrink tiles ``fill_shrink`` picks on 132 SMs: 8 × 64 tokens (SGMV
    # narrowed to 16 rows), 8 × 544 (SGMV's 32 rows kept), a 32-token decode step (BGMV rank tiles narrowed).
    # The two added batches take K, N 16× smaller (same divisibility, so the same compiled variants): the recorded
    # launches keep their tensors, and at 4096 columns they held GBs (the compile pool's fork then failed).
    batches = [(512, 8), (4352, 8), (32, 32)]
    small = {4096: 256, 4095: 255, 4097: 257}
    from ..ops._torch_dropout import SlotDropout

    with record_launches(kernels) as calls:
        for T, S in batches:
            m = build_mapping(torch.arange(T) % S, T, S)
            for dt, adt, R, K, N in multi_lora_launch_matrix():
                if (T, S) != batches[0]:
                    K, N = small[K], small[N]
                for prec in _precisions(dt, adt):
                    with fp32_precision_override(prec):
                        x, y, dy = torch.empty(T, K, dtype=dt), torch.empty(T, N, dtype=dt), torch.empty(T, N, dtype=dt)
                        A, B = torch.empty(S, R, K, dtype=adt), torch.empty(S, N, R, dtype=adt)
                        scal, ranks = torch.ones(S), torch.full((S,), R, dtype=torch.int32)
                        # per-adapter dropout (training): the training batches, not the decode step
                        drops = [None] + ([SlotDropout.make([0.1] * S, torch.zeros(1, dtype=torch.int64), "cpu")]
                                          if T >= 512 else [])
                        for path in ("bgmv", "sgmv"):
                            for drop in drops:
                                _, Sb = ML.multi_lora_forward(y, x, A, B, m, scal, ranks, path, drop)
                                ML.multi_lora_backward(dy, x, torch.empty(T, K, dtype=dt), A, B, Sb, m, scal, ranks,
                                                       path, True, True, drop)
    return calls


def sm90_only(c: Launch) -> bool:
    """Whether the launch passes a TMA descriptor (the persistent sm_90 GEMMs: sm_80 has no TMA)."""
    return TensorDescriptor is not None and any(isinstance(a, TensorDescriptor)
                                                for a in (*c.args, *c.kwargs.values()))


def _launch_key(c: Launch, arch: int):
    """Two launches with equal keys compile to the same binary."""
    _, _, _, spec, opts = _bind(c, arch)
    return (c.kernel.__name__, repr(spec), repr(opts))


def record_adapter_launches():
    """The bottleneck adapter kernels (and the LoRA kernels they reuse) of all three placements, for each
    dtype, bottleneck 16/64/256, every activation, aligned and odd sizes."""
    import torch

    from . import bottleneck as BN
    from . import lora as L

    kernels = [BN._adapter_shrink_kernel, BN._expand_kernel, BN._seq_fwd_kernel, BN._adapter_bwd_kernel,
               L._fwd_gemm_kernel, L._bwd_dy_kernel, L._bwd_dx_kernel]
    shapes = [(512, 4096, 4096), (511, 4095, 4097), (16, 4096, 4096), (1, 4095, 4097)]  # + the decode tiles
    with record_launches(kernels) as calls:
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for prec in _precisions(dt):
                with fp32_precision_override(prec):
                    for b in (16, 64, 256):
                        for act in ("relu", "gelu", "gelu_tanh", "silu", "tanh"):
                            for M, K, N in shapes:
                                e = lambda *s: torch.empty(*s, dtype=dt)  # noqa: E731
                                x, W, bias, db, P = e(M, K), e(N, K), e(N), e(b), torch.empty(M, b)
                                Dp, Ds, U, dy = e(b, K), e(b, N), e(N, b), e(M, N)
                                BN.parallel_forward(x, W, bias, Dp, db, U, act)
                                BN.parallel_backward(dy, x, W, Dp, U, P, act, True, True, True, True)
                                _, y, _ = BN.sequential_forward(x, W, bias, Ds, db, U, bias, act)
                                BN.adapter_backward(dy, y, Ds, U, P, act, True, True, True, True, True)
                                # standalone without the residual (and an adapter whose out ≠ in features)
                                BN.bottleneck_forward(x, Dp, db, U, None, act, False)
                                BN.adapter_backward(dy, x, Dp, U, P, act, False, True, True, True, True)
    return calls


def record_ia3_launches():
    """The (IA)³ GEMM for both scalings, forward and backward, each dtype (fp32 with and without TF32), l in
    the input's dtype and in fp32, aligned and odd sizes."""
    import torch

    from . import ia3 as I

    with record_launches([I._ia3_gemm_kernel]) as calls:
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for prec in _precisions(dt):
                with fp32_precision_override(prec):
                    for ldt in {dt, torch.float32}:
                        # (M ≤ 64: the 16-bit decode tile, narrowed to 16 columns, and kept at 32 for N = 14336)
                        for M, K, N in ((512, 4096, 4096), (511, 4095, 4097), (16, 4096, 4096), (1, 4095, 4097),
                                        (16, 4096, 14336)):
                            x, W, b, dy = (torch.empty(M, K, dtype=dt), torch.empty(N, K, dtype=dt),
                                           torch.empty(N, dtype=dt), torch.empty(M, N, dtype=dt))
                            for ff in (False, True):
                                l = torch.empty(K if ff else N, dtype=ldt)
                                _, raw = I.ia3_forward(x, W, b, l, ff, need_raw=True)
                                I.ia3_backward(dy, x, W, l, raw if raw is not None else dy, ff, True, True)
    return calls


def record_moe_launches():
    """The MoE grouped GEMM (forward and dX) and its per-expert dA/dB reductions, for each dtype (fp32 with and
    without TF32), fp32 adapters on a 16-bit base, rank tiles 16/32/64/128, aligned and odd sizes; the frozen
    experts alone (no LoRA) too."""
    import torch

    from . import moe as MO
    from . import multi_lora as ML

    E, M = 8, 512
    starts = [0, 40, 40, 200, 260, 300, 420, 500, 512]
    shapes = [(256, 768), (255, 769)]  # (K, N): the recorded tensors stay small; same divisibility as 2048/768
    with record_launches([MO._grouped_gemm_kernel, ML._seg_outer_kernel]) as calls:
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for adt in {dt, torch.float32}:
                for prec in _precisions(dt, adt):
                    with fp32_precision_override(prec):
                        for R in (16, 32, 64, 128):
                            for K, N in shapes:
                                x, W, dy = torch.empty(M, K, dtype=dt), torch.empty(E, N, K, dtype=dt), \
                                    torch.empty(M, N, dtype=dt)
                                A, B = torch.empty(E, R, K, dtype=adt), torch.empty(E, N, R, dtype=adt)
                                _, S = MO.grouped_forward(x, starts, W, A, B, 2.0)
                                MO.grouped_backward(dy, x, starts, W, A, B, S, 2.0, True, True, True)
                        if adt == dt:
                            for K, N in shapes:
                                x, W = torch.empty(M, K, dtype=dt), torch.empty(E, N, K, dtype=dt)
                                MO.grouped_forward(x, starts, W, None, None, 1.0)
                                MO.grouped_backward(torch.empty(M, N, dtype=dt), x, starts, W, None, None, None,
                                                    1.0, True, False, False)
    return calls


RECORDERS = {"lora": lambda: record_lora_launches(), "multi_lora": lambda: record_multi_lora_launches(),
             "ia3": lambda: record_ia3_launches(), "qlora": lambda: record_qlora_launches(),
             "adapter": lambda: record_adapter_launches(), "moe": lambda: record_moe_launches()}


_POOL_CALLS: list = []  # the launches a compile worker recorded itself (read by index: nothing is pickled)


def _record_into_pool(ops):
    """A compile worker's initializer: record the launches of ``ops`` into this process's ``_POOL_CALLS``."""
    _POOL_CALLS[:] = [c for op in ops for c in RECORDERS[op]()]


def _compile_indexed(job):
    i, arch = job
    return compile_launch(_POOL_CALLS[i], arch)


def check_all(archs=(80, 90), verbose=True, ops=("lora", "multi_lora", "adapter", "ia3", "qlora", "moe"), jobs=None,
              first_per_kernel=False):
    """Compile every distinct shipped launch of ``ops`` (in ``jobs`` forked processes, default one per
    CPU); return (rows, problems). ``first_per_kernel``: only the first launch of each kernel per arch
    (a quick look, not the full check)."""
    import multiprocessing

    jobs = jobs or os.cpu_count() or 1
    # The compile workers fork before anything is recorded and each records the launches itself (the same order,
    # so the same indices): the recorded launches keep their (untouched, but committed) tensors, about 69 GB of
    # address space for every op, and a fork of a parent that size failed with ENOMEM
    pool = multiprocessing.get_context("fork").Pool(jobs, initializer=_record_into_pool, initargs=(ops,)) \
        if jobs > 1 else None
    calls = [c for op in ops for c in RECORDERS[op]()]
    work = []
    for arch in archs:
        seen = set()
        for i, c in enumerate(calls):
            if arch < 90 and sm90_only(c):
                continue
            key = c.kernel.__name__ if first_per_kernel else _launch_key(c, arch)
            if key not in seen:
                seen.add(key)
                work.append((i, arch))
    if pool is not None:
        with pool:
            results = pool.imap(_compile_indexed, work, chunksize=4)
            rows = [_report(r, verbose) for r in results]
    else:
        _POOL_CALLS[:] = calls
        rows = [_report(_compile_indexed(w), verbose) for w in work]
    problems = []
    for r in rows:
        for o in r.offset_problems:
            problems.append(f"{r.name} on sm_{r.arch} has 32-bit address arithmetic: {o} {r.constexprs}")
        if r.spills:
            problems.append(f"{r.name} on sm_{r.arch} spills {r.spills} bytes: {r.constexprs}")
        if r.shared_bytes > SMEM_LIMIT[r.arch]:
            problems.append(f"{r.name} on sm_{r.arch} uses {r.shared_bytes} B shared memory "
                            f"> {SMEM_LIMIT[r.arch]}: {r.constexprs}")
    return rows, problems


def _report(r: Compiled, verbose: bool) -> Compiled:
    if verbose:
        print(r.row(), flush=True)
    return r


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m peft_kernels.kernels.aot",
                                 description="AOT-compile every shipped Triton config; fail on spills/smem")
    ap.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default both)")
    ap.add_argument("--op", choices=sorted(RECORDERS), action="append", help="kernel family (default all)")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    args = ap.parse_args(argv)
    rows, problems = check_all(tuple(args.arch or (80, 90)), ops=tuple(args.op or sorted(RECORDERS)),
                               jobs=args.jobs)
    print(f"{len(rows)} kernel variants compiled; max registers "
          f"{max(r.registers for r in rows)}, max shared {max(r.shared_bytes for r in rows) / 1024:.1f} KiB, "
          f"total spills {sum(r.spills for r in rows)} bytes, "
          f"32-bit address offsets {sum(len(r.offset_problems) for r in rows)}")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
