"""Decode caches: what incremental generation keeps per layer.

NSA keeps one cache per branch, because each branch has its own keys and values:
* selection: every raw (rotated) key/value — any block may be selected;
* window: only the last w keys/values;
* compression: the compressed tokens so far, plus the raw tail that the next block needs. A new
  compressed token is emitted every d tokens once l are seen (when block i = (t + 1 - l) / d
  completes at t).
`tokens_read` records what the last decode step read per branch, the quantity behind the paper's
"⌊(S - l)/d⌋ + n·l' + w" per step: compressed tokens + selected blocks * l' + window tokens.
"""

from __future__ import annotations

import torch


class _Buffer:
    """A [B, G, T, D] window of a tensor along T: appends at the end and drops at the front in
    amortised O(1) (the live part [start, start + len) of a larger allocation; it is moved or grown
    only when the end is reached, so a sliding window of w tokens copies itself once every ~w steps
    instead of on every decode step)."""

    def __init__(self, x: torch.Tensor):
        self.data, self.start, self.len = x.clone(), 0, x.shape[2]

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[2]
        if self.start + self.len + n > self.data.shape[2]:
            cap = max(self.len + n, 2 * self.len, 16)
            if cap > self.data.shape[2] or self.start == 0:
                fresh = self.data.new_empty(*self.data.shape[:2], max(cap, 2 * self.data.shape[2]), self.data.shape[3])
            else:  # room enough once the dropped front is reclaimed
                fresh = self.data
            live = self.view()
            if fresh is self.data:
                live = live.clone()  # source and destination overlap
            fresh[:, :, : self.len] = live
            self.data, self.start = fresh, 0
        end = self.start + self.len
        self.data[:, :, end : end + n] = x
        self.len += n

    def drop_front(self, n: int) -> None:
        """Forget the first n entries (no copy)."""
        n = min(n, self.len)
        self.start += n
        self.len -= n

    def view(self) -> torch.Tensor:
        return self.data[:, :, self.start : self.start + self.len]


class NSACache:
    def __init__(self, window: int, cmp_block: int, cmp_stride: int, slc_block: int):
        self.window, self.cmp_block, self.cmp_stride, self.slc_block = window, cmp_block, cmp_stride, slc_block
        self.length = 0
        self._reads = None  # (idx, compressed tokens, window tokens) of the last step

    def fill(self, k_raw, v_raw, cmp_kv, slc_kv, win_kv) -> None:
        """Prefill from the projections of a full forward over S tokens."""
        S = k_raw.shape[2]
        self.length = S
        self.cmp_k, self.cmp_v = _Buffer(cmp_kv[0]), _Buffer(cmp_kv[1])
        tail_start = self.cmp_k.len * self.cmp_stride  # first token of the next block
        self.tail_start = tail_start
        self.tail_k, self.tail_v = _Buffer(k_raw[:, :, tail_start:]), _Buffer(v_raw[:, :, tail_start:])
        self.slc_k, self.slc_v = _Buffer(slc_kv[0]), _Buffer(slc_kv[1])
        keep = min(self.window, S)
        self.win_k, self.win_v = _Buffer(win_kv[0][:, :, S - keep :]), _Buffer(win_kv[1][:, :, S - keep :])
        self.win_start = S - keep

    def append(self, k_raw, v_raw, slc_kv, win_kv, layer, rope) -> None:
        """Add the token at position self.length; emit a compressed token if a block completes."""
        self.tail_k.append(k_raw)
        self.tail_v.append(v_raw)
        if self.tail_k.len >= self.cmp_block:  # block covering [tail_start, tail_start + l) is complete
            k_c, v_c = layer.compress(
                self.tail_k.view()[:, :, : self.cmp_block], self.tail_v.view()[:, :, : self.cmp_block],
                rope, first_block=self.cmp_k.len,
            )
            self.cmp_k.append(k_c.to(self.cmp_k.data.dtype))
            self.cmp_v.append(v_c.to(self.cmp_v.data.dtype))
            self.tail_k.drop_front(self.cmp_stride)
            self.tail_v.drop_front(self.cmp_stride)
            self.tail_start += self.cmp_stride
        self.slc_k.append(slc_kv[0])
        self.slc_v.append(slc_kv[1])
        self.win_k.append(win_kv[0])
        self.win_v.append(win_kv[1])
        if self.win_k.len > self.window:
            self.win_k.drop_front(self.win_k.len - self.window)
            self.win_v.drop_front(self.win_v.len - self.window)
        self.length += 1
        self.win_start = self.length - self.win_k.len

    def cmp_kv(self):
        return self.cmp_k.view(), self.cmp_v.view()

    def slc_kv(self):
        return self.slc_k.view(), self.slc_v.view()

    def win_kv(self):
        return self.win_k.view(), self.win_v.view()

    def count_reads(self, idx: torch.Tensor, nsa) -> None:
        """Remember what the step that just ran read; counted only when tokens_read is asked for
        (counting the selected blocks waits for the GPU, which a decode loop should not do per step)."""
        self._reads = (idx, self.cmp_k.len, self.win_k.len)

    @property
    def tokens_read(self) -> dict[str, int]:
        """Tokens read by the last step (per KV group; groups read alike in count), by branch and total."""
        if self._reads is None:
            return {}
        idx, n_cmp, n_win = self._reads
        selected = 0 if idx is None else int((idx[0, 0, -1] >= 0).sum().item())
        reads = {"cmp": n_cmp, "slc": selected * self.slc_block, "win": n_win}
        return {**reads, "total": sum(reads.values())}


class KVCache:
    """Dense baseline cache: all keys and values."""

    def __init__(self):
        self.length = 0
        self.tokens_read = 0

    def fill(self, k, v) -> None:
        self.k, self.v = _Buffer(k), _Buffer(v)
        self.length = k.shape[2]

    def append(self, k, v) -> None:
        self.k.append(k)
        self.v.append(v)
        self.length += 1

    def kv(self):
        return self.k.view(), self.v.view()
