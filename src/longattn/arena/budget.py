"""KV budgets for the arena: one number per cell, translated to each KV policy's own knobs.

A *budget* is how many tokens per (layer, KV head) a policy may keep -- or, for the policies
that keep everything and read less (Quest, Recycled Attention), may *read* per decoding step.
It is given either as a fraction of the prompt length (``"25%"``, ``"0.25"``) or as a token
count (``"512"``, ``"2k"``), parsed by :func:`parse_budget`.

:func:`policy_config` is the one place where a budget becomes a policy config. With ``B`` the
budget in tokens at the cell's nominal length ``L`` (the task's target prompt length, which
the real prompt matches within about 0.5%; using ``L`` rather than the tokenized prompt makes
the config known before the model runs, so it is part of the cell's store key):

==================  ===========================================================================
``streaming``       ``sinks = 4`` (StreamingLLM's), ``window = B - sinks``.
``h2o``             ``heavy = B // 2``, ``recent = B - heavy`` (the paper's even split).
``quest``           ``budget = ceil(B / page_size) * page_size`` (the pages covering ``B``;
                    ``page_size`` 16, ``dense_layers`` 2: the paper's).
``recycled``        ``top_k = B`` (stride 10, the library default).
``duo``             Streaming heads keep ``S`` tokens: the paper's 64 sinks + 256 recent
                    (``S = 320``) when ``S <= B / 2``, else ``S = B // 2`` split 1:4 into sinks
                    and window as the paper's. Retrieval heads keep all ``L``. The share ``r`` of
                    retrieval heads makes the mean kept tokens per head equal ``B``:
                    ``r * L + (1 - r) * S = B``, i.e. ``r = (B - S) / (L - S)`` clipped to
                    ``[0, 1]``; the model has whole heads, so ``round(r * layers * Hkv)`` of
                    them are retrieval heads (the measured ``kv_ratio`` says what that came to).
``lighttransfer``   Lazy layers keep ``S`` tokens: StreamingLLM's 4 + 1020 (``S = 1024``) when
                    ``S <= B / 2``, else ``S = B // 2`` with 4 sinks (fewer when ``S < 8``); the
                    other layers keep all ``L``. The lazy share ``f`` solves
                    ``f * S + (1 - f) * L = B``: ``f = (L - B) / (L - S)`` clipped to ``[0, 1]``;
                    ``round(f * layers)`` layers are lazy.
``full``            no budget (keeps everything).
==================  ===========================================================================

**Which heads / layers.** DuoAttention and LightTransfer choose *which* heads or layers from a
calibration. Give it as ``duo.retrieval_heads`` (per layer, per KV head, a score, higher = more
retrieval-like: an inline list of lists or the path of a JSON file holding that list or
``{"scores": [...]}``) and ``lighttransfer.lazy_scores`` (per layer, higher = lazier; inline
list or JSON file holding the list or ``{"scores": [...]}``); a ``longattn calibrate`` file works
for both (DuoAttention's gates ``alpha``, LightTransfer's ``lazy_mass``). Without one the arena uses a
documented *uncalibrated* default and says so in the config (``"uncalibrated-uniform"`` /
``"uncalibrated-spread"``), which the report shows: DuoAttention's retrieval heads are spread
evenly over layers, lowest-numbered KV heads first; LightTransfer's lazy layers are evenly
spaced over the depth. Neither is the papers' learned choice, and their accuracy is not the
papers'. A file is recorded by path and content hash, so a changed file is a new cell.

Fields given with ``--config policy.field=value`` override the translated ones (and are part
of the key); ``sinks``/``window``/``page_size`` overrides are taken into account by the
translation (e.g. ``streaming.sinks=8`` gives ``window = B - 8``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the names :func:`policy_config` knows (every policy of :mod:`longattn.kv`)
BUDGET_POLICIES = ("full", "streaming", "h2o", "quest", "recycled", "duo", "lighttransfer")

DUO_PAPER_SINKS, DUO_PAPER_WINDOW = 64, 256
LIGHTTRANSFER_SINKS, LIGHTTRANSFER_WINDOW = 4, 1020
DUO_DEFAULT_HEADS = "uncalibrated-uniform"
LIGHTTRANSFER_DEFAULT_LAYERS = "uncalibrated-spread"


@dataclass(frozen=True)
class Budget:
    """A KV budget: ``fraction`` of the prompt length (in ``(0, 1]``) or ``tokens`` (>= 1);
    exactly one is set. :attr:`label` is its canonical text (``"25%"``, ``"512"``), the form
    stored in the cell."""

    fraction: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.tokens is None):
            raise ValueError("a budget is either a fraction of the prompt or a token count, exactly one")
        if self.fraction is not None and not (math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0):
            raise ValueError(f"a budget fraction must lie in (0, 100%], got {self.fraction!r}")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1):
            raise ValueError(f"a budget in tokens must be an int >= 1, got {self.tokens!r}")

    @property
    def label(self) -> str:
        if self.tokens is not None:
            return str(self.tokens)
        return f"{round(self.fraction * 100, 6):g}%"

    def tokens_at(self, length: int) -> int:
        """The budget in tokens for a prompt of ``length`` tokens (a fraction rounds to the
        nearest token, at least 1)."""
        if self.tokens is not None:
            return self.tokens
        return max(1, round(self.fraction * length))


_BUDGET_HELP = ("a KV budget is a percentage of the prompt ('25%'), a fraction ('0.25') or a token "
                "count ('512', '2k')")


def parse_budget(text: str | int | float | Budget) -> Budget:
    """``"25%"`` / ``"0.25"`` -> 25% of the prompt; ``"512"`` / ``512`` / ``"2k"`` -> tokens.

    Raises ``ValueError`` with the accepted forms for zero, negative, above-100% and
    unparseable budgets."""
    if isinstance(text, Budget):
        return text
    if isinstance(text, bool):
        raise ValueError(f"budget {text!r}: {_BUDGET_HELP}")
    if isinstance(text, int):
        if text < 1:
            raise ValueError(f"budget {text!r} must be at least 1 token; {_BUDGET_HELP}")
        return Budget(tokens=text)
    if isinstance(text, float):
        text = repr(text)
    if not isinstance(text, str):
        raise ValueError(f"budget {text!r}: {_BUDGET_HELP}")
    t = text.strip().lower()
    try:
        if t.endswith("%"):
            value = float(t[:-1])
            if not (math.isfinite(value) and 0.0 < value <= 100.0):
                raise ValueError(f"budget {text!r} must be a percentage in (0, 100]; {_BUDGET_HELP}")
            return Budget(fraction=value / 100.0)
        if re.fullmatch(r"\d+(\.\d+)?k", t):
            tokens = int(float(t[:-1]) * 1024)
        elif re.fullmatch(r"[+-]?\d+", t):
            tokens = int(t)
        elif re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+)(e[+-]?\d+)?", t):
            value = float(t)
            if not (0.0 < value <= 1.0):
                raise ValueError(
                    f"budget {text!r}: a fraction must lie in (0, 1] (1 = the whole prompt); {_BUDGET_HELP}")
            return Budget(fraction=value)
        else:
            raise ValueError(f"budget {text!r} is not understood; {_BUDGET_HELP}")
    except ValueError as err:
        if "budget" in str(err):
            raise
        raise ValueError(f"budget {text!r} is not understood; {_BUDGET_HELP}") from None
    if tokens < 1:
        raise ValueError(f"budget {text!r} must be at least 1 token; {_BUDGET_HELP}")
    return Budget(tokens=tokens)


# ------------------------------------------------------------------------------ calibration
def _load_scores(name: str, value: Any) -> tuple[Any, dict[str, Any]]:
    """A calibration given inline (a list) or as a JSON file path: ``(scores, recorded)``,
    where ``recorded`` is what goes into the cell's config (the list itself, or the path and
    the file's content hash)."""
    if isinstance(value, (list, tuple)):
        return value, {name: value}
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{name}={str(value)!r}: no such calibration file")
        raw = path.read_bytes()
        data = json.loads(raw)
        if isinstance(data, dict) and data.get("format") == "longattn-calibration":
            # a `longattn calibrate` file: DuoAttention's gates or LightTransfer's lazy masses
            from ..analysis.calibrate import load_calibration

            cal = load_calibration(path)
            field = {"retrieval_heads": ("duo", "alpha"), "lazy_scores": ("lighttransfer", "lazy_mass")}.get(name)
            if field is None or cal.method != field[0]:
                raise ValueError(f"{name} file {str(path)!r} is a {cal.method!r} calibration; "
                                 f"{name} needs {field[0] if field else 'a score list'!r}")
            data = {"scores": cal.data[field[1]]}
        if isinstance(data, dict):
            if "scores" not in data:
                raise ValueError(f"{name} file {str(path)!r} must hold a list of scores or {{\"scores\": [...]}}")
            data = data["scores"]
        return data, {name: str(path), f"{name}_sha256": hashlib.sha256(raw).hexdigest()[:16]}
    raise ValueError(f"{name} must be a list of scores or the path of a JSON file holding them, got {value!r}")


