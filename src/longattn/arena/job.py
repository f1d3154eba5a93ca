"""The arena's unit of work: one method on one task sample inside one model.

For a :class:`~longattn.arena.store.Cell` it builds the seeded task sample, switches the
model's attention to the cell's method through :mod:`longattn.hf`, and measures against full
attention on the same input: task score (greedy generation), per-layer output error and
attention-mass recall, achieved density, last-position logit KL, prefill time, time per
decoded token and peak GPU memory.

A cell with a KV-cache ``policy`` (:mod:`longattn.kv`) keeps the attention method ``full`` and
runs the prefill and greedy generation with ``past_key_values=make_cache(model, policy)`` (the
argument is ``cache`` from transformers 5.2x on)
(:meth:`ArenaJob.run_policy`): task score, the bytes the cache holds at the end against a full
cache, the bytes read by decoding steps against full attention, logit KL at the first decoding
step, time per decoded token and peak GPU memory. Per-layer fidelity is not measured for these
cells: the policy's cache computes the attention itself, and the attention probe does not see
those calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import get_method, hf
from .budget import build_policy
from .metrics import FidelityProbe, _cache_kwarg, _cache_of, logit_kl, prefill_and_decode_times
from .store import Cell
from .tasks import DEPTH_TASKS, build_prompt, depth_grid, make_sample, max_new_tokens, score

DEPTHS = depth_grid(5)


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1500"`` -> 1500."""
    t = str(text).strip().lower()
    try:
        value = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise ValueError(f"length {text!r} is not a number of tokens like 2048 or 2k") from None
    if value < 16:
        raise ValueError(f"length {text!r} is below 16 tokens")
    return value


