"""KV-cache policies for decoding inside ``transformers`` models, which really free memory.

>>> import longattn.kv as kv
>>> cache = kv.make_cache(model, "streaming", sinks=4, window=1020)           # doctest: +SKIP
>>> out = model.generate(ids, past_key_values=cache, max_new_tokens=64)       # doctest: +SKIP
>>> cache.kv_bytes() < cache.full_kv_bytes()                                  # doctest: +SKIP
True

One file per policy, each a frozen dataclass with its paper's defaults:

======================  =============================================================
``full``                keep everything (the reference)
``streaming``           StreamingLLM: sinks + recent window
``h2o``                 H2O: heavy hitters by accumulated attention + recent tokens
``quest``               Quest: keep everything, read the top pages by key bounds
``recycled``            Recycled Attention: full steps + steps over the last top-K
``duo``                 DuoAttention: retrieval heads full, streaming heads sinks + window
``lighttransfer``       LightTransfer: lazy layers streaming, the others full
======================  =============================================================

:func:`make_cache` builds a :class:`~longattn.kv.cache.KVCache` (a ``transformers.Cache``)
for a model and switches the model's attention to longattn's (``"longattn"``), through which
the cache receives the queries (see :mod:`longattn.kv.cache` for the mechanism and for how
positions are kept). Importing this package needs ``transformers``; nothing happens at
import.
"""

from __future__ import annotations

from typing import Any

from .base import KVPolicy, ModelShape
from .cache import KVCache, KVLayer
from .duo import DuoPolicy
from .full import FullPolicy
from .h2o import H2OPolicy
from .lighttransfer import LightTransferPolicy
from .quest import QuestPolicy
from .recycled import RecycledPolicy
from .streaming import StreamingPolicy

#: policy name -> policy class
POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls
    for cls in (FullPolicy, StreamingPolicy, H2OPolicy, QuestPolicy, RecycledPolicy, DuoPolicy, LightTransferPolicy)
}


def list_policies() -> list[str]:
    """Names of the registered KV-cache policies."""
    return sorted(POLICIES)


def get_policy(name: str, **config: Any) -> KVPolicy:
    """The policy ``name`` configured with ``config`` (validated now).

    >>> get_policy("streaming", sinks=4, window=252)
    StreamingPolicy(sinks=4, window=252)
    """
    if not isinstance(name, str) or name not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; known: {list_policies()}")
    cls = POLICIES[name]
    unknown = sorted(set(config) - set(cls.field_names()))
    if unknown:
        raise ValueError(f"policy {name!r} has no option(s) {unknown}; its options are {cls.field_names()}")
    return cls(**config)


def make_cache(model: Any, policy: KVPolicy | str, **config: Any) -> KVCache:
    """A cache running ``policy`` (a policy object, or a name plus ``config``) for ``model``.

    ``model``: a ``transformers`` causal LM -- its attention is switched to ``"longattn"``
    (registered through :func:`longattn.hf.register`) unless it already is, so that its
    attention layers hand their queries to the cache -- or a :class:`ModelShape` for using
    the cache directly (``cache.update(k, v, layer)`` then ``cache.attend(layer, q)``).

    A cache serves one sequence batch from its prefill on; make a new one per ``generate``.
    """
    if isinstance(policy, str):
        policy = get_policy(policy, **config)
    elif config:
        raise ValueError("pass options either inside the policy object or with a policy name, not both")
    if not isinstance(policy, KVPolicy):
        raise ValueError(f"policy must be a KVPolicy or one of {list_policies()}, got {type(policy).__name__}")
    if isinstance(model, ModelShape):
        shape = model
    else:
        from .. import hf

        shape = ModelShape.of(model)
        hf.register()
        if getattr(model.config, "_attn_implementation", None) != hf.ATTN_IMPLEMENTATION:
            model.set_attn_implementation(hf.ATTN_IMPLEMENTATION)
    policy.check_shape(shape)
    layers = [policy.make_layer(i, shape) for i in range(shape.num_layers)]
    return KVCache(policy, shape, layers)


__all__ = [
    "DuoPolicy",
    "FullPolicy",
    "H2OPolicy",
    "KVCache",
    "KVLayer",
    "KVPolicy",
    "LightTransferPolicy",
    "ModelShape",
    "POLICIES",
    "QuestPolicy",
    "RecycledPolicy",
    "StreamingPolicy",
    "get_policy",
    "make_cache",
    "list_policies",
]
