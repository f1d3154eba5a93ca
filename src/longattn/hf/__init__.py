"""Run any longattn method inside a Hugging Face ``transformers`` model.

Nothing happens at import. :func:`register` adds the attention function ``"longattn"`` to
transformers' ``AttentionInterface`` (and the SDPA mask builder under the same name to
``AttentionMaskInterface``, so the model keeps building its causal / padding / sliding-window
masks); :func:`apply` attaches a plan (which method, with which config, on which layers and
heads) to the model's attention modules and switches the model to ``"longattn"``. No model
class is patched: the plan is an attribute on each attention module instance.

Prefill and decoding both call the method: a decoding step is a query block of one token at
the end of the cached keys, which every method defines (``q`` shorter than ``k``).

KV caches: when the keys come from a :mod:`longattn.kv` cache (its ``update`` tags them),
the cache layer computes the attention over what its policy keeps, with the query it needs;
everything else is as before.

Masks: longattn methods define their own causal pattern. The mask the model passes is
checked: ``None`` or exactly the end-aligned causal mask runs the method as it is; any other
mask (padding, a sliding window) is applied exactly -- through SDPA for ``full``, and for
selection methods by intersecting it with the method's keys in the dense reference -- and NSA
refuses it with an error. A mask is never silently dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

ATTN_IMPLEMENTATION = "longattn"


@dataclass(frozen=True)
class HeadPlan:
    """One method on a set of query heads (``None`` = all heads) of one layer."""

    method: str
    config: dict[str, Any] = field(default_factory=dict)
    heads: tuple[int, ...] | None = None
    backend: str = "auto"


# (layer_idx, query, key, value, output, causal, scale, plan) -> None, called per layer
Probe = Callable[[int, Tensor, Tensor, Tensor, Tensor, bool, "float | None", "list[HeadPlan]"], None]
_probe: contextvars.ContextVar[Probe | None] = contextvars.ContextVar("longattn_probe", default=None)


@contextlib.contextmanager
def attention_probe(callback: Probe) -> Iterator[None]:
    """Within this block every longattn attention layer calls ``callback`` with its inputs
    (``query [B, H, Tq, D]``, ``key/value [B, Hkv, Tk, D]`` after RoPE and the cache) and its
    output ``[B, H, Tq, D]`` -- what the arena's fidelity metrics are computed from."""
    token = _probe.set(callback)
    try:
        yield
    finally:
        _probe.reset(token)


