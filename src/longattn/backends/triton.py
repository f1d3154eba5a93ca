"""``triton`` backend: longattn's own block-sparse kernels (:mod:`longattn.kernels.block_sparse`).

Runs on CUDA, and on CPU through the Triton interpreter (``TRITON_INTERPRET=1``, for tests).
The selection is computed first; a selection the kernels cannot take (a token predicate with
no :class:`~longattn.selection.TokenRule`, a key block that is not a multiple of 16) falls
back to the dense reference with a ``RuntimeWarning`` that says why.
"""

from __future__ import annotations

import warnings
from typing import Callable

from torch import Tensor

from ..registry import AttnInputs
from ..selection import BlockSelection


def triton_can_serve(inputs: AttnInputs, config=None) -> str | None:
    from ..kernels.block_sparse import inputs_unsupported_reason

    return inputs_unsupported_reason(inputs.q)


def triton_selection_attention(
    inputs: AttnInputs, sel: BlockSelection, *, fallback: Callable[[], tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """The block-sparse kernels over ``sel``; ``fallback()`` (warning) when they cannot take it."""
    from ..kernels.block_sparse import _unchecked_block_sparse_attention, selection_unsupported_reason

    reason = selection_unsupported_reason(inputs.q, inputs.k, sel)
    if reason:
        warnings.warn(f"backend 'triton' cannot serve this selection ({reason}); falling back to the reference",
                      RuntimeWarning, stacklevel=4)
        return fallback()
    return _unchecked_block_sparse_attention(inputs.q, inputs.k, inputs.v, sel, inputs.scale)
