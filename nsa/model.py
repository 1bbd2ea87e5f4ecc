"""M7C: a LLaMA-style decoder-only LM whose attention is NSA (or dense causal SDPA as the baseline).

    tokens -> embedding -> n_layers x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> head

The head shares the embedding matrix (tied). The embedding table is padded to a multiple of 64
rows and the head multiplies by all of them, then returns a view of the real vocabulary columns:
an output row of 50257 bf16 values is not 16-byte aligned, which pushed cuBLAS onto slow
align-1 kernels (on an H100 the three head GEMMs took 61 ms of a 208 ms step at 32k tokens).

Parameter count at M7C dims (dim 768, 12 layers, 12 heads, head dim 64, 2 KV heads, SwiGLU 2048,
GPT-2 vocabulary padded to 50304): NSA 124.9M (38.6M of them the tied embedding), the
`attention: full` baseline 111.8M (NSA adds two more K/V projections, phi and the gates).
Why 2 KV heads (GQA groups of 6 query heads): selection is shared per group (Eq. 10), so the
selected-attention kernel loads each chosen K/V block once for all heads of the group; 6 heads pad
to a 16-row tensor-core tile. One group (MQA) would fill the tile better (12/16) but leave a
single block choice per layer; two groups keep two independent choices, matching the paper's use
of several groups, at 6/16 tile use. Change `model.n_kv_heads` to trade these.
"""

from __future__ import annotations

import inspect
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nsa.attention import static_decode
from nsa.attention.cache import KVCache, NSACache
from nsa.attention.layer import NSAttention, build_attention, keep_branches_eager
from nsa.attention.rope import RotaryEmbedding
from nsa.config import ModelConfig
from nsa.errors import UserError


LOSS_PATHS = ("auto", "chunked", "full")
PADDING_LOGIT = -1e4  # bias of the padded head rows in the chunked loss: exp() of it is exactly 0
CPU_LOSS_CHUNK_ROWS = 128  # CPU default (dim 64): 128 x 50304 fp32 logits per chunk; 64-512 within 15%


def _has_chunked_loss() -> bool:
    """torch 2.13's F.linear_cross_entropy with its chunked path (options) and a bias (linear_bias)."""
    try:
        params = inspect.signature(F.linear_cross_entropy).parameters
    except (AttributeError, TypeError, ValueError):  # absent, or a builtin without a signature
        return False
    return hasattr(nn, "LinearCrossEntropyOptions") and {"options", "linear_bias"} <= set(params)


HAS_CHUNKED_LOSS = _has_chunked_loss()


def loss_path(device: torch.device, setting: str | None = None) -> str:
    """How M7C.loss computes the cross-entropy on `device`: `setting` (default: NSA_LOSS) = auto (chunked on
    CPU, full elsewhere until a GPU has measured the chunked path's speed), chunked or full. Full where
    this torch has no chunked F.linear_cross_entropy."""
    path = setting if setting is not None else os.environ.get("NSA_LOSS", LOSS_PATHS[0])
    if path not in LOSS_PATHS:
        raise UserError(f"NSA_LOSS={path!r}: expected one of {', '.join(LOSS_PATHS)}; unset it or pick one.")
    if path == "auto":
        path = "chunked" if device.type == "cpu" else "full"
    return path if HAS_CHUNKED_LOSS else "full"


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32, returned in x's dtype.

    Through F.rms_norm, which on CUDA is one fused kernel each way (aten::_fused_rms_norm and its backward):
    written out, the norm was ~6 eager kernels forward and ~10 backward over the [tokens, dim] activations, at
    25 norms per M7C step. On CPU it runs the same composite ops as the written-out form."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the fused kernel wants one dtype (else torch warns and falls back); the residual stream and the weight
        # are both fp32 in training, autocast included
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x, rope, cache=None):
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))

    def decode_step(self, x, rope, cache):
        x = x + self.attn.decode_step(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))


