"""Attention modules: `NSAttention` (Native Sparse Attention) and `CausalSelfAttention` (dense baseline).

NSA (arXiv 2502.11089): o_t = g_cmp * Attn(q_t, K_cmp, V_cmp) + g_slc * Attn(q_t, K_slc, V_slc)
                            + g_win * Attn(q_t, K_win, V_win)
* queries are shared; each branch has its own key/value projection (one fused Linear);
* gates: an MLP (Linear -> SiLU -> Linear) + sigmoid on the layer input, one gate per head per branch;
* GQA: G key/value heads, each shared by H / G query heads; selection is shared per group (Eq. 10).

Where RoPE goes (the paper does not say; this follows common practice and keeps scores relative):
* q, and the selection and window keys, are rotated at their token positions;
* compressed keys: phi sees *unrotated* raw keys (it has its own intra-block position encoding),
  and its output is rotated at the block's last position i*d + l - 1, the latest token it
  summarises. A query at t therefore scores a block by the relative offset t - (i*d + l - 1) >= 0.
* values are never rotated.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nsa.attention import ops, static_decode
from nsa.attention.blocks import num_cmp_blocks
from nsa.attention.rope import RotaryEmbedding
from nsa.config import ModelConfig
from nsa.errors import UserError

BRANCHES = ("cmp", "slc", "win")
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class BlockCompressor(nn.Module):
    """phi: maps each block of l raw keys (or values) [l, Dh] to one compressed token [Dh].

    "mlp": add a learnable intra-block position embedding, flatten the block, 2-layer MLP (GELU).
    "mean": mean pooling (no parameters), the cheaper option."""

    def __init__(self, kind: str, block: int, head_dim: int, hidden: int):
        super().__init__()
        self.kind, self.block = kind, block
        if kind == "mlp":
            self.pos = nn.Parameter(torch.zeros(block, head_dim))
            self.fc1 = nn.Linear(block * head_dim, hidden)
            self.fc2 = nn.Linear(hidden, head_dim)

    def forward(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        """x [B, G, S, Dh] -> [B, G, n_cmp, Dh] over blocks [i*d, i*d + l)."""
        B, G, S, D = x.shape
        n_cmp = num_cmp_blocks(S, self.block, stride)
        if n_cmp == 0:
            return x.new_zeros(B, G, 0, D)
        blocks = x.unfold(2, self.block, stride).transpose(-1, -2)  # [B, G, n_cmp, l, Dh]
        if self.kind == "mean":
            return blocks.mean(dim=-2)
        # pos in the blocks' dtype: under autocast an fp32 pos would promote the [.., l, Dh] blocks to fp32, a
        # copy twice the raw keys' size that fc1 then casts back
        h = (blocks + self.pos.to(blocks.dtype)).flatten(-2)
        return self.fc2(F.gelu(self.fc1(h)))


class NSAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        nsa = cfg.nsa
        self.cfg, self.nsa = cfg, nsa
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        inner, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.dim, inner, bias=False)
        self.wkv = nn.Linear(cfg.dim, 6 * kv, bias=False)  # (k, v) for cmp, slc, win
        self.wo = nn.Linear(inner, cfg.dim, bias=False)
        gate_hidden = nsa.gate_hidden or max(cfg.dim // 4, 8)
        self.gate = nn.Sequential(
            nn.Linear(cfg.dim, gate_hidden), nn.SiLU(), nn.Linear(gate_hidden, 3 * cfg.n_heads)
        )
        hidden = nsa.compress_hidden or 2 * cfg.head_dim
        self.compress_k = BlockCompressor(nsa.compress, nsa.cmp_block, cfg.head_dim, hidden)
        self.compress_v = BlockCompressor(nsa.compress, nsa.cmp_block, cfg.head_dim, hidden)
        self.enabled = tuple(b in nsa.branches.split(",") for b in BRANCHES)  # ablations
        self.last_gate_mean: torch.Tensor | None = None  # [3], detached, for logging

    # chunk sizes: bound the per-chunk working set (gathered blocks dominate) to ~16M elements
    def _chunks(self, batch: int) -> tuple[int, int]:
        if self.nsa.query_chunk:
            return self.nsa.query_chunk, self.nsa.query_chunk
        per_query = batch * self.n_kv * self.nsa.n_selected * self.nsa.slc_block * self.head_dim
        slc_chunk = max(16, min(1024, (1 << 24) // max(per_query, 1)))
        return 512, slc_chunk

    def project(self, x: torch.Tensor, rope: RotaryEmbedding, start: int = 0, positions=None, bound=None,
                rotate: bool = True):
        """Queries and the three branches' raw keys/values for tokens at start .. start + S - 1 (or at
        the device tensor `positions`, all < `bound`: static decode). rotate=False: q and the selection
        and window keys come back unrotated (the fused decode write rotates them itself)."""
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        kv = self.wkv(x).view(B, S, 6, self.n_kv, self.head_dim).permute(2, 0, 3, 1, 4)
        k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = kv.unbind(0)
        if rotate:
            pos, bound = _positions(x, start, positions, bound)
            q, k_slc, k_win = rope(q, pos, bound), rope(k_slc, pos, bound), rope(k_win, pos, bound)
        return q, (k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win)

    def compress(self, k_raw: torch.Tensor, v_raw: torch.Tensor, rope: RotaryEmbedding, first_block: int = 0):
        """Compressed keys/values of the raw cmp-branch tokens; keys rotated at their block's end.
        `first_block` is the index of the first block (non-zero when compressing in decode)."""
        l, d = self.nsa.cmp_block, self.nsa.cmp_stride
        k_c, v_c = self.compress_k(k_raw, d), self.compress_v(v_raw, d)
        n = k_c.shape[2]
        ends = torch.arange(first_block * d + l - 1, (first_block + n) * d + l - 1, d, device=k_raw.device)
        return rope(k_c, ends, (first_block + n) * d + l), v_c

    def kernels(self, q: torch.Tensor):
        """The Triton kernel module for these inputs, or None for the PyTorch path (`ops`).

        auto: Triton on CUDA when importable (fp16/bf16/fp32) and it passes a one-time parity
        self-check on this device (else PyTorch, with a warning); torch: always ops; triton: the
        kernels or a clear error (on CPU they need TRITON_INTERPRET=1, for tests only).
        With the kernels, the window branch uses the Triton window kernel, or flash-attn's where it is
        installed and faster (NSA_WINDOW, window_impl)."""
        impl = self.nsa.impl
        if impl == "torch" or (impl == "auto" and not q.is_cuda):
            return None
        from nsa.attention import triton as triton_kernels

        if triton_kernels.available() and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
            if impl == "triton":
                return triton_kernels
            from nsa.attention.triton.selfcheck import kernels_ok

            return triton_kernels if kernels_ok(q.device, q.dtype) else None
        if impl == "triton":
            raise UserError(
                f"model.nsa.impl=triton, but the Triton NSA kernels cannot run here (device {q.device.type}, "
                f"dtype {q.dtype}; they need the triton package and a CUDA GPU, fp32/bf16/fp16). "
                "Set model.nsa.impl=auto (or torch) to use the PyTorch path."
            )
        return None

    def branches(self, q, cmp_kv, slc_kv, win_kv, q_start: int = 0, win_start: int = 0):
        """The three branch outputs [B, H, Sq, Dh] for queries at q_start.. against keys from 0
        (cmp, slc) and from win_start (window)."""
        nsa = self.nsa
        chunk, slc_chunk = self._chunks(q.shape[0])
        use_cmp, use_slc, use_win = self.enabled
        o_cmp = o_slc = o_win = idx = None
        tk = self.kernels(q)
        if tk is not None:  # Triton: the compressed pass hands its log-sum-exp to selection
            lse = None
            if use_cmp:
                o_cmp, lse = tk.compressed_attention(q, *cmp_kv, nsa.cmp_block, nsa.cmp_stride, q_start)
            if use_slc:
                idx = tk.select_blocks(q, cmp_kv[0], nsa.cmp_block, nsa.cmp_stride, nsa.slc_block,
                                       nsa.n_selected, q_start, lse=lse)
                o_slc = tk.selected_attention(q, *slc_kv, idx, nsa.slc_block, q_start)
        else:
            if use_cmp:
                o_cmp = ops.compressed_attention(q, *cmp_kv, nsa.cmp_block, nsa.cmp_stride, q_start, chunk)
            if use_slc:
                idx = ops.select_blocks(
                    q, cmp_kv[0], nsa.cmp_block, nsa.cmp_stride, nsa.slc_block, nsa.n_selected, q_start, chunk
                )
                o_slc = ops.selected_attention(q, *slc_kv, idx, nsa.slc_block, q_start, slc_chunk)
        if use_win:
            impl = window_impl()
            if tk is not None and impl != "sdpa":
                o_win = tk.window_attention(q, *win_kv, nsa.window, q_start, win_start, impl=impl)
            else:  # chunked SDPA (also what NSA_WINDOW=sdpa forces on CUDA, for comparison)
                o_win = ops.window_attention(q, *win_kv, nsa.window, q_start, win_start, chunk)
        return (o_cmp, o_slc, o_win), idx

    def combine(self, x, outs, record_gates: bool = True) -> torch.Tensor:
        """Gated sum of the branch outputs (Eq. 5), then the output projection. record_gates=False
        (decode): leave `last_gate_mean` (the gates' mean per branch, for the training log) as the
        last forward left it (two kernels fewer per step), and with the Triton kernels and no gradients
        run the gate MLP's SiLU and last Linear inside the gated sum's kernel (two more)."""
        if not record_gates:
            tk = self._fused_combine(outs)
            if tk is not None and not torch.is_grad_enabled():
                first, _, last = self.gate
                return self.wo(tk.gate_mlp_combine(first(x), last.weight, last.bias, *outs))
        logits = self.gate(x)
        if record_gates:
            with torch.no_grad():
                self.last_gate_mean = torch.sigmoid(logits.float()).view(-1, 3).mean(0)
        return self.wo(self.mix(logits, outs))

    def mix(self, logits: torch.Tensor, outs) -> torch.Tensor:
        """sum_c sigmoid(logits[..., 3h + c]) * o_c: gate logits [B, S, 3H] and the branch outputs
        [B, H, S, D] (None: branch off) -> [B, S, H*D], the output projection's input. With the Triton
        kernels (eager, all three branches on) one fused kernel each way (triton/combine.py); under
        torch.compile Inductor fuses the PyTorch version itself."""
        tk = self._fused_combine(outs)
        if tk is not None:
            return tk.gate_combine(logits, *outs)
        B, S, _ = logits.shape
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        dtype = next(o for o in outs if o is not None).dtype
        g = torch.sigmoid(logits).view(B, S, self.n_heads, 3).transpose(1, 2).to(dtype)  # [B, H, S, 3]
        o = sum(g[..., i : i + 1] * out for i, out in enumerate(outs) if out is not None)
        return o.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)

    def _fused_combine(self, outs):
        """The kernel module for the fused gate-and-combine, or None (PyTorch): NSA_COMBINE=torch,
        an ablated branch, torch.compile tracing, or no kernels for these tensors."""
        if combine_impl() == "torch" or any(o is None for o in outs) or torch.compiler.is_compiling():
            return None
        return self.kernels(outs[0])

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cache=None) -> torch.Tensor:
        q, (k_cr, v_cr), slc_kv, win_kv = self.project(x, rope)
        cmp_kv = self.compress(k_cr, v_cr, rope)
        if q.dtype != cmp_kv[0].dtype:  # autocast: phi's Linear ran in another dtype
            cmp_kv = tuple(t.to(q.dtype) for t in cmp_kv)
        outs, _ = self.branches(q, cmp_kv, slc_kv, win_kv)
        if cache is not None:
            cache.fill(k_cr, v_cr, cmp_kv, slc_kv, win_kv)
        return self.combine(x, outs)

    @torch.no_grad()
    def decode_step(self, x: torch.Tensor, rope: RotaryEmbedding, cache) -> torch.Tensor:
        """One new token per sequence: x [B, 1, dim] at position cache.length -> [B, 1, dim]. With a
        static cache (static_decode.py) the step has fixed shapes (CUDA-graph capturable) and the
        caller advances the shared position."""
        if isinstance(cache, static_decode.StaticNSACache):
            return static_decode.nsa_step(self, x, rope, cache)
        t = cache.length
        q, (k_cr, v_cr), slc_kv, win_kv = self.project(x, rope, start=t)
        cache.append(k_cr, v_cr, slc_kv, win_kv, self, rope)
        outs, idx = self.branches(
            q, cache.cmp_kv(), cache.slc_kv(), cache.win_kv(), q_start=t, win_start=cache.win_start
        )
        cache.count_reads(idx, self.nsa)
        return self.combine(x, outs, record_gates=False)


class CausalSelfAttention(nn.Module):
    """Dense causal attention (SDPA), the baseline every NSA claim is measured against."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        inner, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.dim, inner, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * kv, bias=False)
        self.wo = nn.Linear(inner, cfg.dim, bias=False)

    def project(self, x, rope, start: int = 0, positions=None, bound=None):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(B, S, 2, self.n_kv, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        pos, bound = _positions(x, start, positions, bound)
        return rope(q, pos, bound), rope(k, pos, bound), v

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cache=None) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            cache.fill(k, v)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))

    @torch.no_grad()
    def decode_step(self, x: torch.Tensor, rope: RotaryEmbedding, cache) -> torch.Tensor:
        if isinstance(cache, static_decode.StaticKVCache):
            return static_decode.dense_step(self, x, rope, cache)
        B = x.shape[0]
        q, k, v = self.project(x, rope, start=cache.length)
        cache.append(k, v)
        k_all, v_all = cache.kv()
        # Not cuDNN: its attention plans a graph per key length, i.e. on every decode step (a flat
        # ~40 ms per step at 8k..64k on an H100 with torch 2.11, BENCHMARKS.md).
        with sdpa_kernel(DECODE_BACKENDS):
            o = F.scaled_dot_product_attention(q, k_all, v_all, enable_gqa=self.n_kv != self.n_heads)
        cache.tokens_read = k_all.shape[2]
        return self.wo(o.transpose(1, 2).reshape(B, 1, -1))


