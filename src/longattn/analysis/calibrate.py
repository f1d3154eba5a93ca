"""Calibration: measure a model once, save what methods need as a versioned JSON file.

Three calibrations, each a function returning a :class:`Calibration`:

* ``duo`` -- :func:`calibrate_duo` (DuoAttention, Xiao et al. 2024): a gate
  ``alpha in [0, 1]`` per (layer, KV head) mixes full attention with streaming attention
  (``sink`` initial tokens + the last ``window`` keys): ``o = alpha * full + (1 - alpha) *
  streaming``. The model is frozen; only the gates are trained, on synthetic passkey samples,
  to minimise the distillation loss of the final hidden states against full attention plus
  ``lam`` times the L1 norm of the gates. The KV heads with the largest gates (a ``ratio`` of
  them) are the retrieval heads (full attention); the rest are streaming heads.
* ``lighttransfer`` -- :func:`calibrate_lighttransfer` (LightTransfer, 2025): a layer is lazy
  when its attention (mean over heads and queries) sits on the initial tokens and the recent
  window; layers are ranked by that mass and the laziest ``ratio`` of them are marked lazy
  (to run streaming attention).
* ``headkv`` -- :func:`calibrate_headkv` (Retrieval Head, Wu et al. 2024): each query head's
  copy-paste retrieval score on needle samples (:mod:`.retrieval`), ranked; the top ``ratio``
  are marked retrieval heads.

Files (:func:`save_calibration`, :func:`load_calibration`)::

    {"format": "longattn-calibration", "version": 1, "model": "smollm2-135m",
     "method": "duo" | "lighttransfer" | "headkv", "ratio": 0.5, "date": "<ISO 8601>",
     "tool_version": "<longattn.__version__>", "data": {...}}

``data`` always holds ``num_layers``, ``num_heads``, ``num_kv_heads`` and ``settings`` (how it
was measured), plus per method: duo -- ``alpha`` ``[L][Hkv]``, ``retrieval`` ``[L][Hkv]``
bools, ``sink``, ``window``, ``loss`` (one entry per step); lighttransfer -- ``lazy_mass``
``[L]``, ``lazy`` ``[L]`` bools, ``window``, ``sink``; headkv -- ``scores`` ``[L][H]``,
``retrieval`` ``[L][H]`` bools, ``threshold``. :func:`apply_calibration` turns a duo or
lighttransfer file into a :mod:`longattn.hf` plan.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

FORMAT = "longattn-calibration"
VERSION = 1
METHODS = ("duo", "lighttransfer", "headkv")
DUO_ATTN_IMPLEMENTATION = "longattn_duo"


class CalibrationError(ValueError):
    """A calibration file that is not one this version of longattn can read."""


@dataclass
class Calibration:
    """One calibration: the fields of the file (see the module docstring)."""

    model: str
    method: str
    ratio: float
    data: dict[str, Any]
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    tool_version: str = ""
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self) -> None:
        if not self.tool_version:
            from .. import __version__

            self.tool_version = __version__

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "model": self.model, "method": self.method,
                "ratio": self.ratio, "date": self.date, "tool_version": self.tool_version, "data": self.data}


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float in ``[0, 1]``, else ``ValueError``."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}") from None
    if not 0.0 <= r <= 1.0:  # also rejects NaN
        raise ValueError(f"ratio must lie in [0, 1] (a fraction of heads or layers), got {ratio!r}")
    return r


def top_fraction(scores: Sequence[float], ratio: float) -> list[bool]:
    """Flags for the ``round(ratio * n)`` largest scores (ties: earlier index first)."""
    n = len(scores)
    k = int(round(check_ratio(ratio) * n))
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    chosen = set(order[:k])
    return [i in chosen for i in range(n)]


def _split(flat: Sequence[Any], rows: int) -> list[list[Any]]:
    width = len(flat) // rows
    return [list(flat[i * width:(i + 1) * width]) for i in range(rows)]


# --------------------------------------------------------------------------------------------
# files


def save_calibration(cal: Calibration, path: str | Path) -> Path:
    """Write ``cal`` as JSON (validated first, so a file that is written can be read)."""
    d = cal.to_dict()
    _validate(d, str(path))
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=1) + "\n")
    return path


_REQUIRED_DATA = {
    "duo": {"alpha": 2, "retrieval": 2, "sink": 0, "window": 0},
    "lighttransfer": {"lazy_mass": 1, "lazy": 1, "window": 0, "sink": 0},
    "headkv": {"scores": 2, "retrieval": 2},
}


def _validate(d: Any, where: str) -> None:
    def bad(msg: str) -> CalibrationError:
        return CalibrationError(f"{where}: {msg}")

    if not isinstance(d, dict):
        raise bad("not a calibration file (the JSON is not an object)")
    if d.get("format") != FORMAT:
        raise bad(f"not a calibration file: format is {d.get('format')!r}, expected {FORMAT!r}")
    version = d.get("version")
    if version != VERSION:
        raise bad(f"calibration format version {version!r} is not supported by this longattn (it reads "
                  f"version {VERSION}); recalibrate with `longattn calibrate` or upgrade longattn")
    for key in ("model", "method", "ratio", "date", "tool_version", "data"):
        if key not in d:
            raise bad(f"missing the field {key!r}")
    if d["method"] not in METHODS:
        raise bad(f"unknown method {d['method']!r}; expected one of {METHODS}")
    if not isinstance(d["ratio"], (int, float)) or isinstance(d["ratio"], bool) or not 0 <= d["ratio"] <= 1:
        raise bad(f"ratio must be a number in [0, 1], got {d['ratio']!r}")
    data = d["data"]
    if not isinstance(data, dict):
        raise bad("data must be an object")
    for key in ("num_layers", "num_heads", "num_kv_heads"):
        if not isinstance(data.get(key), int) or data[key] < 1:
            raise bad(f"data.{key} must be a positive int, got {data.get(key)!r}")
    L, H, Hkv = data["num_layers"], data["num_heads"], data["num_kv_heads"]
    width = {"duo": Hkv, "headkv": H}.get(d["method"])
    for key, dims in _REQUIRED_DATA[d["method"]].items():
        if key not in data:
            raise bad(f"data.{key} is missing (needed by method {d['method']!r})")
        value = data[key]
        if dims == 0 and not (isinstance(value, int) and value >= 0):
            raise bad(f"data.{key} must be a non-negative int, got {value!r}")
        if dims == 1 and not (isinstance(value, list) and len(value) == L):
            raise bad(f"data.{key} must be a list of {L} values (one per layer)")
        if dims == 2 and not (isinstance(value, list) and len(value) == L
                              and all(isinstance(row, list) and len(row) == width for row in value)):
            raise bad(f"data.{key} must be {L} lists of {width} values")


def load_calibration(path: str | Path) -> Calibration:
    """Read and validate a calibration file; :class:`CalibrationError` says what is wrong
    (not JSON, another format, an unsupported version, a missing or malformed field)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{path}: not a calibration file (invalid JSON: {err})") from None
    _validate(d, str(path))
    return Calibration(model=d["model"], method=d["method"], ratio=float(d["ratio"]), data=d["data"],
                       date=d["date"], tool_version=d["tool_version"], format=d["format"], version=d["version"])


