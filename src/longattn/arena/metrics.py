"""Fidelity, speed and memory metrics of a method against full attention on the same model
and input.

* per-layer attention-output relative error ``||o_method - o_full|| / ||o_full||``, with
  ``o_full`` computed on the *same* queries/keys/values the method saw in that layer;
* per-layer attention-mass recall: the share of full attention's probability mass that falls
  on the keys the method reads (1 = nothing lost), averaged over heads and queries;
* last-position logit KL divergence ``KL(p_full || p_method)``;
* prefill time, time per decoded token, peak memory (GPU: allocator peak; CPU: not measured).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor

from .. import attention, get_method
from ..backends import causal_token_mask, expand_kv_heads
from ..hf import HeadPlan, attention_probe


def kept_key_mask(q: Tensor, k: Tensor, causal: bool, method: str, config: dict[str, Any]) -> Tensor:
    """``bool [B or 1, Hs, Tq, Tk]``: the keys a method's softmax branches read (for NSA the
    selected blocks and the window; its compressed branch reads summaries, not keys)."""
    spec = get_method(method)
    cfg = spec.make_config(**config)
    Tq, Tk = q.shape[2], k.shape[2]
    if spec.selector is not None:
        return spec.selector(q, k, causal, cfg).to_dense_mask()
    if method == "nsa":
        from ..methods.nsa import nsa_compress, nsa_selection
        from ..methods.window import WindowConfig, select_window

        k_cmp, _ = nsa_compress(k, k, cfg)
        sel = nsa_selection(q, k_cmp, cfg, kv_len=Tk).to_dense_mask()  # [B, Hkv, Tq, Tk]
        window = select_window(q, k, True, WindowConfig(window=cfg.window)).to_dense_mask()  # [1, 1, Tq, Tk]
        return sel | window
    mask = causal_token_mask(Tq, Tk, q.device) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    return mask[None, None]


def mass_recall(q: Tensor, k: Tensor, kept: Tensor, causal: bool, scale: float | None) -> float:
    """Mean over heads and queries of the full-attention probability on ``kept`` keys."""
    H = q.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.float(), expand_kv_heads(k, H).float().transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if causal:
        s = s.masked_fill(~causal_token_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    kept = kept if kept.shape[1] in (1, H) else kept.repeat_interleave(H // kept.shape[1], dim=1)
    return float((p * kept).sum(-1).mean())


class FidelityProbe:
    """Collects per-layer error and recall while a model runs under :func:`attention_probe`."""

    def __init__(self, recall: bool = True) -> None:
        self.recall = recall
        self.layers: dict[int, dict[str, float]] = {}

    def __call__(self, layer, query, key, value, out, causal, scale, plan: list[HeadPlan]) -> None:
        full = attention(query, key, value, method="full", causal=causal, scale=scale, backend="reference")
        err = float((out.float() - full.float()).norm() / full.float().norm().clamp_min(1e-30))
        row = {"rel_error": err}
        if self.recall:
            H = query.shape[1]
            group = H // key.shape[1]
            total, weight = 0.0, 0
            for p in plan:
                heads = list(range(H)) if p.heads is None else list(p.heads)
                kv = sorted({h // group for h in heads})
                q, k = query[:, heads], key[:, kv]
                kept = kept_key_mask(q, k, causal, p.method, p.config)
                total += mass_recall(q, k, kept, causal, scale) * len(heads)
                weight += len(heads)
            row["mass_recall"] = total / weight
        self.layers[layer] = row


def layer_fidelity(model, input_ids: Tensor, recall: bool = True) -> list[dict[str, float]]:
    """Run ``model`` (already under a longattn plan) on ``input_ids`` and return one row per
    layer: ``{"layer", "rel_error", "mass_recall"}``."""
    probe = FidelityProbe(recall)
    with torch.no_grad(), attention_probe(probe):
        model(input_ids, use_cache=False)
    return [{"layer": i, **probe.layers[i]} for i in sorted(probe.layers)]


def logit_kl(ref_logits: Tensor, logits: Tensor) -> float:
    """``KL(softmax(ref) || softmax(logits))`` over the last dim, averaged over the rest."""
    lp = torch.log_softmax(ref_logits.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use what this one takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output):
    return getattr(output, "cache", None) or output.past_key_values


def prefill_and_decode_times(model, input_ids: Tensor, new_tokens: int = 8, repeats: int = 3,
                             cache_factory: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Median prefill time (ms) and median time per decoded token (ms, greedy, with cache),
    plus the peak allocated GPU memory (bytes) of one prefill+decode, or None on CPU.

    ``cache_factory``: called once per timed run for the cache the prefill starts from (a
    KV-policy cache from :func:`longattn.kv.make_cache`); ``None``: the model's own cache."""
    device = input_ids.device
    prefill, decode = [], []
    peak = None
    with torch.no_grad():
        warmup = 1 if device.type == "cuda" else 0  # compilation and autotuning happen on GPU only
        for i in range(repeats + warmup):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            first = {} if cache_factory is None else {_cache_kwarg(model): cache_factory()}
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids, use_cache=True, **first)
            _sync(device)
            t1 = time.perf_counter()
            cache, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                step = model(nxt, **{_cache_kwarg(model): cache}, use_cache=True)
                cache, nxt = _cache_of(step), step.logits[:, -1:].argmax(-1)
            _sync(device)
            t2 = time.perf_counter()
            if i < warmup:
                continue
            prefill.append((t1 - t0) * 1e3)
            decode.append((t2 - t1) * 1e3 / max(1, new_tokens))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
    return {"prefill_ms": statistics.median(prefill), "decode_ms_per_token": statistics.median(decode), "peak_bytes": peak}
