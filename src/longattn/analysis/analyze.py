"""Analyse a model's attention on one prompt: entropy, sinks, head classes, retrieval scores
and attention pictures per layer and query head; written as markdown, JSON and PNGs.

The model runs once under :func:`longattn.hf.attention_probe` with full attention (the model
is switched to ``attn_implementation="longattn"``, method ``full``). Each layer's statistics
are reduced inside the probe (:func:`~longattn.analysis.stats.layer_attention_stats`), so no
attention matrix outlives its layer. With a needle prompt the model first generates its
answer greedily; the probed forward then runs over prompt + answer, the statistics use the
prompt rows and keys only (causal: the answer does not change them), and the answer rows give
each head's most attended key at every generation step for the retrieval score.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .. import hf
from .retrieval import NeedleSpan, argmax_keys, copy_paste_scores, locate_needle
from .stats import AnalysisConfig, LayerStats, layer_attention_stats

NEEDLE_TASKS = ("passkey", "niah")


@dataclass
class Prompt:
    """A tokenised prompt ``ids [1, T]``; ``needle`` and ``sample`` for needle tasks."""

    ids: Tensor
    source: dict[str, Any]
    needle: NeedleSpan | None = None
    sample: Any = None


def needle_prompt(tokenizer: Any, length: int, *, task: str = "passkey", seed: int = 0,
                  depth: float = 0.5, haystack: str | None = None) -> Prompt:
    """A passkey or single-needle NIAH prompt of about ``length`` tokens from the arena's
    task generators, with the answer tokens inside the needle located."""
    from ..arena.tasks import build_prompt, niah, passkey

    check_length(length)
    if task not in NEEDLE_TASKS:
        raise ValueError(f"task must be one of {NEEDLE_TASKS}, got {task!r}")
    kw = {} if haystack is None else {"haystack": haystack}
    sample = (passkey if task == "passkey" else niah)(tokenizer, length, seed, depth=depth, **kw)
    text = build_prompt(sample, tokenizer)
    ids, span = locate_needle(tokenizer, text, sample.metadata["needle"], sample.answer)
    source = {"kind": "task", "task": task, "length": length, "seed": seed, "depth": depth,
              "haystack": sample.metadata.get("haystack"), "tokens": int(ids.shape[1]),
              "answer": sample.answer, "needle": sample.metadata["needle"]}
    return Prompt(ids, source, span, sample)


def text_prompt(tokenizer: Any, path: str | Path, length: int | None = None) -> Prompt:
    """The first ``length`` tokens of a text file (all of it when ``None`` or shorter)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if length is not None:
        check_length(length)
        ids = ids[:, :length]
    if ids.shape[1] < 16:
        raise ValueError(f"{path} has only {ids.shape[1]} tokens; the analysis needs at least 16")
    return Prompt(ids, {"kind": "text", "path": str(path), "tokens": int(ids.shape[1])})


def check_length(length: int) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 16:
        raise ValueError(f"length must be an int of at least 16 tokens, got {length!r}")


def parse_index_list(text: str | None, what: str) -> list[int] | None:
    """``"0,5"`` -> ``[0, 5]``; ``None``/``""`` -> ``None``."""
    if text is None or not str(text).strip():
        return None
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers like 0,5; got {text!r}") from None


def model_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(layers, query heads, KV heads)`` of a transformers model."""
    cfg = model.config
    heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", None) or heads


def check_indices(layers: Sequence[int] | None, heads: Sequence[int] | None, n_layers: int, n_heads: int) -> None:
    """``ValueError`` naming the valid range for any layer or head index out of range."""
    for i in layers or ():
        if not 0 <= i < n_layers:
            raise ValueError(f"layer {i} does not exist; the model has layers 0..{n_layers - 1}")
    for h in heads or ():
        if not 0 <= h < n_heads:
            raise ValueError(f"head {h} does not exist; the model has query heads 0..{n_heads - 1}")


def default_picture_layers(n_layers: int) -> list[int]:
    return sorted({0, n_layers // 2, n_layers - 1})


@dataclass
class AnalysisResult:
    """All layers' statistics plus what produced them."""

    model: str
    prompt: dict[str, Any]
    config: AnalysisConfig
    layers: list[LayerStats]
    answer: dict[str, Any] | None = None
    pictures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "longattn-analysis",
            "version": 1,
            "model": self.model,
            "prompt": self.prompt,
            "answer": self.answer,
            "config": self.config.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "pictures": self.pictures,
        }


