"""Shared helpers for the NSA Triton kernels.

Conventions used by every kernel in this package:
* softmax statistics, accumulators and LSE are float32 whatever the input dtype;
* fp32 inputs use `tl.dot(..., input_precision="ieee")` (no TF32) so fp32 results match the
  PyTorch path to ~1e-6; bf16/fp16 inputs use the native tensor-core dot with fp32 accumulation;
* all integer divisions are done on non-negative operands (Triton's `//` truncates toward zero on
  the GPU while the interpreter floors; for x >= 0 both agree);
* under TRITON_INTERPRET=1, bf16 dot operands are upcast to fp32 (DOT_T) after being rounded to
  bf16 (IN_T): the interpreter (triton 3.7.1) stores bf16 as uint16 and its `tl.dot` multiplies
  the raw integers. On the GPU DOT_T == IN_T and the casts are no-ops. (The casts are written
  inline: a helper call per cast site costs interpreter time even through `device_function`.)
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Softmax in base 2, as flash-attention kernels do: scores are scaled by scale * LOG2E so that exp(x)
# becomes exp2(x * LOG2E) with the multiply folded into the score scale (on the GPU tl.exp is itself
# ex2.approx after a multiply by log2(e): one multiply per score element fewer). LSEs stay natural logs
# outside the kernels (LN2 converts back; backward kernels multiply a loaded LSE by LOG2E).
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def f32dot(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


# Host-side integer helpers: triton.cdiv / triton.next_power_of_2 are constexpr functions whose JIT
# wrapper costs ~3 us a call, and the wrappers make dozens of calls per layer (host overhead matters:
# short sequences and decode are launch-bound).
def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def pad_pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(int(x), 1) - 1).bit_length())


def num_warps(head_dim: int) -> int:
    """4 warps up to head dim 64, 8 above (not tuned on a GPU yet)."""
    return 4 if head_dim <= 64 else 8


class DkvTile(NamedTuple):
    """A dK/dV tile variant of the compressed and window kernels: BM queries per step, BN keys per program,
    num_warps (0 = num_warps of the head dim); split: dV and dK in two launches of the kernel (PARTS 1 then
    2), one [BN, D] fp32 accumulator each instead of two (compressed only); key_rows: the transposed score
    form (KEY_ROWS: s^T = k q^T, so no dot takes a transposed operand)."""
    bm: int
    bn: int
    warps: int
    split: bool = False
    key_rows: bool = False


# num_warps measured best on an H100 (bench/bench_kernels.py, BENCHMARKS.md), as
# (head dim <= 64, head dim > 64); other kernels use num_warps(head_dim).
MEASURED_WARPS = {"selected_fwd": (2, 4), "selected_bwd_dq": (2, 2), "selected_bwd_dkdv": (4, 4)}

# Per-kernel num_warps overrides, e.g. {"selected_fwd": 8}: bench/bench_kernels.py sweeps these on
# a GPU; production code leaves the dict empty.
TUNING: dict[str, int] = {}


def launch_warps(kernel: str, head_dim: int) -> int:
    if kernel in TUNING:
        return TUNING[kernel]
    if kernel in MEASURED_WARPS:
        return MEASURED_WARPS[kernel][head_dim > 64]
    return num_warps(head_dim)


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """Environment variable `name`, one of `choices` (unset: the first); anything else is an error."""
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def env_int(name: str, default: int, lo: int, hi: int, meaning: str) -> int:
    """Environment variable `name` as an integer in [lo, hi] (unset: default); anything else is an error."""
    raw = os.environ.get(name, str(default))
    if not (raw.isdigit() and lo <= int(raw) <= hi):
        raise ValueError(f"{name}={raw!r}: expected an integer {lo}..{hi} ({meaning})")
    return int(raw)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Does this call need the autograd.Function? Without it (decode, eval) the wrappers call the
    forward directly: Function.apply costs ~20 us of host time per call even under no_grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_inputs(name: str, *tensors: torch.Tensor) -> None:
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"nsa triton {name}: dtype {dtype} unsupported (float32/bfloat16/float16); "
                        "use the PyTorch path (nsa.attention.ops)")
    for t in tensors:
        if t.dtype != dtype or t.device != device:
            raise TypeError(f"nsa triton {name}: all inputs must share dtype and device")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"nsa triton {name}: tensors on {device} need CUDA or TRITON_INTERPRET=1")


def dot_config(dtype: torch.dtype) -> dict:
    """Constexpr kernel arguments for the dots: IN_T (input element type, used to round
    probabilities / dS like the GPU does), DOT_T (type the dot operands are cast to; equals IN_T
    except for the interpreter-bf16 workaround) and PREC (tl.dot input_precision)."""
    in_t = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    f32 = f32dot(dtype)
    return dict(IN_T=in_t, DOT_T=tl.float32 if f32 else in_t, PREC="ieee" if f32 else "tf32")


@triton.jit
def _delta_kernel(DO, O, DELTA, s_db, s_dh, s_dt, s_dd, s_ob, s_oh, s_ot, s_od, H, Sq,
                  D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dt + offs_d[None, :] * s_dd, mask=mask, other=0.0)
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :] * s_od, mask=mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=offs_m < Sq)


def rowsum_do_o(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) in fp32 as a contiguous [B, H, Sq] tensor, the flash-attention backward's
    correction term, in one pass (torch needed four: two fp32 copies, a product and a sum)."""
    B, H, Sq, D = out.shape
    res = torch.empty(B, H, Sq, dtype=torch.float32, device=out.device)
    if res.numel():
        bm = 64
        _delta_kernel[(cdiv(Sq, bm), B * H)](
            grad_out, out, res, *grad_out.stride(), *out.stride(), H, Sq, D=D, D_PAD=pad_pow2(D), BM=bm,
            num_warps=num_warps(D))
    return res


