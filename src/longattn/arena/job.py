"""The arena's unit of work: one method on one task sample inside one model.

For a :class:`~longattn.arena.store.Cell` it builds the seeded task sample, switches the
model's attention to the cell's method through :mod:`longattn.hf`, and measures against full
attention on the same input: task score (greedy generation), per-layer output error and
attention-mass recall, achieved density, last-position logit KL, prefill time, time per
decoded token and peak GPU memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import get_method, hf
from .metrics import FidelityProbe, logit_kl, prefill_and_decode_times
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

    def __call__(self, cell: Cell) -> dict[str, Any]:
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