def register() -> None:
    """Register ``"longattn"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, longattn_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The self-attention modules of ``model`` by layer index (modules with a ``layer_idx``
    and ``head_dim`` whose class name ends in ``Attention``)."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx") and hasattr(module, "head_dim"):
            found[int(module.layer_idx)] = module
    if not found:
        raise ValueError(
            f"found no attention modules with a layer_idx in {type(model).__name__}; longattn.hf "
            "supports models whose attention goes through transformers' AttentionInterface"
        )
    return found


def _num_heads(module: torch.nn.Module) -> tuple[int, int]:
    cfg = module.config
    heads = getattr(cfg, "num_attention_heads")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv


def apply(
    model: torch.nn.Module,
    method: str = "full",
    *,
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    backend: str = "auto",
    **config: Any,
) -> torch.nn.Module:
    """Use ``method`` (with ``config``) on ``layers`` (default: all) and ``heads`` (default:
    all query heads; must be whole GQA groups) of ``model``. Calls add up: a later call
    overrides the earlier plan on the heads it names. Returns the model.

    >>> apply(model, "full"); apply(model, "moba", layers=range(4, 30), top_k=3)
    """
    from .. import get_method

    spec = get_method(method)
    spec.make_config(**config)  # validates names and values now, not at the first forward
    from ..registry import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    modules = attention_modules(model)
    chosen = sorted(modules) if layers is None else sorted(set(int(i) for i in layers))
    unknown = [i for i in chosen if i not in modules]
    if unknown:
        raise ValueError(f"layers {unknown} do not exist; the model has layers 0..{max(modules)}")
    head_set = None if heads is None else tuple(sorted(set(int(h) for h in heads)))
    for idx in chosen:
        module = modules[idx]
        H, Hkv = _num_heads(module)
        if head_set is not None:
            group = H // Hkv
            if not head_set or head_set[0] < 0 or head_set[-1] >= H:
                raise ValueError(f"heads must lie in [0, {H}), got {list(head_set)}")
            groups = {h // group for h in head_set}
            if len(head_set) != len(groups) * group:
                raise ValueError(
                    f"heads must be whole GQA groups of {group} consecutive query heads "
                    f"(H={H}, Hkv={Hkv}), got {list(head_set)}"
                )
        # one entry per query head; heads with equal entries run together
        per_head = list(getattr(module, "longattn_heads", None) or [HeadPlan("full")] * H)
        entry = HeadPlan(method, dict(config), None, backend)
        for h in range(H) if head_set is None else head_set:
            per_head[h] = entry
        module.longattn_heads = per_head
        module.longattn_plan = _group_heads(per_head)
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def _group_heads(per_head: list[HeadPlan]) -> list[HeadPlan]:
    groups: dict[int, list[int]] = {}
    first: dict[int, HeadPlan] = {}
    for h, p in enumerate(per_head):
        key = next((k for k, q in first.items() if q == p), None)
        if key is None:
            key = len(first)
            first[key] = p
        groups.setdefault(key, []).append(h)
    if len(first) == 1:
        return [first[0]]
    return [HeadPlan(first[k].method, first[k].config, tuple(hs), first[k].backend) for k, hs in groups.items()]


def plan_of(model: torch.nn.Module) -> dict[int, list[HeadPlan]]:
    """The plan of every attention layer (layers without one run ``full``)."""
    return {i: list(getattr(m, "longattn_plan", [HeadPlan("full")])) for i, m in attention_modules(model).items()}


def _is_plain_causal(mask: Tensor, q_len: int, kv_len: int) -> bool:
    """Whether ``mask`` (bool, or additive float) is the end-aligned causal mask for every
    batch row and head."""
    from ..backends import causal_token_mask

    allowed = mask if mask.dtype == torch.bool else mask == 0
    if allowed.shape[-2:] != (q_len, kv_len):
        return False
    expected = causal_token_mask(q_len, kv_len, mask.device)
    return bool((allowed == expected).all())


def _masked_selection_attention(module, q, k, v, attention_mask, causal, scaling, p: HeadPlan) -> Tensor:
    """A selection method under a model mask that is not plain causal (padding, a sliding
    window): the dense reference over the intersection of the method's keys and the model's
    mask (``O(Tq * Tk)``, like the mask transformers already built). Methods without a
    selector (NSA) refuse."""
    from .. import get_method
    from ..api import validate_inputs
    from ..backends import dense_masked_attention

    spec = get_method(p.method)
    if spec.selector is None:
        raise NotImplementedError(
            f"layer {getattr(module, 'layer_idx', '?')}: the model passed an attention mask that is "
            f"not the plain causal mask (padding, a sliding window or another pattern), which "
            f"method {p.method!r} cannot combine; use unpadded batches, or another method on this layer"
        )
    inputs = validate_inputs(q, k, v, causal=causal, scale=scaling)
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    selected = spec.selector(q, k, causal, spec.make_config(**p.config)).to_dense_mask()  # [B|1, Hs, Tq, Tk]
    if allowed.shape[1] != 1:
        raise NotImplementedError("per-head model masks are not supported with sparse methods")
    return dense_masked_attention(inputs, selected & allowed)[0]


# the attribute longattn.kv.cache.KVLayer.update sets on the keys it returns (kv.cache.TAG);
# spelled out here so that this module never imports longattn.kv
_KV_TAG = "_longattn_kv_layer"


def _kv_cache_attention(module, layer, query: Tensor, attention_mask, scaling, is_causal) -> tuple[Tensor, None]:
    """Attention of a layer whose cache is a longattn KV cache: the cache layer that
    produced the keys computes it over what its policy keeps (``KVLayer.attend``), with the
    model's mask read at the token indices it kept. Causal only; a sparse method plan on the
    same layer is refused rather than ignored. Attention probes do not see these calls."""
    idx = getattr(module, "layer_idx", None)
    if idx is not None and int(idx) != layer.layer_idx:
        raise RuntimeError(f"attention module of layer {idx} received keys of KV-cache layer {layer.layer_idx}")
    plan = getattr(module, "longattn_plan", None) or [HeadPlan("full")]
    if any(p.method != "full" for p in plan):
        raise NotImplementedError(
            f"layer {idx}: a longattn KV cache computes its own attention; it is not combined with the "
            f"sparse method plan {[p.method for p in plan]} (call longattn.hf.apply(model, 'full'))"
        )
    if is_causal is False or not getattr(module, "is_causal", True):
        raise NotImplementedError(f"layer {idx}: longattn KV caches serve causal attention only")
    out = layer.attend(query, attention_mask, scaling)  # [B, H, Tq, D]
    return out.transpose(1, 2).contiguous(), None


def longattn_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: ``query [B, H, Tq, D]``, ``key/value [B, Hkv, Tk, D]``
    -> ``([B, Tq, H, D], None)``."""
    from .. import attention

    if dropout:
        raise NotImplementedError("longattn.hf does not implement attention dropout; call model.eval()")
    for name in ("softcap", "s_aux"):  # score transforms (Gemma-2 soft-capping, gpt-oss sinks)
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"layer {getattr(module, 'layer_idx', '?')}: the model asks for {name}={kwargs[name]!r}, "
                "which longattn methods do not implement; refusing rather than ignoring it"
            )
    kv_layer = getattr(key, _KV_TAG, None)
    if kv_layer is not None:  # keys from a longattn KV cache: its policy computes the attention
        return _kv_cache_attention(module, kv_layer, query, attention_mask, scaling, is_causal)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    Tq, Tk = query.shape[2], key.shape[2]
    H, Hkv = query.shape[1], key.shape[1]
    plain = attention_mask is None or (causal and _is_plain_causal(attention_mask, Tq, Tk))
    plan = getattr(module, "longattn_plan", None) or [HeadPlan("full")]
    out = query.new_empty(query.shape)
    group = H // Hkv
    for p in plan:
        heads = list(range(H)) if p.heads is None else list(p.heads)
        kv_heads = sorted({h // group for h in heads})
        q = query[:, heads]
        k, v = key[:, kv_heads], value[:, kv_heads]
        if plain:
            o = attention(q, k, v, method=p.method, causal=causal, scale=scaling, backend=p.backend, **p.config)
        elif p.method == "full":
            mask = attention_mask if attention_mask.shape[1] == 1 else attention_mask[:, heads]
            o = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scaling, enable_gqa=len(kv_heads) != len(heads)
            )
        else:
            o = _masked_selection_attention(module, q, k, v, attention_mask, causal, scaling, p)
        out[:, heads] = o
    probe = _probe.get()
    if probe is not None:
        probe(int(getattr(module, "layer_idx", -1)), query, key, value, out, causal, scaling, plan)
    return out.transpose(1, 2).contiguous(), None


__all__ = ["ATTN_IMPLEMENTATION", "HeadPlan", "apply", "attention_probe", "attention_modules", "longattn_attention_forward", "plan_of", "register"]