def attach_delta(grad_out: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> None:
    """Leave rowsum(grad_out * out) (fp32 [B, H, Sq], computed by whoever made grad_out: the fused gated sum's
    backward) on grad_out for the backward of the branch whose output is `out` (branch_delta)."""
    grad_out.nsa_delta = (delta, out)


def branch_delta(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) [B, H, Sq] fp32 for an attention backward: the one attached to dO (attach_delta) when it was
    computed from this very output, else rowsum_do_o. Autograd hands the gated sum's d o_c to the branch as the
    same tensor, attributes included; a slice (tuning) or a copy carries none and is computed here."""
    attached = getattr(grad_out, "nsa_delta", None)
    if attached is not None:
        delta, src = attached
        if (src.data_ptr() == out.data_ptr() and src.shape == out.shape and src.stride() == out.stride()
                and delta.shape == out.shape[:3]):
            return delta
    return rowsum_do_o(grad_out, out)


def device_function(fn):
    """@triton.jit for a helper that kernels call (not launched itself). On the GPU the compiler inlines
    it. Under the interpreter the helper becomes the plain Python function the interpreter would run,
    called directly: triton 3.7's InterpretedFunction.__call__ re-patches all of triton.language on
    every nested call (with plain @triton.jit helpers the kernel tests ran ~20% longer)."""
    jitted = triton.jit(fn)
    if interpreting():
        from triton.runtime.interpreter import InterpretedFunction

        if isinstance(jitted, InterpretedFunction):
            return jitted.rewrite()
    return jitted


# Flash-attention building blocks shared by the compressed, selected, window and decode kernels
# (inlined by the compiler: the kernels' GPU code is the same as with the lines written out, which
# `aot_check --ptx-dir` shows by diffing two dumps). Scores are in log2 units (module docstring).
@device_function
def online_softmax(s, qk_scale, v, m_i, l_i, acc, IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """One key tile of an online softmax: scores s [rows, keys] (-inf where masked) times qk_scale > 0 (the
    log2-unit scale; 1.0 for scores already scaled), values v [keys, D]; returns the new running (max, sum,
    unnormalised output). The scale goes into the exponent's argument, s * qk_scale - m: one FMA per score
    instead of a multiply and a subtract. A row with no key so far keeps max -inf (m_safe keeps exp2 finite)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(IN_T).to(DOT_T), v, input_precision=PREC)
    return m_new, l_i, acc