def _positions(x: torch.Tensor, start: int, positions, bound):
    """(positions [S], bound): start .. start + S - 1 unless given as a device tensor (with its bound)."""
    if positions is None:
        S = x.shape[1]
        return torch.arange(start, start + S, device=x.device), start + S
    return positions, bound


WINDOW_IMPLS = ("auto", "triton", "flash", "flash3", "sdpa")


def window_impl() -> str:
    """NSA_WINDOW, the window branch's implementation when the NSA kernels are in use: "auto" (default:
    the Triton window kernel, or flash-attn 2/3's sliding-window kernel where that package is installed,
    can compute the call and is faster on the first call's timing), "triton", "flash" / "flash3" (that
    package wherever it can compute the call; see nsa/attention/flash_window.py) or "sdpa" (chunked SDPA,
    ops.window_attention, for comparison)."""
    impl = os.environ.get("NSA_WINDOW", "auto")
    if impl not in WINDOW_IMPLS:
        raise UserError(f"NSA_WINDOW={impl!r}: expected one of {', '.join(WINDOW_IMPLS)}")
    return impl


def combine_impl() -> str:
    """NSA_COMBINE: "triton" (default; the fused gate-and-combine kernel whenever the NSA kernels are in
    use) or "torch" (the PyTorch gated sum, for comparison)."""
    impl = os.environ.get("NSA_COMBINE", "triton")
    if impl not in ("triton", "torch"):
        raise UserError(f"NSA_COMBINE={impl!r}: expected triton or torch")
    return impl


def keep_branches_eager() -> None:
    """Make torch.compile leave NSAttention.branches eager (a graph break); call before compiling.

    Dynamo cannot trace the kernels' self-check, and Inductor failed to re-compile the Triton kernels
    inside a graph (H100, torch 2.11), which sent `auto` to the slow PyTorch path; projections, phi,
    gates and MLPs still compile. Not done at import: torch.compiler.disable imports Dynamo, and with
    it triton, which must stay unimported until a test can switch on its interpreter."""
    if not getattr(NSAttention.branches, "_nsa_eager", False):
        eager = torch.compiler.disable(NSAttention.branches)
        eager._nsa_eager = True
        NSAttention.branches = eager


def build_attention(cfg: ModelConfig) -> nn.Module:
    return NSAttention(cfg) if cfg.attention == "nsa" else CausalSelfAttention(cfg)


__all__ = ["NSAttention", "CausalSelfAttention", "BlockCompressor", "build_attention", "keep_branches_eager", "BRANCHES"]