def apply_calibration(model: torch.nn.Module, cal: Calibration, *, backend: str = "auto") -> torch.nn.Module:
    """Run ``model`` as the calibration says, through :func:`longattn.hf.apply`: DuoAttention
    streaming KV heads (all their query heads) and LightTransfer lazy layers get method
    ``sink`` with the file's ``sink``/``window``; everything else ``full``. ``headkv`` files
    rank heads and are not a plan (``ValueError``)."""
    from .. import hf
    from .analyze import model_shape

    L, H, Hkv = model_shape(model)
    data = cal.data
    if (data["num_layers"], data["num_heads"], data["num_kv_heads"]) != (L, H, Hkv):
        raise ValueError(f"the calibration is for {data['num_layers']} layers x {data['num_heads']}/"
                         f"{data['num_kv_heads']} heads; the model has {L} x {H}/{Hkv}")
    stream = {"sink": int(data["sink"]), "window": int(data["window"])} if cal.method != "headkv" else {}
    hf.apply(model, "full", backend=backend)
    if cal.method == "duo":
        group = H // Hkv
        for layer, flags in enumerate(data["retrieval"]):
            heads = [kv * group + r for kv, full in enumerate(flags) if not full for r in range(group)]
            if heads:
                hf.apply(model, "sink", layers=[layer], heads=heads, backend=backend, **stream)
    elif cal.method == "lighttransfer":
        lazy = [i for i, flag in enumerate(data["lazy"]) if flag]
        if lazy:
            hf.apply(model, "sink", layers=lazy, backend=backend, **stream)
    else:
        raise ValueError("a headkv calibration ranks heads by retrieval score; it is not an attention plan")
    return model