@device_function
def softmax_output(acc, m_i, l_i):
    """(output, natural-log LSE) of the running state; a row that saw no key gives zeros and -inf."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    return out, lse


# False: the compressed and window kernels mask every tile, as before band_split (bench/bench_kernels.py times both)
INTERIOR_TILES = True


@device_function
def band_split(lo, hi, full_lo, full_hi, BT: tl.constexpr, INTERIOR: tl.constexpr):
    """(tiles, first interior, end of interior) of the tiles lo + j*BT, j < tiles, that cover [lo, hi):
    the interior tiles lie inside [full_lo, full_hi), where no element is masked (every query of the
    program sees every key), and run without a mask; the others (the band's edges) with one. In the window
    kernels the mask was ~40% of the instructions of a key step (SASS, sm_90). The interior's loads keep
    a mask of the tile's full shape (all true): with a broadcast [1, D] mask Triton 3.7 loads the tiles
    through registers (LDG + STS) instead of asynchronous copies (LDGSTS)."""
    tiles = (tl.maximum(hi - lo, 0) + BT - 1) // BT
    j_fs = tl.minimum((tl.maximum(full_lo - lo, 0) + BT - 1) // BT, tiles)
    j_fe = tl.minimum(tl.maximum(tl.maximum(full_hi - lo, 0) // BT, j_fs), tiles)
    if not INTERIOR:  # every tile masked (INTERIOR_TILES)
        j_fs = j_fe
    return tiles, j_fs, j_fe


@device_function
def lse_delta(LSE, DELTA, row, mask):
    """A backward tile's forward LSE (in log2 units; -inf, a row with no key, becomes 0: every one of
    its scores is masked anyway) and rowsum(dO * O), from the contiguous [B, H, Sq] buffers."""
    lse = tl.load(LSE + row, mask=mask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
    delta = tl.load(DELTA + row, mask=mask, other=0.0)
    return lse, delta


@device_function
def key_tile(k_ptrs, v_ptrs, s_kn, s_vn, n0, offs_n, n_hi, dmask, DOT_T: tl.constexpr):
    """A forward / dQ step's key tile n0 + offs_n (those < n_hi; all of them in an interior step, where the mask
    stays for its full shape: see band_split): (key mask, k, v [keys, D] as DOT_T)."""
    nin = (n0 + offs_n) < n_hi
    kv_mask = nin[:, None] & dmask[None, :]
    k = tl.load(k_ptrs + n0 * s_kn, mask=kv_mask, other=0.0).to(DOT_T)
    v = tl.load(v_ptrs + n0 * s_vn, mask=kv_mask, other=0.0).to(DOT_T)
    return nin, k, v


@device_function
def query_rows(q_base, do_base, s_qt, s_dt, LSE, DELTA, row0, offs_m, m_end, dmask, DOT_T: tl.constexpr):
    """A dK/dV step's query rows offs_m (those < m_end; all of them in an interior step, where the mask stays
    for its full shape: see band_split): (row mask, q, dO [rows, D] as DOT_T, LSE in log2 units, delta)."""
    mmask = offs_m < m_end
    md_mask = mmask[:, None] & dmask[None, :]
    lse, delta = lse_delta(LSE, DELTA, row0 + offs_m, mmask)
    q = tl.load(q_base + offs_m[:, None] * s_qt, mask=md_mask, other=0.0).to(DOT_T)
    do = tl.load(do_base + offs_m[:, None] * s_dt, mask=md_mask, other=0.0).to(DOT_T)
    return mmask, q, do, lse, delta


@device_function
def score_grads(p, do, v, delta, IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """dS = P * (dO V^T - delta), rounded to the input dtype for the dK and dQ dots."""
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return (p * (dp - delta[:, None])).to(IN_T).to(DOT_T)
