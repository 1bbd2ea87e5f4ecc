"""NSA: Native Sparse Attention training toolkit (M7C model, trainer, runbook helpers)."""

__version__ = "0.1.0"
