"""Trainable Native Sparse Attention (Yuan et al., 2025) as a ``torch.nn.Module``.

The learned parts of NSA: the compression function ``phi`` for keys and for values (an MLP over
a flattened block of ``l`` tokens plus a learned intra-block position embedding) and the
per-head branch gates (``sigmoid`` of a linear map). The attention itself is
:mod:`longattn.methods.nsa`: the same branch functions, with ``phi`` = these MLPs and the
gates computed here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..api import check_finite, resolve_backend, validate_inputs
from ..methods.nsa import NSAConfig, nsa_forward
from ..registry import get_method


class CompressionMLP(nn.Module):
    """``phi``: blocks ``[..., l, D]`` -> ``[..., D]``. Adds a learned position embedding
    ``[l, D]`` to the block, flattens it to ``l * D`` and applies
    ``Linear(l*D, hidden) -> GELU -> Linear(hidden, D)``. Runs in its parameters' dtype."""

    def __init__(self, block: int, head_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = head_dim if hidden is None else hidden
        self.block = block
        self.head_dim = head_dim
        self.pos_emb = nn.Parameter(torch.randn(block, head_dim) * 0.02)  # [l, D]
        self.fc1 = nn.Linear(block * head_dim, hidden)
        self.fc2 = nn.Linear(hidden, head_dim)

    def forward(self, blocks: Tensor) -> Tensor:
        x = blocks.to(self.fc1.weight.dtype) + self.pos_emb  # [..., l, D]
        x = x.flatten(-2)  # [..., l * D]
        return self.fc2(F.gelu(self.fc1(x)))  # [..., D]


class NativeSparseAttention(nn.Module):
    """NSA with learned compression and gates.

    Args:
        head_dim: ``D``.
        num_heads: query heads ``H`` (each has its own gate weights).
        config: :class:`~longattn.methods.nsa.NSAConfig` (its ``gates`` are not used: the
            module learns them); default: the paper's.
        compress_hidden: hidden width of the compression MLPs (default ``D``).
        gate_input_dim: when given, the gates are computed from a hidden state
            ``x [B, Tq, gate_input_dim]`` passed to :meth:`forward` (the paper's form);
            otherwise from each head's query vector.
        scale: score scale (default ``1 / sqrt(D)``).

    ``forward(q, k, v, x=None, backend="auto")``: ``q [B, H, Tq, D]``, ``k, v [B, Hkv, Tk, D]``
    (causal, queries at the end of the keys) -> ``[B, H, Tq, D]``. Gradients reach every
    parameter; the block selection itself is discrete. ``backend``: ``"auto"``,
    ``"reference"`` or ``"flex"`` (with autograd on CPU, where FlexAttention has no backward,
    ``flex`` falls back to the reference with a warning).
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        config: NSAConfig | None = None,
        *,
        compress_hidden: int | None = None,
        gate_input_dim: int | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("head_dim", head_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NativeSparseAttention.{name} must be an int >= 1, got {value!r}")
        if config is None:
            config = NSAConfig()
        if not isinstance(config, NSAConfig):
            raise TypeError(f"NativeSparseAttention.config must be an NSAConfig, got {type(config).__name__}")
        self.config = config
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.scale = scale
        self.k_compress = CompressionMLP(config.compress_block, head_dim, compress_hidden)
        self.v_compress = CompressionMLP(config.compress_block, head_dim, compress_hidden)
        self.gate_input_dim = gate_input_dim
        if gate_input_dim is None:
            # per-head Linear(D -> 3) on the query vector
            self.gate_weight = nn.Parameter(torch.randn(num_heads, head_dim, 3) / head_dim**0.5)
            self.gate_bias = nn.Parameter(torch.zeros(num_heads, 3))
        else:
            self.gate_proj = nn.Linear(gate_input_dim, num_heads * 3)

    def gates(self, q: Tensor, x: Tensor | None = None) -> Tensor:
        """Branch gates ``[B, H, Tq, 3]`` in (0, 1) (compressed, selected, window)."""
        if self.gate_input_dim is None:
            if x is not None:
                raise ValueError("x was given but the module was built without gate_input_dim")
            w = self.gate_weight
            logits = torch.einsum("bhtd,hdc->bhtc", q.to(w.dtype), w) + self.gate_bias[:, None, :]
        else:
            if x is None:
                raise ValueError("this module computes its gates from x: pass x [B, Tq, gate_input_dim]")
            B, H, Tq, _ = q.shape
            if x.shape[:2] != (B, Tq) or x.dim() != 3:
                raise ValueError(f"x must be [B, Tq, gate_input_dim] = [{B}, {Tq}, {self.gate_input_dim}], got {tuple(x.shape)}")
            logits = self.gate_proj(x).view(B, Tq, H, 3).transpose(1, 2)  # [B, H, Tq, 3]
        return torch.sigmoid(logits)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor | None = None, backend: str = "auto") -> Tensor:
        inputs = validate_inputs(q, k, v, causal=True, scale=self.scale)
        if q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q must be [B, {self.num_heads}, T, {self.head_dim}] for this module, got {tuple(q.shape)}"
            )
        check_finite(q=q, k=k, v=v)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        spec = get_method("nsa")
        # parameters need gradients too: the flex path cannot run backward on CPU
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        probe = inputs
        if grad and not inputs.needs_grad:
            probe = validate_inputs(q.detach().requires_grad_(True), k, v, causal=True, scale=self.scale)
        name = resolve_backend(spec, probe, self.config, backend)
        return nsa_forward(
            q,
            k,
            v,
            self.config,
            scale=inputs.scale,
            backend=name,
            phi=(self.k_compress, self.v_compress),
            gates=self.gates(q, x),
        )