class M7C(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_seq_len)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.activation_checkpointing = cfg.activation_checkpointing
        self.apply(self._init_weights)
        # GPT-2 style: scale the residual-writing projections by depth
        for name, p in self.named_parameters():
            if name.endswith("attn.wo.weight") or name.endswith("mlp.w_down.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, vocab_size]; with targets [B, S], the next-token
        cross-entropy instead (fp32; `reduction` as in F.cross_entropy), without the logits tensor."""
        x = self.embed(input_ids)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, self.rope, use_reentrant=False)
            else:
                x = block(x, self.rope)
        if targets is None:
            return self.logits(self.norm(x))
        return self.loss(self.norm(x), targets, reduction)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the head's logits of h [.., dim] against targets [..] (fp32: a scalar, or
        per token with reduction="none"). Two ways, the same result (tests/test_model.py):

        "chunked" (`NSA_LOSS`, see loss_path): torch's F.linear_cross_entropy makes the logits a few
        hundred rows at a time, so the [tokens, vocab] logits, their fp32 copy, log-softmax and gradient
        never exist whole (~20 GB at 8 x 4096 tokens, the 80G tier's micro-batch). It multiplies by the
        whole padded head (aligned GEMMs, see the module docstring) with a bias of PADDING_LOGIT on the
        padding rows, whose probabilities are then exactly 0, so they get no gradient. In fp32 it also
        precomputes the gradient in the forward: the CPU default's head and loss take half the time (the
        logits chunk stays in cache). In bf16 torch sums the loss across chunks in bf16 (15% off at 128
        chunks), so there it returns per-token losses, summed here in fp32, and recomputes each chunk in
        the backward.
        "full": the logits, then F.cross_entropy on their fp32 copy."""
        if loss_path(h.device) == "full":
            logits = self.logits(h)
            return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   reduction=reduction)
        device = h.device.type
        # the dtype F.linear would compute in: autocast's where it is on (h itself is fp32 there)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        padded, vocab = self.cfg.padded_vocab_size, self.cfg.vocab_size
        bias = None
        if padded > vocab:
            bias = torch.where(torch.arange(padded, device=h.device) < vocab, 0.0, PADDING_LOGIT).to(dtype)
        # chunk rows: fixed on CPU (torch's size heuristic gives 1-row chunks at small dims there, 16x
        # slower), torch's per-device pick elsewhere; under torch.compile the op needs allow_retain_graph
        options = nn.LinearCrossEntropyOptions(batch_chunk_size=CPU_LOSS_CHUNK_ROWS if device == "cpu" else None,
                                               allow_retain_graph=torch.compiler.is_compiling())
        chunk_reduction = reduction if dtype == torch.float32 else "none"
        with torch.autocast(device, enabled=False):
            loss = F.linear_cross_entropy(h.reshape(-1, h.size(-1)).to(dtype), self.head.weight.to(dtype),
                                          targets.reshape(-1), linear_bias=bias, reduction=chunk_reduction,
                                          options=options).float()
        if chunk_reduction != reduction:
            loss = loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
        return loss

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[.., vocab_size] logits. On CUDA a view of the padded [.., padded_vocab_size] product (aligned
        GEMM, see the module docstring); the padding columns are never used, and the full loss's .float()
        copies the view into a contiguous tensor anyway. Elsewhere the real rows only: on CPU the padded
        product's backward (zeros the full padded size, then copies in) made the head and loss ~20% slower."""
        if h.is_cuda:
            return F.linear(h, self.head.weight)[..., : self.cfg.vocab_size]
        return F.linear(h, self.head.weight[: self.cfg.vocab_size])

    # ---- inference -------------------------------------------------------------------------
    def new_caches(self) -> list:
        nsa = self.cfg.nsa
        if self.cfg.attention == "nsa":
            return [NSACache(nsa.window, nsa.cmp_block, nsa.cmp_stride, nsa.slc_block) for _ in self.blocks]
        return [KVCache() for _ in self.blocks]

    def new_static_caches(self, batch: int, capacity: int, device=None, dtype=None):
        """Fixed-size decode caches for up to `capacity` tokens and their shared position, for decode
        steps replayed as CUDA graphs (nsa/attention/static_decode.py) -> (caches, position)."""
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        position = static_decode.DecodePosition(device, capacity)
        self.rope.reserve(capacity, device, dtype)  # a compiled step then finds its tables (see reserve)
        kind = static_decode.StaticNSACache if self.cfg.attention == "nsa" else static_decode.StaticKVCache
        return [kind(block.attn, batch, capacity, position, device, dtype) for block in self.blocks], position

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, caches: list | None = None):
        """Full forward over a prompt that also fills per-layer caches (new dynamic ones unless given)
        -> (logits [B,S,V], caches)."""
        caches = caches if caches is not None else self.new_caches()
        x = self.embed(input_ids)
        for block, cache in zip(self.blocks, caches):
            x = block(x, self.rope, cache)
        return self.logits(self.norm(x)), caches

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, caches: list) -> torch.Tensor:
        """Next-token logits [B, V] for token_ids [B] appended at position caches[0].length (static
        caches: the caller advances their position, e.g. static_decode.GraphedStep)."""
        x = self.embed(token_ids[:, None])
        for block, cache in zip(self.blocks, caches):
            x = block.decode_step(x, self.rope, cache)
        return self.logits(self.norm(x))[:, 0]

    # ---- bookkeeping -----------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = bool(enabled)

    def gate_stats(self) -> dict[str, float]:
        """Mean gate value per NSA branch over all layers, from the last forward ({} if dense)."""
        means = [b.attn.last_gate_mean for b in self.blocks if isinstance(b.attn, NSAttention)]
        means = [m for m in means if m is not None]
        if not means:
            return {}
        avg = torch.stack(means).mean(0).tolist()
        return {f"gate/{name}": v for name, v in zip(("cmp", "slc", "win"), avg)}

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the score and value matmuls, averaged over positions, as
        computed (NSA: visible compressed tokens + selected block tokens + window tokens)."""
        cfg, S = self.cfg, seq_len
        if cfg.attention == "full":
            keys = (S + 1) / 2  # causal average
        else:
            n = cfg.nsa
            n_cmp = max(0, (S - n.cmp_block) // n.cmp_stride + 1)
            keys = n_cmp / 2 + min(n.n_selected * n.slc_block, (S + 1) / 2) + min(n.window, (S + 1) / 2)
        return 2 * 2 * cfg.n_heads * cfg.head_dim * keys * cfg.n_layers

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters (non-embedding, plus the head) + 3 x attention."""
        n_matmul = self.num_params(exclude_embeddings=True) + self.head.weight.numel()
        return 6 * n_matmul + 3 * self.attention_flops_per_token(seq_len)


def build_model(model_cfg) -> M7C:
    """Public API: the `model:` config section (dict as parsed from YAML, or ModelConfig) -> M7C."""
    return M7C(ModelConfig.from_dict(model_cfg))


def compile_model(model: nn.Module, **options) -> nn.Module:
    """torch.compile (`options` go to it), with the NSA branches (the Triton kernels) left eager: see
    keep_branches_eager."""
    keep_branches_eager()
    return torch.compile(model, **options)
