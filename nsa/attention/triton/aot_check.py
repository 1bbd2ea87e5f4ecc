"""Compile every NSA Triton kernel for a CUDA architecture without a GPU.

    python -m nsa.attention.triton.aot_check [--arch 80 90] [--dtype bf16 fp32 fp16] [--head-dim 64 128] [--jobs N]
                                             [--ptx-dir DIR]

Uses triton's own compiler and the ptxas shipped in the triton wheel, so it catches code that the
interpreter (TRITON_INTERPRET=1) accepts but the GPU backend rejects. It must run in a process
where TRITON_INTERPRET is unset (triton's standard library is decorated differently under the
interpreter). Prints one line per kernel and exits non-zero on any failure.

--ptx-dir DIR writes each compiled variant's PTX, without its source-location lines, to one file
per job: a change meant to restructure the kernel source only (shared helpers, renames) can then
be shown not to change the GPU code by diffing two dumps (`diff -r before/ after/`).

--ptxas-info compiles each variant as a launch on contiguous tensors would specialise it (pointers and
strides 16-divisible, head-dim strides s_*d equal to 1) and adds what `ptxas -v` reports for its GPU code:
registers per thread and register-spill bytes (stores/loads). A variant that spills usually runs slower;
this is how kernel tile variants can be chosen without a GPU. --only NAME compiles just the kernels whose
name contains NAME; --group R sets the query heads per KV group (default 3; the paper layout has 16).

    python -m nsa.attention.triton.aot_check --arch 90 --dtype bf16 --head-dim 128 --group 16 \
        --only _cmp_bwd_dkdv --ptxas-info
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time


# the launch_warps names of the kernels whose num_warps was tuned (the others use num_warps(D))
LAUNCH_NAMES = {("_slc_fwd_kernel", None): "selected_fwd", ("_slc_bwd_kernel", True): "selected_bwd_atomic",
                ("_slc_bwd_kernel", False): "selected_bwd_dq", ("_slc_bwd_dkdv_kernel", None): "selected_bwd_dkdv",
                ("_slc_fwd_block_kernel", None): "selected_bwd_dkdv",
                ("_select_scores_kernel", None): "select"}

# largest shared memory one block may use (bytes): A100 (sm80) 163 KB, H100 (sm90) 227 KB
SHARED_LIMIT = {80: 166912, 90: 232448}


def strip_locations(ptx: str) -> str:
    """PTX without what moves when source lines move: `.loc`/`.file` directives and debug sections."""
    out = []
    for line in ptx.splitlines():
        if line.lstrip().startswith(".section") and ".debug" in line:
            break  # the debug sections come last
        if not line.lstrip().startswith((".loc", ".file", "$L__tmp")):
            out.append(line)
    return "\n".join(out) + "\n"


def parse_ptxas(report: str) -> str:
    """'regs=N spill=S/L' (bytes of spill stores / loads) from `ptxas -v` output."""
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not regs:
        return "ptxas: no register report"
    return f"regs={regs.group(1)}" + (f" spill={spill.group(1)}/{spill.group(2)}" if spill else "")


def ptxas_info(ptx: str, arch: int) -> str:
    """parse_ptxas of the triton wheel's ptxas -v on this PTX for sm_<arch> (sm_90a on Hopper, as triton)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, timeout=600)
    return parse_ptxas(res.stderr) if res.returncode == 0 else f"ptxas failed: {res.stderr.strip()[:200]}"


def constexpr_defaults(kernel) -> dict:
    """The defaults of a kernel's constexpr parameters: a launch applies them, a compile from ASTSource does not."""
    return {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}


