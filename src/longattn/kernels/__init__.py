"""longattn's own Triton kernels (``backend="triton"``).

On a CUDA GPU they are compiled; on CPU they run through the Triton interpreter when the
environment variable ``TRITON_INTERPRET=1`` is set before Triton is imported (slow: tests use
small sizes). Nothing here is imported by ``import longattn``; the ``triton`` backend imports
it on first use.
"""

from __future__ import annotations

import os

import torch


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is "not available", not a crash
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """``None`` when Triton kernels can run on tensors of ``device``, else why not."""
    if not triton_importable():
        return "Triton is not installed (pip install 'longattn[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1), "
            f"got device type {device.type!r}")