# --------------------------------------------------------------------------------------------
# synthetic data


@dataclass
class NeedleExample:
    """One tokenised needle sample: ``ids [1, T]`` = prompt + answer; ``prompt_len`` tokens
    of prompt. ``span`` locates the answer inside the needle."""

    ids: Tensor
    prompt_len: int
    prompt: Any  # analyze.Prompt


def needle_examples(tokenizer: Any, *, task: str, length: int, samples: int, seed: int = 0,
                    haystack: str | None = None) -> list[NeedleExample]:
    """``samples`` needle prompts at depths spread evenly over ``[0.1, 0.9]`` with seeds
    ``seed, seed+1, ...``, each followed by its answer (`` <answer>.``) for teacher forcing."""
    from .analyze import needle_prompt

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    out = []
    for i in range(samples):
        depth = 0.5 if samples == 1 else 0.1 + 0.8 * i / (samples - 1)
        prompt = needle_prompt(tokenizer, length, task=task, seed=seed + i, depth=round(depth, 4), haystack=haystack)
        answer = tokenizer(" " + prompt.source["answer"] + ".", add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([prompt.ids, answer], 1)
        out.append(NeedleExample(ids, prompt.ids.shape[1], prompt))
    return out


# --------------------------------------------------------------------------------------------
# DuoAttention


@dataclass
class _DuoState:
    gates: Tensor  # [L, Hkv], the alphas
    sink: int
    window: int


_duo_state: contextvars.ContextVar[_DuoState | None] = contextvars.ContextVar("longattn_duo", default=None)


def streaming_mask(q_len: int, kv_len: int, sink: int, window: int, device: torch.device | str = "cpu") -> Tensor:
    """``bool [Tq, Tk]``: the keys a streaming head sees -- causal, and either one of the
    first ``sink`` keys or at distance ``< window`` (StreamingLLM; same keys as the ``sink``
    method)."""
    qpos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    kpos = torch.arange(kv_len, device=device)[None, :]
    return (kpos <= qpos) & ((kpos < sink) | (qpos - kpos < window))


def duo_mixed_attention(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, *, sink: int, window: int,
                        scale: float | None = None) -> Tensor:
    """DuoAttention's training-time mixture ``alpha * full + (1 - alpha) * streaming``.

    ``q [B, H, T, D]``, ``k/v [B, Hkv, T, D]``, ``alpha [Hkv]`` (one gate per KV head, shared
    by its query heads) -> ``[B, H, T, D]``. Causal; differentiable in ``alpha`` and the
    inputs."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    gqa = H != Hkv
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = streaming_mask(T, k.shape[2], sink, window, q.device)
    stream = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    a = alpha.to(q.dtype).repeat_interleave(H // Hkv)[None, :, None, None]  # [1, H, 1, 1]
    return a * full + (1 - a) * stream


def _duo_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function for gate training: ``([B, T, H, D], None)``."""
    from ..hf import _is_plain_causal

    state = _duo_state.get()
    if state is None:
        raise RuntimeError("the longattn_duo attention runs only inside duo_gates(...)")
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError("DuoAttention gate training runs whole sequences without a cache")
    if attention_mask is not None and not _is_plain_causal(attention_mask, query.shape[2], key.shape[2]):
        raise NotImplementedError("DuoAttention gate training takes unpadded single sequences")
    out = duo_mixed_attention(query, key, value, state.gates[int(module.layer_idx)],
                              sink=state.sink, window=state.window, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def duo_gates(model: torch.nn.Module, gates: Tensor, *, sink: int, window: int) -> Iterator[None]:
    """Within this block ``model`` runs DuoAttention's gated mixture with ``gates [L, Hkv]``
    (gradients flow to ``gates``); the model's attention implementation is restored after."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DUO_ATTN_IMPLEMENTATION, _duo_attention_forward)
    AttentionMaskInterface.register(DUO_ATTN_IMPLEMENTATION, sdpa_mask)
    previous = model.config._attn_implementation
    token = _duo_state.set(_DuoState(gates, sink, window))
    model.set_attn_implementation(DUO_ATTN_IMPLEMENTATION)
    try:
        yield
    finally:
        _duo_state.reset(token)
        model.set_attn_implementation(previous)


def _final_hidden(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """The last layer's hidden states (after the final norm) ``[B, T, hidden]``; the logits
    of all but the last position are skipped where the model allows it."""
    import inspect

    kwargs: dict[str, Any] = {"use_cache": False, "output_hidden_states": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return model(ids, **kwargs).hidden_states[-1]


@dataclass
class DuoResult:
    alpha: Tensor  # [L, Hkv]
    loss: list[dict[str, float]]


def optimize_duo_gates(
    model: torch.nn.Module,
    batches: Sequence[tuple[Tensor, slice]],
    *,
    steps: int = 50,
    lr: float = 0.02,
    lam: float = 0.05,
    sink: int = 4,
    window: int = 64,
    init: float = 1.0,
) -> DuoResult:
    """Train DuoAttention's gates on ``batches`` (``(ids [1, T], rows)``: the loss is taken on
    hidden-state rows ``rows``), one batch per step in turn, with Adam; gates are clamped to
    ``[0, 1]`` after every step (as in the paper). Model weights stay frozen.

    Loss per step: ``mean((h_mixed - h_full)^2)`` over the chosen rows and hidden dims, plus
    ``lam * mean(alpha)`` (the paper's L1 norm ``sum |alpha|``, divided by the number of gates
    so ``lam`` does not scale with model size; gates are non-negative). The full-attention
    targets are computed once per batch. Returns the final gates and per-step losses."""
    from .analyze import model_shape

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (lr > 0) or not (lam >= 0):
        raise ValueError(f"need lr > 0 and lam >= 0, got lr={lr!r}, lam={lam!r}")
    if not 0.0 <= init <= 1.0:
        raise ValueError(f"init must lie in [0, 1], got {init!r}")
    if not batches:
        raise ValueError("no batches to train on")
    L, _, Hkv = model_shape(model)
    device = next(model.parameters()).device
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        targets = []
        ones = torch.ones(L, Hkv, device=device)
        with torch.no_grad(), duo_gates(model, ones, sink=sink, window=window):
            for ids, rows in batches:
                targets.append(_final_hidden(model, ids.to(device))[:, rows].float())
        gates = torch.full((L, Hkv), float(init), device=device, requires_grad=True)
        opt = torch.optim.Adam([gates], lr=lr)
        history = []
        for step in range(steps):
            ids, rows = batches[step % len(batches)]
            with duo_gates(model, gates, sink=sink, window=window):
                hidden = _final_hidden(model, ids.to(device))[:, rows].float()
            distill = (hidden - targets[step % len(batches)]).pow(2).mean()
            reg = gates.abs().mean()
            loss = distill + lam * reg
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            history.append({"step": step, "loss": loss.item(), "distill": distill.item(), "reg": reg.item()})
        return DuoResult(gates.detach().cpu(), history)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)


def calibrate_duo(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    model_name: str,
    length: int = 512,
    samples: int = 4,
    steps: int = 40,
    lr: float = 0.02,
    lam: float = 0.05,
    sink: int = 4,
    window: int = 64,
    ratio: float = 0.5,
    seed: int = 0,
    haystack: str = "synthetic",
) -> Calibration:
    """DuoAttention gates learned on ``samples`` synthetic passkey prompts of ``length``
    tokens; the distillation loss is on the rows that predict the answer (teacher-forced
    `` <key>.``). The paper trains 2000 steps at lr 0.02 on 1k-32k tokens with a larger
    streaming budget; defaults here are sized for minutes on a CPU."""
    from .analyze import check_length, model_shape

    check_length(length)
    ratio = check_ratio(ratio)
    L, H, Hkv = model_shape(model)
    examples = needle_examples(tokenizer, task="passkey", length=length, samples=samples, seed=seed, haystack=haystack)
    batches = [(ex.ids, slice(ex.prompt_len - 1, ex.ids.shape[1] - 1)) for ex in examples]
    result = optimize_duo_gates(model, batches, steps=steps, lr=lr, lam=lam, sink=sink, window=window)
    alpha = result.alpha.tolist()
    flags = _split(top_fraction([a for row in alpha for a in row], ratio), L)
    data = {
        "num_layers": L, "num_heads": H, "num_kv_heads": Hkv,
        "alpha": alpha, "retrieval": flags, "sink": sink, "window": window, "loss": result.loss,
        "settings": {"task": "passkey", "length": length, "samples": samples, "steps": steps, "lr": lr,
                     "lam": lam, "seed": seed, "haystack": haystack,
                     "prompt_tokens": [ex.prompt_len for ex in examples]},
    }
    return Calibration(model=model_name, method="duo", ratio=ratio, data=data)


# --------------------------------------------------------------------------------------------
# LightTransfer


def lazy_layers(lazy_mass: Sequence[float], ratio: float) -> list[bool]:
    """LightTransfer's choice: the ``round(ratio * L)`` layers with the most attention on
    initial + recent tokens are lazy."""
    return top_fraction(list(lazy_mass), ratio)


def calibrate_lighttransfer(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    model_name: str,
    length: int = 1024,
    samples: int = 2,
    ratio: float = 0.5,
    window: int = 64,
    sink: int = 4,
    seed: int = 0,
    task: str = "niah",
    haystack: str | None = None,
) -> Calibration:
    """Per-layer laziness (mean over heads and over queries at position ``>= window`` of the
    attention on the first ``sink`` tokens plus the last ``window`` keys), averaged over
    ``samples`` needle prompts; the laziest ``ratio`` of layers are marked lazy."""
    from .. import hf
    from .analyze import check_length, model_shape, probe_forward
    from .stats import AnalysisConfig, layer_attention_stats

    check_length(length)
    ratio = check_ratio(ratio)
    L, H, Hkv = model_shape(model)
    cfg = AnalysisConfig(window=window, sink_tokens=sink)
    examples = needle_examples(tokenizer, task=task, length=length, samples=samples, seed=seed, haystack=haystack)
    totals = [0.0] * L
    hf.apply(model, "full")
    for ex in examples:
        ids = ex.prompt.ids.to(next(model.parameters()).device)
        seen: dict[int, float] = {}

        def probe(layer, q, k, v, out, causal, scale, plan):
            seen[layer] = layer_attention_stats(q, k, scale=scale, config=cfg, layer=layer).lazy_mass

        with torch.no_grad(), hf.attention_probe(probe):
            probe_forward(model, ids)
        for i in range(L):
            totals[i] += seen[i] / len(examples)
    flags = lazy_layers(totals, ratio)
    data = {
        "num_layers": L, "num_heads": H, "num_kv_heads": Hkv,
        "lazy_mass": totals, "lazy": flags, "window": window, "sink": sink,
        "rank": sorted(range(L), key=lambda i: (-totals[i], i)),
        "settings": {"task": task, "length": length, "samples": samples, "seed": seed,
                     "haystack": examples[0].prompt.source.get("haystack")},
    }
    return Calibration(model=model_name, method="lighttransfer", ratio=ratio, data=data)


# --------------------------------------------------------------------------------------------
# Retrieval heads (headkv)


def retrieval_head_scores(model: torch.nn.Module, tokenizer: Any, prompt: Any, *,
                          max_new_tokens: int = 16) -> tuple[Tensor, dict[str, Any]]:
    """Copy-paste retrieval scores ``[L, H]`` of every query head on one needle prompt: the
    model generates its answer greedily, then one forward over prompt + answer gives each
    head's most attended key at every generation step. Also returns the reply and whether
    it was correct."""
    from .. import hf
    from .analyze import generate_answer, probe_forward
    from .retrieval import argmax_keys, copy_paste_scores

    device = next(model.parameters()).device
    ids = prompt.ids.to(device)
    T = ids.shape[1]
    hf.apply(model, "full")
    generated = generate_answer(model, tokenizer, ids, max_new_tokens)
    reply = tokenizer.decode(generated, skip_special_tokens=True)
    correct = None
    if prompt.sample is not None:
        from ..arena.tasks import score

        correct = bool(score(prompt.sample, reply))
    L = model.config.num_hidden_layers
    if not generated:
        return torch.zeros(L, model.config.num_attention_heads, dtype=torch.float64), {"reply": reply, "correct": correct}
    full_ids = torch.cat([ids, torch.tensor([generated], dtype=ids.dtype, device=device)], 1)
    rows = range(T - 1, T - 1 + len(generated))
    found: dict[int, Tensor] = {}

    def probe(layer, q, k, v, out, causal, scale, plan):
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        found[layer] = argmax_keys(q, k, rows, s)[0].cpu()

    with torch.no_grad(), hf.attention_probe(probe):
        probe_forward(model, full_ids)
    argmax = torch.stack([found[i] for i in range(L)])
    return copy_paste_scores(argmax, generated, full_ids[0].tolist(), prompt.needle), {"reply": reply, "correct": correct}


def calibrate_headkv(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    model_name: str,
    length: int = 1024,
    samples: int = 4,
    ratio: float = 0.05,
    seed: int = 0,
    task: str = "niah",
    haystack: str | None = None,
    threshold: float = 0.1,
) -> Calibration:
    """Retrieval scores averaged over the needle samples the model answered correctly (the
    paper scores only successful retrievals; if none succeeded, over all samples, and
    ``data.settings.used_failed_samples`` says so). The top ``ratio`` of query heads are
    marked; ``threshold`` (the paper's 0.1) is recorded for consumers that cut by score."""
    from .analyze import check_length, model_shape

    check_length(length)
    ratio = check_ratio(ratio)
    L, H, Hkv = model_shape(model)
    examples = needle_examples(tokenizer, task=task, length=length, samples=samples, seed=seed, haystack=haystack)
    per_sample, replies = [], []
    for ex in examples:
        scores, info = retrieval_head_scores(model, tokenizer, ex.prompt)
        per_sample.append(scores)
        replies.append(info)
    good = [s for s, info in zip(per_sample, replies) if info["correct"]]
    used_failed = not good
    mean = torch.stack(good or per_sample).mean(0)
    flat = mean.flatten().tolist()
    data = {
        "num_layers": L, "num_heads": H, "num_kv_heads": Hkv,
        "scores": mean.tolist(), "retrieval": _split(top_fraction(flat, ratio), L), "threshold": threshold,
        "rank": [[i // H, i % H] for i in sorted(range(len(flat)), key=lambda i: (-flat[i], i))],
        "settings": {"task": task, "length": length, "samples": samples, "seed": seed,
                     "correct": sum(bool(r["correct"]) for r in replies), "used_failed_samples": used_failed,
                     "replies": [r["reply"] for r in replies]},
    }
    return Calibration(model=model_name, method="headkv", ratio=ratio, data=data)


__all__ = [
    "Calibration", "CalibrationError", "DuoResult", "FORMAT", "METHODS", "VERSION", "apply_calibration",
    "calibrate_duo", "calibrate_headkv", "calibrate_lighttransfer", "check_ratio", "duo_gates",
    "duo_mixed_attention", "lazy_layers", "load_calibration", "needle_examples", "optimize_duo_gates",
    "retrieval_head_scores", "save_calibration", "streaming_mask", "top_fraction",
]
