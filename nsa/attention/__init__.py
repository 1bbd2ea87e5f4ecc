"""Native Sparse Attention (arXiv 2502.11089): block geometry, functional branches, the layer, caches."""

from nsa.attention.layer import BlockCompressor, CausalSelfAttention, NSAttention, build_attention

__all__ = ["NSAttention", "CausalSelfAttention", "BlockCompressor", "build_attention"]
