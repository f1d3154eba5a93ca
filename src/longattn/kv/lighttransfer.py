"""LightTransfer (Zhang et al. 2024, "LightTransfer: Your Long-Context LLM is Secretly a
Hybrid Model with Effortless Adaptation"): the *lazy layers* -- those whose attention stays
on the initial and recent tokens -- get a streaming cache (sinks + recent window); every
other layer keeps its full cache.

Which layers are lazy is plain data here (the layer plan comes from measuring laziness, e.g.
with longattn's analysis tools). A lazy layer holds at most ``[B, Hkv, sinks + window, D]``;
the memory saved is :meth:`KVCache.full_kv_bytes` minus :meth:`KVCache.kv_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .base import KVPolicy, ModelShape, check_int, load_policy_calibration
from .cache import KVLayer, RuleLayer, Segment


@dataclass(frozen=True)
class LightTransferPolicy(KVPolicy):
    """Streaming cache on ``lazy_layers``, full cache elsewhere.

    Args:
        lazy_layers: indices of the lazy layers (ints >= 0, distinct). Default: none (full
            everywhere).
        sinks: sink tokens kept by lazy layers (int >= 1). Default 4.
        window: recent tokens kept by lazy layers (int >= 1). Default 1020 (StreamingLLM's
            4 + 1020 cache).
    """

    name = "lighttransfer"
    lazy_layers: tuple[int, ...] = ()
    sinks: int = 4
    window: int = 1020

    @classmethod
    def from_calibration(cls, calibration, *, sinks: int | None = None,
                         window: int | None = None) -> "LightTransferPolicy":
        """The policy a ``longattn calibrate --method lighttransfer`` file describes: its lazy
        layers, and its ``sink``/``window`` unless given here. ``calibration``: a path or a
        loaded :class:`longattn.analysis.calibrate.Calibration`."""
        cal = load_policy_calibration(calibration, "lighttransfer")
        lazy = [i for i, flag in enumerate(cal.data["lazy"]) if flag]
        return cls(lazy_layers=tuple(lazy), sinks=int(cal.data["sink"]) if sinks is None else sinks,
                   window=int(cal.data["window"]) if window is None else window)

    def __post_init__(self) -> None:
        layers = self.lazy_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise ValueError(f"lazy_layers must be a list of layer indices (ints >= 0), got {type(layers).__name__}")
        for i in layers:
            check_int("lazy_layers entries", i, minimum=0)
        if len(set(layers)) != len(layers):
            raise ValueError(f"lazy_layers must not repeat a layer, got {list(layers)}")
        object.__setattr__(self, "lazy_layers", tuple(sorted(layers)))
        check_int("sinks", self.sinks, minimum=1)
        check_int("window", self.window, minimum=1)

    def check_shape(self, shape: ModelShape) -> None:
        bad = [i for i in self.lazy_layers if i >= shape.num_layers]
        if bad:
            raise ValueError(f"lazy_layers {bad} do not exist; the model has layers 0..{shape.num_layers - 1}")

    def make_layer(self, layer_idx: int, shape: ModelShape) -> KVLayer:
        rule = (self.sinks, self.window) if layer_idx in self.lazy_layers else None
        return RuleLayer(layer_idx, shape, self, [Segment(range(shape.num_kv_heads), rule=rule)])


__all__ = ["LightTransferPolicy"]