class ArenaJob:
    """Holds the model and tokenizer; ``job(cell) -> metrics``.

    ``fidelity``: compute per-layer error / recall / density (one extra forward, and the
    ``T x T`` full-attention probabilities of one layer at a time); ``timing``: measure prefill
    and decode times (``repeats`` timed runs after a warm-up)."""

    def __init__(self, model, tokenizer, *, model_name: str, fidelity: bool = True, timing: bool = True,
                 repeats: int = 1, decode_tokens: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.fidelity = fidelity
        self.timing = timing
        self.repeats = repeats
        self.decode_tokens = decode_tokens
        self.device = next(model.parameters()).device
        self._full_logits: dict[tuple, torch.Tensor] = {}
        hf.register()

    def sample_of(self, cell: Cell):
        depth = DEPTHS[cell.sample % len(DEPTHS)] if cell.task in DEPTH_TASKS else None
        seed = cell.seed * 100_003 + cell.sample
        return make_sample(cell.task, self.tokenizer, cell.length, seed, depth=depth)

    def _ids(self, prompt: str) -> torch.Tensor:
        enc = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        return enc.input_ids.to(self.device)

    def _pad_id(self) -> int | None:
        """The model's pad token, else its end-of-sequence token, else the tokenizer's."""
        gen = self.model.generation_config
        for tid in (gen.pad_token_id, gen.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(tid, (list, tuple)):
                tid = tid[0] if tid else None
            if tid is not None:
                return int(tid)
        return None

    def _last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids, use_cache=False).logits[:, -1].float().cpu()

    def _full_reference(self, cell: Cell, ids: torch.Tensor) -> dict[str, Any]:
        """Full attention on the cell's sample (computed once per sample, kept): the prompt's
        last logits, the greedy first token and the logits of the first decoding step."""
        key = ("ref", cell.task, cell.length, cell.sample, cell.seed)
        if key not in self._full_logits:
            hf.apply(self.model, "full")
            with torch.no_grad():
                out = self.model(ids, use_cache=True)
                first = out.logits[:, -1:].argmax(-1)  # [B, 1]
                step = self.model(first, **{_cache_kwarg(self.model): _cache_of(out)}, use_cache=True)
            self._full_logits[key] = {
                "prefill": out.logits[:, -1].float().cpu(), "first": first.cpu(),
                "step": step.logits[:, -1].float().cpu(),
            }
        return self._full_logits[key]

    def run_policy(self, cell: Cell) -> dict[str, Any]:
        """Metrics of a KV-policy cell (see the module docstring): ``score``, ``reply``,
        ``kv_bytes`` (held by the cache after the last generated token), ``full_kv_bytes``,
        ``kv_ratio``, ``meta_bytes`` (the policy's bookkeeping), ``bytes_read`` /
        ``full_bytes_read`` / ``read_ratio`` over the decoding steps, ``kl`` (KL of full
        attention's logits against the policy's at the first decoding step, the first logits
        the policy's cache changes; ``None`` if the first generated tokens differ),
        ``kl_prefill`` (at the prompt's last position, which every policy attends exactly),
        ``decode_ms_per_token`` / ``prefill_ms`` (when timing), ``peak_bytes`` (CUDA; the
        generation's peak) and ``policy_resolved`` (the policy's repr, with DuoAttention's
        heads and LightTransfer's layers made concrete)."""
        from .. import kv

        sample = self.sample_of(cell)
        ids = self._ids(build_prompt(sample, self.tokenizer))
        ref = self._full_reference(cell, ids)
        hf.apply(self.model, "full")  # a cache refuses a sparse method plan on its layers
        policy = build_policy(cell.policy, cell.policy_config, kv.ModelShape.of(self.model))
        metrics: dict[str, Any] = {"prompt_tokens": int(ids.shape[1]), "depth": sample.depth,
                                   "policy_resolved": repr(policy)}
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        cache = kv.make_cache(self.model, policy)
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens(sample),
                do_sample=False, pad_token_id=self._pad_id(), output_logits=True, return_dict_in_generate=True,
                **{_cache_kwarg(self.model): cache},
            )
        metrics["peak_bytes"] = None
        if cuda:
            torch.cuda.synchronize(self.device)
            metrics["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        new = out.sequences[0, ids.shape[1]:]
        reply = self.tokenizer.decode(new, skip_special_tokens=True)
        metrics["score"] = score(sample, reply)
        metrics["reply"] = reply[:200]
        metrics["generated_tokens"] = int(new.shape[0])
        held, full_kv = cache.kv_bytes(), cache.full_kv_bytes()
        read, full_read = cache.bytes_read(), cache.full_bytes_read()
        metrics.update({
            "kv_bytes": held, "full_kv_bytes": full_kv, "kv_ratio": held / full_kv if full_kv else None,
            "meta_bytes": cache.meta_bytes(), "bytes_read": read, "full_bytes_read": full_read,
            "read_ratio": read / full_read if full_read else None,
        })
        logits = out.logits  # one [B, V] per generated token
        metrics["kl_prefill"] = logit_kl(ref["prefill"], logits[0].float().cpu())
        same_first = bool(torch.equal(new[:1].cpu(), ref["first"][0]))
        metrics["kl"] = logit_kl(ref["step"], logits[1].float().cpu()) if same_first and len(logits) > 1 else None
        del cache, out
        if self.timing:
            times = prefill_and_decode_times(self.model, ids, self.decode_tokens, self.repeats,
                                             cache_factory=lambda: kv.make_cache(self.model, policy))
            peak = metrics["peak_bytes"]
            metrics.update(times)
            metrics["peak_bytes"] = peak if peak is not None else times["peak_bytes"]
        return metrics

    def __call__(self, cell: Cell) -> dict[str, Any]:
        if cell.policy is not None:
            return self.run_policy(cell)
        sample = self.sample_of(cell)
        ids = self._ids(build_prompt(sample, self.tokenizer))
        key = (cell.task, cell.length, cell.sample, cell.seed)
        if key not in self._full_logits:
            hf.apply(self.model, "full")
            self._full_logits[key] = self._last_logits(ids)
        hf.apply(self.model, cell.method, **cell.config)
        metrics: dict[str, Any] = {"prompt_tokens": int(ids.shape[1]), "depth": sample.depth}

        with torch.no_grad():
            # the explicit all-ones mask: without one, generate() infers padding from the pad
            # token id, and a pad id that also occurs in the prompt (a chat template's special
            # tokens) would mask those prompt tokens
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens(sample),
                do_sample=False, pad_token_id=self._pad_id(),
            )
        reply = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        metrics["score"] = score(sample, reply)
        metrics["reply"] = reply[:200]

        if self.fidelity:
            probe = DensityFidelityProbe(cell.method, cell.config)
            with torch.no_grad(), hf.attention_probe(probe):
                logits = self.model(ids, use_cache=False).logits[:, -1].float().cpu()
            layers = [probe.layers[i] for i in sorted(probe.layers)]
            metrics["layer_rel_error"] = [r["rel_error"] for r in layers]
            metrics["layer_mass_recall"] = [r["mass_recall"] for r in layers]
            metrics["density"] = sum(r["density"] for r in layers) / len(layers)
        else:
            logits = self._last_logits(ids)
        metrics["kl"] = logit_kl(self._full_logits[key], logits)
        if self.timing:
            metrics.update(prefill_and_decode_times(self.model, ids, self.decode_tokens, self.repeats))
        return metrics


class DensityFidelityProbe(FidelityProbe):
    """Per layer: output error and mass recall (see :class:`FidelityProbe`) and the method's
    achieved density on that layer's queries and keys."""

    def __init__(self, method: str, config: dict[str, Any]) -> None:
        super().__init__(recall=True)
        self.spec = get_method(method)
        self.cfg = self.spec.make_config(**config)

    def __call__(self, layer, query, key, value, out, causal, scale, plan) -> None:
        super().__call__(layer, query, key, value, out, causal, scale, plan)
        density = self.spec.density(query, key, causal, self.cfg) if self.spec.density else math.nan
        self.layers[layer]["density"] = float(density)
