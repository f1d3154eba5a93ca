"""Trainable attention modules (``torch.nn.Module``) built on the functional methods."""

from .nsa import CompressionMLP, NativeSparseAttention

__all__ = ["CompressionMLP", "NativeSparseAttention"]