def duo_scores(config: dict[str, Any], num_layers: int, num_kv_heads: int) -> list[list[float]]:
    """Per layer, per KV head, the retrieval score a DuoAttention cell ranks heads by: the
    calibration in ``config["retrieval_heads"]``, or for the uncalibrated default a score that
    takes KV head 0 of every layer first, then KV head 1 of every layer, and so on (retrieval
    heads spread evenly over layers)."""
    source = config.get("retrieval_heads", DUO_DEFAULT_HEADS)
    if source == DUO_DEFAULT_HEADS:
        return [[-float(j * num_layers + i) for j in range(num_kv_heads)] for i in range(num_layers)]
    scores, _ = _load_scores("retrieval_heads", source)
    return [list(row) for row in scores]


def lighttransfer_layers(config: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """The lazy layers of a LightTransfer cell: ``round(lazy_ratio * num_layers)`` layers, the
    laziest by ``config["lazy_scores"]`` (ties: lower index first), or for the uncalibrated
    default evenly spaced: layer ``floor((k + 1/2) * L / n)`` for ``k < n``."""
    n = round(config["lazy_ratio"] * num_layers)
    if n == 0:
        return ()
    source = config.get("lazy_scores", LIGHTTRANSFER_DEFAULT_LAYERS)
    if source == LIGHTTRANSFER_DEFAULT_LAYERS:
        return tuple(sorted({int((k + 0.5) * num_layers / n) for k in range(n)}))
    scores, _ = _load_scores("lazy_scores", source)
    if len(scores) != num_layers or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise ValueError(f"lazy_scores must hold one number per layer ({num_layers}), got {scores!r}")
    order = sorted(range(num_layers), key=lambda i: (-scores[i], i))
    return tuple(sorted(order[:n]))


# ------------------------------------------------------------------------------ the translation
def _check_overrides(policy: str, overrides: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"policy {policy!r} in the arena takes no option(s) {unknown} (the budget sets them); "
            f"the options beside the budget are {list(allowed)}")


def _need(policy: str, budget: Budget, tokens: int, minimum: int, why: str) -> None:
    if tokens < minimum:
        raise ValueError(
            f"budget {budget.label} is {tokens} tokens here, too small for {policy} (needs >= {minimum}: {why})")


def policy_config(policy: str, budget: str | Budget | None, length: int,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config a ``policy`` cell runs with at ``budget`` for a prompt of nominal ``length``
    tokens (JSON-serialisable; the table in this module's docstring says how). ``overrides``
    (from ``--config policy.field=value``) win over translated fields.

    ``full`` takes no budget (pass ``None``); every other policy needs one. Raises
    ``ValueError`` for unknown policies, bad budgets and budgets too small for a policy."""
    overrides = dict(overrides or {})
    if policy not in BUDGET_POLICIES:
        raise ValueError(f"unknown KV policy {policy!r}; known: {list(BUDGET_POLICIES)}")
    if policy == "full":
        if budget is not None:
            raise ValueError("the full policy keeps everything and takes no budget")
        _check_overrides(policy, overrides, ())
        return {}
    if budget is None:
        raise ValueError(f"policy {policy!r} needs a budget; {_BUDGET_HELP}")
    b = parse_budget(budget)
    B = b.tokens_at(length)
    L = int(length)

    if policy == "streaming":
        _check_overrides(policy, overrides, ("sinks",))
        sinks = overrides.get("sinks", 4)
        _need(policy, b, B, sinks + 1, f"{sinks} sinks + a window of at least 1")
        return {"sinks": sinks, "window": B - sinks}

    if policy == "h2o":
        _check_overrides(policy, overrides, ())
        _need(policy, b, B, 2, "one heavy hitter + one recent token")
        return {"heavy": B // 2, "recent": B - B // 2}

    if policy == "quest":
        _check_overrides(policy, overrides, ("page_size", "dense_layers"))
        page = overrides.get("page_size", 16)
        return {"budget": -(-B // page) * page, "page_size": page, "dense_layers": overrides.get("dense_layers", 2)}

    if policy == "recycled":
        _check_overrides(policy, overrides, ("stride", "threshold"))
        return {"top_k": B, "stride": overrides.get("stride", 10), "threshold": overrides.get("threshold")}

    if policy == "duo":
        _check_overrides(policy, overrides, ("sinks", "window", "retrieval_heads"))
        if "sinks" in overrides or "window" in overrides:
            sinks = overrides.get("sinks", DUO_PAPER_SINKS)
            window = overrides.get("window", DUO_PAPER_WINDOW)
        elif DUO_PAPER_SINKS + DUO_PAPER_WINDOW <= B // 2:
            sinks, window = DUO_PAPER_SINKS, DUO_PAPER_WINDOW
        else:
            _need(policy, b, B, 4, "streaming heads need a sink and a window token, half the budget")
            S = B // 2
            sinks = max(1, S // 5)
            window = S - sinks
        S = sinks + window
        if S > B:
            raise ValueError(f"duo's streaming heads alone keep {S} tokens, more than the budget {b.label} ({B})")
        ratio = 1.0 if L <= S else min(1.0, max(0.0, (B - S) / (L - S)))
        cfg: dict[str, Any] = {"retrieval_ratio": round(ratio, 6), "sinks": sinks, "window": window}
        if "retrieval_heads" in overrides:
            _, recorded = _load_scores("retrieval_heads", overrides["retrieval_heads"])
            cfg.update(recorded)
        else:
            cfg["retrieval_heads"] = DUO_DEFAULT_HEADS
        return cfg

    # lighttransfer
    _check_overrides(policy, overrides, ("sinks", "window", "lazy_scores"))
    if "sinks" in overrides or "window" in overrides:
        sinks = overrides.get("sinks", LIGHTTRANSFER_SINKS)
        window = overrides.get("window", LIGHTTRANSFER_WINDOW)
    elif LIGHTTRANSFER_SINKS + LIGHTTRANSFER_WINDOW <= B // 2:
        sinks, window = LIGHTTRANSFER_SINKS, LIGHTTRANSFER_WINDOW
    else:
        _need(policy, b, B, 4, "lazy layers need a sink and a window token, half the budget")
        S = B // 2
        sinks = min(LIGHTTRANSFER_SINKS, S // 2)
        window = S - sinks
    S = sinks + window
    if S > B:
        raise ValueError(f"lighttransfer's lazy layers alone keep {S} tokens, more than the budget {b.label} ({B})")
    lazy = 0.0 if L <= S else min(1.0, max(0.0, (L - B) / (L - S)))
    cfg = {"lazy_ratio": round(lazy, 6), "sinks": sinks, "window": window}
    if "lazy_scores" in overrides:
        _, recorded = _load_scores("lazy_scores", overrides["lazy_scores"])
        cfg.update(recorded)
    else:
        cfg["lazy_scores"] = LIGHTTRANSFER_DEFAULT_LAYERS
    return cfg


def build_policy(policy: str, config: dict[str, Any], shape: Any):
    """The :class:`~longattn.kv.KVPolicy` a cell's ``(policy, config)`` describes for a model
    of ``shape`` (a :class:`~longattn.kv.ModelShape`): the config as stored, with DuoAttention's
    head scores and LightTransfer's lazy layers made concrete for the model."""
    from .. import kv

    if policy == "duo":
        scores = duo_scores(config, shape.num_layers, shape.num_kv_heads)
        return kv.get_policy("duo", scores=scores, retrieval_ratio=config["retrieval_ratio"],
                             sinks=config["sinks"], window=config["window"])
    if policy == "lighttransfer":
        return kv.get_policy("lighttransfer", lazy_layers=lighttransfer_layers(config, shape.num_layers),
                             sinks=config["sinks"], window=config["window"])
    return kv.get_policy(policy, **config)


def check_policy_config(policy: str, config: dict[str, Any]) -> None:
    """Validate a cell's policy config before any model is loaded (the policy dataclass checks
    every field; DuoAttention's and LightTransfer's model-sized data is checked when the cell
    runs, against the model)."""
    from .. import kv

    if policy == "duo":
        kv.get_policy("duo", scores=[[0.0]], retrieval_ratio=config["retrieval_ratio"],
                      sinks=config["sinks"], window=config["window"])
    elif policy == "lighttransfer":
        kv.get_policy("lighttransfer", sinks=config["sinks"], window=config["window"])
    else:
        kv.get_policy(policy, **config)


def is_uncalibrated(policy: str | None, config: dict[str, Any]) -> bool:
    """Whether a cell chose DuoAttention heads / LightTransfer layers without a calibration."""
    return (policy == "duo" and config.get("retrieval_heads") == DUO_DEFAULT_HEADS) or (
        policy == "lighttransfer" and config.get("lazy_scores") == LIGHTTRANSFER_DEFAULT_LAYERS)


__all__ = [
    "BUDGET_POLICIES", "Budget", "build_policy", "check_policy_config", "duo_scores", "is_uncalibrated", "lighttransfer_layers",
    "parse_budget", "policy_config",
]
