"""Mutation testing: plant realistic bugs in the library, one at a time, and report which ones the test suite
catches.

    .venv/bin/python tools/mutate.py            # every mutant; prints a table and the score
    .venv/bin/python tools/mutate.py --list     # the mutants
    .venv/bin/python tools/mutate.py --only ID [--only ID ...]

Each mutant is an exact text edit (found exactly once, or the mutant is reported stale: the code moved on and the
mutant must be updated) in ops, kernels, C++ or checkpoint code, with the test files a developer would run for
that code. Every mutant runs in a scratch copy of the checkout at HEAD (--rev, or --worktree for uncommitted
work; the working tree is never touched, and edits made during a run cannot leak into it): the copy is
edited, its C++ extension rebuilt in place when a .cpp/.h changed, and `pytest -x` runs the mutant's tests
against it (PYTHONPATH points at the copy). Killed = the tests fail; survived = they pass. Target: ≥ 90% killed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (id, file, find, replace, tests, what the bug is)
MUTANTS = [
    ("lora-bwd-scale", "peft_kernels/ops/lora.py",
     "dS = torch.mm(dyc, B).mul_(scaling)  # M×r", "dS = torch.mm(dyc, B)  # M×r",
     ["tests/test_lora_op.py"], "torch backend: dA/dX miss the LoRA scaling"),
    ("lora-fwd-bias-scale", "peft_kernels/ops/lora.py",
     "y = torch.addmm(bias.to(cdt), S, B.t(), alpha=scaling)", "y = torch.addmm(bias.to(cdt), S, B.t())",
     ["tests/test_lora_op.py"], "torch backend with a bias: the update is not scaled"),
    ("lora-bf16-scale-3pct", "peft_kernels/kernels/lora.py",
     "                 bits_out: Optional[torch.Tensor] = None):\n",
     "                 bits_out: Optional[torch.Tensor] = None):\n"
     "    scaling = scaling * 1.03 if x.dtype == torch.bfloat16 else scaling\n",
     ["tests/test_lora_op.py"], "Triton: the bf16 LoRA scaling is 3% off"),
    ("lora-triton-x-col-stride", "peft_kernels/kernels/lora.py",
     "        x.stride(0), x.stride(1), swn, swk, B.stride(0), B.stride(1),",
     "        x.stride(0), 1, swn, swk, B.stride(0), B.stride(1),",
     ["tests/test_lora_op.py"], "Triton GEMM ignores x's column stride"),
    ("dropout-keep-scale", "peft_kernels/ops/_torch_dropout.py",
     "    return _TWO32 / (_TWO32 - threshold(p))", "    return 1.0",
     ["tests/test_lora_op.py", "tests/test_bottleneck.py"], "inverted dropout without the 1/(1-p) scale"),
    ("rslora-scaling", "peft_kernels/nn/lora.py",
     "self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)", "self.scaling = lora_alpha / r",
     ["tests/test_module.py"], "rsLoRA scales by alpha/r instead of alpha/sqrt(r)"),
    ("unmerge-current-delta", "peft_kernels/nn/lora.py",
     '        delta = self._delta(mw["lora_A"], mw["lora_B"], float(mw["scaling"]))',
     '        delta = self.delta_weight()',
     ["tests/test_module.py"], "unmerge subtracts the current update, not the merged one"),
    ("merged-state-dict", "peft_kernels/nn/lora.py",
     "        if self.merged:\n            w, b = self._unmerged_base()\n            destination[",
     "        if False:\n            w, b = self._unmerged_base()\n            destination[",
     ["tests/test_module.py"], "a merged layer's state dict holds the merged weight (applied twice on load)"),
    ("dora-norm-scaling", "peft_kernels/nn/lora.py",
     "        return dora_weight_norm(self.base_weight(), self.lora_A, self.lora_B, self.scaling)",
     "        return dora_weight_norm(self.base_weight(), self.lora_A, self.lora_B, 1.0)",
     ["tests/test_dora.py"], "DoRA's norm ignores the scaling"),
    ("ia3-ff-trainable-dw", "peft_kernels/ops/ia3.py",
     "                xin = x2 * lv.to(x2.dtype) if ctx.feedforward else x2",
     "                xin = x2",
     ["tests/test_ia3.py"], "IA3 Triton, trainable base, input scaling: dW misses l"),
    ("bottleneck-up-grad-scale", "peft_kernels/ops/bottleneck.py",
     "    dU = (gtH * col).to(up_w.dtype) if need_uw else None",
     "    dU = gtH.to(up_w.dtype) if need_uw else None",
     ["tests/test_bottleneck.py"], "bottleneck: dU misses the scale"),
    ("multi-triton-rank-clamp", "peft_kernels/kernels/multi_lora.py",
     "    return tl.minimum(tl.maximum(tl.load(ranks_ptr + slot), 0), R)",
     "    return tl.maximum(tl.load(ranks_ptr + slot), 0)",
     ["tests/test_gpu_path.py", "tests/test_multi_lora_op.py"], "Triton multi-adapter: ranks not clamped to R"),
    ("multi-bad-ids-last-slot", "peft_kernels/ops/multi_lora.py",
     "    key = torch.where(valid, ids, -1)", "    key = torch.where(valid, ids, num_slots - 1)",
     ["tests/test_multi_lora_op.py", "tests/test_multi_lora_module.py"], "ids outside [0, S) read the last slot"),
    ("multi-set-adapter-scaling", "peft_kernels/nn/multi_lora.py",
     "            self.scalings[slot] = scaling", "            self.scalings[slot] = 1.0",
     ["tests/test_multi_lora_module.py"], "set_adapter drops the scaling"),
    ("multi-stale-grouping", "peft_kernels/nn/multi_lora.py",
     "        st._new_forward()", "        pass",
     ["tests/test_multi_lora_module.py", "tests/test_concurrency.py"], "ids changed in place: stale grouping"),
    ("checkpoint-rslora", "peft_kernels/checkpoint.py",
     '    rslora = bool(cfg.get("use_rslora", False))', "    rslora = False",
     ["tests/test_peft_checkpoint.py"], "a PEFT checkpoint's use_rslora is ignored"),
    ("checkpoint-alpha-check", "peft_kernels/checkpoint.py",
     "    elif not (math.isfinite(v) and abs(v) < 3.0e38):", "    elif False:",
     ["tests/test_checkpoint_safety.py"], "config numbers not checked for NaN/Infinity/float32 range"),
    ("fp32-precision", "peft_kernels/kernels/_common.py",
     '    return "tf32" if p == "tf32" else "ieee"', '    return "tf32" if p != "ieee" else "ieee"',
     ["tests/test_gpu_path.py"], "fp32 precision: torch's 'none' read as TF32"),
    # concurrency, stale state, safety (#15)
    ("adapter-ids-leak", "peft_kernels/nn/multi_lora.py",
     "        _ACTIVE.reset(token)", "        pass",
     ["tests/test_multi_lora_module.py"], "adapter_ids' ids outlive the block"),
    ("hot-swap-no-lock", "peft_kernels/nn/multi_lora.py",
     "    def _write_slot(self, slot: int, A, B, scaling: float, r: int) -> None:\n"
     "        with self._slots_lock.writing(self.lora_A.device):",
     "    def _write_slot(self, slot: int, A, B, scaling: float, r: int) -> None:\n"
     "        with contextlib.nullcontext():",
     ["tests/test_concurrency.py"], "set_adapter writes slots while forwards read them (torn hot swap)"),
    ("set-adapter-nonfinite", "peft_kernels/nn/multi_lora.py",
     "        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):",
     "        if False:", ["tests/test_concurrency.py"], "set_adapter accepts non-finite weights"),
    ("mapping-mutable", "peft_kernels/ops/multi_lora.py",
     '    perm = property(lambda self: self._perm.clone(), doc="int32 [T_active] (a copy)")',
     '    perm = property(lambda self: self._perm, doc="int32 [T_active] (a copy)")',
     ["tests/test_fuzz.py"], "AdapterMapping hands out its own perm (mutable from outside)"),
    ("merged-load-no-remerge", "peft_kernels/nn/lora.py",
     "    if was_merged:\n        module.merge()", "    if was_merged:\n        pass",
     ["tests/test_module.py"], "loading into a merged layer leaves it unmerged but flagged"),
    ("double-backward-saved-S", "peft_kernels/ops/lora.py",
     "    S = xd @ A.t()\n", "    S = ctx.saved_tensors[1].to(cdt)\n",
     ["tests/test_meta.py"], "double backward treats S as a constant (drops dS/dA terms)"),
    ("first-order-silent", "peft_kernels/ops/_autograd.py",
     "            if torch.is_grad_enabled() and any(ctx.needs_input_grad):", "            if False:",
     ["tests/test_meta.py"], "first-order-only backends silently first-order under create_graph"),
    ("fp64-scalings-fp32", "peft_kernels/ops/multi_lora.py",
     "torch.float64 if x.dtype == torch.float64 else torch.float32)", "torch.float32)",
     ["tests/test_float64.py"], "multi-adapter fp64 rounds its scalings through fp32"),
    ("adapter-name-escape", "peft_kernels/checkpoint.py",
     "    if os.path.commonpath([root, os.path.realpath(sub)]) != root:", "    if False:",
     ["tests/test_checkpoint_safety.py"], "adapter_name may follow a link out of the folder"),
    ("config-string-bool", "peft_kernels/checkpoint.py",
     '    if not isinstance(v, bool):  # "false" is a non-empty string', '    if not isinstance(v, (bool, str)):  #',
     ["tests/test_checkpoint_safety.py"], "config booleans given as strings are accepted"),
    ("slot-load-no-rollback", "peft_kernels/checkpoint.py",
     "        for m, (A, B, s, p) in reversed(done):", "        for m, (A, B, s, p) in []:",
     ["tests/test_checkpoint_safety.py"], "a failed slot load leaves earlier layers written"),
    ("save-leaves-temp", "peft_kernels/checkpoint.py",
     "    except BaseException:\n        shutil.rmtree(tmp, ignore_errors=True)\n        raise",
     "    except BaseException:\n        raise",
     ["tests/test_checkpoint_safety.py"], "a failed save leaves its temporary folder behind"),
    ("cpp-dy-shape", "csrc/cpu/multi_lora.cpp",
     '  check_matrix(dy, "dy", x.size(0), lora_B.size(1));\n', "",
     ["tests/test_fuzz.py"], "C++ multi_lora_bwd trusts dy's shape"),
    # C++ (the copy's extension is rebuilt)
    ("cpp-chunk-boundary", "csrc/cpu/multi_lora.cpp",
     "items.push_back({segs.slots[g], b, std::min(b + kChunkRows, segs.starts[g + 1])});",
     "items.push_back({segs.slots[g], b, std::min(b + kChunkRows - 1, segs.starts[g + 1])});",
     ["tests/test_multi_lora_op.py"], "C++ multi-adapter: the last row of each 64-row chunk is skipped"),
    ("cpp-rank-clamp", "csrc/cpu/multi_lora.cpp",
     "for (auto& r : s.ranks) r = std::min(std::max<int64_t>(r, 0), R);",
     "for (auto& r : s.ranks) r = std::max<int64_t>(r, 0);",
     ["tests/test_fuzz.py", "tests/test_gpu_path.py"], "C++ multi-adapter: ranks not clamped to R"),
    ("cpp-bgmv-expand-scale", "csrc/cpu/lora_gather.cpp",
     "        if (rank == 0) continue;\n        const float s = slot_scale(scalings, slot);",
     "        if (rank == 0) continue;\n        const float s = 1.f;",
     ["tests/test_gather_ops.py"], "C++ bgmv_expand ignores the per-slot scalings"),
    ("cpp-perm-range-check", "csrc/include/peft_kernels/gather_checks.h",
     '    TORCH_CHECK_VALUE(v >= 0 && v < n_rows, "perm[", i,',
     '    if (v < 0 || v >= n_rows) continue;\n    TORCH_CHECK_VALUE(v >= 0 && v < n_rows, "perm[", i,',
     ["tests/test_fuzz.py"], "C++ gather ops: perm values not range-checked (out-of-bounds access)"),
    ("cpp-seg-starts-check", "csrc/cpu/multi_lora.cpp",
     "  TORCH_CHECK_VALUE(s.starts.front() == 0 && s.starts.back() == n_active,",
     "  TORCH_CHECK_VALUE(true || s.starts.back() == n_active,",
     ["tests/test_fuzz.py"], "C++ multi-adapter: seg_starts bounds unchecked"),
    # #16: the measured dispatch, the flattened SGMV grid, the split-K shrink
    ("dispatch-picks-slowest", "peft_kernels/dispatch.py",
     "choice = min(ok, key=lambda k: (ok[k], candidates.index(k)))",
     "choice = max(ok, key=lambda k: (ok[k], candidates.index(k)))",
     ["tests/test_dispatch_measured.py"], "measured dispatch keeps the slowest backend"),
    ("dispatch-cache-ignores-versions", "peft_kernels/dispatch.py",
     'h = hashlib.sha256(json.dumps(self.meta(), sort_keys=True).encode()).hexdigest()[:16]',
     'h = "fixed"',
     ["tests/test_dispatch_measured.py"], "dispatch disk cache shared across torch/triton versions"),
    ("row-blocks-floor", "peft_kernels/ops/multi_lora.py",
     "nbs = (starts[1:] - starts[:-1] + (block_m - 1)) // block_m",
     "nbs = (starts[1:] - starts[:-1]) // block_m",
     ["tests/test_multi_lora_op.py"], "flattened SGMV grid drops each segment's partial last block"),
    ("split-k-drops-a-partial", "peft_kernels/kernels/lora.py",
     "        for j in range(1, num_parts):  # partial j",
     "        for j in range(2, num_parts):  # partial j",
     ["tests/test_lora_op.py"], "split-K shrink: the GEMM skips one partial of S"),
    ("decode-bucket-never", "peft_kernels/kernels/lora.py",
     'M_BUCKETS = (("decode", 64), ("mid", 1024), ("prefill", None))',
     'M_BUCKETS = (("decode", 0), ("mid", 1024), ("prefill", None))',
     ["tests/test_lora_op.py"], "decode GEMMs get the prefill tile (32 programs at N = 4096)"),
    ("fp32-one-level-sum", "peft_kernels/kernels/_common.py",
     "        if step % CHUNK == CHUNK - 1:\n            acc += part\n            part = tl.zeros_like(part)",
     "        if step % CHUNK == CHUNK - 1:\n            acc = acc\n            part = part",
     ["tests/test_fp32_summation.py"], "the fp32 partial is only flushed at the end: a one-level sum (cuBLAS × 4-6 error)"),
    ("tuner-first-round-only", "peft_kernels/dispatch.py",
     "                        timings[name] = min(timings.get(name, math.inf), ms)",
     "                        timings.setdefault(name, ms)",
     ["tests/test_dispatch_measured.py"], "the measured dispatch keeps the first round, not the fastest"),
    ("tuner-fast-path-under-capture", "peft_kernels/dispatch.py",
     "        if hit is None or _capturing(device) or _autotune_off():", "        if hit is None or _autotune_off():",
     ["tests/test_dispatch_measured.py"], "the per-process fast path answers under CUDA-graph capture"),
    ("hash-mask-high-word", "peft_kernels/kernels/_common.py",
     "    k1 = _fmix32((s >> 32).to(tl.uint32) ^ k0 ^ 0x85EBCA77)", "    k1 = _fmix32(k0 ^ 0x85EBCA77)",
     ["tests/test_dropout_hash.py"], "the GPU torch-backend mask ignores the seed's high word"),
    ("dropout-bits-expand", "peft_kernels/kernels/_common.py",
     "    return (wide >> (tl.arange(0, BLOCK_K) % 8).to(tl.uint8)[None, :]) & 1",
     "    return (wide >> (tl.arange(0, BLOCK_K) % 4).to(tl.uint8)[None, :]) & 1",
     ["tests/test_dropout_bits.py"], "the shrink unpacks the mask bytes with the wrong bit order"),
    ("dropout-bits-dx-byte", "peft_kernels/kernels/lora.py",
     "            acc = tl.where(keep != 0, acc * keep_scale, 0.0)\n        acc = _gemm_mainloop(acc, dy_ptr,",
     "            acc = tl.where(keep == 0, acc * keep_scale, 0.0)\n        acc = _gemm_mainloop(acc, dy_ptr,",
     ["tests/test_dropout_bits.py"], "dX applies the inverted mask bits: backward's mask is not forward's"),
    ("fused-dx-mask-byte", "peft_kernels/kernels/lora.py",
     "            keep = load_keep(bits_ptr, rm64, m_ok, pid_k * BLOCK_K, tl.cdiv(K, 8), BLOCK_M, BLOCK_K)\n"
     "            lr = tl.where(",
     "            keep = load_keep(bits_ptr, rm64, m_ok, pid_k * BLOCK_K + 8, tl.cdiv(K, 8), BLOCK_M, BLOCK_K)\n"
     "            lr = tl.where(",
     ["tests/test_fill_machine.py"], "the fused decode dX reads the neighbouring mask byte"),
    ("fused-shrink-s-store", "peft_kernels/kernels/lora.py",
     "        acc += _side_expand(st, rm64, m_ok, R, b_ptr, rn64, n_ok, stride_br, stride_bn, s_out_ptr, pid_n == 0,",
     "        acc += _side_expand(st, rm64, m_ok, R, b_ptr, rn64, n_ok, stride_br, stride_bn, s_out_ptr, pid_n < 0,",
     ["tests/test_fill_machine.py"], "the fused decode GEMM never stores S for backward"),
    ("fused-dx-ds-unscaled", "peft_kernels/kernels/lora.py",
     "        lr = _side_expand(dst * scaling, rm64,", "        lr = _side_expand(dst, rm64,",
     ["tests/test_fill_machine.py"], "the fused decode dX forgets the LoRA scaling in dS"),
    ("db-direct-unscaled", "peft_kernels/kernels/lora.py",
     "            db_acc = acc_flush(db_acc, part, ACC_CHUNK) * scaling", "            db_acc = acc_flush(db_acc, part, ACC_CHUNK)",
     ["tests/test_fill_machine.py"], "the decode dA launch's direct dB misses the LoRA scaling"),
    ("dy-split-same-partial", "peft_kernels/kernels/lora.py",
     "        ds_ptr += split.to(tl.int64) * ds_part_stride\n", "",
     ["tests/test_fill_machine.py"], "every N split of the dY launch writes partial 0 (the others stay garbage)"),
    ("dy-split-overlap", "peft_kernels/kernels/lora.py",
     "        n_span = tl.minimum(N - n_lo, n_per_split).to(tl.int32)",
     "        n_span = tl.minimum(N - n_lo, 2 * n_per_split).to(tl.int32)",
     ["tests/test_fill_machine.py"], "the dY launch's N spans overlap: columns counted twice in dS"),
    ("dx-split-no-store", "peft_kernels/kernels/lora.py",
     "            ds_out_ptr=dS if fused or ds_parts > 1 else None, STORE_S=ds_parts > 1,",
     "            ds_out_ptr=dS if fused or ds_parts > 1 else None, STORE_S=False,",
     ["tests/test_fill_machine.py"], "dX sums the dS partials but never stores the sum: dA reads garbage"),
    ("adapter-dx-no-store", "peft_kernels/kernels/bottleneck.py",
     "            ds_out_ptr=dP if splits > 1 else None, STORE_S=splits > 1, **fl)",
     "            ds_out_ptr=dP if splits > 1 else None, STORE_S=False, **fl)",
     ["tests/test_fill_machine.py"], "the parallel adapter's dX sums the dP partials but never stores dP for dD"),
    ("decode-tile-never-narrows", "peft_kernels/kernels/lora.py",
     "           and triton.cdiv(M, c.block_m) * triton.cdiv(cols, c.block_n) < program_budget(device)):",
     "           and triton.cdiv(M, c.block_m) * triton.cdiv(cols, c.block_n) < 0):",
     ["tests/test_fill_machine.py", "tests/test_launch_model.py"],
     "the decode GEMM tile keeps 32 columns: 128 programs on 132 SMs at N = 4096"),
    ("tma-persistent-skips-tiles", "peft_kernels/kernels/lora.py",
     "    for tile in range(tl.program_id(0), num_m * num_n, num_progs):",
     "    for tile in range(tl.program_id(0), num_m * num_n, num_progs + 1):",
     ["tests/test_tma_gemm.py"], "the persistent TMA GEMM's programs stride past some output tiles"),
    ("tma-dx-dropout-unscaled", "peft_kernels/kernels/lora.py",
     "            acc = tl.where(keep != 0, acc * keep_scale, 0.0)\n        acc = _tma_mainloop(",
     "            acc = tl.where(keep != 0, acc, 0.0)\n        acc = _tma_mainloop(",
     ["tests/test_tma_gemm.py"], "the TMA dX masks the LoRA term without the 1/(1-p) scale"),
    ("tma-split-k-no-store", "peft_kernels/kernels/lora.py",
     "            num_parts=splits, part_stride=M * R, s_out_ptr=S if splits > 1 else None, STORE_S=splits > 1, **fl)",
     "            num_parts=splits, part_stride=M * R, s_out_ptr=S if splits > 1 else None, STORE_S=False, **fl)",
     ["tests/test_tma_gemm.py"], "the TMA forward GEMM sums the split-K partials of S but never stores S for backward"),
    ("tma-row-stride-unchecked", "peft_kernels/kernels/lora.py",
     "                or (t.stride(0) * t.element_size()) % 16):",
     "                ):",
     ["tests/test_tma_gemm.py"], "an unaligned row stride takes the TMA path (the descriptor refuses it: a crash)"),
    ("adapter-shrink-sums-one-split", "peft_kernels/kernels/bottleneck.py",
     "            for _ in range(0, num_splits):  # split order: deterministic; pointer steps are 64-bit",
     "            for _ in range(0, 1):  # split order: deterministic; pointer steps are 64-bit",
     ["tests/test_fill_machine.py"], "the adapter's split-K shrink activates one partial of x·Dᵀ, not their sum"),
    ("adapter-dy-counter-not-reset", "peft_kernels/kernels/lora.py",
     "            tl.atomic_xchg(cnt_ptr + pid_p, 0)  # leave the counter at 0 for the next launch",
     "            pass",
     ["tests/test_fill_machine.py"], "the dY launch's arrival counters stay set: the next call never reduces dP"),
    ("qlora-nibble-order", "csrc/cpu/dequant.cpp",
     "    pairs[2 * b] = c[b >> 4];\n    pairs[2 * b + 1] = c[b & 15];",
     "    pairs[2 * b] = c[b & 15];\n    pairs[2 * b + 1] = c[b >> 4];",
     ["tests/test_qlora.py"], "the C++ NF4 dequantization swaps the two codes of a byte"),
    ("qlora-absmax-short-check", "csrc/cpu/dequant.cpp",
     "  TORCH_CHECK_VALUE(absmax_.numel() >= nblocks,",
     "  TORCH_CHECK_VALUE(absmax_.numel() >= 0,",
     ["tests/test_qlora.py"], "the dequantize op accepts an absmax too short for its blocks (reads past it)"),
    ("qlora-chunk-misaligned", "peft_kernels/quant.py",
     "        return max(a, rows // a * a)",
     "        return max(1, rows)",
     ["tests/test_qlora.py"], "a torch-backend chunk starts mid-block: its absmax indices shift"),
    ("qlora-kernel-odd-nibble", "peft_kernels/kernels/lora.py",
     "            odd = (k & 1)[None, :]",
     "            odd = ((k + 1) & 1)[None, :]",
     ["tests/test_qlora.py"], "the Triton GEMM reads the other nibble of each byte (aligned rows)"),
    ("qlora-kernel-block-shift", "peft_kernels/kernels/lora.py",
     "        blk = (row_e >> WQ_SHIFT)[:, None] + (k >> WQ_SHIFT)[None, :]",
     "        blk = (row_e >> WQ_SHIFT)[:, None] + (k >> (WQ_SHIFT + 1))[None, :]",
     ["tests/test_qlora.py"], "the Triton GEMM takes the absmax of the wrong block"),
    ("qlora-kernel-zero-point", "peft_kernels/kernels/lora.py",
     "        v = (qv.to(tl.int32) - zp).to(tl.float32)",
     "        v = qv.to(tl.float32)",
     ["tests/test_qlora.py"], "the Triton GEMM ignores torchao's zero points"),
    ("qlora-kernel-dq-offset", "peft_kernels/kernels/lora.py",
     "                                                                     other=0.0) + offset",
     "                                                                     other=0.0)",
     ["tests/test_qlora.py"], "the Triton GEMM's double-quantized absmax misses bitsandbytes' offset"),
    ("qlora-aot-matrix-gap", "peft_kernels/kernels/aot.py",
     "            for R, p, M in ((16, 0.0, 16), (16, 0.1, 16), (16, 0.0, 512), (16, 0.1, 512), (16, 0.0, 16384),\n"
     "                            (16, 0.1, 16384), (64, 0.0, 512)):",
     "            for R, p, M in ((16, 0.0, 16), (16, 0.1, 16), (16, 0.0, 512), (16, 0.1, 512), (16, 0.0, 16384),\n"
     "                            (64, 0.0, 512)):",
     ["tests/test_qlora.py"], "the AOT matrix misses the prefill dX with dropout of the QLoRA layouts"),
    ("qlora-dx-transposed", "peft_kernels/kernels/lora.py",
     "                             WQ_SHIFT, WQ_ROW, WQ_ALIGNED, True, wq_code2_ptr, wq_absmax2_ptr, wq_offset, WQ_DQ,",
     "                             WQ_SHIFT, WQ_ROW, WQ_ALIGNED, False, wq_code2_ptr, wq_absmax2_ptr, wq_offset, WQ_DQ,",
     ["tests/test_qlora.py"], "dX reads the quantized W in the forward's orientation"),
    ("qlora-compute-dtype-ignored", "peft_kernels/quant.py",
     "            cd = getattr(self.layer, \"compute_dtype\", None)",
     "            cd = None",
     ["tests/test_qlora.py"], "bitsandbytes' compute_dtype is ignored: the base runs in x's dtype"),
    ("qlora-requantize-drops-delta", "peft_kernels/nn/qlora.py",
     "        self._requantize(new)",
     "        self._requantize(self.base_weight())",
     ["tests/test_qlora.py"], "merge() requantizes the old weight: the update is lost"),
    ("head-not-saved", "peft_kernels/checkpoint.py",
     "            sd[f\"{PREFIX}{n}.{k}\"] = v.detach().to(\"cpu\").contiguous()",
     "            pass",
     ["tests/test_model_controls.py"], "save_peft_adapter drops the trained head's tensors (config still names it)"),
    ("head-runs-original", "peft_kernels/nn/saved.py",
     "        return self.original_module if adapters_disabled(self) else self.trained",
     "        return self.original_module",
     ["tests/test_model_controls.py"], "a modules_to_save wrapper runs the frozen original, not the trained copy"),
    ("disable-ignored", "peft_kernels/nn/lora.py",
     "        if adapters_disabled(self):\n            _check_unmerged(self)\n            return F.linear(x, self.base_weight(), self.bias)",
     "        if False:\n            _check_unmerged(self)\n            return F.linear(x, self.base_weight(), self.bias)",
     ["tests/test_model_controls.py"], "disable_adapters leaves LoRALinear's update on"),
    ("unload-keeps-frozen", "peft_kernels/model.py",
     "    _restore_frozen(model)\n    return model",
     "    return model",
     ["tests/test_model_controls.py"], "unload leaves the parameters the injection froze frozen"),
    ("merge-and-unload-no-merge", "peft_kernels/model.py",
     "        if not m.merged:\n            m.merge()\n        return _original(n, m)",
     "        return _original(n, m)",
     ["tests/test_model_controls.py"], "merge_and_unload drops the LoRA update instead of merging it"),
    ("from-peft-ia3-feedforward", "peft_kernels/checkpoint.py",
     "            new = IA3Linear.from_linear(lin, feedforward=bool(m.is_feedforward), backend=backend)",
     "            new = IA3Linear.from_linear(lin, feedforward=False, backend=backend)",
     ["tests/test_model_controls.py"], "from_peft turns IA3 feed-forward (input) scalings into output scalings"),
    ("embedding-padding-grad", "peft_kernels/ops/embedding.py",
     "    if padding_idx is not None:\n        keep = (ids != padding_idx).to(dtype)",
     "    if False:\n        keep = (ids != padding_idx).to(dtype)",
     ["tests/test_embedding.py"], "the padding row's tokens give lora_embedding_A a gradient"),
    ("embedding-da-unscaled", "peft_kernels/ops/embedding.py",
     "                dS = torch.mm(dyw.to(A.dtype), B).mul_(ctx.scaling)  # [T, r]",
     "                dS = torch.mm(dyw.to(A.dtype), B)  # [T, r]",
     ["tests/test_embedding.py"], "lora_embedding's dA misses the LoRA scaling"),
    ("embedding-freq-ignored", "peft_kernels/ops/embedding.py",
     "        w = 1.0 / counts.index_select(0, ids).to(dtype)",
     "        w = torch.ones(ids.shape, dtype=dtype)",
     ["tests/test_embedding.py"], "scale_grad_by_freq is ignored in the update's gradient"),
    ("embedding-table-not-loaded", "peft_kernels/checkpoint.py",
     "                    w.copy_(L.table)",
     "                    pass",
     ["tests/test_embedding.py"], "the embedding table PEFT saves beside an embedding LoRA is not applied"),
    ("multi-dropout-dx-unmasked", "peft_kernels/ops/multi_lora.py",
     "            if f is not None:\n                dXs[s:e].mul_(f)",
     "            pass",
     ["tests/test_multi_lora_op.py"], "torch backend: dX of a dropped-out slot skips forward's mask"),
    ("multi-dropout-triton-da-index", "peft_kernels/kernels/multi_lora.py",
     "                qt = tl.where(hash_keep(seed_ptr, qrow[:, None] * J + rj.to(tl.int64)[None, :],",
     "                qt = tl.where(hash_keep(seed_ptr, qrow[:, None] * (J + 1) + rj.to(tl.int64)[None, :],",
     ["tests/test_multi_lora_op.py"], "Triton dA regenerates the mask at the wrong element indices"),
    ("multi-dropout-threshold", "peft_kernels/ops/_torch_dropout.py",
     "        thr = torch.tensor([threshold(p) for p in ps], dtype=torch.int64).to(device)",
     "        thr = torch.tensor([threshold(p / 2) for p in ps], dtype=torch.int64).to(device)",
     ["tests/test_multi_lora_op.py"], "the kernels drop half the slot's p (the scale still says p)"),
    ("multi-dropout-gather-da", "peft_kernels/ops/multi_lora.py",
     "                dA[a] = torch.mm(dS[s:e].t(), xr if fac is None else xr * fac[s:e]).to(A.dtype)",
     "                dA[a] = torch.mm(dS[s:e].t(), xr).to(A.dtype)",
     ["tests/test_multi_lora_op.py"], "the cuda backend's dA ignores the dropout mask"),
    ("multi-dropout-module-off", "peft_kernels/nn/multi_lora.py",
     "                                 dropout_p=tuple(self.lora_dropout) if self.training else None,",
     "                                 dropout_p=None,",
     ["tests/test_multi_lora_module.py"], "MultiLoRALinear never applies its slots' dropout"),
    ("compiled-dropout-other-seed", "peft_kernels/ops/_compiled.py",
     "    dx, dA = lora_dropout_shrink_bwd(dS, x, A, ctx.p, seed, need_x, need_a)",
     "    dx, dA = lora_dropout_shrink_bwd(dS, x, A, ctx.p, seed + 1, need_x, need_a)",
     ["tests/test_compile.py"], "compiled LoRA dropout: backward regenerates another seed's mask"),
    ("hash-dropout-cpp-chunk-index", "csrc/cpu/lora_dropout.cpp",
     "        masked_copy(fill, fac, len, static_cast<uint64_t>(i0), keys);",
     "        masked_copy(fill, fac, len, static_cast<uint64_t>(0), keys);",
     ["tests/test_hash_dropout.py"], "the C++ hash_dropout hashes each chunk from index 0: every chunk the same mask"),
    ("hash-dropout-bwd-other-seed", "peft_kernels/ops/hash_dropout.py",
     "    return _hash_dropout_op(dy, seed, ctx.p), None, None",
     "    return _hash_dropout_op(dy, _torch_dropout.draw_seed(dy.device), ctx.p), None, None",
     ["tests/test_hash_dropout.py"], "hash_dropout's backward draws a new mask"),
    ("hash-dropout-torch-no-scale", "peft_kernels/ops/hash_dropout.py",
     "    return (x.contiguous().reshape(-1) * factor).to(x.dtype).view(x.shape)",
     "    return (x.contiguous().reshape(-1) * factor).view(x.shape)",
     ["tests/test_hash_dropout.py"], "the torch-op hash_dropout returns fp32 for half inputs"),
    ("hash-attention-not-causal", "peft_kernels/nn/dropout.py",
     "    is_causal = q_len > 1 and attention_mask is None and is_causal\n",
     "    is_causal = False\n",
     ["tests/test_hash_dropout.py"], "the hash attention ignores causality when no mask is given"),
    ("hash-attention-hidden-row-nan", "peft_kernels/nn/dropout.py",
     "        w = w.masked_fill(hidden.all(-1, keepdim=True), 0.0)",
     "        pass",
     ["tests/test_hash_dropout.py"], "a query row a bool mask hides entirely gives NaN, not zeros"),
    ("hash-dropout-swap-train-mode", "peft_kernels/model.py",
     "            new.train(child.training)",
     "            new.train(True)",
     ["tests/test_hash_dropout.py"], "use_hash_dropout puts an eval-mode dropout layer in training mode"),
    ("compiled-ids-mix-tasks", "peft_kernels/nn/multi_lora.py",
     "    _COMPILED.ids = None if not stack or len({id(t) for t, _ in stack}) > 1 else stack[-1][1]",
     "    _COMPILED.ids = None if not stack else stack[-1][1]",
     ["tests/test_compile.py"], "compiled layers read another asyncio task's adapter ids"),
    ("compiled-ids-block-not-closed", "peft_kernels/nn/multi_lora.py",
     "        _COMPILED.stack = [e for e in _COMPILED.stack if e is not entry]",
     "        pass",
     ["tests/test_compile.py"], "a closed adapter_ids block stays in the compiled layers' view"),
    ("linear-ce-dh-no-lora", "peft_kernels/ops/linear_ce.py",
     "                dhc += (lo if factor is None else lo * factor[sl]).to(cdt)",
     "                pass",
     ["tests/test_linear_ce.py"], "the fused head loss leaves the LoRA term out of dh"),
    ("linear-ce-dh-mask", "peft_kernels/ops/linear_ce.py",
     "                dhc += (lo if factor is None else lo * factor[sl]).to(cdt)",
     "                dhc += lo.to(cdt)",
     ["tests/test_linear_ce.py"], "the head LoRA's dropout mask is not applied to dh"),
    ("linear-ce-smoothing-grad", "peft_kernels/ops/linear_ce.py",
     "            dl.sub_((eps / V) * w[:, None])",
     "            pass",
     ["tests/test_linear_ce.py"], "label smoothing's uniform term missing from the gradient"),
    ("linear-ce-zloss-grad", "peft_kernels/ops/linear_ce.py",
     "        dl.mul_(((1.0 + 2.0 * zl * lse) * w if zl else w)[:, None])",
     "        dl.mul_(((1.0 + zl * lse) * w if zl else w)[:, None])",
     ["tests/test_linear_ce.py"], "the z-loss gradient without its factor 2"),
    ("linear-ce-ignored-grad", "peft_kernels/ops/linear_ce.py",
     "        w = torch.where(valid[sl], weight_tok[sl], 0.0)",
     "        w = weight_tok[sl]",
     ["tests/test_linear_ce.py"], "ignored tokens contribute gradient"),
    ("linear-ce-mean-over-all", "peft_kernels/ops/linear_ce.py",
     "            return loss.sum() / n\n",
     "            return loss.sum() / h.shape[0]\n",
     ["tests/test_linear_ce.py"], "the mean counts ignored tokens"),
    ("causal-lm-no-shift", "peft_kernels/nn/lm_head.py",
     "    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]",
     "    shifted = labels",
     ["tests/test_linear_ce.py"], "causal_lm_loss predicts each token from itself"),
    ("siblings-slice-scaling", "peft_kernels/ops/siblings.py",
     "            ys.addmm_(S[i], Bs[i].t(), alpha=call.scalings[i])",
     "            ys.addmm_(S[i], Bs[i].t(), alpha=call.scalings[0])",
     ["tests/test_siblings.py"], "every sibling's update uses the first member's scaling"),
    ("siblings-dx-no-lora", "peft_kernels/ops/siblings.py",
     "            dx += lo.to(dx.dtype) if lo.dtype != dx.dtype else lo",
     "            pass",
     ["tests/test_siblings.py"], "the stacked dS·A term is left out of dx"),
    ("siblings-shared-mask", "peft_kernels/ops/siblings.py",
     "            S[i] = shrink(x, As[i], p, call.seeds[i])",
     "            S[i] = shrink(x, As[i], p, call.seeds[i] if p == 0 else next(d for d in call.seeds if d is not None))",
     ["tests/test_siblings.py"], "every sibling with dropout uses the first one's mask"),
    ("siblings-stale-pack", "peft_kernels/nn/siblings.py",
     "        if not self.packed():\n            with self._lock:",
     "        if False:\n            with self._lock:",
     ["tests/test_siblings.py"], "a re-bound weight is not packed again: the group computes with the old one"),
    ("siblings-other-input", "peft_kernels/nn/siblings.py",
     "                if pend.x is x and pend.version == x._version:",
     "                if True:",
     ["tests/test_siblings.py"], "a sibling called with another input takes the output left for it"),
    ("siblings-unload-shares", "peft_kernels/model.py",
     "    unfuse_siblings(model)  # each plain layer owns its weight again, not a block of a packed buffer",
     "    pass",
     ["tests/test_siblings.py"], "unload / merge_and_unload leave the plain layers' weights as blocks of one buffer"),
    ("siblings-multi-no-dropout", "peft_kernels/nn/siblings.py",
     "dropout_p=tuple(m.lora_dropout) if m.training else None,",
     "dropout_p=None,",
     ["tests/test_siblings.py"], "a multi-adapter sibling group trains without its slots' dropout"),
    ("siblings-multi-first-scalings", "peft_kernels/nn/siblings.py",
     "outs.append(multi_lora_delta(x, m.lora_A, m.lora_B, m.scalings, ids,",
     "outs.append(multi_lora_delta(x, m.lora_A, m.lora_B, ms[0].scalings, ids,",
     ["tests/test_siblings.py"], "a multi-adapter sibling group scales every member by the first member's scalings"),
    ("multi-delta-base-dx", "peft_kernels/ops/multi_lora.py",
     "        return dy.new_zeros((dy.shape[0], weight.shape[1]))",
     "        return dy.new_ones((dy.shape[0], weight.shape[1])) * 1e-3",
     ["tests/test_siblings.py"], "the LoRA-only call's dX carries a base term"),
    ("moe-dA-no-scale", "peft_kernels/ops/moe.py",
     "                dS = torch.mm(dyc, B[e]).mul_(s)",
     "                dS = torch.mm(dyc, B[e])",
     ["tests/test_experts.py"], "the experts' dA and dx LoRA terms miss the scaling"),
    ("moe-expert0-scaled", "peft_kernels/ops/moe.py",
     "            xe = x[a:b]\n",
     "            xe = x[a:b] if e else x[a:b] * 1.001\n",
     ["tests/test_experts.py"], "expert 0's tokens are scaled before its GEMM"),
    ("moe-route-weights", "peft_kernels/ops/moe.py",
     "    w = top_k_weights.reshape(-1)[order]",
     "    w = top_k_weights.reshape(-1)[order.flip(0)]",
     ["tests/test_experts.py"], "routing weights applied to the wrong assignments"),
    ("moe-triton-side-unscaled", "peft_kernels/kernels/moe.py",
     "UPCAST, LORA_PREC) * scaling\n",
     "UPCAST, LORA_PREC)\n",
     ["tests/test_experts.py"], "Triton grouped GEMM: the LoRA expand joins the accumulator without the scaling"),
    ("moe-triton-row-end", "peft_kernels/kernels/moe.py",
     "    end = tl.load(starts_ptr + e + 1)\n",
     "    end = tl.load(starts_ptr + e + 1) + 1\n",
     ["tests/test_experts.py"], "Triton grouped GEMM: a row block runs one row into the next expert"),
    ("moe-triton-k-stride", "peft_kernels/kernels/moe.py",
     "        C, KD, R, float(scaling), a.stride(0), a.stride(1),",
     "        C, KD, R, float(scaling), a.stride(0), 1,",
     ["tests/test_experts.py"], "Triton grouped GEMM ignores the input's column stride"),
    ("moe-triton-segment-order", "peft_kernels/kernels/moe.py",
     "_seg_slots=torch.tensor([e for e, _, _ in live], dtype=torch.int32)",
     "_seg_slots=torch.tensor([e for e, _, _ in live][::-1], dtype=torch.int32)",
     ["tests/test_experts.py"], "Triton dA/dB: the experts' row ranges are credited to the wrong experts"),
    ("moe-peft-b-layout", "peft_kernels/nn/experts.py",
     "    return b.reshape(N, -1, E).permute(2, 0, 1).contiguous()",
     "    return b.reshape(N, E, -1).permute(1, 0, 2).contiguous()",
     ["tests/test_experts.py"], "PEFT's lora_B [out, r*E] read as expert-major"),
    ("moe-peft-nesting", "peft_kernels/nn/experts.py",
     "            key = f\"{prefix}.{'base_layer.' * (n - 1 - j)}\"",
     "            key = f\"{prefix}.{'base_layer.' * j}\"",
     ["tests/test_experts.py"], "saved expert LoRA nests gate_up_proj and down_proj the other way round"),
    ("moe-merge-sign", "peft_kernels/nn/experts.py",
     "                getattr(self.base_layer, name).add_(self.delta(name))",
     "                getattr(self.base_layer, name).sub_(self.delta(name))",
     ["tests/test_experts.py"], "merging subtracts the experts' update"),
    ("packed-rank-pattern", "peft_kernels/nn/packed.py",
     "            r = _pattern_value(rp, f, r0)",
     "            r = r0",
     ["tests/test_packed.py"], "a packed slice ignores the adapter's rank_pattern"),
    ("packed-peft-view-scale", "peft_kernels/nn/packed.py",
     "        B = torch.block_diag(*[self.lora_B[n].detach() * self.scaling[n] for n in self.slices])",
     "        B = torch.block_diag(*[self.lora_B[n].detach() for n in self.slices])",
     ["tests/test_packed.py"], "the packed adapter saved for PEFT without each slice's scale"),
    ("packed-merge-conv1d", "peft_kernels/nn/packed.py",
     "            self.weight.add_(d.t() if self.fan_in_fan_out else d)",
     "            self.weight.add_(d.reshape(self.weight.shape))",
     ["tests/test_packed.py"], "merging into a Conv1D packed layer adds the update untransposed"),
    ("multi-compiled-quant-update", "peft_kernels/ops/multi_lora.py",
     "    y = y if base is None else base + y\n", "    y = y if base is None else base\n",
     ["tests/test_qlora.py"], "compiled QMultiLoRALinear: the quantized base's output without the slots' update"),
    ("lora-output-view", "peft_kernels/ops/lora.py",
     "    ctx.has_bias = bias is not None\n    return y2d\n",
     "    ctx.has_bias = bias is not None\n    return y2d.view(*x.shape[:-1], weight.shape[0])\n",
     ["tests/test_inplace_outputs.py"], "the LoRA Functions return a view made inside them: editing the output in place "
     "raises"),
    ("siblings-split-views", "peft_kernels/ops/siblings.py",
     "            return _blocks(y, call.widths)", "            return tuple(y.split(list(call.widths), dim=1))",
     ["tests/test_siblings.py"], "sibling members' outputs are split views: editing one in place raises"),
    ("checkpoint-context-noop", "peft_kernels/nn/multi_lora.py",
     "    return contextlib.nullcontext(), recompute()", "    return contextlib.nullcontext(), contextlib.nullcontext()",
     ["tests/test_multi_lora_module.py"], "checkpoint_context does not reopen the ids: the recompute has none"),
    ("embedding-bwd-empty", "peft_kernels/ops/embedding.py",
     "        dy2 = dy.reshape(flat.numel(), B.shape[0])", "        dy2 = dy.reshape(flat.numel(), -1)",
     ["tests/test_embedding.py"], "LoRAEmbedding's backward fails on a batch with no ids"),
]


def _copy_tree(dst: str, rev: str) -> None:
    """The checkout at ``rev`` (default HEAD: commit first; edits made while it runs cannot leak into it), or
    the working tree with ``rev=None``, plus the built extension."""
    if rev is None:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
        for f in files:
            s = os.path.join(ROOT, f)
            if os.path.isfile(s):
                os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
                shutil.copy2(s, os.path.join(dst, f))
    else:
        tar = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", dst], input=tar, check=True)
    for so in os.listdir(os.path.join(ROOT, "peft_kernels")):  # the built extension
        if so.startswith("_C") and so.endswith(".so"):
            shutil.copy2(os.path.join(ROOT, "peft_kernels", so), os.path.join(dst, "peft_kernels", so))


def _build(dst: str) -> bool:
    env = dict(os.environ, PEFT_KERNELS_CUDA="0", MAX_JOBS=str(os.cpu_count() or 1))
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dst, env=env,
                       capture_output=True, text=True)
    return r.returncode == 0 and "WARNING: building" not in r.stderr and "not built" not in r.stderr


def run_mutant(m, timeout: int, rev) -> tuple:
    mid, path, find, repl, tests, _ = m
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mid}-") as dst:
        _copy_tree(dst, rev)
        fp = os.path.join(dst, path)
        src = open(fp).read()
        if find is None or src.count(find) != 1:
            return "stale", f"the text to mutate occurs {0 if find is None else src.count(find)} times"
        open(fp, "w").write(src.replace(find, repl))
        if path.startswith("csrc/") and not _build(dst):
            return "killed", "the mutant does not compile"
        env = dict(os.environ, PYTHONPATH=dst, PEFT_KERNELS_REQUIRE_EXT="1", TRITON_INTERPRET="1",
                   PEFT_KERNELS_FUZZ_EXAMPLES="60")
        pytest = os.path.join(os.path.dirname(sys.executable), "pytest")  # not -m: that puts the cwd first
        cmd = [pytest, "-x", "-q", "-p", "no:cacheprovider", *tests]
        try:
            r = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed", "the tests timed out"
        check = subprocess.run([sys.executable, "-c", "import peft_kernels, sys; print(peft_kernels.__file__)"],
                               cwd="/", env=env, capture_output=True, text=True).stdout.strip()
        if not check.startswith(dst):
            return "error", f"the tests imported {check}, not the mutant copy"
        last = (r.stdout.strip().splitlines() or [""])[-1]
        if r.returncode == 0:
            return "survived", last
        if r.returncode == 5:
            return "error", "no tests collected"
        return "killed", last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="run only these mutant ids")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--rev", default="HEAD", help="the commit to mutate (default HEAD)")
    ap.add_argument("--worktree", action="store_true", help="mutate the working tree instead of a commit")
    a = ap.parse_args()
    todo = [m for m in MUTANTS if not a.only or m[0] in a.only]
    if a.list:
        for m in todo:
            print(f"{m[0]:28s} {m[1]:42s} {m[5]}")
        return 0
    rows, t0 = [], time.time()
    for m in todo:
        t = time.time()
        status, detail = run_mutant(m, a.timeout, None if a.worktree else a.rev)
        rows.append((m[0], status, detail))
        print(f"{m[0]:28s} {status:9s} {time.time() - t:6.0f}s  {m[5]}  [{detail[:90]}]", flush=True)
    killed = sum(s == "killed" for _, s, _ in rows)
    counted = sum(s in ("killed", "survived") for _, s, _ in rows)
    print(f"\nmutation score: {killed}/{counted} killed ({100.0 * killed / max(counted, 1):.0f}%) in "
          f"{time.time() - t0:.0f}s; survived: {[i for i, s, _ in rows if s == 'survived']}; "
          f"stale/error: {[i for i, s, _ in rows if s in ('stale', 'error')]}")
    return 0 if counted == len(rows) and killed >= 0.9 * counted else 1


if __name__ == "__main__":
    sys.exit(main())
