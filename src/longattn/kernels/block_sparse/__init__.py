"""Block-sparse attention with longattn's own Triton kernels (forward and backward).

:func:`block_sparse_attention` runs attention over exactly the (query, key) pairs a
:class:`~longattn.selection.BlockSelection` keeps: its selected key blocks, refined inside the
blocks by the selection's :class:`~longattn.selection.TokenRule` (causality, window, sinks).
The dense reference (``BlockSelection.to_dense_mask`` + softmax) is its specification.

Work and memory are ``O(selected pairs)``: no ``Tq x Tk`` tensor is ever formed. Query heads
that share a KV head and a selection row (GQA with a group-shared selection, as in NSA) are
processed by one program, so each selected K/V chunk is loaded once for all of them.

The backward's dK/dV is key-major: a program per key chunk and KV head walks the queries that
selected its block. A block many queries select (NSA's first block is selected by every token)
would make one program walk far longer than the rest, so programs past ``DKDV_STEPS_PER_ITEM``
steps are cut into parts whose fp32 partial sums are added afterwards, in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd import forward_ad

from ...selection import BlockSelection, _ceil_div, token_rule_of
from .. import interpreting, kernel_layout, triton_unavailable_reason
from ..launch import fast

# Tile caps (query rows = heads x tokens per program, keys per inner step), chosen by measured
# time on the H200 (benchmarks/tile_sweep.py) within the shared memory a block may have on sm_90
# (tests/test_kernels_compile.py): fp32 tiles are smaller, and the backward, which holds more
# accumulators, has fewer rows. ptxas reports some register spills for the 16-bit query-major
# forward at 128 x 64 (832 bytes at D = 128); it was still the fastest tile measured.
TILE_CAPS = {  # (phase, fp32?) -> (max rows, max block_n)
    ("fwd", False): (128, 64),  # the query-major forward
    ("fwd-tokens", False): (128, 32),  # the key-major per-token forward (MoBA's gate, NSA's selected branch)
    ("fwd", True): (32, 32),
    ("fwd-tokens", True): (32, 32),
    ("bwd", False): (64, 64),
    ("bwd", True): (16, 32),
}


# Per-token selections (``q_block = 1``: MoBA's per-token gate, NSA's selected branch) run
# key-major: the forward visits each selected key block once per tile of the tokens that chose it
# and merges the per-block results through their LSEs; the backward's dQ is computed the same way
# (per-block shares summed). False keeps the query-major kernels for them (one program row per token and head
# group, every token loading its own blocks) -- kept for comparison and tests.
KEY_MAJOR_PER_TOKEN = True
# The 16-bit key-major forward over key blocks of at most this many keys (NSA's 64) takes the whole
# block in one inner step at 2 stages: NSA's selected branch at 64k (benchmarks/nsa_selected_tiles.py,
# H200, 2026-12-01) ran its tile kernel in 10.6 ms at 128 x 64 / 2 stages against 11.7 at 128 x 32
# / 3 stages and 17.6 at 128 x 64 / 3 stages. MoBA's 512-key blocks keep 128 x 32 at 3 stages: at
# 128 x 64 / 2 stages its forward at 64k took 26.0 ms against about 21.
KEY_MAJOR_ONE_STEP = 64
# Budget of per-block results (output row and LSE per token, head and selected block, counted as
# fp32; bf16 rows take about half) the key-major forward holds at once; longer query ranges run in chunks of tokens.
KEY_MAJOR_PARTIAL_BYTES = 1 << 30
MERGE_BLOCK_T = 32  # tokens per program of the slot merge

# A dK/dV program (one per key chunk, sequence and KV head) walks the lists of the queries that
# selected its key block, a tile of query rows per step, so a block every query selects makes one
# very long program: NSA at 64k tokens walks 4,096 steps for its first block against about 64 for
# the average program and about 1,750 per SM slot for the whole grid, and those few programs set
# the kernel's time (12.2 ms on the H200). A program of more steps than this is cut into parts of
# this many steps, run as separate programs whose fp32 partial sums are added afterwards. A part
# costs one more K/V tile load and a [BLOCK_N, D] fp32 partial of dK and of dV written and read
# back: the memory traffic of a few steps, a percent or two of 256. A part is about a seventh of
# an SM slot's share in that NSA case, and inputs with no program past 256 steps (NSA below 4k
# tokens: its first block is 4,096 tokens / 16 per step) run exactly the unsplit programs.
DKDV_STEPS_PER_ITEM = 256
DKDV_SUM_ROWS = 16  # keys per program of the partial sum (BLOCK_N: a power of two >= 16)


# Launch settings forced per phase ("fwd", "bwd"), e.g. {"fwd": {"num_warps": 4, "num_stages": 3}}:
# a tuning hook for benchmarks that sweep configurations (with TILE_CAPS); empty in normal use.
LAUNCH_OVERRIDES: dict[str, dict[str, int]] = {}


def _largest_pow2_divisor_at_most(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


@dataclass(frozen=True)
class _Plan:
    """Static launch parameters for one (inputs, selection) shape."""

    P: int  # query heads per program (share a KV head and a selection head)
    BLOCK_M: int  # query tokens per program (divides q_block)
    ROWS: int  # P * BLOCK_M padded to a power of two >= 16
    BLOCK_N: int  # keys per inner step (divides kv_block)
    HEAD_DIM: int  # D padded to a power of two
    heads_per_kv: int
    heads_per_sel: int
    causal: bool
    window: int | None
    sink: int
    two_sided: bool
    ieee: bool
    upcast: bool  # interpreter only: 16-bit operands go to fp32 before tl.dot
    num_warps: int
    num_stages: int
    key_major: bool  # per-token selection run key-major (KEY_MAJOR_PER_TOKEN)


def inputs_unsupported_reason(q: Tensor) -> str | None:
    """``None`` when the kernels can run on queries like ``q`` (device, dtype, head dim)."""
    reason = triton_unavailable_reason(q.device)
    if reason:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernels take float16, bfloat16 or float32, got {q.dtype}"
    D = q.shape[-1]
    if D < 16 or D > 256:
        return f"the Triton kernels take head dims 16..256, got {D}"
    return None


def selection_unsupported_reason(q: Tensor, k: Tensor, sel: BlockSelection) -> str | None:
    """``None`` when the kernels can run this selection on these inputs, else why not."""
    reason = inputs_unsupported_reason(q)
    if reason:
        return reason
    if sel.kv_block % 16 != 0:
        return f"the Triton kernels need kv_block to be a multiple of 16, got {sel.kv_block}"
    if sel.mask_mod is not None and token_rule_of(sel.mask_mod) is None:
        return "the selection's mask_mod is a Python predicate without a TokenRule"
    rule = token_rule_of(sel.mask_mod)
    if rule is not None and rule.q_offset != sel.q_offset:
        return f"the TokenRule's q_offset {rule.q_offset} differs from the selection's {sel.q_offset}"
    H = q.shape[1]
    Bs, Hs = sel.kv_num_blocks.shape[:2]
    if Bs not in (1, q.shape[0]):
        return f"the selection's batch axis has {Bs} entries for a batch of {q.shape[0]}"
    if H % Hs != 0:
        return f"{Hs} selection heads do not divide {H} query heads"
    return None


def _tile_rows(rows: int) -> int:
    """Rows of a program's tile: ``rows`` padded to a power of two >= 16 (``tl.dot``)."""
    return max(16, 1 << (rows - 1).bit_length())


