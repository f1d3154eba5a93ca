"""Split-K sparse decoding kernels (``longattn.decode.sparse_decode(..., backend="triton")``).

Importing this package imports Triton; :mod:`longattn.decode` does so only after
:func:`longattn.kernels.triton_unavailable_reason` has said Triton can run.
"""

from .kernel import (
    SUPPORTED_DTYPES,
    choose_num_splits,
    decode_partials,
    merge_partials,
    sparse_decode_triton,
    tile_config,
    unsupported_reason,
    work_units,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "choose_num_splits",
    "decode_partials",
    "merge_partials",
    "sparse_decode_triton",
    "tile_config",
    "unsupported_reason",
    "work_units",
]