def _pad_id(model, tokenizer) -> int | None:
    gen = model.generation_config
    for tid in (gen.pad_token_id, gen.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, (list, tuple)):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    return None


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for tid in (model.generation_config.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, (list, tuple)):
            ids.update(int(t) for t in tid)
        elif tid is not None:
            ids.add(int(tid))
    return ids


def generate_answer(model, tokenizer, ids: Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``ids [1, T]``, cut at the first end-of-sequence token."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=_pad_id(model, tokenizer))
    gen = out[0, ids.shape[1]:].tolist()
    stop = _eos_ids(model, tokenizer)
    for i, t in enumerate(gen):
        if t in stop:
            return gen[:i]
    return gen


def probe_forward(model: torch.nn.Module, ids: Tensor) -> None:
    """One forward without a cache, for the probe's sake: only the last position's logits
    are computed where the model allows it (at 8k tokens the full logits of a 49k vocabulary
    would take 1.6 GB)."""
    import inspect

    kwargs: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    model(ids, **kwargs)


class _AnalysisProbe:
    """Reduces every layer to :class:`LayerStats` (and argmax keys of the answer rows)."""

    def __init__(self, prompt_len: int, answer_rows: range, config: AnalysisConfig,
                 picture_layers: set[int], picture_heads: Sequence[int], max_pixels: int) -> None:
        self.T = prompt_len
        self.rows = answer_rows
        self.config = config
        self.picture_layers = picture_layers
        self.picture_heads = list(picture_heads)
        self.max_pixels = max_pixels
        self.stats: dict[int, LayerStats] = {}
        self.argmax: dict[int, Tensor] = {}

    def __call__(self, layer, query, key, value, out, causal, scale, plan) -> None:
        if not causal:
            raise ValueError("the analysis assumes causal attention")
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        if query.shape[2] != key.shape[2]:
            raise ValueError("the analysis runs one forward without a cache (Tq == Tk)")
        T = self.T
        heads = self.picture_heads if layer in self.picture_layers else ()
        self.stats[layer] = layer_attention_stats(
            query[:, :, :T], key[:, :, :T], scale=scale, config=self.config, layer=layer,
            picture_heads=heads, max_pixels=self.max_pixels)
        if len(self.rows):
            self.argmax[layer] = argmax_keys(query, key, self.rows, scale)[0].cpu()  # [H, n]


def analyze_model(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    *,
    model_name: str = "",
    config: AnalysisConfig = AnalysisConfig(),
    picture_layers: Sequence[int] | None = None,
    picture_heads: Sequence[int] | None = None,
    max_pixels: int = 512,
    max_new_tokens: int = 16,
) -> AnalysisResult:
    """Statistics of every layer and query head of ``model`` on ``prompt`` (batch of one).

    ``picture_layers``/``picture_heads``: which maps to keep (default: first, middle and last
    layer; head 0). With a needle prompt the model's greedy answer (at most
    ``max_new_tokens``) is generated and every head gets its copy-paste retrieval score."""
    n_layers, n_heads, _ = model_shape(model)
    check_indices(picture_layers, picture_heads, n_layers, n_heads)
    layers_pic = set(default_picture_layers(n_layers) if picture_layers is None else picture_layers)
    heads_pic = [0] if picture_heads is None else list(picture_heads)
    ids = prompt.ids.to(next(model.parameters()).device)
    if ids.shape[0] != 1:
        raise ValueError("analyze_model takes one prompt (batch of 1)")
    T = ids.shape[1]
    if T < 16:
        raise ValueError(f"the prompt has {T} tokens; the analysis needs at least 16")
    hf.apply(model, "full")

    generated: list[int] = []
    answer = None
    if prompt.needle is not None:
        generated = generate_answer(model, tokenizer, ids, max_new_tokens)
        reply = tokenizer.decode(generated, skip_special_tokens=True)
        correct = None
        if prompt.sample is not None:
            from ..arena.tasks import score

            correct = bool(score(prompt.sample, reply))
        answer = {"reply": reply, "generated_ids": generated, "correct": correct,
                  "needle": prompt.needle.to_dict()}
    full_ids = torch.cat([ids, torch.tensor([generated], dtype=ids.dtype, device=ids.device)], 1) if generated else ids
    rows = range(T - 1, T - 1 + len(generated))
    probe = _AnalysisProbe(T, rows, config, layers_pic, heads_pic, max_pixels)
    with torch.no_grad(), hf.attention_probe(probe):
        probe_forward(model, full_ids)
    layers = [probe.stats[i] for i in sorted(probe.stats)]

    if generated:
        argmax = torch.stack([probe.argmax[l.layer] for l in layers])  # [L, H, n]
        scores = copy_paste_scores(argmax, generated, full_ids[0].tolist(), prompt.needle)
        for l, row in zip(layers, scores.tolist()):
            l.retrieval_score = row
    prompt_ids = ids[0].tolist()
    for l in layers:
        l.classify(config)
        for s in l.sinks:
            s.token = tokenizer.decode([prompt_ids[s.position]])
    return AnalysisResult(model_name, dict(prompt.source), config, layers, answer)


# --------------------------------------------------------------------------------------------
# output


def _f(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _token_cell(text: str | None) -> str:
    if text is None:
        return "-"
    return "`" + repr(text)[1:-1].replace("|", "\\|").replace("`", "'") + "`"


def markdown_report(result: AnalysisResult) -> str:
    """The analysis as markdown tables."""
    cfg = result.config
    L = result.layers
    H = L[0].num_heads if L else 0
    out = [f"# Attention analysis: {result.model or 'model'}", ""]
    p = result.prompt
    if p.get("kind") == "task":
        out.append(f"Prompt: `{p['task']}` task, {p['tokens']} tokens (target {p['length']}), seed "
                   f"{p['seed']}, needle depth {p['depth']}, haystack `{p.get('haystack')}`.")
    else:
        out.append(f"Prompt: {p.get('tokens')} tokens of `{p.get('path')}`.")
    if result.answer is not None:
        a = result.answer
        out.append(f"Answer `{p.get('answer')}`; the model replied `{a['reply'].strip()}` "
                   f"({'correct' if a['correct'] else 'wrong' if a['correct'] is not None else 'unscored'}).")
    out += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()) + ".", ""]
    out += [
        "Definitions: entropy in nats, mean over all queries; normalised entropy = entropy / log(visible "
        "keys), mean over queries with >= 2 keys. Masses are means over queries at position >= window: "
        "`recent` = attention on the last `window` keys, `sink` = on sinks outside the window (initial "
        "tokens + the head's detected sinks), `top-k far` = on the `retrieval_top_k` largest distant "
        "non-sink keys. Lazy mass (LightTransfer) = recent + initial-token mass, mean over heads.", "",
        "## Per layer", "",
        "| layer | entropy | norm. entropy | lazy mass | retrieval | streaming | local | diffuse | mixed | sinks (position) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for l in L:
        d = l.to_dict()
        counts = {c: (l.classes or []).count(c) for c in ("retrieval", "streaming", "local", "diffuse", "mixed")}
        sinks = ", ".join(str(s.position) + ("*" if s.heads else "") for s in l.sinks)
        out.append(f"| {l.layer} | {_f(d['mean_entropy'])} | {_f(d['mean_norm_entropy'])} | {_f(l.lazy_mass)} | "
                   + " | ".join(str(counts[c]) for c in counts) + f" | {sinks} |")
    out += ["", "`*`: a sink in at least one head (position 0 is always listed).", ""]

    letters = {"retrieval": "R", "streaming": "S", "local": "L", "diffuse": "D", "mixed": "·"}
    out += ["## Head classes", "", "R retrieval, S streaming, L local, D diffuse, · mixed.", "",
            "| layer | " + " | ".join(f"h{h}" for h in range(H)) + " |", "|---|" + "---|" * H]
    for l in L:
        out.append(f"| {l.layer} | " + " | ".join(letters[c] for c in (l.classes or ["mixed"] * H)) + " |")

    for title, attr in (("Normalised entropy", "norm_entropy"), ("Recent-window mass", "recent_mass"),
                        ("Sink mass", "sink_mass"), ("Distant top-k mass", "far_topk_mass"),
                        ("Retrieval score (copy-paste)", "retrieval_score")):
        if not L or getattr(L[0], attr) is None:
            continue
        out += ["", f"## {title}", "", "| layer | " + " | ".join(f"h{h}" for h in range(H)) + " |", "|---|" + "---|" * H]
        for l in L:
            out.append(f"| {l.layer} | " + " | ".join(_f(x, 2) for x in getattr(l, attr)) + " |")

    out += ["", "## Sinks", "",
            f"A key is a sink in a head when its mean attention from queries at distance >= {cfg.window} is at "
            f"least {cfg.sink_factor} x their uniform share 1/n. `share`: mean over the layer's heads of that "
            "mean attention; `lift`: largest share / uniform share over heads.", "",
            "| layer | position | token | initial | share | share (max head) | lift | heads |",
            "|---|---|---|---|---|---|---|---|"]
    for l in L:
        for s in l.sinks:
            out.append(f"| {l.layer} | {s.position} | {_token_cell(s.token)} | {'yes' if s.initial else 'no'} | "
                       f"{_f(s.share)} | {_f(s.share_max)} | {_f(s.lift_max, 1)} | "
                       f"{','.join(map(str, s.heads)) or '-'} |")
    if L and L[0].retrieval_score is not None:
        ranked = sorted(((score, l.layer, h) for l in L for h, score in enumerate(l.retrieval_score)), reverse=True)
        out += ["", "## Top retrieval heads", "", "| rank | layer | head | score |", "|---|---|---|---|"]
        for r, (score, layer, h) in enumerate(ranked[:10]):
            out.append(f"| {r + 1} | {layer} | {h} | {_f(score)} |")
    if result.pictures:
        out += ["", "## Pictures", ""] + [f"![{name}]({name})" for name in result.pictures]
    return "\n".join(out) + "\n"


def write_outputs(result: AnalysisResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``analysis.json`` and the PNGs (each kept attention map, the
    normalised-entropy and head-class grids) to ``out_dir``; returns their paths by name."""
    from .pictures import attention_map_png, class_grid_png, heatmap_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    names: list[str] = []
    for l in result.layers:
        for h, pooled in sorted(l.pictures.items()):
            name = f"attn_L{l.layer:02d}_H{h:02d}.png"
            cls = l.classes[h] if l.classes else ""
            sinks = sorted({0} | set(l.head_sinks[h]))
            title = f"{result.model} layer {l.layer} head {h} ({cls}); {l.q_len} tokens, {l.picture_block}-token tiles"
            paths[name] = attention_map_png(pooled, out / name, block=l.picture_block, title=title, sinks=sinks)
            names.append(name)
    if result.layers:
        paths["entropy.png"] = heatmap_png([l.norm_entropy for l in result.layers], out / "entropy.png",
                                           title="normalised attention entropy", label="entropy / log(keys)",
                                           vmin=0.0, vmax=1.0)
        paths["head_classes.png"] = class_grid_png([l.classes or [] for l in result.layers],
                                                   out / "head_classes.png", title="head classes")
        names += ["entropy.png", "head_classes.png"]
    result.pictures = names
    (out / "analysis.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    paths["analysis.json"] = out / "analysis.json"
    (out / "report.md").write_text(markdown_report(result))
    paths["report.md"] = out / "report.md"
    return paths


__all__ = [
    "AnalysisResult", "NEEDLE_TASKS", "Prompt", "analyze_model", "check_indices", "check_length",
    "default_picture_layers", "generate_answer", "markdown_report", "model_shape", "needle_prompt",
    "parse_index_list", "probe_forward", "text_prompt", "write_outputs",
]
