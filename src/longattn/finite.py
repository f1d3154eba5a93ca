"""Finiteness witnesses: block sums a method computed anyway stand in for a pass over its input.

Methods that select keys from the input values (top-k, MoBA, NSA) need finite inputs, and
``longattn.attention`` checks ``q``, ``k`` and ``v`` for NaN and infinities: one fp32 sum per
tensor (:func:`longattn.api.nonfinite_flags`), on a GPU a full read of each tensor. Those
methods already add up every element of ``q`` and/or ``k`` in fp32 to pool them into blocks
(sums, or means: the sums times the exact reciprocal of the block length), and an fp32 sum
that includes a NaN or an infinity is itself NaN or infinite. So while
:func:`collecting_witnesses` is active, :func:`witness_sums` records such sums per source
tensor, and the check then sums the small block sums instead of the tensor.

The check stays exact: finite inputs whose fp32 sum overflows make a finite tensor look
non-finite, so a sum that is not finite is confirmed on the tensor itself before anything is
raised (:func:`longattn.api.raise_if_nonfinite`).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from torch import Tensor

_WITNESSES: ContextVar[dict | None] = ContextVar("longattn_finite_witnesses", default=None)


def tensor_key(t: Tensor) -> tuple:
    """Identity of a tensor's elements: storage address, dtype, shape, strides, device (a view
    with the same key holds exactly the same elements)."""
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.device)


@contextmanager
def collecting_witnesses() -> Iterator[dict]:
    """Collect :func:`witness_sums` records made inside the block (``tensor_key -> sums``)."""
    token = _WITNESSES.set({})
    try:
        yield _WITNESSES.get()
    finally:
        _WITNESSES.reset(token)


def witness_sums(source: Tensor, sums: Tensor) -> None:
    """Record ``sums`` (fp32 or wider) as partial sums that together add up every element of
    ``source`` exactly once, or those sums each multiplied by a positive factor of at most 1 (block
    means: a factor cannot turn a NaN or an infinity finite, nor a finite sum infinite), when
    witnesses are being collected."""
    found = _WITNESSES.get()
    if found is not None:
        found[tensor_key(source)] = sums.detach()


__all__ = ["collecting_witnesses", "tensor_key", "witness_sums"]
