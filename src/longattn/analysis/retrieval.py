"""Copy-paste retrieval scores of attention heads (Retrieval Head Mechanistically Explains
Long-Context Factuality -- Wu et al., 2024).

The paper's definition: while the model generates the answer to a needle-in-a-haystack
question, a head *copies* a generated token ``w`` when its most attended key (argmax over the
context) lies inside the needle and holds the same token ``w``. A head's retrieval score is
the fraction of the needle's tokens it copied; heads above 0.1 are retrieval heads.

Our reading for the arena's tasks: the needle tokens to be copied are the tokens of the
*answer value* inside the needle (the pass key digits, the magic number), since that is what
the model writes after the prompt's answer prefix; a needle that states the value twice
(passkey) has two occurrences, and a token counts once whichever occurrence it was copied
from. Score = distinct answer-token indices copied / answer length, in ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from .stats import chunk_probabilities


@dataclass
class NeedleSpan:
    """Where the answer sits in a tokenised prompt: ``occurrences[i]`` lists the token
    positions of the ``i``-th place the answer value is written inside the needle."""

    answer: str
    occurrences: list[list[int]]
    needle_tokens: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return max((len(o) for o in self.occurrences), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "occurrences": self.occurrences, "needle_tokens": self.needle_tokens}


def _tokens_in(offsets: Sequence[Sequence[int]], lo: int, hi: int) -> list[int]:
    """Token indices whose character span overlaps ``[lo, hi)``."""
    return [i for i, (a, b) in enumerate(offsets) if b > lo and a < hi and b > a]


def locate_needle(tokenizer: Any, prompt: str, needle: str, answer: str) -> tuple[Tensor, NeedleSpan]:
    """Tokenise ``prompt`` (no added special tokens) and find the tokens of ``answer`` inside
    the first occurrence of ``needle``. Returns ``(input_ids [1, T], span)``.

    Needs a fast tokenizer (character offsets). Raises ``ValueError`` when the needle or the
    answer is not in the prompt."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
    offsets = enc["offset_mapping"]
    start = prompt.find(needle)
    if start < 0:
        raise ValueError(f"needle {needle!r} is not in the prompt")
    occurrences = []
    pos = needle.find(answer)
    while pos >= 0:
        toks = _tokens_in(offsets, start + pos, start + pos + len(answer))
        if toks:
            occurrences.append(toks)
        pos = needle.find(answer, pos + len(answer))
    if not occurrences:
        raise ValueError(f"answer {answer!r} is not in the needle {needle!r}")
    return ids, NeedleSpan(answer, occurrences, _tokens_in(offsets, start, start + len(needle)))


def argmax_keys(q: Tensor, k: Tensor, rows: range, scale: float) -> Tensor:
    """Most attended key of each query row in ``rows`` (causal, end-aligned), per head:
    ``long [B, H, len(rows)]``. ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``."""
    if len(rows) == 0:
        return torch.zeros(q.shape[0], q.shape[1], 0, dtype=torch.long, device=q.device)
    p, _ = chunk_probabilities(q, k, rows.start, rows.stop, scale)  # [B, H, n, kv]
    return p.argmax(-1)


def copy_paste_scores(
    argmax: Tensor,
    generated: Sequence[int],
    context_ids: Sequence[int],
    span: NeedleSpan,
) -> Tensor:
    """Retrieval scores ``[L, H]`` from the most attended key of every head at every
    generation step.

    ``argmax [L, H, n]``: at step ``t`` (the query that predicts ``generated[t]``) the key
    position each head attends most. ``context_ids``: the token ids at those key positions
    (the prompt followed by the generated tokens). A head copies at step ``t`` when
    ``argmax[l, h, t]`` is a position of an answer occurrence and
    ``context_ids[that position] == generated[t]``."""
    L, H, n = argmax.shape
    if n != len(generated):
        raise ValueError(f"argmax has {n} steps but {len(generated)} generated tokens")
    where: dict[int, int] = {}  # key position -> index of its token in the answer
    for occ in span.occurrences:
        for a, pos in enumerate(occ):
            where[pos] = a
    copied = [[set() for _ in range(H)] for _ in range(L)]
    am = argmax.tolist()
    for t, w in enumerate(generated):
        for layer in range(L):
            for h in range(H):
                j = am[layer][h][t]
                a = where.get(j)
                if a is not None and int(context_ids[j]) == int(w):
                    copied[layer][h].add(a)
    denom = max(1, span.length)
    return torch.tensor([[len(copied[l][h]) / denom for h in range(H)] for l in range(L)], dtype=torch.float64)


__all__ = ["NeedleSpan", "argmax_keys", "copy_paste_scores", "locate_needle"]
