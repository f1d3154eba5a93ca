"""FlexAttention backend: eager on CPU, compiled on GPU, with a guard against the silent
dense fallback.

When ``torch.compile`` hits its recompile limit it quietly runs ``flex_attention`` eagerly,
which materialises the whole ``Tq x Tk`` score matrix (out of memory at 32k+). Here every GPU
call goes through one compiled entry point with ``fullgraph=True`` (a graph break raises) and
``fail_on_recompile_limit_hit`` set (the limit raises); on that error the entry point is
rebuilt with a fresh compile cache once, with a warning, and a second failure is raised.
"""

from __future__ import annotations

import threading
import types
import warnings

import torch
from torch import Tensor

from ..registry import AttnInputs
from ..selection import BlockSelection

# Raised when first used on a GPU (never at import): one entry is compiled per mask
# function and shape, and the defaults (8) are far too small for a sweep over lengths.
RECOMPILE_LIMIT = 256

_lock = threading.Lock()
_entry = None
_fresh_caches = 0


def _flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _aux_kwargs() -> dict:
    try:
        from torch.nn.attention.flex_attention import AuxRequest

        return {"return_aux": AuxRequest(lse=True)}
    except ImportError:  # older torch
        return {"return_lse": True}


def _split(result) -> tuple[Tensor, Tensor]:
    out, aux = result
    return out, getattr(aux, "lse", aux)


def _new_entry():
    """A compiled entry point with its own code object, hence its own compile cache."""
    flex = _flex_fn()

    def _flex_entry(q, k, v, block_mask, scale, enable_gqa, aux):
        return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, **aux)

    global _fresh_caches
    _fresh_caches += 1
    code = _flex_entry.__code__.replace(co_name=f"_flex_entry_{_fresh_caches}")
    fn = types.FunctionType(code, _flex_entry.__globals__, code.co_name, None, _flex_entry.__closure__)
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _raise_limits() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < RECOMPILE_LIMIT:
            setattr(cfg, name, RECOMPILE_LIMIT)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 4 * RECOMPILE_LIMIT:
            setattr(cfg, name, 4 * RECOMPILE_LIMIT)


def _limit_hit_errors() -> tuple[type, ...]:
    exc = torch._dynamo.exc
    return tuple(
        getattr(exc, n) for n in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit") if hasattr(exc, n)
    )


def flex_call(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float) -> tuple[Tensor, Tensor]:
    """Run FlexAttention and return ``(out [B, H, Tq, D], lse float32 [B, H, Tq])``. On GPU,
    raises :class:`FlexCompileError` when Inductor finds no kernel for the inputs."""
    enable_gqa = q.shape[1] != k.shape[1]
    aux = _aux_kwargs()
    if q.device.type == "cpu":
        with warnings.catch_warnings():
            # eager FlexAttention is the intended CPU path (tests, small inputs)
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
            return _split(
                _flex_fn()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, **aux)
            )
    return compiled_flex_call(q, k, v, block_mask, scale, enable_gqa, aux)


class FlexCompileError(RuntimeError):
    """Inductor found no FlexAttention kernel for these inputs (``NoValidChoicesError``).

    Seen on the H200 with torch 2.11 for fp32 inputs of 100 queries over 257 keys, head dim 40
    (also when zero-padded to 64), under the token-level mask functions of full, window and sink.
    ``longattn.attention`` answers it by moving to the next backend, and
    :func:`remember_compile_failure` makes ``flex`` decline the same call afterwards (a failed
    compilation is not cached by torch.compile and would be retried on every call). It covers
    failures of the forward's compilation; the backward compiles lazily, at ``.backward()``,
    where a failure surfaces as Inductor's own error."""


_FAILED: set = set()


def _failure_key(inputs: AttnInputs, config) -> tuple:
    try:
        hash(config)
        cfg = config
    except TypeError:
        cfg = repr(config)
    return (cfg, tuple(inputs.q.shape), tuple(inputs.k.shape), inputs.q.dtype, inputs.q.device.type,
            inputs.causal, inputs.needs_grad)


def remember_compile_failure(inputs: AttnInputs, config) -> None:
    """Record that compiled FlexAttention failed for this method config, shapes, dtype, device,
    causality and grad mode, so :func:`flex_can_serve` declines it from now on."""
    _FAILED.add(_failure_key(inputs, config))


def _no_kernel(err: BaseException) -> bool:
    return "NoValidChoicesError" in f"{type(err).__name__}: {err}"


def compiled_flex_call(q, k, v, block_mask, scale: float, enable_gqa: bool, aux: dict):
    """The guarded compiled call: a recompile-limit hit (which torch.compile would answer by
    running the dense eager path) rebuilds the entry once with a fresh cache, then raises."""
    global _entry
    with _lock:
        if _entry is None:
            _raise_limits()
            _entry = _new_entry()
        entry = _entry
    patch = {}
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        patch["fail_on_recompile_limit_hit"] = True
    for attempt in range(2):
        try:
            with torch._dynamo.config.patch(**patch):
                return _split(entry(q, k, v, block_mask, scale, enable_gqa, aux))
        except Exception as err:  # noqa: BLE001 - only the two known failures are translated
            if _no_kernel(err):
                raise FlexCompileError(
                    f"Inductor found no FlexAttention kernel for q {tuple(q.shape)} and k {tuple(k.shape)} in "
                    f"{q.dtype} (NoValidChoicesError)") from err
            if not isinstance(err, _limit_hit_errors()):
                raise
            if attempt == 1:
                raise RuntimeError(
                    "FlexAttention hit torch.compile's recompile limit twice; refusing the eager "
                    "fallback that would materialise the full score matrix"
                ) from err
            warnings.warn(
                "FlexAttention hit torch.compile's recompile limit; rebuilding the compiled "
                "entry with a fresh cache instead of falling back to dense eager attention",
                RuntimeWarning,
                stacklevel=3,
            )
            with _lock:
                _entry = entry = _new_entry()
    raise AssertionError("unreachable")


def flex_selection_attention(inputs: AttnInputs, sel: BlockSelection) -> tuple[Tensor, Tensor]:
    """FlexAttention over the tokens a :class:`BlockSelection` keeps."""
    return flex_call(inputs.q, inputs.k, inputs.v, sel.to_block_mask(), inputs.scale)


def flex_can_serve(inputs: AttnInputs, config=None) -> str | None:
    dev = inputs.q.device.type
    if dev == "cpu" and inputs.needs_grad:
        return "FlexAttention has no backward on CPU"
    if dev not in ("cpu", "cuda"):
        return f"FlexAttention does not run on device type {dev!r}"
    if dev == "cuda" and inputs.q.dtype == torch.float64:
        return "compiled FlexAttention on GPU is not used for float64"
    if _FAILED and _failure_key(inputs, config) in _FAILED:
        return "Inductor found no FlexAttention kernel for this call earlier in this process"
    return None
