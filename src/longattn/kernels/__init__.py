"""longattn's own Triton kernels (``backend="triton"``).

On a CUDA GPU they are compiled; on CPU they run through the Triton interpreter when the
environment variable ``TRITON_INTERPRET=1`` is set before Triton is imported (slow: tests use
small sizes). Nothing here is imported by ``import longattn``; the ``triton`` backend imports
it on first use.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_importable() -> bool:
    """Whether Triton imports (found once per process: a kernel call asks several times)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is "not available", not a crash
        return False
    return True


@functools.cache
def interpreting() -> bool:
    """Whether Triton kernels run through the interpreter (``TRITON_INTERPRET=1``). Read once per
    process: Triton reads the variable when a kernel is defined, so a later change would not
    change how the kernels run."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_interpreter_fixed = False


def _fix_interpreter_index() -> None:
    """Triton's interpreter (3.6) turns a scalar into a Python int with ``int(array)`` on a
    one-element array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted"): every loop bounded by a loaded value fails. Use ``.item()`` instead (same
    value). Only touches the interpreter, only when it is in use."""
    global _interpreter_fixed
    if _interpreter_fixed:
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0].item()))

    interpreter._patch_lang_tensor = patched
    _interpreter_fixed = True


def triton_unavailable_reason(device: torch.device) -> str | None:
    """``None`` when Triton kernels can run on tensors of ``device``, else why not."""
    if not triton_importable():
        return "Triton is not installed (pip install 'longattn[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        _fix_interpreter_index()
        return None
    return (f"Triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1), "
            f"got device type {device.type!r}")


#: The kernels compute batch and head offsets in int64 but offsets along the token and feature
#: axes in int32: within one ``[batch, head]`` slice every element offset must stay below this.
MAX_SLICE_OFFSET = 2**31 - 1


def slice_offset_span(t: torch.Tensor) -> int:
    """Largest element offset inside one ``[batch, head]`` slice of a ``[B, H, T, D]`` tensor:
    ``(T - 1) * stride(2) + (D - 1) * stride(3)``."""
    return sum((n - 1) * s for n, s in zip(t.shape[2:], t.stride()[2:]) if n > 0)


def kernel_layout(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t [B, H, T, D]`` laid out as the kernels take it: unit stride along ``D`` and slice
    offsets within int32. A view that breaks either (e.g. ``[B, T, H, D]`` transposed at
    ``T * H * D >= 2^31``: 512k tokens of 32 heads of 128) is copied contiguous; if even that does
    not fit (``T * D >= 2^31``), ``ValueError`` names the argument, instead of wrong addresses."""
    if t.stride(-1) != 1 or slice_offset_span(t) > MAX_SLICE_OFFSET:
        t = t.contiguous()
    if slice_offset_span(t) > MAX_SLICE_OFFSET:
        raise ValueError(f"{name} {tuple(t.shape)}: one [batch, head] slice holds more than 2^31 elements, "
                         "past the Triton kernels' int32 token offsets")
    return t

