"""Per-head attention statistics computed from a layer's queries and keys, in query chunks.

Everything here reads ``q [B, H, Tq, D]`` and ``k [B, Hkv, Tk, D]`` (after RoPE, as
:func:`longattn.hf.attention_probe` hands them over), with the causal mask aligned to the end
of the keys (query ``i`` sits at absolute position ``i + Tk - Tq``). The softmax is computed
for ``chunk`` query rows of all heads at a time, over only the keys those rows can see, so an
8k prompt holds ``H x chunk x 8k`` probabilities at once, never ``H x 8k x 8k``. GQA is done
by grouping query heads onto their KV head, not by copying keys.

What is measured (definitions in :class:`AnalysisConfig` and :func:`layer_attention_stats`):

* **entropy** (Attention Entropy is a Key Factor, Zhang et al. 2024): per query
  ``-sum_j p_j log p_j`` (nats), averaged over all queries; and the same divided by
  ``log(n)`` with ``n`` the number of keys the query sees (1 = uniform, 0 = one-hot), averaged
  over queries with ``n >= 2``.
* **sinks** (Unveiling and Harnessing Hidden Attention Sinks -- ACT, Yu et al. 2024): a key
  whose mean attention from the queries that see it from afar (distance ``>= window``) is at
  least ``sink_factor`` times the mean uniform share ``1/n`` of those same queries, and at
  least ``sink_min_share``. The first
  ``sink_tokens`` keys are the initial sinks (StreamingLLM's); later ones are non-initial
  ("hidden") sinks.
* **pattern masses** of each head, averaged over the queries that can see beyond the recent
  window (absolute position ``>= window``): mass on the recent window (distance
  ``< window``), on the sinks outside it, and on the ``retrieval_top_k`` largest distant
  non-sink keys. :func:`classify_head` turns them into streaming / local / retrieval /
  diffuse (DuoAttention's retrieval vs streaming heads, refined).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

HEAD_CLASSES = ("retrieval", "streaming", "local", "diffuse", "mixed")


@dataclass(frozen=True)
class AnalysisConfig:
    """Windows and thresholds of the analysis (all in tokens or in probability mass).

    ``window``: the recent window, keys at distance ``0 <= i - j < window`` from the query
    (the query itself included). ``sink_tokens``: the first keys that count as initial sinks
    (StreamingLLM keeps 4). ``sink_factor``: a key is a sink when its mean received attention
    from distant queries is at least this many times the uniform share ``1/n`` of those
    queries (ACT flags tokens whose attention exceeds a multiple of ``1/N``), and at least
    ``sink_min_share`` in absolute terms (so that at long lengths, where ``1/n`` is tiny, a
    key that a few late queries look at is not called a sink).
    ``sink_min_queries``: a key needs at least this many distant queries to be judged.
    ``max_sinks``: at most this many non-initial sinks per head (the largest shares).
    ``retrieval_top_k``: how many distant non-sink keys form "a few".
    ``chunk``: query rows per softmax chunk.

    Head classes, first rule that holds (masses are means over queries at position
    ``>= window``; ``recent + sink_mass + far = 1`` per query):

    1. **retrieval**: with a needle, the copy-paste retrieval score ``>= retrieval_score``
       (the Retrieval Head paper's 0.1); without one, the top-``retrieval_top_k`` distant
       non-sink keys hold ``>= retrieval_mass`` of the attention.
    2. **local**: ``recent >= local_mass`` and ``sink_mass < sink_min_mass``.
    3. **streaming**: ``recent + sink_mass >= streaming_mass``.
    4. **diffuse**: normalised entropy ``>= diffuse_entropy``.
    5. **mixed**: none of these.
    """

    window: int = 64
    sink_tokens: int = 4
    sink_factor: float = 20.0
    sink_min_share: float = 0.02
    sink_min_queries: int = 16
    max_sinks: int = 8
    retrieval_top_k: int = 8
    chunk: int = 256
    local_mass: float = 0.7
    sink_min_mass: float = 0.1
    streaming_mass: float = 0.7
    retrieval_mass: float = 0.5
    retrieval_score: float = 0.1
    diffuse_entropy: float = 0.6

    def __post_init__(self) -> None:
        for name in ("window", "sink_tokens", "sink_min_queries", "retrieval_top_k", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AnalysisConfig.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.max_sinks, bool) or not isinstance(self.max_sinks, int) or self.max_sinks < 0:
            raise ValueError(f"AnalysisConfig.max_sinks must be an int >= 0, got {self.max_sinks!r}")
        if not (self.sink_factor > 1):
            raise ValueError(f"AnalysisConfig.sink_factor must exceed 1 (a multiple of the uniform share), got {self.sink_factor!r}")
        for name in ("sink_min_share", "local_mass", "sink_min_mass", "streaming_mass", "retrieval_mass", "retrieval_score", "diffuse_entropy"):
            value = getattr(self, name)
            if not (0.0 <= value <= 1.0):
                raise ValueError(f"AnalysisConfig.{name} must lie in [0, 1], got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Sink:
    """One sink key of a layer. ``share``: mean over the layer's heads of the key's mean
    received attention from distant queries; ``share_max``/``lift_max``: the largest over
    heads (lift = share / uniform share); ``heads``: heads in which it passes the threshold."""

    position: int
    initial: bool
    share: float
    share_max: float
    lift_max: float
    heads: list[int]
    token: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


@dataclass
class LayerStats:
    """Statistics of one layer; per-head lists have one entry per query head.

    ``pictures[h]`` is the block-pooled attention map of head ``h`` (mean probability per
    ``block x block`` tile, ``[ceil(Tq / block), ceil(Tk / block)]``) for the heads asked for.
    """

    layer: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    entropy: list[float]
    norm_entropy: list[float]
    recent_mass: list[float]
    sink_mass: list[float]
    initial_mass: list[float]
    far_topk_mass: list[float]
    head_sinks: list[list[int]]
    sinks: list[Sink]
    pattern_queries: int
    pictures: dict[int, Tensor] = field(default_factory=dict)
    picture_block: int = 1
    retrieval_score: list[float] | None = None
    classes: list[str] | None = None

    def classify(self, config: AnalysisConfig) -> list[str]:
        self.classes = [
            classify_head(
                recent_mass=self.recent_mass[h], sink_mass=self.sink_mass[h],
                far_topk_mass=self.far_topk_mass[h], norm_entropy=self.norm_entropy[h],
                retrieval_score=None if self.retrieval_score is None else self.retrieval_score[h],
                config=config,
            )
            for h in range(self.num_heads)
        ]
        return self.classes

    @property
    def lazy_mass(self) -> float:
        """Mean over heads of the attention on the recent window plus the initial tokens
        (LightTransfer's laziness)."""
        return sum(r + i for r, i in zip(self.recent_mass, self.initial_mass)) / self.num_heads

    def to_dict(self) -> dict[str, Any]:
        d = {
            "layer": self.layer,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "mean_entropy": sum(self.entropy) / self.num_heads,
            "mean_norm_entropy": sum(self.norm_entropy) / self.num_heads,
            "lazy_mass": self.lazy_mass,
            "pattern_queries": self.pattern_queries,
            "sinks": [s.to_dict() for s in self.sinks],
            "heads": [],
        }
        for h in range(self.num_heads):
            row = {
                "head": h,
                "kv_head": h // (self.num_heads // self.num_kv_heads),
                "entropy": self.entropy[h],
                "norm_entropy": self.norm_entropy[h],
                "recent_mass": self.recent_mass[h],
                "sink_mass": self.sink_mass[h],
                "initial_mass": self.initial_mass[h],
                "far_topk_mass": self.far_topk_mass[h],
                "sinks": self.head_sinks[h],
            }
            if self.retrieval_score is not None:
                row["retrieval_score"] = self.retrieval_score[h]
            if self.classes is not None:
                row["class"] = self.classes[h]
            d["heads"].append(row)
        return d


def classify_head(
    *,
    recent_mass: float,
    sink_mass: float,
    far_topk_mass: float,
    norm_entropy: float,
    config: AnalysisConfig,
    retrieval_score: float | None = None,
) -> str:
    """The class of one head by the rules of :class:`AnalysisConfig` (first that holds)."""
    if retrieval_score is not None:
        if retrieval_score >= config.retrieval_score:
            return "retrieval"
    elif far_topk_mass >= config.retrieval_mass:
        return "retrieval"
    if recent_mass >= config.local_mass and sink_mass < config.sink_min_mass:
        return "local"
    if recent_mass + sink_mass >= config.streaming_mass:
        return "streaming"
    if norm_entropy >= config.diffuse_entropy:
        return "diffuse"
    return "mixed"


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy ``-sum p log p`` in nats along ``dim`` (``0 log 0 = 0``)."""
    return torch.special.entr(p).sum(dim)


def chunk_probabilities(q: Tensor, k: Tensor, start: int, stop: int, scale: float) -> tuple[Tensor, int]:
    """Causal softmax of query rows ``start:stop`` of ``q [B, H, Tq, D]`` over the keys they
    can see in ``k [B, Hkv, Tk, D]``, in fp32: ``(p [B, H, stop - start, kv_stop], kv_stop)``
    with ``kv_stop = stop + Tk - Tq`` (later keys are invisible to every row of the chunk)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = H // Hkv
    off = Tk - Tq
    kv_stop = stop + off
    rows = stop - start
    qc = q[:, :, start:stop].float().reshape(B, Hkv, group * rows, D)  # [B, Hkv, g*c, D]
    kc = k[:, :, :kv_stop].float()  # [B, Hkv, kv_stop, D]
    s = torch.matmul(qc, kc.transpose(-1, -2)).mul_(scale).view(B, H, rows, kv_stop)  # [B, H, c, kv]
    qpos = torch.arange(start, stop, device=q.device)[:, None] + off
    visible = torch.arange(kv_stop, device=q.device)[None, :] <= qpos  # [c, kv]
    s.masked_fill_(~visible, float("-inf"))
    return torch.softmax(s, dim=-1), kv_stop


def _check_qk(q: Tensor, k: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, T, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of KV heads {k.shape[1]}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries ({q.shape[2]}) than keys ({k.shape[2]}); causal analysis needs Tq <= Tk")


def picture_block_size(length: int, max_pixels: int) -> int:
    """Pooling block so that ``length`` tokens become at most ``max_pixels`` pixels."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    return max(1, math.ceil(length / max_pixels))


def layer_attention_stats(
    q: Tensor,
    k: Tensor,
    *,
    scale: float | None = None,
    config: AnalysisConfig = AnalysisConfig(),
    layer: int = 0,
    picture_heads: Sequence[int] = (),
    max_pixels: int = 512,
) -> LayerStats:
    """Entropy, sinks and pattern masses of every query head of one layer.

    ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``; causal, end-aligned; ``scale`` defaults to
    ``1/sqrt(D)``. Batch rows are pooled (sums over batch and queries). ``picture_heads``:
    query heads whose block-pooled map (at most ``max_pixels`` blocks a side) is kept.

    Sinks of a head are found from the mean attention each key receives from the queries at
    distance ``>= config.window`` (see :class:`AnalysisConfig`); the head's pattern masses
    then use its own sink set (initial tokens plus its detected non-initial sinks). The
    distant top-k mass is computed from the ``retrieval_top_k + max_sinks`` largest distant
    non-initial keys kept per query, so it is exact whenever a head has at most
    ``max_sinks`` non-initial sinks (always, since more are not kept).
    """
    _check_qk(q, k)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    for h in picture_heads:
        if not 0 <= int(h) < H:
            raise ValueError(f"picture head {h} does not exist; heads are 0..{H - 1}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cfg = config
    off = Tk - Tq
    dev = q.device
    w, s0 = cfg.window, min(cfg.sink_tokens, Tk)
    n_cand = cfg.retrieval_top_k + cfg.max_sinks

    ent_sum = torch.zeros(H, dtype=torch.float64, device=dev)
    nent_sum = torch.zeros(H, dtype=torch.float64, device=dev)
    nent_rows = 0
    recent_sum = torch.zeros(H, dtype=torch.float64, device=dev)
    received_far = torch.zeros(H, Tk, dtype=torch.float64, device=dev)  # from pattern rows
    uniform_far = torch.zeros(Tk, dtype=torch.float64, device=dev)
    count_far = torch.zeros(Tk, dtype=torch.float64, device=dev)
    pattern_rows = 0
    cand_vals: list[Tensor] = []  # [B, H, rows, n_cand] of pattern rows
    cand_idx: list[Tensor] = []

    block = picture_block_size(max(Tq, Tk), max_pixels)
    nqb, nkb = math.ceil(Tq / block), math.ceil(Tk / block)
    pic_heads = sorted({int(h) for h in picture_heads})
    pic_sum = torch.zeros(len(pic_heads), nqb, nkb, dtype=torch.float64, device=dev) if pic_heads else None

    for start in range(0, Tq, cfg.chunk):
        stop = min(Tq, start + cfg.chunk)
        p, kv = chunk_probabilities(q, k, start, stop, scale)  # [B, H, c, kv]
        qpos = torch.arange(start, stop, device=dev) + off  # absolute positions [c]
        n_vis = (qpos + 1).to(torch.float64)
        ent = entropy(p)  # [B, H, c]
        ent_sum += ent.sum((0, 2)).double()
        multi = n_vis >= 2
        if bool(multi.any()):
            nent_sum += (ent[:, :, multi].double() / torch.log(n_vis[multi])).sum((0, 2))
            nent_rows += int(multi.sum()) * B
        dist = qpos[:, None] - torch.arange(kv, device=dev)[None, :]  # [c, kv]
        rows = qpos >= w  # rows that see beyond the window
        if bool(rows.any()):
            pr = p[:, :, rows]  # [B, H, r, kv]
            dr = dist[rows]
            recent = (dr >= 0) & (dr < w)
            far = dr >= w
            recent_sum += (pr * recent).sum((0, 2, 3)).double()
            far_p = pr * far  # [B, H, r, kv]
            received_far[:, :kv] += far_p.sum((0, 2)).double()
            count_far[:kv] += far.sum(0).double() * B
            uniform_far[:kv] += (far.double() / n_vis[rows][:, None]).sum(0) * B
            pattern_rows += int(rows.sum()) * B
            cand = far_p.clone()
            cand[..., :s0] = 0.0
            kk = min(n_cand, kv)
            vals, idx = cand.topk(kk, dim=-1)
            if kk < n_cand:  # pad so chunks concatenate
                pad = n_cand - kk
                vals = torch.nn.functional.pad(vals, (0, pad))
                idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
            cand_vals.append(vals)
            cand_idx.append(idx)
        if pic_sum is not None:
            pp = p[:, pic_heads].sum(0).double()  # [nh, c, kv]
            pp = torch.nn.functional.pad(pp, (0, nkb * block - kv)).view(len(pic_heads), stop - start, nkb, block).sum(-1)
            pic_sum.index_add_(1, torch.div(torch.arange(start, stop, device=dev), block, rounding_mode="floor"), pp)
        del p

    # ---- sinks per head
    share = torch.where(count_far > 0, received_far / count_far.clamp_min(1), torch.zeros_like(received_far))  # [H, Tk]
    uniform = torch.where(count_far > 0, uniform_far / count_far.clamp_min(1), torch.ones_like(uniform_far))
    lift = share / uniform  # [H, Tk]
    eligible = count_far >= max(1, cfg.sink_min_queries)
    passes = (lift >= cfg.sink_factor) & (share >= cfg.sink_min_share) & eligible[None, :]  # [H, Tk]
    head_sinks: list[list[int]] = []
    for h in range(H):
        later = torch.nonzero(passes[h, s0:]).flatten() + s0
        if later.numel() > cfg.max_sinks:
            later = later[share[h, later].argsort(descending=True)[: cfg.max_sinks]]
        head_sinks.append(sorted(int(j) for j in later))

    rows_n = max(1, pattern_rows)
    initial_mass = received_far[:, :s0].sum(-1) / rows_n  # [H]
    sink_mass = initial_mass.clone()
    for h in range(H):
        if head_sinks[h]:
            sink_mass[h] += received_far[h, head_sinks[h]].sum() / rows_n

    # ---- distant top-k mass without each head's sinks
    far_topk = torch.zeros(H, dtype=torch.float64, device=dev)
    if cand_vals:
        vals = torch.cat(cand_vals, 2)  # [B, H, R, n_cand]
        idx = torch.cat(cand_idx, 2)
        for h in range(H):
            v = vals[:, h]
            if head_sinks[h]:
                is_sink = torch.isin(idx[:, h], torch.tensor(head_sinks[h], device=dev))
                v = v.masked_fill(is_sink, 0.0)
            far_topk[h] = v.topk(min(cfg.retrieval_top_k, v.shape[-1]), dim=-1).values.sum(-1).double().sum()
        far_topk /= rows_n

    # ---- the layer's sink table: position 0 always, then every key that is a sink in some head
    positions = sorted({0} | {j for h in range(H) for j in range(s0) if bool(passes[h, j])}
                       | {j for hs in head_sinks for j in hs}) if Tk else []
    sinks = []
    for j in positions:
        heads_j = [h for h in range(H) if (j < s0 and bool(passes[h, j])) or j in head_sinks[h]]
        sinks.append(Sink(
            position=j, initial=j < s0, share=float(share[:, j].mean()), share_max=float(share[:, j].max()),
            lift_max=float(lift[:, j].max()) if bool(eligible[j]) else float("nan"), heads=heads_j,
        ))

    pictures: dict[int, Tensor] = {}
    if pic_sum is not None:
        rows_per = torch.full((nqb,), block, dtype=torch.float64, device=dev)
        rows_per[-1] = Tq - (nqb - 1) * block
        cols_per = torch.full((nkb,), block, dtype=torch.float64, device=dev)
        cols_per[-1] = Tk - (nkb - 1) * block
        area = rows_per[:, None] * cols_per[None, :] * B
        for i, h in enumerate(pic_heads):
            pictures[h] = (pic_sum[i] / area).float().cpu()

    return LayerStats(
        layer=layer, num_heads=H, num_kv_heads=Hkv, q_len=Tq, kv_len=Tk,
        entropy=(ent_sum / (B * Tq)).tolist(),
        norm_entropy=(nent_sum / max(1, nent_rows)).tolist(),
        recent_mass=(recent_sum / rows_n).tolist(),
        sink_mass=sink_mass.tolist(),
        initial_mass=initial_mass.tolist(),
        far_topk_mass=far_topk.tolist(),
        head_sinks=head_sinks,
        sinks=sinks,
        pattern_queries=pattern_rows,
        pictures=pictures,
        picture_block=block,
    )


__all__ = [
    "AnalysisConfig", "HEAD_CLASSES", "LayerStats", "Sink", "chunk_probabilities", "classify_head",
    "entropy", "layer_attention_stats", "picture_block_size",
]