def heads_per_program(heads_per_kv: int, heads_per_sel: int, max_rows: int) -> int:
    """``P``: query heads one program serves. They must share a KV head and a selection head:
    aligned runs of ``gcd(heads_per_kv, heads_per_sel)`` heads do, so ``P`` is the largest
    divisor of that run within the row cap (a cap that does not divide the run would give a
    program heads of two KV heads or selections, or leave heads without a program)."""
    run = math.gcd(heads_per_kv, heads_per_sel)
    return max(d for d in range(1, min(run, max_rows) + 1) if run % d == 0)


def _plan(q: Tensor, k: Tensor, sel: BlockSelection, phase: str = "fwd") -> _Plan:
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    key_major = KEY_MAJOR_PER_TOKEN and sel.q_block == 1
    caps = "fwd-tokens" if key_major and phase == "fwd" else phase
    max_rows, max_block_n = TILE_CAPS[(caps, q.dtype == torch.float32)]
    G = H // Hkv
    hps = H // sel.kv_num_blocks.shape[1]
    P = heads_per_program(G, hps, max_rows)
    if key_major:  # BLOCK_M: tokens gathered per program from a key block's list
        block_m = _largest_pow2_divisor_at_most(1 << 30, max(1, max_rows // P))
    else:
        block_m = _largest_pow2_divisor_at_most(sel.q_block, max(1, max_rows // P))
    rows = _tile_rows(P * block_m)
    # the whole key block in one inner step (no loop to pipeline: 2 stages below)
    one_step = key_major and phase == "fwd" and q.dtype != torch.float32 and sel.kv_block <= KEY_MAJOR_ONE_STEP
    block_n = _largest_pow2_divisor_at_most(sel.kv_block, KEY_MAJOR_ONE_STEP if one_step else max_block_n)
    rule = token_rule_of(sel.mask_mod)
    head_dim = max(16, 1 << (D - 1).bit_length())
    # 16-bit launch settings from benchmarks/tile_sweep.py on the H200 (top-k, T = 64k, D = 128,
    # bf16; docs/benchmarks.md): 4 warps beat 8 in both phases (forward + backward 26.8 ms
    # against 45.9 ms at 8 warps). The query-major forward with the mask skip and the lazy
    # rescale: 5.21 ms at 128 x 64 tiles and 3 stages, 5.40 at 2 stages, 6.41 at 128 x 32 (the
    # previous default, which without those two changes took 6.0). The key-major forward keeps
    # 128 x 32 at 3 stages, except over key blocks of at most KEY_MAJOR_ONE_STEP keys.
    # fp32 keeps its small tiles at 4 warps and 2 stages.
    sixteen = q.dtype != torch.float32
    warps = 4
    stages = 3 if sixteen and phase == "fwd" and not one_step else 2
    return _Plan(
        P=P,
        BLOCK_M=block_m,
        ROWS=rows,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        heads_per_kv=G,
        heads_per_sel=hps,
        causal=bool(rule and rule.causal),
        window=rule.window if rule else None,
        sink=rule.sink if rule else 0,
        two_sided=bool(rule and rule.window is not None and not rule.causal),
        ieee=q.dtype == torch.float32,
        upcast=interpreting() and q.dtype != torch.float32,
        num_warps=LAUNCH_OVERRIDES.get(phase, {}).get("num_warps", warps),
        num_stages=LAUNCH_OVERRIDES.get(phase, {}).get("num_stages", stages),
        key_major=key_major,
    )


def _rule_args(plan: _Plan) -> dict:
    return dict(
        CAUSAL=plan.causal,
        HAS_WINDOW=plan.window is not None,
        TWO_SIDED=plan.two_sided,
        IEEE=plan.ieee,
        UPCAST=plan.upcast,
    )


def _sel_strides(t: Tensor) -> tuple[int, int, int]:
    """Strides of the leading (batch, head, query-block) axes; a batch of one broadcasts."""
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


def _forward(q, k, v, kvn, kvi, sel_meta, plan: _Plan, scale: float, num_kv_blocks: int):
    """``(out, lse, token lists)``; the lists (:class:`_TokenLists`) only for the key-major path."""
    from .kernel import _fwd

    if plan.key_major:
        return _forward_key_major(q, k, v, kvn, kvi, sel_meta, plan, scale, num_kv_blocks)
    B, H, Tq, D = q.shape
    q_block, kv_block, kv_len, q_offset = sel_meta
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    grid = (_ceil_div(Tq, plan.BLOCK_M), B * (H // plan.P))
    fast(_fwd)[grid](
        q, k, v, out, lse, kvn, kvi,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        *_sel_strides(kvn), *_sel_strides(kvi),
        Tq, kv_len, q_offset, q_block, H, plan.heads_per_kv, plan.heads_per_sel,
        scale * math.log2(math.e), plan.window or 0, plan.sink,
        D=D, HEAD_DIM=plan.HEAD_DIM, P=plan.P, BLOCK_M=plan.BLOCK_M, ROWS=plan.ROWS,
        KV_BLOCK=kv_block, BLOCK_N=plan.BLOCK_N, **_rule_args(plan),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return out, lse, None


def _transpose(kvn: Tensor, kvi: Tensor, num_kv_blocks: int, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """A selection's entries ordered key-major, its query blocks cut into chunks of ``chunk``:
    ``(keys int64 [total], query_blocks int32 [total], slots int32 [total])`` sorted by key, then
    query block. A key names (chunk, selection batch, selection head, key block) as
    ``((chunk * Bs + b) * Hs + h) * nKB + kb``; query blocks are local to their chunk; a slot is
    where the key block sits in the query block's row of ``kvi``. Size O(selected blocks)."""
    Bs, Hs, nqb, K = kvi.shape
    valid = torch.arange(K, device=kvi.device) < kvn[..., None].long()  # [Bs, Hs, nQB, K]
    bs, hs, qb, slot = valid.nonzero(as_tuple=True)
    kb = kvi[bs, hs, qb, slot].long()
    cid = qb // chunk
    key = ((cid * Bs + bs) * Hs + hs) * num_kv_blocks + kb
    # nonzero lists the entries in row-major order, so within one key (one batch and head) they
    # come by query block: a stable sort by the key alone orders them by key, then query block.
    # Keys that fit int32 sort in half the radix passes of int64 ones.
    n_keys = _ceil_div(nqb, chunk) * Bs * Hs * num_kv_blocks
    _, order = torch.sort(key.to(torch.int32) if n_keys < 2**31 else key, stable=True)
    local = (qb - cid * chunk)[order].to(torch.int32).contiguous()
    return key[order], local, slot[order].to(torch.int32).contiguous()


def transposed_selection(kvn: Tensor, kvi: Tensor, num_kv_blocks: int) -> tuple[Tensor, Tensor]:
    """CSR transpose of a selection: for every (selection batch, selection head, key block)
    the query blocks that selected it, ascending. Returns ``offsets int32 [Bs * Hs * nKB + 1]``
    and ``query_blocks int32 [total]``; size O(selected blocks)."""
    Bs, Hs, nqb, _ = kvi.shape
    keys, qbs, _ = _transpose(kvn, kvi, num_kv_blocks, max(1, nqb))
    # the keys are sorted: each one's run starts where searchsorted puts it (bincount's atomics
    # took 1.7 ms on NSA's 8M entries at 64k, most of them on the first block)
    bounds = torch.arange(Bs * Hs * num_kv_blocks + 1, device=kvi.device)
    return torch.searchsorted(keys, bounds).to(torch.int32), qbs


def _work_items(keys: Tensor, per_item: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cuts the runs of equal ``keys`` (sorted) into items of at most ``per_item`` entries:
    ``(key int64 [items], first entry int32 [items], end of the run int32 [items])``, so one long
    list (NSA's first block, chosen by every token) spreads over many programs. Only keys that
    occur make items."""
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    per_run = (counts + per_item - 1) // per_item
    total = int(per_run.sum())
    runs = torch.repeat_interleave(torch.arange(len(per_run), device=keys.device), per_run, output_size=total)
    first = torch.cumsum(per_run, 0) - per_run
    start = starts[runs] + (torch.arange(total, device=keys.device) - first[runs]) * per_item
    return uniq[runs], start.to(torch.int32), (starts + counts)[runs].to(torch.int32)


@dataclass(frozen=True)
class _TokenLists:
    """A per-token selection transposed once for the key-major kernels (forward and dQ):
    ``keys int64 [total]`` sorted, naming (query chunk, selection batch, selection head, key
    block); ``tokens`` / ``token_slots int32 [total]``: each entry's token (local to its chunk of
    ``chunk`` tokens) and the key block's slot in that token's selection; ``slots``: the widest
    row's count of selected blocks (it sizes the per-block buffers); ``n_keys``: keys per chunk."""

    chunk: int
    slots: int
    n_keys: int
    keys: Tensor
    tokens: Tensor
    token_slots: Tensor


def _token_lists(kvn: Tensor, kvi: Tensor, num_kv_blocks: int, bytes_per_slot: int) -> _TokenLists:
    """Transposes a per-token selection, its queries cut into chunks whose per-block buffers hold
    at most ``KEY_MAJOR_PARTIAL_BYTES`` at ``bytes_per_slot`` per (token, slot). One transposition
    and a fixed number of host syncs serve every chunk (per-chunk transpositions left the GPU
    idle between chunks), and the backward's dQ reuses the forward's."""
    slots = max(1, int(kvn.max())) if kvn.numel() else 1  # rows list their blocks first: slot < kvn
    chunk = max(1, KEY_MAJOR_PARTIAL_BYTES // (bytes_per_slot * slots))
    keys, toks, tok_slots = _transpose(kvn, kvi, num_kv_blocks, chunk)
    return _TokenLists(chunk, slots, kvi.shape[0] * kvi.shape[1] * num_kv_blocks, keys, toks, tok_slots)


def _token_chunks(lists: _TokenLists, q_len: int, per_item: int):
    """The query chunks of a key-major pass: yields ``(t0, t1, items)`` with ``items = (item_key,
    item_start, item_stop)`` for tokens ``[t0, t1)``: each item is up to ``per_item`` entries
    ``[start, stop)`` of ``lists.tokens`` that share one key."""
    item_key, item_start, item_stop = _work_items(lists.keys, per_item)
    n_chunks = _ceil_div(q_len, lists.chunk)
    marks = torch.arange(n_chunks + 1, device=item_key.device) * lists.n_keys
    bounds = torch.searchsorted(item_key, marks).tolist()
    for c in range(n_chunks):
        i0, i1 = bounds[c], bounds[c + 1]
        yield c * lists.chunk, min(q_len, (c + 1) * lists.chunk), (item_key[i0:i1], item_start[i0:i1], item_stop[i0:i1])


def _chunk_buffer(buf: Tensor | None, shape: tuple[int, ...], n: int, device, fill: float | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """A per-chunk buffer of ``shape`` (axis 2: tokens of the largest chunk) and ``dtype``,
    allocated once and reused, so chunks never hold two at a time; returns its first ``n`` tokens
    (a view with the buffer's strides), filled with ``fill`` if given."""
    if buf is None:
        buf = torch.empty(shape, device=device, dtype=dtype)
    view = buf[:, :, :n]
    if fill is not None:
        view.fill_(fill)
    return buf, view


def _token_launch(q: Tensor, kvn: Tensor, plan: _Plan, sel_meta, num_kv_blocks: int, scale: float):
    """What every launch of the key-major kernels shares: ``(grid axis 1, arguments after the
    strides without the chunk's first token, launch keywords)``. A selection per sequence names
    its sequence in the work items; a shared one (batch axis 1) is applied to every sequence."""
    _, kv_block, kv_len, q_offset = sel_meta
    groups = plan.heads_per_sel // plan.P
    per_sequence = kvn.shape[0] > 1
    grid1 = (1 if per_sequence else q.shape[0]) * groups
    args = (kvn.shape[0], kvn.shape[1], num_kv_blocks, groups, int(per_sequence))
    tail = (kv_len, q_offset, plan.heads_per_kv, plan.heads_per_sel, scale * math.log2(math.e),
            plan.window or 0, plan.sink)
    kw = dict(D=q.shape[-1], HEAD_DIM=plan.HEAD_DIM, P=plan.P, BLOCK_M=plan.BLOCK_M, ROWS=plan.ROWS,
              KV_BLOCK=kv_block, BLOCK_N=plan.BLOCK_N, **_rule_args(plan),
              num_warps=plan.num_warps, num_stages=plan.num_stages)
    return grid1, args, tail, kw


def partial_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the key-major forward's per-block output rows for inputs of ``dtype``: bf16 for
    bf16 inputs, fp32 otherwise. Each row is a normalised attention output over one key block
    (about a convex combination of value rows) and is rounded once more before the merge, as
    the final output is; fp16 keeps fp32 rows, since a row of values near fp16's maximum could
    round to inf. On the H200 (NSA at 64k, 16 blocks per token: 17 GB of fp32 rows written and
    read back) bf16 rows took the forward from 40.5 / 39.3 to 37.6 / 37.4 ms with bf16 compressed
    tokens and from 55.8 to 53.6 / 54.1 with fp32 ones; the error against the fp32 reference at
    4k was unchanged with fp32 tokens (3.72e-3) and 1.893e-2 against 1.891e-2 with bf16 ones
    (``benchmarks/nsa_bf16_partials.py``, 2026-12-01)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _forward_key_major(q, k, v, kvn, kvi, sel_meta, plan: _Plan, scale: float, num_kv_blocks: int):
    """Forward of a per-token selection (``q_block = 1``), key-major: for each selected key
    block, the tokens that chose it in tiles of ``plan.BLOCK_M`` (:func:`kernel._fwd_tokens`),
    then the per-block results merged per token (:func:`kernel._merge_slots`). The per-block
    results are ``B * H`` normalised output rows (``D`` values in the dtype of
    :func:`partial_dtype`) and LSEs (fp32) per (token, slot); query ranges run in chunks that keep
    them under ``KEY_MAJOR_PARTIAL_BYTES`` at ``B * H * (D + 1)`` fp32 per (token, slot), the
    size the backward's dQ partials reuse (one buffer, reused by every chunk). Returns ``out``,
    ``lse`` and the transposed selection (:class:`_TokenLists`, for the backward)."""
    from .kernel import _fwd_tokens, _merge_slots

    B, H, Tq, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    lists = _token_lists(kvn, kvi, num_kv_blocks, 4 * B * H * (D + 1))
    grid1, args, tail, kw = _token_launch(q, kvn, plan, sel_meta, num_kv_blocks, scale)
    op_buf = lp_buf = None
    for t0, t1, (item_key, item_start, item_stop) in _token_chunks(lists, Tq, plan.BLOCK_M):
        n = t1 - t0
        op_buf, op = _chunk_buffer(op_buf, (B, H, n, lists.slots, D), n, q.device, dtype=partial_dtype(q.dtype))
        lp_buf, lp = _chunk_buffer(lp_buf, (B, H, n, lists.slots), n, q.device, fill=float("-inf"))
        if item_key.numel():
            fast(_fwd_tokens)[(item_key.numel(), grid1)](
                q, k, v, op, lp, item_key, item_start, item_stop, lists.tokens, lists.token_slots,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *op.stride()[:4], *lp.stride()[:3],
                *args, t0, *tail, **kw,
            )
        fast(_merge_slots)[(_ceil_div(n, MERGE_BLOCK_T), B * H)](
            op, lp, out, lse, *op.stride()[:4], *lp.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
            t0, n, H, lists.slots, D=D, HEAD_DIM=plan.HEAD_DIM, BLOCK_T=MERGE_BLOCK_T, num_warps=4,
        )
    return out, lse, lists


def _dq_key_major(q, k, v, dout, lse, delta, kvn, lists: _TokenLists, sel_meta, plan: _Plan, scale: float,
                  num_kv_blocks: int):
    """dQ of a per-token selection, key-major (:func:`kernel._bwd_dq_tokens`) over the forward's
    transposed selection ``lists``: per (token, slot) the block's share in fp32, summed over the
    token's filled slots per query chunk (:func:`kernel._sum_slots`)."""
    from .kernel import _bwd_dq_tokens, _sum_slots

    B, H, Tq, D = q.shape
    dq = torch.empty_like(q)
    grid1, args, tail, kw = _token_launch(q, kvn, plan, sel_meta, num_kv_blocks, scale)
    part_buf = None
    for t0, t1, (item_key, item_start, item_stop) in _token_chunks(lists, Tq, plan.BLOCK_M):
        n = t1 - t0
        part_buf, part = _chunk_buffer(part_buf, (B, H, n, lists.slots, D), n, q.device)  # filled slots only
        if item_key.numel():
            fast(_bwd_dq_tokens)[(item_key.numel(), grid1)](
                q, k, v, dout, part, lse, delta, item_key, item_start, item_stop, lists.tokens, lists.token_slots,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *part.stride()[:4],
                *lse.stride()[:2], *args, t0, *tail, **kw,
            )
        fast(_sum_slots)[(_ceil_div(n, MERGE_BLOCK_T), B * H)](
            part, kvn, dq, *part.stride()[:4], *_sel_strides(kvn), *dq.stride()[:3],
            t0, n, H, plan.heads_per_sel, lists.slots, scale,
            D=D, HEAD_DIM=plan.HEAD_DIM, BLOCK_T=MERGE_BLOCK_T, num_warps=4,
        )
    return dq


@dataclass(frozen=True)
class _DkdvWork:
    """The work items of :func:`kernel._bwd_dkdv`. Program ``p = (b * Hkv + kvh) * key_chunks +
    n`` (``key_chunks = nKB * KV_BLOCK / BLOCK_N``) owns key chunk ``n`` of KV head ``kvh`` of
    sequence ``b``; its steps are those of its head groups' lists, concatenated in group order.
    ``items int32 [n_items, 4]``: ``(program, first step, end step, slot)``, longest first:
    either a whole program, slot -1 (it writes dK/dV), or a part of a program cut into parts,
    whose fp32 sums go to slot ``slot`` of the partial buffers. ``split int32 [n_split, 3]``:
    ``(program, first slot, parts)`` of each program cut into parts (its parts' slots are
    consecutive, in step order). ``slots``: the partial buffers' slots in all."""

    items: Tensor
    split: Tensor
    slots: int


def _dkdv_work(list_steps: Tensor, batch: int, kv_heads: int, plan: _Plan, chunks: int) -> _DkdvWork:
    """The work items of the dK/dV programs of ``batch`` sequences and ``kv_heads`` KV heads: a
    program of at most ``DKDV_STEPS_PER_ITEM`` steps is one item, a longer one is cut into
    parts of that many steps (the last shorter); a program with no steps is still an item (it
    writes zeros). ``list_steps int64 [Bs, Hs, nKB]``: the steps of each (selection batch,
    selection head, key block)'s list; ``chunks``: key chunks per key block. O(programs) work
    and one host sync."""
    dev = list_steps.device
    per_item = DKDV_STEPS_PER_ITEM
    # the selection head of head group g of KV head kvh (heads kvh * G + g * P, ...), [Hkv, G // P]
    sel_head = (torch.arange(kv_heads, device=dev)[:, None] * plan.heads_per_kv
                + torch.arange(0, plan.heads_per_kv, plan.P, device=dev)) // plan.heads_per_sel
    per_kv_head = list_steps[:, sel_head].sum(2)  # [Bs, Hkv, nKB]
    seq = torch.arange(batch, device=dev) % list_steps.shape[0]  # a shared selection (Bs = 1) serves all
    steps = per_kv_head[seq].repeat_interleave(chunks, dim=2).flatten()  # per program
    parts = ((steps + per_item - 1) // per_item).clamp_min(1)
    split_parts = torch.where(parts > 1, parts, 0)
    n_items, slots, n_split = torch.stack([parts.sum(), split_parts.sum(), (parts > 1).sum()]).tolist()  # sync
    prog = torch.repeat_interleave(torch.arange(steps.numel(), device=dev), parts, output_size=n_items)
    part = torch.arange(n_items, device=dev) - (torch.cumsum(parts, 0) - parts)[prog]
    lo = part * per_item
    hi = torch.minimum(lo + per_item, steps[prog])
    first_slot = torch.cumsum(split_parts, 0) - split_parts
    slot = torch.where(parts[prog] > 1, first_slot[prog] + part, -1)
    longest_first = torch.sort(hi - lo, descending=True, stable=True).indices
    items = torch.stack([prog, lo, hi, slot], 1)[longest_first]
    split_prog = torch.nonzero_static(parts > 1, size=n_split).flatten()
    split = torch.stack([split_prog, first_slot[split_prog], parts[split_prog]], 1)
    return _DkdvWork(items.to(torch.int32).contiguous(), split.to(torch.int32).contiguous(), slots)


def _dkdv(q, k, v, dout, lse, delta, kvn, kvi, sel_meta, plan: _Plan, scale: float, num_kv_blocks: int,
          common: dict) -> tuple[Tensor, Tensor]:
    """``(dk, dv)``, key-major (:func:`kernel._bwd_dkdv`) over the transposed selection, long
    programs cut into parts (:func:`_dkdv_work`) whose partial sums :func:`kernel._sum_dkdv_parts`
    adds. ``common``: the backward's launch keywords."""
    from .kernel import _bwd_dkdv, _sum_dkdv_parts

    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    q_block, kv_block, kv_len, q_offset = sel_meta
    Bs, Hs = kvn.shape[:2]
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    t_off, t_qb = transposed_selection(kvn, kvi, num_kv_blocks)
    counts = (t_off[1:] - t_off[:-1]).long().view(Bs, Hs, num_kv_blocks)
    token_list = q_block == 1
    if token_list:
        # per-token selections: gather as many selecting tokens per step as the rows allow
        gather = max(1, TILE_CAPS[("bwd", q.dtype == torch.float32)][0] // plan.P)
        common = dict(common, BLOCK_M=gather, ROWS=_tile_rows(plan.P * gather))
        list_steps = (counts + gather - 1) // gather
    else:
        list_steps = counts * _ceil_div(q_block, plan.BLOCK_M)
    chunks = kv_block // plan.BLOCK_N
    work = _dkdv_work(list_steps, B, Hkv, plan, chunks)
    # fp32 partials of the split programs' parts, [slots, BLOCK_N, D] (one slot at least: the
    # kernel takes a pointer even when nothing is split)
    dk_part = torch.empty(max(1, work.slots), plan.BLOCK_N, D, device=q.device, dtype=torch.float32)
    dv_part = torch.empty_like(dk_part)
    fast(_bwd_dkdv)[(work.items.shape[0],)](
        q, k, v, dout, dk, dv, dk_part, dv_part, lse, delta, t_off, t_qb, work.items,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3], *lse.stride()[:2],
        Bs, Hs, num_kv_blocks,
        Tq, kv_len, q_offset, q_block, H, plan.heads_per_kv, plan.heads_per_sel,
        scale, plan.window or 0, plan.sink, TOKEN_LIST=token_list, **common,
    )
    if work.split.numel():
        fast(_sum_dkdv_parts)[(work.split.shape[0], plan.BLOCK_N // DKDV_SUM_ROWS)](
            dk_part, dv_part, dk, dv, work.split, *dk.stride()[:3], *dv.stride()[:3],
            kv_len, Hkv, num_kv_blocks * chunks, scale,
            D=D, HEAD_DIM=plan.HEAD_DIM, BLOCK_N=plan.BLOCK_N, SUM_ROWS=DKDV_SUM_ROWS, num_warps=4,
        )
    return dk, dv


def _backward(q, k, v, out, lse, dout, kvn, kvi, sel_meta, plan: _Plan, scale: float, num_kv_blocks: int,
              lists: _TokenLists | None = None):
    """``(dq, dk, dv)``. ``lists``: the forward's transposed per-token selection, reused by the
    key-major dQ (made here when the forward ran query-major)."""
    from ..online_softmax import backward_delta
    from .kernel import _bwd_dq

    B, H, Tq, D = q.shape
    q_block, kv_block, kv_len, q_offset = sel_meta
    dout = dout.contiguous()
    delta = backward_delta(dout, out)  # [B, H, Tq] fp32, laid out as lse
    common = dict(
        D=D, HEAD_DIM=plan.HEAD_DIM, P=plan.P, BLOCK_M=plan.BLOCK_M, ROWS=plan.ROWS,
        KV_BLOCK=kv_block, BLOCK_N=plan.BLOCK_N, **_rule_args(plan),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if plan.key_major:
        if lists is None:
            lists = _token_lists(kvn, kvi, num_kv_blocks, 4 * B * H * (D + 1))
        dq = _dq_key_major(q, k, v, dout, lse, delta, kvn, lists, sel_meta, plan, scale, num_kv_blocks)
    else:
        dq = torch.empty_like(q)
        fast(_bwd_dq)[(_ceil_div(Tq, plan.BLOCK_M), B * (H // plan.P))](
            q, k, v, dout, dq, lse, delta, kvn, kvi,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
            *lse.stride()[:2], *_sel_strides(kvn), *_sel_strides(kvi),
            Tq, kv_len, q_offset, q_block, H, plan.heads_per_kv, plan.heads_per_sel,
            scale, plan.window or 0, plan.sink, **common,
        )
    dk, dv = _dkdv(q, k, v, dout, lse, delta, kvn, kvi, sel_meta, plan, scale, num_kv_blocks, common)
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kvn, kvi, sel_meta, num_kv_blocks, plans, scale):
        out, lse, lists = _forward(q, k, v, kvn, kvi, sel_meta, plans[0], scale, num_kv_blocks)
        ctx.save_for_backward(q, k, v, out, lse, kvn, kvi)
        ctx.meta = (sel_meta, plans[1], scale, num_kv_blocks, lists)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, kvn, kvi = ctx.saved_tensors
        sel_meta, plan, scale, num_kv_blocks, lists = ctx.meta
        dq, dk, dv = _backward(q, k, v, out, lse, dout, kvn, kvi, sel_meta, plan, scale, num_kv_blocks, lists)
        return dq, dk, dv, None, None, None, None, None, None


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, sel: BlockSelection, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of ``q [B, H, Tq, D]`` over ``k, v [B, Hkv, Tk, D]`` restricted to ``sel``.

    Returns ``(out [B, H, Tq, D] in q's dtype, lse float32 [B, H, Tq])`` (natural log;
    ``-inf`` and output 0 for a query with no key). Differentiable in ``q``, ``k``, ``v``.
    Raises ``ValueError`` when :func:`selection_unsupported_reason` gives a reason."""
    reason = selection_unsupported_reason(q, k, sel)
    if reason:
        raise ValueError(f"block_sparse_attention cannot run: {reason}")
    return _unchecked_block_sparse_attention(q, k, v, sel, scale)


def _unchecked_block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, sel: BlockSelection,
                                      scale: float) -> tuple[Tensor, Tensor]:
    """:func:`block_sparse_attention` without its check, for a caller (the triton backend) that
    has just found :func:`selection_unsupported_reason` to be ``None`` (the check costs host time
    that the GPU waits through before the kernel starts). Unsupported inputs are not caught here."""
    if q.shape[0] == 0:
        return torch.zeros_like(q), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
    q, k, v = (kernel_layout(t, name) for t, name in ((q, "q"), (k, "k"), (v, "v")))
    kvn = sel.kv_num_blocks.to(torch.int32)
    kvi = sel.kv_indices.to(torch.int32).contiguous()
    sel_meta = (sel.q_block, sel.kv_block, sel.kv_len, sel.q_offset)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))) and not any(
            forward_ad.unpack_dual(t).tangent is not None for t in (q, k, v)):
        # inference: the forward alone, without the autograd node and the backward's plan (host
        # time the GPU would otherwise wait through before the kernel starts). Dual tensors of
        # forward-mode AD go through the Function, which says it has no jvp.
        out, lse, _ = _forward(q, k, v, kvn, kvi, sel_meta, _plan(q, k, sel, "fwd"), float(scale), sel.num_kv_blocks)
        return out, lse
    plans = (_plan(q, k, sel, "fwd"), _plan(q, k, sel, "bwd"))
    return _BlockSparseAttention.apply(q, k, v, kvn, kvi, sel_meta, sel.num_kv_blocks, plans, float(scale))


__all__ = ["block_sparse_attention", "inputs_unsupported_reason", "selection_unsupported_reason", "transposed_selection"]
