"""Decode with static shapes, so that a whole decode step can be replayed as one CUDA graph.

The caches in cache.py grow with the context and hand their lengths to the kernels as host integers:
every step launches NSA's ~40 kernels per layer (dense: ~9) with new arguments, and at batch 1..32 a
step is bound by issuing them, not by what it reads (BENCHMARKS.md: full attention's step was 2-3x
faster than NSA's although NSA reads 11x fewer tokens at 64k). Here every buffer is allocated once for
`capacity` tokens and the position of the next token lives in a device tensor (`DecodePosition`), so a
step runs the same kernels on the same memory each time, with masks in place of lengths and no host
synchronisation; `GraphedStep` captures it (one layer or the whole model) and replays it per token.

NSA step (`StaticNSACache`, `nsa_step`): the token's keys/values written at t, then the three
branches over the fixed buffers (`attend`), the same arithmetic as the dynamic decode
(nsa.attention.ops, which the tests compare it with):
* compressed: softmax over the compressed slots, masked to the blocks complete by t; the same
  probabilities give the selection scores (Eqs. 8-10: overlap map, group sum, forced initial and
  local blocks, future blocks excluded, stable top-n: ties to the lower block index);
* selected: the n chosen blocks read from the raw-token buffer, clipped at t;
* window: a ring buffer of the last w tokens and the positions they hold;
* a compressed token is computed from a ring of the last l raw tokens on the steps where a block
  completes (1 in d): `position.emitting`, a host bool, so no device value decides the control
  flow; GraphedStep keeps one graph per value.
Where the layer runs the Triton kernels (CUDA), `attend` is one fused kernel (triton/decode.py: one
program per sequence and KV group, every cached token it reads loaded once) and the RoPE and cache
writes before it another (`StaticNSACache.write`); elsewhere, or with NSA_DECODE=torch, PyTorch ops
(`attend_torch`, ~80 small kernels per layer, its reference).
What the step reads: the paper's count (`tokens_read`); the PyTorch ops scan all capacity / d
compressed slots, valid or not (a few percent of full attention's reads at the same capacity), the
kernel only the visible ones.

Dense step (`StaticKVCache`, `dense_step`): on CUDA the decode kernel's scan with every cached token its
own block (triton/decode.dense_decode: tokens 0..t only, split over programs flash-decoding style);
elsewhere SDPA over the whole buffer with a mask t' <= t, the usual static-cache formulation (SDPA
picks its memory-efficient kernel for a mask, which reads the whole buffer and does not split the keys
over programs: 1.95 ms per layer at 64k on an H100, against 0.47 ms for the growing cache's SDPA).

Usage (a model; a single layer works the same way with `layer.decode_step`):
    caches, position = model.new_static_caches(batch, capacity, device, dtype)
    logits, _ = model.prefill(prompt, caches)              # fills the buffers, position = len(prompt)
    step = GraphedStep(lambda ids: model.decode_step(ids, caches), next_ids, position)
    logits = step(next_ids)                                # one token; replays the graph on CUDA
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F

from nsa.attention.blocks import num_cmp_blocks, num_slc_blocks, overlap_map
from nsa.attention.ops import _masked_softmax
from nsa.errors import UserError


class DecodePosition:
    """Position of the next token: a device tensor (what the captured kernels read) and its host
    mirror (for capacity checks without waiting for the GPU). Shared by all layers of a model.

    `emitting`: does a compressed block complete at the next token (t + 1 - l >= 0, a multiple of d)?
    A host bool kept with the mirror, so a step computes the compressed token only then (1 step in
    d) and GraphedStep keeps one graph per value (torch.compile: one guard, two variants)."""

    def __init__(self, device, capacity: int):
        self.t = torch.zeros((), dtype=torch.int64, device=device)
        self.host = 0
        self.capacity = capacity
        self.compression: tuple[int, int] | None = None  # (l, d) of the NSA caches sharing the position
        self.emitting = False

    def compresses(self, block: int, stride: int) -> None:
        """An NSA cache with compressed blocks of `block` tokens every `stride` shares this position."""
        if self.compression not in (None, (block, stride)):
            raise ValueError(f"static caches with compressed blocks {self.compression} and {(block, stride)} "
                             "cannot share one DecodePosition")
        self.compression = (block, stride)
        self._moved()

    def _moved(self) -> None:
        if self.compression is not None:
            l, d = self.compression
            self.emitting = self.host + 1 >= l and (self.host + 1 - l) % d == 0

    def check_batch(self, got: int, want: int) -> None:
        if got != want:
            raise UserError(f"a batch of {got} sequences does not fit static decode caches made for {want}; "
                            "allocate them with the batch you decode")

    def set(self, t: int) -> None:
        """After a prompt of t tokens (which may fill the buffers exactly)."""
        if t > self.capacity:
            raise self._past(t, "the prompt")
        self.t.fill_(t)
        self.host = t
        self._moved()

    def check(self) -> None:
        """Before a step: is there room for the token at position `host`?"""
        if self.host >= self.capacity:
            raise self._past(self.host, "decoding")

    def _past(self, t: int, what: str) -> UserError:
        return UserError(f"{what} reaches position {t}, past the static decode caches' capacity of "
                         f"{self.capacity} tokens; allocate them with a larger capacity")

    def advance(self) -> None:
        """Eager stepping: move to the next token (GraphedStep does this inside its graph)."""
        self.t.add_(1)
        self.stepped()

    def stepped(self) -> None:
        """The host side of a step (the device tensor was advanced by the step itself)."""
        self.host += 1
        self._moved()


def decode_impl() -> str:
    """NSA_DECODE: "fused" (default: the one-kernel decode attention, triton/decode.py, wherever the
    layer runs the Triton kernels) or "torch" (the PyTorch ops of attend_torch, for comparison)."""
    impl = os.environ.get("NSA_DECODE", "fused")
    if impl not in ("fused", "torch"):
        raise UserError(f"NSA_DECODE={impl!r}: expected fused or torch")
    return impl


def fused_kernel(layer, device, dtype):
    """The fused decode op for a cache on (device, dtype), or None (PyTorch): NSA_DECODE=torch, the
    layer would not run its Triton kernels on such tensors (CPU, a failed self-check), or the fused
    kernel failed its own (selfcheck.decode_ok; skipped when model.nsa.impl=triton forces the kernels)."""
    device = torch.device(device)
    if decode_impl() == "torch" or layer.kernels(torch.empty(0, device=device, dtype=dtype)) is None:
        return None
    from nsa.attention.triton import decode  # noqa: F401  (registers the op)
    from nsa.attention.triton.selfcheck import decode_ok

    if layer.nsa.impl != "triton" and not decode_ok(device, dtype):  # impl=triton: no checks, as the layer
        return None
    return torch.ops.nsa.static_decode.default  # decode.static_decode_into


def dense_kernel(device, dtype, fused: bool | None = None):
    """The dense step's decode op (triton/decode.dense_decode) for a cache on (device, dtype), or None
    (masked SDPA). fused=None: on CUDA unless NSA_DECODE=torch, Triton is missing or the decode kernels
    failed their self-check (selfcheck.decode_ok); True: the op (on CPU through the Triton interpreter,
    for tests); False: SDPA."""
    device = torch.device(device)
    if fused is None:
        fused = device.type == "cuda" and decode_impl() == "fused" and dtype in (torch.float32, torch.bfloat16,
                                                                                    torch.float16)
        if fused:
            from nsa.attention import triton as triton_kernels

            fused = triton_kernels.available()
        if fused:
            from nsa.attention.triton.selfcheck import decode_ok

            fused = decode_ok(device, dtype)
    if not fused:
        return None
    from nsa.attention.triton import decode  # noqa: F401  (registers the op)

    return torch.ops.nsa.dense_decode.default


def _put(buf: torch.Tensor, slot: torch.Tensor, x: torch.Tensor) -> None:
    """buf[:, :, slot] = x for a 1-element device index `slot` (no host sync)."""
    buf.index_copy_(2, slot, x.to(buf.dtype))


def _attend(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor):
    """qg [B,G,r,D] over keys k/v [B,G,K,D] where `valid` (broadcast to [B,G,1,K]) -> (out [B,G,r,D],
    probabilities [B,G,r,K] fp32); no valid key -> zeros, as in ops."""
    s = torch.einsum("bgrd,bgkd->bgrk", qg, k).float() * (1.0 / math.sqrt(qg.shape[-1]))
    p = _masked_softmax(s, valid)
    return torch.einsum("bgrk,bgkd->bgrd", p.to(v.dtype), v), p


class StaticNSACache:
    """One NSA layer's decode state in fixed buffers for up to `capacity` tokens (see the module
    docstring). Filled by the layer's forward (the same `fill` as NSACache)."""

    def __init__(self, layer, batch: int, capacity: int, position: DecodePosition, device, dtype):
        nsa = layer.nsa
        self.window, self.cmp_block, self.cmp_stride, self.slc_block = (
            nsa.window, nsa.cmp_block, nsa.cmp_stride, nsa.slc_block)
        self.capacity, self.position = capacity, position
        G, D = layer.n_kv, layer.head_dim
        n_cmp = max(num_cmp_blocks(capacity, nsa.cmp_block, nsa.cmp_stride), 1)

        def buf(n):
            return torch.zeros(batch, G, n, D, device=device, dtype=dtype)

        self.slc_k, self.slc_v = buf(capacity), buf(capacity)
        self.cmp_k, self.cmp_v = buf(n_cmp), buf(n_cmp)
        self.raw_k, self.raw_v = buf(nsa.cmp_block), buf(nsa.cmp_block)  # ring: position p in slot p % l
        self.win_k, self.win_v = buf(nsa.window), buf(nsa.window)  # ring: position p in slot p % w
        self.win_pos = torch.full((nsa.window,), -1, dtype=torch.int64, device=device)
        self.map_idx, map_w = overlap_map(n_cmp, nsa.cmp_block, nsa.cmp_stride, nsa.slc_block, device=device)
        self.map_w = map_w.float()
        self.n_slc = num_slc_blocks(capacity, nsa.slc_block)
        self.map_idx = self.map_idx.clamp_max(self.n_slc - 1)
        # the last step's position and selected blocks, for tokens_read: buffers of the cache, written
        # in place by the step, because a replayed CUDA graph writes only the tensors it captured (a
        # tensor the step allocated belongs to the graph's pool, and the next graph reuses that memory).
        # The fused kernels write them themselves (no copy kernels in the step).
        self.last_t = torch.zeros(1, dtype=torch.int64, device=device)
        self.last_sel = torch.full((batch, G, min(nsa.n_selected, self.n_slc)), -1, dtype=torch.int32, device=device)
        self.stepped = False
        self.fused = fused_kernel(layer, device, dtype)
        position.compresses(nsa.cmp_block, nsa.cmp_stride)

    @property
    def length(self) -> int:
        return self.position.host

    def write(self, t: torch.Tensor, q: torch.Tensor, slc_kv, win_kv, raw_kv, rope) -> torch.Tensor:
        """The fused path's one kernel for a decode token at the device position t: RoPE on the
        unrotated q [B, H, 1, D] and the selection and window keys, every buffer write; returns the
        rotated q (nsa_step rotates in `project` and writes with index_copy_ otherwise)."""
        from nsa.attention.triton.decode import static_write

        cos, sin = rope.tables(self.capacity, q.device, torch.float32)
        return static_write(t, self, q, slc_kv, win_kv, raw_kv, cos, sin)

    def fill(self, k_raw, v_raw, cmp_kv, slc_kv, win_kv) -> None:
        """Prefill from the projections of a full forward over S tokens (positions 0..S-1)."""
        S = k_raw.shape[2]
        self.position.check_batch(k_raw.shape[0], self.slc_k.shape[0])
        self.position.set(S)
        n = cmp_kv[0].shape[2]
        self.slc_k[:, :, :S], self.slc_v[:, :, :S] = slc_kv
        self.cmp_k[:, :, :n], self.cmp_v[:, :, :n] = cmp_kv
        l, w = self.cmp_block, self.window
        for lo, ring, size, (k, v) in ((max(0, S - l), (self.raw_k, self.raw_v), l, (k_raw, v_raw)),
                                       (max(0, S - w), (self.win_k, self.win_v), w, win_kv)):
            slots = torch.arange(lo, S, device=k.device) % size
            ring[0].index_copy_(2, slots, k[:, :, lo:S].to(ring[0].dtype))
            ring[1].index_copy_(2, slots, v[:, :, lo:S].to(ring[1].dtype))
        self.win_pos.fill_(-1)
        self.win_pos[torch.arange(max(0, S - w), S, device=self.win_pos.device) % w] = torch.arange(
            max(0, S - w), S, device=self.win_pos.device)

    @property
    def tokens_read(self) -> dict[str, int]:
        """Tokens the last step read per KV group, by branch (the paper's count; waits for the GPU)."""
        if not self.stepped:
            return {}
        t = int(self.last_t)
        reads = {"cmp": min(max(0, (t - self.cmp_block + 1) // self.cmp_stride + 1), self.cmp_k.shape[2]),
                 "slc": int((self.last_sel[0, 0] >= 0).sum()) * self.slc_block, "win": min(self.window, t + 1)}
        return {**reads, "total": sum(reads.values())}


@torch.no_grad()
def nsa_step(layer, x: torch.Tensor, rope, cache: StaticNSACache) -> torch.Tensor:
    """NSAttention's decode step over a StaticNSACache: x [B, 1, dim] at position cache.position.t
    -> [B, 1, dim]. Writes the token's keys/values at t; does not advance the position."""
    nsa = layer.nsa
    if not torch.compiler.is_compiling():  # traced, the host int would become a guard (a recompile per step)
        cache.position.check()  # an index past the buffers would fail on the device
    t = cache.position.t
    pos = t.view(1)
    l, d, w = nsa.cmp_block, nsa.cmp_stride, nsa.window
    one_write = cache.fused is not None and not torch.compiler.is_compiling()  # RoPE and writes: one kernel
    q, (k_cr, v_cr), (k_s, v_s), (k_w, v_w) = layer.project(x, rope, positions=pos, bound=cache.capacity,
                                                            rotate=not one_write)
    if one_write:
        q = cache.write(t, q, (k_s, v_s), (k_w, v_w), (k_cr, v_cr), rope)
    else:
        _put(cache.slc_k, pos, k_s)
        _put(cache.slc_v, pos, v_s)
        w_slot = pos % w
        _put(cache.win_k, w_slot, k_w)
        _put(cache.win_v, w_slot, v_w)
        cache.win_pos.index_copy_(0, w_slot, pos)
        r_slot = pos % l
        _put(cache.raw_k, r_slot, k_cr)
        _put(cache.raw_v, r_slot, v_cr)

    if cache.position.emitting:  # the block [t+1-l, t] completes at t: its compressed token, at slot i
        ring = (t + 1 - l + torch.arange(l, device=x.device)) % l  # oldest first
        k_c = layer.compress_k(cache.raw_k.index_select(2, ring), d)
        v_c = layer.compress_v(cache.raw_v.index_select(2, ring), d)
        k_c = rope(k_c, pos, cache.capacity)  # rotated at the block's last token, t
        i_slot = ((t + 1 - l) // d).clamp(0, cache.cmp_k.shape[2] - 1).view(1)
        _put(cache.cmp_k, i_slot, k_c)
        _put(cache.cmp_v, i_slot, v_c)

    o_cmp, o_slc, o_win, idx = attend(q, cache, t, nsa.n_selected, layer.enabled)
    if idx is not None:  # what the step read (see StaticNSACache.last_t); the fused kernels wrote their part
        if not one_write:
            cache.last_t.copy_(t.view(1))
        if idx is not cache.last_sel:
            cache.last_sel.copy_(idx)
        cache.stepped = True
    return layer.combine(x, (o_cmp, o_slc, o_win), record_gates=False)


def attend(q: torch.Tensor, cache: StaticNSACache, t: torch.Tensor, n_selected: int, enabled):
    """The three branches for the decode queries q [B, H, 1, D] at position t over the cache (its
    slots for t already written) -> (o_cmp, o_slc, o_win) [B, H, 1, D] (None: branch off) and the
    selected blocks [B, G, n] (-1 = none; None without selection). The fused Triton kernel
    (triton/decode.py) when the cache was made for it (the blocks: cache.last_sel, which it writes),
    else `attend_torch`."""
    if cache.fused is None:
        return attend_torch(q, cache, t, n_selected, enabled)
    c = cache
    outs = c.fused(q, c.cmp_k, c.cmp_v, c.slc_k, c.slc_v, c.win_k, c.win_v, c.win_pos, t.view(1), c.last_sel,
                   c.cmp_block, c.cmp_stride, c.slc_block, n_selected, *enabled, 0)
    return (*(o if on else None for o, on in zip(outs, enabled)), c.last_sel if enabled[1] else None)


def attend_torch(q: torch.Tensor, cache: StaticNSACache, t: torch.Tensor, n_selected: int, enabled):
    """`attend` in PyTorch ops: the reference for the fused kernel and the CPU path."""
    B, H, _, D = q.shape
    G = cache.cmp_k.shape[1]
    l, d, lp, w = cache.cmp_block, cache.cmp_stride, cache.slc_block, cache.window
    qg = q.reshape(B, G, H // G, D)
    use_cmp, use_slc, use_win = enabled
    o_cmp = o_slc = o_win = idx = None
    if use_cmp or use_slc:
        n_vis = ((t - l + 1).clamp_min(-d) // d + 1).clamp(0, cache.cmp_k.shape[2])
        valid = (torch.arange(cache.cmp_k.shape[2], device=q.device) < n_vis).view(1, 1, 1, -1)
        o, p_cmp = _attend(qg, cache.cmp_k, cache.cmp_v, valid)
        o_cmp = o if use_cmp else None
    if use_slc:
        p_grp = p_cmp.sum(dim=2)  # Eq. 10 [B, G, n_cmp]
        scores = torch.zeros(B, G, cache.n_slc, device=q.device)
        for slot in range(cache.map_idx.shape[1]):  # Eq. 9 along the sparse overlap map
            scores.scatter_add_(-1, cache.map_idx[:, slot].expand(B, G, -1), p_grp * cache.map_w[:, slot])
        j = torch.arange(cache.n_slc, device=q.device)
        cur = t // lp
        scores = scores.masked_fill((j == 0) | (j == cur) | (j == cur - 1), float("inf"))
        scores = scores.masked_fill(j > cur, float("-inf"))
        vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        n = min(n_selected, cache.n_slc)
        idx = torch.where(vals[..., :n] > float("-inf"), order[..., :n], -1)  # [B, G, n]
        tok = idx[..., None] * lp + torch.arange(lp, device=q.device)  # [B, G, n, l']
        ok = (idx[..., None] >= 0) & (tok <= t)
        tok = tok.clamp(0, cache.capacity - 1).reshape(B, G, n * lp, 1).expand(-1, -1, -1, D)
        o_slc, _ = _attend(qg, cache.slc_k.gather(2, tok), cache.slc_v.gather(2, tok), ok.view(B, G, 1, n * lp))
    if use_win:
        ok = (cache.win_pos >= 0) & (cache.win_pos > t - w) & (cache.win_pos <= t)
        o_win, _ = _attend(qg, cache.win_k, cache.win_v, ok.view(1, 1, 1, -1))
    outs = tuple(None if o is None else o.reshape(B, H, 1, D).to(q.dtype) for o in (o_cmp, o_slc, o_win))
    return (*outs, idx)


class StaticKVCache:
    """The dense baseline's decode state: all keys/values in [B, G, capacity, D] buffers.
    fused: the step's attention through the decode kernel (dense_kernel; None: where it can run)."""

    def __init__(self, layer, batch: int, capacity: int, position: DecodePosition, device, dtype,
                 fused: bool | None = None):
        self.capacity, self.position = capacity, position
        shape = (batch, layer.n_kv, capacity, layer.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.fused = dense_kernel(device, dtype, fused)

    @property
    def length(self) -> int:
        return self.position.host

    @property
    def tokens_read(self) -> int:
        return self.position.host

    def fill(self, k, v) -> None:
        S = k.shape[2]
        self.position.check_batch(k.shape[0], self.k.shape[0])
        self.position.set(S)
        self.k[:, :, :S], self.v[:, :, :S] = k, v


@torch.no_grad()
def dense_step(layer, x: torch.Tensor, rope, cache: StaticKVCache) -> torch.Tensor:
    """CausalSelfAttention's decode step over a StaticKVCache (does not advance the position)."""
    B = x.shape[0]
    if not torch.compiler.is_compiling():  # as in nsa_step
        cache.position.check()
    pos = cache.position.t.view(1)
    q, k, v = layer.project(x, rope, positions=pos, bound=cache.capacity)
    _put(cache.k, pos, k)
    _put(cache.v, pos, v)
    if cache.fused is not None:  # split over programs, reads tokens 0..t only
        return layer.wo(cache.fused(q, cache.k, cache.v, pos, 0).transpose(1, 2).reshape(B, 1, -1))
    G, r = layer.n_kv, layer.n_heads // layer.n_kv
    mask = (torch.arange(cache.capacity, device=x.device) <= pos).expand(r, -1)  # the group's r heads as rows
    o = F.scaled_dot_product_attention(q.reshape(B, G, r, -1), cache.k, cache.v, attn_mask=mask)
    return layer.wo(o.reshape(B, 1, -1))


class GraphedStep:
    """fn(x) -> y, one decode step over static caches, then the position advanced. On CUDA each step
    replays a CUDA graph: one per value of `position.emitting` (the step computes a compressed token
    1 step in d; the two graphs share one memory pool), each captured when first needed, after
    `warmup` eager calls (which compile and self-check the kernels; they write the current
    position's slots, which the real step then overwrites); a call copies x into the graph's input
    and replays it. Elsewhere it runs eagerly.
    compile=True: fn goes through torch.compile first (one graph per variant, no breaks: Inductor
    fuses the step's small kernels, which the CUDA graph then replays).
    The returned tensor is the graph's output buffer: the next call overwrites it."""

    def __init__(self, fn, example: torch.Tensor, position: DecodePosition, warmup: int = 2, compile: bool = False):
        if compile:
            fn = torch.compile(fn, dynamic=False, fullgraph=True)
        self.fn, self.position, self.warmup, self.compiled = fn, position, warmup, compile
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.x = example.clone() if example.is_cuda else None
        if self.x is not None:
            self._capture()

    def _capture(self) -> None:
        self.position.check()  # the warm-up calls write the current position's slots
        device = self.x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(self.x)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values()))[0].pool() if self.graphs else None
        # compiled: the warm-up calls must have compiled what the capture runs; a compile during the
        # capture would launch, time and sync kernels there. Fail with Dynamo's reason instead.
        no_recompile = torch._dynamo.config.patch(error_on_recompile=True) if self.compiled else contextlib.nullcontext()
        with no_recompile, torch.cuda.graph(graph, pool=pool):
            y = self.fn(self.x)
            self.position.t.add_(1)
        self.graphs[self.position.emitting] = (graph, y)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.position.check()
        if self.x is None:
            y = self.fn(x)
            self.position.advance()
            return y
        self.x.copy_(x)
        if self.position.emitting not in self.graphs:
            self._capture()
        graph, y = self.graphs[self.position.emitting]
        graph.replay()
        self.position.stepped()
        return y
