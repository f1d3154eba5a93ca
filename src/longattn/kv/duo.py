"""DuoAttention (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with
Retrieval and Streaming Heads"): each (layer, KV head) is either a *retrieval head*, which
keeps the whole cache, or a *streaming head*, which keeps only attention sinks and a recent
window (StreamingLLM's cache).

The retrieval and streaming heads of a layer are stored as two separate tensors,
``[B, H_retrieval, n, D]`` and ``[B, H_streaming, sinks + window, D]``: heads that keep
different numbers of tokens never share a padded tensor. The head classification is plain
Python data -- per-layer flags, or per-layer scores (e.g. DuoAttention's learned gate values,
or a retrieval score from the analysis tools) plus the fraction of heads to keep as
retrieval heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .base import KVPolicy, ModelShape, check_int, load_policy_calibration
from .cache import KVLayer, RuleLayer, Segment


def _as_table(name: str, value: object, kind: type | tuple[type, ...]) -> tuple[tuple, ...]:
    """A list of per-layer lists as a tuple of tuples, checking the element types."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list with one list per layer, got {type(value).__name__}")
    rows = []
    for i, row in enumerate(value):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"{name}[{i}] must be a list with one entry per KV head, got {type(row).__name__}")
        for x in row:
            bad = not isinstance(x, kind) or (kind is not bool and isinstance(x, bool))
            if bad or (kind is not bool and not math.isfinite(x)):
                what = "bools (True = retrieval head)" if kind is bool else "finite numbers"
                raise ValueError(f"{name}[{i}] must hold {what}, got {x!r}")
        rows.append(tuple(row))
    if not rows:
        raise ValueError(f"{name} must have one entry per layer, got an empty list")
    return tuple(rows)


@dataclass(frozen=True)
class DuoPolicy(KVPolicy):
    """DuoAttention's per-head cache.

    Give exactly one of:
        retrieval: per layer, per KV head, ``True`` for a retrieval head (full cache),
            ``False`` for a streaming head.
        scores: per layer, per KV head, a number (higher = more retrieval-like); the
            ``retrieval_ratio`` fraction of all heads of the model with the highest scores
            (``round(ratio * layers * Hkv)``, ranked over the whole model as DuoAttention
            ranks its gate values) become retrieval heads.

    Args:
        retrieval_ratio: float in [0, 1], used with ``scores``. Default 0.5 (DuoAttention's
            evaluations use 50% and 25% retrieval heads; its sparsity 0.5).
        sinks: sink tokens kept by streaming heads (int >= 1). Default 64.
        window: recent tokens kept by streaming heads (int >= 1). Default 256 -- the
            sink/recent sizes of DuoAttention's evaluation scripts.
    """

    name = "duo"
    retrieval: tuple[tuple[bool, ...], ...] | None = None
    scores: tuple[tuple[float, ...], ...] | None = None
    retrieval_ratio: float = 0.5
    sinks: int = 64
    window: int = 256

    @classmethod
    def from_calibration(cls, calibration, *, sinks: int | None = None, window: int | None = None) -> "DuoPolicy":
        """The policy a ``longattn calibrate --method duo`` file describes: its per-(layer, KV
        head) retrieval flags, and its streaming ``sink``/``window`` unless given here.
        ``calibration``: a path or a loaded :class:`longattn.analysis.calibrate.Calibration`."""
        cal = load_policy_calibration(calibration, "duo")
        return cls(retrieval=cal.data["retrieval"], sinks=int(cal.data["sink"]) if sinks is None else sinks,
                   window=int(cal.data["window"]) if window is None else window)

    def __post_init__(self) -> None:
        if (self.retrieval is None) == (self.scores is None):
            raise ValueError("give exactly one of retrieval (per-layer head flags) or scores (per-layer head scores)")
        if self.retrieval is not None:
            object.__setattr__(self, "retrieval", _as_table("retrieval", self.retrieval, bool))
        else:
            object.__setattr__(self, "scores", _as_table("scores", self.scores, (int, float)))
        r = self.retrieval_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and 0.0 <= r <= 1.0):
            raise ValueError(f"retrieval_ratio must be a number in [0, 1], got {r!r}")
        check_int("sinks", self.sinks, minimum=1)
        check_int("window", self.window, minimum=1)

    def retrieval_flags(self) -> tuple[tuple[bool, ...], ...]:
        """Per layer, per KV head: ``True`` for a retrieval head."""
        if self.retrieval is not None:
            return self.retrieval
        flat = sorted(
            ((s, i, j) for i, row in enumerate(self.scores) for j, s in enumerate(row)),
            key=lambda t: (-t[0], t[1], t[2]),
        )
        keep = {(i, j) for _, i, j in flat[: round(self.retrieval_ratio * len(flat))]}
        return tuple(tuple((i, j) in keep for j in range(len(row))) for i, row in enumerate(self.scores))

    def check_shape(self, shape: ModelShape) -> None:
        table = self.retrieval if self.retrieval is not None else self.scores
        what = "retrieval" if self.retrieval is not None else "scores"
        if len(table) != shape.num_layers:
            raise ValueError(f"{what} has {len(table)} layers, the model has {shape.num_layers}")
        for i, row in enumerate(table):
            if len(row) != shape.num_kv_heads:
                raise ValueError(
                    f"{what}[{i}] has {len(row)} entries; give one per KV head ({shape.num_kv_heads}; "
                    f"query heads of a GQA group share their KV head)"
                )

    def make_layer(self, layer_idx: int, shape: ModelShape) -> KVLayer:
        flags = self.retrieval_flags()[layer_idx]
        retrieval = [h for h, f in enumerate(flags) if f]
        streaming = [h for h, f in enumerate(flags) if not f]
        return RuleLayer(layer_idx, shape, self, [
            Segment(retrieval), Segment(streaming, rule=(self.sinks, self.window)),
        ])


__all__ = ["DuoPolicy"]
