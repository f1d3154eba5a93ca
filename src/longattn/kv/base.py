"""What every KV-cache policy shares: the model shape it is built for, the policy base class
and the argument checks of the policy dataclasses.

A policy is a frozen dataclass (its fields are the paper's knobs, the paper's values the
defaults) that builds one cache layer per attention layer of a model
(:meth:`KVPolicy.make_layer`). The layers do the work; they live in :mod:`longattn.kv.cache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from .cache import KVLayer


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry a cache is built for: ``num_layers`` attention layers, each
    with ``num_heads`` query heads and ``num_kv_heads`` key/value heads (GQA:
    ``num_heads % num_kv_heads == 0``; query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)``) of size ``head_dim``."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            check_int(name, getattr(self, name), minimum=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA)"
            )

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, model: Any) -> "ModelShape":
        """The shape of a ``transformers`` causal LM (its self-attention modules, found as
        :func:`longattn.hf.attention_modules` finds them)."""
        from ..hf import _num_heads, attention_modules

        modules = attention_modules(model)
        if sorted(modules) != list(range(len(modules))):
            raise ValueError(f"attention layer indices are not 0..L-1: {sorted(modules)}")
        first = modules[0]
        heads, kv_heads = _num_heads(first)
        return cls(len(modules), int(heads), int(kv_heads), int(first.head_dim))


class KVPolicy:
    """Base of the policy dataclasses. Subclasses set :attr:`name`, hold their knobs as
    frozen dataclass fields validated in ``__post_init__``, and implement
    :meth:`make_layer`."""

    name: ClassVar[str] = ""
    #: whether the policy drops entries from memory (False: it only reads fewer of them)
    evicts: ClassVar[bool] = True

    def check_shape(self, shape: ModelShape) -> None:
        """Raise ``ValueError`` when the policy's per-layer / per-head data does not fit
        ``shape`` (the default accepts every shape)."""

    def make_layer(self, layer_idx: int, shape: ModelShape) -> "KVLayer":  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- checks
def check_int(name: str, value: object, *, minimum: int) -> int:
    """``value`` must be an ``int`` (not a bool) ``>= minimum``; else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_tokens_or_fraction(name: str, value: object) -> int | float:
    """A token count (``int >= 1``) or a fraction of the prompt length (``float`` in
    ``(0, 1]``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{name} must be a token count (int >= 1) or a fraction of the prompt (float in (0, 1]), "
            f"got {value!r} ({type(value).__name__})"
        )
    if isinstance(value, int):
        return check_int(name, value, minimum=1)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(
            f"{name} as a float is a fraction of the prompt length and must lie in (0, 1], got {value!r}; "
            "pass an int for a number of tokens"
        )
    return value


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def load_policy_calibration(calibration, method: str):
    """A :class:`~longattn.analysis.calibrate.Calibration` from a path or itself, checked to be
    of ``method``."""
    from ..analysis.calibrate import Calibration, load_calibration

    cal = calibration if isinstance(calibration, Calibration) else load_calibration(calibration)
    if cal.method != method:
        raise ValueError(f"calibration is for method {cal.method!r}; this policy needs a {method!r} calibration")
    return cal


__all__ = ["load_policy_calibration", "KVPolicy", "ModelShape", "check_choice", "check_int", "check_tokens_or_fraction"]
