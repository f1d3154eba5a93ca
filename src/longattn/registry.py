"""One table of attention methods: their config, reference and fast paths.

A method registers a :class:`MethodSpec`. Two kinds exist:

* *selection methods* (``window``, ``sink``, ``bigbird``, ``topk``, ``moba``) only write a
  selector ``(q, k, causal, config) -> BlockSelection``; :func:`register_selection_method`
  derives their reference (dense masked softmax) and their FlexAttention path from it;
* *composite methods* (``full``, ``nsa``) register their own reference and backends.

Every implementation has the signature ``impl(inputs: AttnInputs, config) -> (out, lse)``
where ``out`` is ``[B, H, Tq, D]`` in the input dtype and ``lse`` is ``float32 [B, H, Tq]``
(natural log; ``-inf`` for a query that attends to nothing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .selection import BlockSelection

BACKENDS = ("reference", "sdpa", "flex", "triton")


@dataclass(frozen=True)
class AttnInputs:
    """Validated inputs of one attention call (``[B, H, T, D]`` layout)."""

    q: Tensor
    k: Tensor
    v: Tensor
    causal: bool
    scale: float
    return_lse: bool = False

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def q_offset(self) -> int:
        return self.k.shape[2] - self.q.shape[2]

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))


Impl = Callable[[AttnInputs, Any], tuple[Tensor, Tensor]]
CanServe = Callable[[AttnInputs, Any], "str | None"]


@dataclass(frozen=True)
class Backend:
    """One way to run a method. ``can_serve`` returns ``None`` or the reason it cannot."""

    impl: Impl
    can_serve: CanServe = lambda inputs, config: None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str
    paper: str
    summary: str
    config_cls: type
    reference: Impl
    backends: dict[str, Backend] = field(default_factory=dict)
    selector: Callable[[Tensor, Tensor, bool, Any], BlockSelection] | None = None
    bidirectional: bool = True
    needs_finite: bool = False  # data-dependent selection: NaN/Inf inputs are rejected
    has_lse: bool = True  # False for outputs that are not one softmax (e.g. NSA's gated sum)
    # fraction of full attention's (query, key) pairs the method reads: (q, k, causal, config)
    density: Callable[[Tensor, Tensor, bool, Any], float] | None = None

    def all_backends(self) -> dict[str, Backend]:
        return {"reference": Backend(self.reference), **self.backends}

    def make_config(self, **config: Any):
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise TypeError(
                f"method {self.name!r} got unknown config {unknown}; allowed: {sorted(fields)}"
            )
        return self.config_cls(**config)

    def defaults(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config_cls())


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    from . import methods  # noqa: F401  (registers the built-in methods)


def list_methods() -> list[str]:
    """Names of every registered method, in registration order."""
    _ensure_loaded()
    return list(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered under ``name``."""
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def register_selection_method(
    *,
    name: str,
    family: str,
    paper: str,
    summary: str,
    config_cls: type,
    selector: Callable[[Tensor, Tensor, bool, Any], BlockSelection],
    bidirectional: bool = True,
    needs_finite: bool = False,
) -> MethodSpec:
    """Register a method defined by a selector: reference = dense softmax under the
    selection's token mask; ``sdpa`` = PyTorch SDPA under the same mask (short inputs: the mask
    is materialised); ``flex`` = FlexAttention with the selection's BlockMask; ``triton`` =
    longattn's block-sparse kernels over the selection."""
    from .backends import (dense_masked_attention, flex_can_serve, flex_selection_attention, sdpa_mask_can_serve,
                           sdpa_masked_attention)
    from .backends.triton import triton_can_serve, triton_selection_attention

    def reference(inputs: AttnInputs, config) -> tuple[Tensor, Tensor]:
        sel = selector(inputs.q, inputs.k, inputs.causal, config)
        return dense_masked_attention(inputs, sel.to_dense_mask())

    def flex(inputs: AttnInputs, config) -> tuple[Tensor, Tensor]:
        sel = selector(inputs.q, inputs.k, inputs.causal, config)
        return flex_selection_attention(inputs, sel)

    def sdpa(inputs: AttnInputs, config) -> tuple[Tensor, Tensor]:
        sel = selector(inputs.q, inputs.k, inputs.causal, config)
        return sdpa_masked_attention(inputs, sel.to_dense_mask())

    def triton(inputs: AttnInputs, config) -> tuple[Tensor, Tensor]:
        sel = selector(inputs.q, inputs.k, inputs.causal, config)
        return triton_selection_attention(inputs, sel, fallback=lambda: dense_masked_attention(inputs, sel.to_dense_mask()))

    return register(
        MethodSpec(
            name=name,
            family=family,
            paper=paper,
            summary=summary,
            config_cls=config_cls,
            reference=reference,
            backends={"sdpa": Backend(sdpa, sdpa_mask_can_serve), "flex": Backend(flex, flex_can_serve),
                      "triton": Backend(triton, triton_can_serve)},
            selector=selector,
            bidirectional=bidirectional,
            needs_finite=needs_finite,
            density=lambda q, k, causal, config: selector(q, k, causal, config).density(),
        )
    )
