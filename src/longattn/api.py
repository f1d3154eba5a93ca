"""``longattn.attention``: one call for every method and backend."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from .auto import auto_order
from .finite import collecting_witnesses, tensor_key
from .registry import BACKENDS, AttnInputs, MethodSpec, get_method

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_inputs(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None, return_lse: bool = False
) -> AttnInputs:
    """Check shapes, dtypes and devices of ``[B, H, T, D]`` inputs; raise a ``ValueError`` or
    ``TypeError`` that names the argument and what is allowed."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, T, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; allowed: float16, bfloat16, float32, float64"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}"
        )
    B, H, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={tuple(k.shape)}, v={tuple(v.shape)}")
    Bk, Hkv, Tk, Dk = k.shape
    if B == 0:
        raise ValueError("q has batch size 0; the batch must hold at least one sequence")
    if Bk != B:
        raise ValueError(f"batch size differs: q has B={B}, k/v have B={Bk}")
    if Dk != D:
        raise ValueError(f"head dim differs: q has D={D}, k/v have D={Dk}")
    if D == 0:
        raise ValueError("head dim D must be >= 1")
    if H == 0 or Hkv == 0 or H % Hkv != 0:
        raise ValueError(
            f"query heads H={H} must be a positive multiple of key/value heads Hkv={Hkv} (GQA)"
        )
    if Tq == 0 or Tk == 0:
        raise ValueError(f"sequence lengths must be >= 1, got q T={Tq}, k/v T={Tk}")
    if Tq > Tk:
        raise ValueError(
            f"q has T={Tq} > k/v T={Tk}; queries must be the last positions of the key sequence"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    return AttnInputs(q=q, k=k, v=v, causal=causal, scale=float(scale), return_lse=return_lse)


def _nonfinite_flag(t: Tensor) -> Tensor:
    """0-dim bool: ``t`` holds a NaN or an infinity. One reading pass (``aminmax`` propagates
    NaN, and an infinity is the max or the min); ``torch.isfinite(t).all()`` takes four
    elementwise passes with bool temporaries (1.35 ms for q, k, v at 64k tokens on an H200)."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t.detach())
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def _finite_probe(t: Tensor) -> Tensor:
    """0-dim float32: the sum of ``t``'s elements, accumulated in fp32. A NaN or an infinity
    among them makes it NaN or infinite; so can finite elements whose sum overflows, which
    :func:`raise_if_nonfinite` tells apart. A finite probe means every element is finite. One
    reduction kernel: the exact check (:func:`_nonfinite_flag`) takes about ten small kernels
    per tensor, which queue after a top-k forward's attention kernel."""
    return t.detach().sum(dtype=torch.float32)


NonfiniteFlags = tuple[list[str], Tensor, list[Tensor]]


def nonfinite_flags(witnesses: dict | None = None, **tensors: Tensor) -> NonfiniteFlags:
    """The names, a float32 tensor ``[len(tensors)]`` of probes (:func:`_finite_probe`: not
    finite for a tensor holding NaN or Inf, and finite only when all its elements are), computed
    without a host sync (:func:`raise_if_nonfinite` reads it), and the tensors. ``witnesses``:
    fp32 block sums or means of some of the tensors, keyed by :func:`longattn.finite.tensor_key`
    (:mod:`longattn.finite`); a witnessed tensor is probed through them (a NaN or Inf element
    makes its block's sum NaN or Inf) instead of a pass over its elements."""
    probes = []
    for t in tensors.values():
        sums = witnesses.get(tensor_key(t)) if witnesses else None
        probes.append(_finite_probe(t if sums is None else sums))
    return list(tensors), torch.stack(probes), list(tensors.values())


def raise_if_nonfinite(flags: NonfiniteFlags) -> None:
    """Raise ``ValueError`` naming the first tensor holding NaN or Inf (one host sync). A probe
    that is not finite is confirmed on the tensor by the exact check: finite elements whose fp32
    sum overflowed are not an error."""
    names, probes, tensors = flags
    for name, value, t in zip(names, probes.tolist(), tensors):
        if not math.isfinite(value) and bool(_nonfinite_flag(t)):
            raise ValueError(
                f"{name} contains NaN or Inf; this method selects keys from the input values "
                "and cannot handle non-finite inputs"
            )


def check_finite(**tensors: Tensor) -> None:
    """Raise ``ValueError`` naming the first tensor holding NaN or Inf (one host sync)."""
    raise_if_nonfinite(nonfinite_flags(**tensors))


def resolve_backend(
    spec: MethodSpec, inputs: AttnInputs, config: Any, backend: str, exclude: tuple[str, ...] = ()
) -> str:
    """The backend that will run: ``backend`` itself, or the first in the fallback order that
    can serve these inputs (warning when an explicitly requested one cannot). ``exclude``:
    backends already found unable to run these inputs (skipped)."""
    available = spec.all_backends()
    if backend == "auto":
        candidates = [b for b in auto_order(spec, inputs) if b not in exclude]
    else:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; allowed: 'auto', {', '.join(map(repr, BACKENDS))}")
        if backend not in available:
            raise ValueError(
                f"method {spec.name!r} has no {backend!r} backend; allowed: {sorted(available)} or 'auto'"
            )
        if not exclude and available[backend].can_serve(inputs, config) is None:
            return backend  # the usual case, without building the fallback order (50 us of host time)
        candidates = [backend] + [b for b in auto_order(spec, inputs) if b != backend]
        candidates = [b for b in candidates if b not in exclude]
    for i, name in enumerate(candidates):
        reason = available[name].can_serve(inputs, config)
        if reason is None:
            return name
        if backend != "auto" and i == 0 and not exclude:  # once, on the first pass
            warnings.warn(
                f"backend {backend!r} cannot serve this call ({reason}); falling back",
                RuntimeWarning,
                stacklevel=3,
            )
    return "reference"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    method: str = "full",
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    **config: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of ``q`` over ``k``/``v`` with any registered method.

    Args:
        q: ``[B, H, Tq, D]`` queries (the last ``Tq`` positions of the sequence).
        k, v: ``[B, Hkv, Tk, D]`` keys and values, ``H % Hkv == 0`` (GQA), ``Tk >= Tq``.
        method: a name from :func:`longattn.list_methods`.
        causal: causal (aligned to the end of ``k``) or bidirectional.
        scale: score scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (on CUDA, the path measured fastest for this method, mode and
            length on an H200; on CPU the masked ``sdpa`` path, then the reference; see
            :mod:`longattn.auto`), ``"reference"``, ``"sdpa"`` (for sparse methods:
            SDPA under the materialised token mask, short inputs only), ``"flex"`` or
            ``"triton"`` (longattn's own kernels).
        return_lse: also return the log-sum-exp ``float32 [B, H, Tq]``.
        **config: fields of the method's Config dataclass (e.g. ``window=512``).

    Returns:
        ``out [B, H, Tq, D]`` in the input dtype, or ``(out, lse)``.
    """
    spec = get_method(method)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    cfg = spec.make_config(**config)
    inputs = validate_inputs(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
    if not causal and not spec.bidirectional:
        raise ValueError(f"method {method!r} is causal only; call it with causal=True")
    if return_lse and not spec.has_lse:
        raise ValueError(
            f"method {method!r} has no single log-sum-exp (its output is not one softmax); "
            "call it with return_lse=False"
        )
    # Methods that select keys from the values need finite inputs. On a GPU the check is queued
    # after the work and read once at the end: a host sync up front would leave the GPU idle
    # while the rest of the call is launched, and queued first, its launches delay the
    # attention kernel's (the top-k call at 64k is bound by the host's launches until the
    # kernel starts). A failure on non-finite inputs reports them, not itself.
    # Deferred, the check reuses the fp32 block sums or means of q or k that the method's
    # selection computed (longattn.finite): no second pass over those tensors.
    deferred = spec.needs_finite and _defer_finite_check(q.device)
    if spec.needs_finite and not deferred:
        raise_if_nonfinite(nonfinite_flags(q=q, k=k, v=v))
    with collecting_witnesses() as witnesses:
        try:
            out, lse = _run(spec, inputs, cfg, backend)
        except Exception:
            if deferred:
                raise_if_nonfinite(nonfinite_flags(witnesses, q=q, k=k, v=v))
            raise
    if deferred:
        raise_if_nonfinite(nonfinite_flags(witnesses, q=q, k=k, v=v))
    return (out, lse) if return_lse else out


def _defer_finite_check(device: torch.device) -> bool:
    """Whether the finiteness check is read after the work is queued (CUDA) or before (CPU)."""
    return device.type == "cuda"


def _run(spec: MethodSpec, inputs: AttnInputs, cfg: Any, backend: str) -> tuple[Tensor, Tensor | None]:
    """The resolved backend's ``(out, lse)``; a FlexAttention compile failure moves on to the
    next backend in the order."""
    from .backends.flex import FlexCompileError, remember_compile_failure

    failed: tuple[str, ...] = ()
    while True:
        name = resolve_backend(spec, inputs, cfg, backend, failed)
        try:
            return spec.all_backends()[name].impl(inputs, cfg)
        except FlexCompileError as err:  # known only once compiled: the next backend serves
            if name == "reference":
                raise
            if name == "flex":
                remember_compile_failure(inputs, cfg)
            warnings.warn(f"backend {name!r} failed on this call ({err}); falling back", RuntimeWarning, stacklevel=3)
            failed += (name,)