def runtime_specialisation(kernel, ptrs: dict, consts: dict) -> tuple[dict, dict]:
    """(constexprs, attrs) as a launch on contiguous tensors specialises them: head-dim strides (s_*d) are 1,
    pointers and the other strides divisible by 16 (the head dims here are multiples of 16)."""
    consts = dict(consts)
    attrs = {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            continue
        if name.startswith("s_") and name.endswith("d"):
            consts[name] = 1
        elif name in ptrs or name.startswith("s_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return consts, attrs


def compile_all(archs=(90,), dtypes=("bf16",), head_dims=(64,), group=3, slc_block=64, verbose=True,
                ptx_dir=None, only: str | None = None, ptxas: bool = False, workers: int = 1) -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("aot_check: unset TRITON_INTERPRET (the compiler cannot run in interpreter mode)")
    import torch
    import triton.language as tl

    from nsa.attention.triton import combine, compressed, decode, rope, segments, select, selected, window
    from nsa.attention.triton import _common
    from nsa.attention.triton._common import launch_warps, num_warps, pad_pow2
    from nsa.attention.triton.select import BM as SEL_BM, BN as SEL_BN, NJ as SEL_NJ
    from nsa.attention.triton.window import tile_sizes as win_tiles

    tl_types = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    ok = True
    labels = []
    for arch in archs:
        for dtn in dtypes:
            dt = tl_types[dtn]
            dots = dict(IN_T=dt, DOT_T=dt, PREC="ieee" if dtn == "fp32" else "tf32")
            for D in head_dims:
                t, f = f"*{dtn}", "*fp32"
                qkv = dict(Q=t, K=t, V=t)
                rd = dict(R=group, D=D, D_PAD=pad_pow2(D))
                slc = dict(rd, BLK=slc_block, BLK_PAD=pad_pow2(slc_block), **dots)
                # selected fwd / dQ: one query per program (LST = CNT = idx), and the largest query tile
                # selected.query_tile allows (NSA_SLC_QTILE)
                max_rows = selected.row_cap(selected.MAX_TILE_ROWS, torch.float32 if dtn == "fp32" else torch.bfloat16)
                slc_tiles = [(dict(slc, QT=qt, ROWS_PAD=pad_pow2(qt * group), NSEL_PAD=16),
                              dict(IDX="*i64", LST="*i64" if qt == 1 else "*i32", CNT="*i64" if qt == 1 else "*i32"))
                             for qt in (1, max_rows // group)]
                # head tiles (tuned variants "qt64h", "qt128h"; 2-byte inputs only): qt queries of one head,
                # 4 or 8 warps as launched
                head_tiles = [(dict(slc, QT=qt, ROWS_PAD=qt, NSEL_PAD=16, HEAD_TILES=True),
                               dict(IDX="*i64", LST="*i32", CNT="*i32"), 8 if qt >= 128 else 4)
                              for qt in selected.HEAD_TILE_CANDIDATES if dtn != "fp32" and D <= 128]
                cmp_ = dict(rd, **dots)
                esize = 4 if dtn == "fp32" else 2

                def cmp_tiles(tiles):  # (BM, BN, num_warps, the other constexprs of each launch) as launched
                    names = list(tiles) if esize == 2 else list(tiles)[:1]
                    out = []
                    for spec in (tiles[name] for name in names):
                        bm, bn, warps = spec[:3]
                        launches = ([dict(PARTS=part, KEY_ROWS=spec.key_rows) for part in ((1, 2) if spec.split else (0,))]
                                    if isinstance(spec, compressed.DkvTile) else [{}])
                        out.append((min(bm, 32) if esize == 4 and D > 64 else bm, bn, warps or num_warps(D), launches))
                    return out

                win_bm, win_bn = win_tiles(esize, D)
                win = dict(rd, BM=win_bm, BN=win_bn, **dots)
                jobs = [
                    *((selected._slc_fwd_kernel, dict(qkv, **lists, O=t, LSE=f), consts)
                      for consts, lists in slc_tiles),
                    *((selected._slc_bwd_kernel, dict(qkv, **lists, DO=t, LSE=f, DELTA=f, DQ=t, DK=f, DV=f),
                       dict(consts, DKV_ATOMIC=atomic))
                      for consts, lists in slc_tiles for atomic in (False, True) if consts["QT"] == 1 or not atomic),
                    *((selected._slc_fwd_kernel, dict(qkv, **lists, O=t, LSE=f), consts, warps)
                      for consts, lists, warps in head_tiles),
                    *((selected._slc_bwd_kernel, dict(qkv, **lists, DO=t, LSE=f, DELTA=f, DQ=t, DK=f, DV=f),
                       dict(consts, DKV_ATOMIC=False), warps) for consts, lists, warps in head_tiles),
                    (selected._slc_fwd_block_kernel,
                     dict(qkv, QIDX="*i32", PAIR="*i32", SEG_OWNER="*i32", SEG_START="*i32", SEG_END="*i32",
                          PO=t, PL=f),
                     dict(slc, QPR=max_rows // group, ROWS_PAD=pad_pow2(max_rows // group * group))),
                    *((selected._slc_merge_kernel, dict(PO=t if softmax else f, PL=f, IDX="*i64", O=t, LSE=f),
                       dict(R=group, QT=max_rows // group, ROWS_PAD=pad_pow2(max_rows // group * group), D=D,
                            D_PAD=pad_pow2(D), SOFTMAX=softmax)) for softmax in (True, False)),
                    *((selected._slc_bwd_dkdv_kernel,
                       dict(qkv, DO=t, LSE=f, DELTA=f, DK=f, DV=f, DQ=f, QIDX="*i32", PAIR="*i32", SEG_OWNER="*i32",
                            SEG_START="*i32", SEG_END="*i32"),
                       dict(slc, BM=selected.BM_DKV, DQ_MODE=dq, QPR=qpr, ROWS_PAD=pad_pow2(max(qpr, 1) * group),
                            KEY_ROWS=kr, INTERIOR=selected.interior_dkv(D, selected.KEY_ROWS_WARPS if kr else launch_warps(
                                "selected_bwd_dkdv", D))),
                       *((selected.KEY_ROWS_WARPS,) if kr else ()))
                      for dq in (0, 1, 2) for qpr in (0, max_rows // group) for kr in (False, True)
                      if not kr or (dq == 0 and esize == 2)),  # the key-rows form: tuned for "block" only
                    # compressed: every tile variant tuning may time (fp32 at head dim > 64: the reference only)
                    *((kernel, dict(qkv, O=t, LSE=f) if kernel is compressed._cmp_fwd_kernel
                       else dict(qkv, DO=t, LSE=f, DELTA=f, DQ=t), dict(cmp_, BM=bm, BN=bn), warps)
                      for kernel, tiles in ((compressed._cmp_fwd_kernel, compressed.FWD_TILES),
                                            (compressed._cmp_bwd_dq_kernel, compressed.DQ_TILES))
                      for bm, bn, warps, _ in cmp_tiles(tiles)),
                    *((compressed._cmp_bwd_dkdv_kernel,
                       dict(qkv, DO=t, LSE=f, DELTA=f, DK=f if atomic else t, DV=f if atomic else t),
                       dict(cmp_, BM=bm, BN=bn, ATOMIC=atomic, **launch), warps)
                      for bm, bn, warps, launches in cmp_tiles(compressed.DKV_TILES) for atomic in (False, True)
                      for launch in launches),
                    (window._win_fwd_kernel, dict(qkv, O=t, LSE=f), win),
                    (window._win_bwd_dq_kernel, dict(qkv, DO=t, LSE=f, DELTA=f, DQ=t), win),
                    (window._win_bwd_dkdv_kernel, dict(qkv, DO=t, LSE=f, DELTA=f, DK=t, DV=t), win),
                    (_common._delta_kernel, dict(DO=t, O=t, DELTA=f), dict(D=D, D_PAD=pad_pow2(D), BM=64)),
                    *((rope._rope_kernel, dict(X=t, Y=t, POS="*i64", COS=f, SIN=f),
                       dict(HALF=D // 2, HALF_PAD=pad_pow2(D // 2, 1), BP=rope.BP, SIGN=sign)) for sign in (1, -1)),
                    (combine._combine_fwd_kernel, dict(LG=t, O0=t, O1=t, O2=t, Y=t),
                     dict(D=D, D_PAD=pad_pow2(D), BT=combine.BT)),
                    (combine._combine_bwd_kernel,
                     dict(LG=t, O0=t, O1=t, O2=t, DY=t, DLG=t, DO0=t, DO1=t, DO2=t, DELTA=f),
                     dict(D=D, D_PAD=pad_pow2(D), BT=combine.BT)),
                    # the block-centric kernels' query lists (segments.block_segments): no dtype or head dim
                    *((kernel, ptrs, dict(BLOCK=segments.BLOCK)) for kernel, ptrs in (
                        (segments._owner_keys_kernel, dict(IDX="*i64", OWNER="*i32")),
                        (segments._owner_ranges_kernel, dict(SORTED="*i32", FIRST="*i32", COUNT="*i32", NSEG="*i32")),
                        (segments._segments_kernel, dict(ORDER="*i64", QIDX="*i32", PAIR="*i32", CUM="*i32",
                                                         NSEG="*i32", FIRST="*i32", COUNT="*i32", SEG_OWNER="*i32",
                                                         SEG_START="*i32", SEG_END="*i32")))
                      if dtn == dtypes[0] and D == head_dims[0]),
                    (combine._gate_mlp_combine_kernel, dict(HID=t, W2=t, B2=t, O0=t, O1=t, O2=t, Y=t),
                     dict(D=D, D_PAD=pad_pow2(D), HID_PAD=256, HAS_BIAS=True), combine.gate_warps(192)),  # M7C's gate
                ]
                # fused static decode: the paper's geometry (l=32, d=16, n=16), 64k and 256k-token caches,
                # the compressed scan in the one kernel or split (MAX_SPLITS = 32 splits, batch 1 from 128k
                # tokens, and 4 window programs; their partials merged)
                rp = pad_pow2(group)
                dec = dict(R=group, RP=rp, D=D, D_PAD=pad_pow2(D), L=32, DS=16, BC=decode.BC, BW=decode.BW,
                           USE_SLC=True, **dots)
                dec_ptrs = dict(Q=t, CK=t, CV=t, SK=t, SV=t, WK=t, WV=t, WPOS="*i64", T="*i64", SCR=f, PGRP=f,
                                IDX="*i32", OC=t, OS=t, OW=t, PM=f, PL=f, PACC=f)

                def merge(nsplit, wsplit):
                    return dict(NSPLIT=nsplit, WSPLIT=wsplit, MPAD=pad_pow2(max(nsplit, wsplit), 1),
                                MCH=decode.merge_chunk(max(nsplit, wsplit), rp, pad_pow2(D)))

                for ns_pad, nsplit, wsplit in ((1024, 1, 0), (4096, 1, 0), (1024, 32, 4)):
                    jobs.append((decode._decode_kernel, dec_ptrs,
                                 dict(dec, LP=slc_block, NSEL=16, NS_PAD=ns_pad, NI=decode.overlap_terms(32, 16, slc_block),
                                      BP=decode.prob_tile(rp, ns_pad * 4), SR=decode.selected_rows(16, slc_block, D),
                                      USE_CMP=True, USE_WIN=True, **merge(nsplit, wsplit)),
                                 decode.decode_warps(ns_pad, D)))
                split_ptrs = dict(Q=t, CK=t, CV=t, T="*i64", SCR=f, PM=f, PL=f, PACC=f, WK=t, WV=t, WPOS="*i64")
                jobs.append((decode._decode_split_kernel, split_ptrs,  # with the window's programs
                             dict(dec, NSPLIT=32, WSPLIT=4), num_warps(D)))
                # the dense baseline's decode (dense_decode): the scan with l = d = 1, split, nothing else
                dense = dict(dec, L=1, DS=1, USE_SLC=False)
                jobs.append((decode._decode_kernel, dec_ptrs,
                             dict(dense, LP=1, NSEL=0, NS_PAD=16, NI=1, BP=16, SR=16, USE_CMP=True, USE_WIN=False,
                                  **merge(32, 0)),
                             decode.decode_warps(16, D)))
                jobs.append((decode._decode_split_kernel, split_ptrs, dict(dense, NSPLIT=32, WSPLIT=0), num_warps(D)))
                jobs.append((decode._write_kernel, dict(T="*i64", LAST_T="*i64", Q=t, QO=t, COS=f, SIN=f, SK=t, SV=t, WK=t, WV=t,
                                                        WPOS="*i64", RK=t, RV=t, NKS=t, NVS=t, NKW=t, NVW=t, NKR=t,
                                                        NVR=t),
                             dict(R=group, RP=pad_pow2(group, 1), D=D, D_PAD=pad_pow2(D, 1), HALF=D // 2,
                                  HALF_PAD=pad_pow2(D // 2, 1)), 1))
                if esize == 2 and D > 64:  # the candidate window tiles (window.WIDE_FWD_TILE, window.DQ_TILES)
                    jobs.append((window._win_fwd_kernel, dict(qkv, O=t, LSE=f), dict(win, BM=2 * window.BM_MAX)))
                    jobs.extend((window._win_bwd_dq_kernel, dict(qkv, DO=t, LSE=f, DELTA=f, DQ=t),
                                 dict(win, BM=bm, BN=bn), warps or num_warps(D))
                                for bm, bn, warps in list(window.DQ_TILES.values())[1:])
                if esize == 2:  # the window dK/dV tile variants tuning may time (the first is `win`, above)
                    jobs.extend((window._win_bwd_dkdv_kernel, dict(qkv, DO=t, LSE=f, DELTA=f, DK=t, DV=t),
                                 dict(win, BM=spec.bm, BN=spec.bn, KEY_ROWS=spec.key_rows), spec.warps or num_warps(D))
                                for spec in list(window.DKV_TILES.values())[1:])
                # selection: fp32 scores and int64 keys (NSA_SELECT=topk) with NJ = 16; the fused
                # top-n with NJ = NP = 16 (n <= 16) and 32 (n <= 32), and the BN = 16 variant; each
                # with aligned key tiles too (KPB keys per selection block: 4 = the paper's geometry)
                for mode, nj, bn, kpb in (("scores", SEL_NJ, SEL_BN, 0), ("keys", SEL_NJ, SEL_BN, 0),
                                          ("topn", 16, SEL_BN, 0), ("topn", 32, SEL_BN, 0), ("topn", 16, 16, 0),
                                          ("scores", SEL_NJ, SEL_BN, 4), ("keys", SEL_NJ, SEL_BN, 4),
                                          ("topn", 16, SEL_BN, 4), ("topn", 32, SEL_BN, 2),
                                          ("topn", 32, SEL_BN, 4)):  # bench_kernels' NJ_MIN = 32
                    out_t = f if mode == "scores" else "*i64"
                    jobs.append((select._select_scores_kernel, dict(Q=t, K=t, LSE=f, OUT=out_t),
                                 dict(rd, BM=SEL_BM, BN=bn, NJ=nj, LOG_NJ=nj.bit_length() - 1, MODE=mode,
                                      KPB=kpb, BNA=pad_pow2(nj * kpb), PREC_W="ieee" if dtn == "fp32" else "tf32",
                                      **dots)))
                if esize == 2:  # the select_tile variants of other shapes (select.TILE_SHAPES), aligned tiles
                    jobs.extend((select._select_scores_kernel, dict(Q=t, K=t, LSE=f, OUT="*i64"),
                                 dict(rd, BM=bm, BN=SEL_BN, NJ=16, LOG_NJ=4, MODE="topn", KPB=4, BNA=64,
                                      PREC_W="tf32", **dots), warps)
                                for bm, warps in select.TILE_SHAPES.values())
                for job_no, (kernel, ptrs, consts, *fixed_warps) in enumerate(jobs):
                    if only and only not in kernel.__name__:
                        continue
                    warps = launch_warps(LAUNCH_NAMES.get((kernel.__name__, consts.get("DKV_ATOMIC")), ""), D)
                    if consts.get("QT", 1) > 1:  # as selected._warps
                        warps = num_warps(D)
                    if fixed_warps:  # a tile variant's own
                        warps = fixed_warps[0]
                    attrs = None
                    consts = {**constexpr_defaults(kernel), **consts}
                    if ptxas:
                        consts, attrs = runtime_specialisation(kernel, ptrs, consts)
                    sig = {name: "constexpr" if name in consts else ptrs.get(name, "fp32" if name == "scale" else "i32")
                           for name in kernel.arg_names}
                    ptx_name = f"sm{arch}_{dtn}_d{D}_{job_no:02d}_{kernel.__name__}_w{warps}.ptx" if ptx_dir else None
                    _TASKS.append((arch, kernel, sig, consts, attrs, warps, ptxas, ptx_name))
                    labels.append(f"sm{arch} {dtn} D={D} {kernel.__name__}{_tag(kernel.__name__, consts, warps)}")
    if workers > 1 and len(_TASKS) > 1:  # forked workers share _TASKS (the kernels need no pickling)
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(_compile_task, range(len(_TASKS)))
    else:
        pool, results = None, map(_compile_task, range(len(_TASKS)))
    try:
        for label, (good, msg, ptx, ptx_name, secs) in zip(labels, results):
            if ptx_name:
                with open(os.path.join(ptx_dir, ptx_name), "w") as fh:
                    fh.write(ptx)
            ok &= good
            if verbose or not good:
                print(f"{'OK  ' if good else 'FAIL'} {label} {msg} ({secs:.1f}s)", flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
        _TASKS.clear()
    return ok


def _tag(name: str, consts: dict, warps: int) -> str:
    """What tells a kernel's variants apart in the report."""
    tag = "".join(f" {k}={consts[k]}" for k in ("MODE", "BM", "NJ", "BN", "KPB") if "MODE" in consts)
    tag += f" QT={consts['QT']}" if "QT" in consts else ""
    tag += f" QPR={consts['QPR']}" if "QPR" in consts else ""
    tag += f" NS_PAD={consts['NS_PAD']}" if "NS_PAD" in consts else ""
    tag += f" NSPLIT={consts['NSPLIT']}" if "NSPLIT" in consts else ""
    tag += " dense" if "_decode" in name and consts.get("L") == 1 else ""
    tag += f" BM={consts['BM']} BN={consts['BN']}" if "_cmp_" in name or name.startswith("_win_bwd") else ""
    tag += f" PARTS={consts['PARTS']}" if consts.get("PARTS") else ""
    tag += " KEY_ROWS" if consts.get("KEY_ROWS") else ""
    tag += " atomic" if consts.get("ATOMIC") else ""
    return tag + f" w{warps}"


# the compile jobs of one compile_all call, (arch, kernel, signature, constexprs, attrs, num_warps, ptxas,
# PTX file name or None); module state so that forked workers read them by index
_TASKS: list = []


def _compile_task(i: int):
    """(ok, message, PTX without source locations or None, its file name, seconds) of _TASKS[i]."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch, kernel, sig, consts, attrs, warps, ptxas, ptx_name = _TASKS[i]
    t0 = time.time()
    try:
        out = triton.compile(ASTSource(kernel, sig, constexprs=consts, attrs=attrs),
                             target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
        limit = SHARED_LIMIT.get(arch)
        good = bool(out.asm.get("cubin")) and (limit is None or out.metadata.shared <= limit)
        msg = f"shared={out.metadata.shared}B" + (f" > the sm{arch} limit {limit}B" if not good else "")
        if ptxas:
            msg += " " + ptxas_info(out.asm["ptx"], arch)
        ptx = strip_locations(out.asm["ptx"]) if ptx_name else None
    except Exception as exc:  # report every failure, then fail
        good, msg, ptx, ptx_name = False, f"{type(exc).__name__}: {exc}", None, None
    return good, msg, ptx, ptx_name, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--ptx-dir", help="write each variant's PTX (source locations stripped) here")
    ap.add_argument("--group", type=int, default=3, help="query heads per KV group (the paper layout: 16)")
    ap.add_argument("--only", help="compile only the kernels whose name contains this")
    ap.add_argument("--ptxas-info", action="store_true",
                    help="specialise as a launch would and report ptxas -v's registers and spill bytes")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default 1)")
    args = ap.parse_args(argv)
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)
    ok = compile_all(args.arch, args.dtype, args.head_dim, group=args.group, ptx_dir=args.ptx_dir, only=args.only,
                     ptxas=args.ptxas_info, workers=max(1, args.jobs))
    print("aot_check: all kernels compiled" if ok else "aot_check: FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
