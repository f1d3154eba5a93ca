"""The finiteness check of selecting methods reuses the fp32 block sums their selection computed
(``longattn.finite``): it still finds every NaN and infinity in q, k and v, looks at the sums
instead of the tensors they cover, and confirms a flag from a sum on the tensor itself (finite
values whose fp32 sum overflows are not an error). CPU runs exercise the deferred (GPU) order
by switching it on."""

from __future__ import annotations

import pytest
import torch

import longattn
import longattn.api as api
from longattn.finite import collecting_witnesses, tensor_key, witness_sums

from .conftest import rand_qkv


@pytest.fixture
def deferred(monkeypatch):
    """The GPU order on any device: the check runs after the work, with witnesses."""
    monkeypatch.setattr(api, "_defer_finite_check", lambda device: True)


@pytest.fixture
def checked_sizes(monkeypatch):
    """Element counts of the tensors the one-pass probe reads."""
    seen = []
    real = api._finite_probe
    monkeypatch.setattr(api, "_finite_probe", lambda t: seen.append(t.numel()) or real(t))
    return seen


def test_top_k_checks_q_and_k_through_their_block_sums(device, deferred, checked_sizes):
    q, k, v = rand_qkv(1, 4, 2, 128, 128, 16, device=device, seed=1)
    out = longattn.attention(q, k, v, method="topk", block_size=16, top_k=2, backend="reference")
    assert torch.isfinite(out).all()
    # q and k: their [B, H, 8 blocks, D] sums (8x fewer elements); v: itself
    assert sorted(checked_sizes) == sorted([q.numel() // 16, k.numel() // 16, v.numel()])


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_nonfinite_input_is_still_reported(device, deferred, name, value):
    q, k, v = rand_qkv(1, 4, 2, 128, 128, 16, device=device, seed=2)
    t = {"q": q, "k": k, "v": v}[name]
    t[0, 1, 77, 5] = value
    with pytest.raises(ValueError, match=f"^{name} contains NaN or Inf"):
        longattn.attention(q, k, v, method="topk", block_size=16, top_k=2, backend="reference")


def test_a_flag_from_an_overflowing_sum_is_confirmed_on_the_tensor():
    """Finite bf16 values near the largest float: their fp32 block sums overflow to inf, so the
    witness flags them, and the confirmation on the tensor clears it. A real NaN is raised."""
    big = torch.full((1, 1, 32, 4), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16)
    with collecting_witnesses() as wit:
        sums = big.view(1, 1, 2, 16, 4).sum(3, dtype=torch.float32)
        witness_sums(big, sums)
    assert tensor_key(big) in wit and torch.isinf(sums).all()
    flags = api.nonfinite_flags(wit, q=big)
    assert torch.isinf(flags[1]).tolist() == [True] and flags[2][0] is big  # flagged from the sums ...
    api.raise_if_nonfinite(flags)  # ... and cleared by the tensor
    bad = big.clone()
    bad[0, 0, 3, 1] = float("nan")
    with collecting_witnesses() as wit:
        witness_sums(bad, bad.view(1, 1, 2, 16, 4).sum(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="^k contains NaN or Inf"):
        api.raise_if_nonfinite(api.nonfinite_flags(wit, k=bad))


def test_witnesses_are_only_collected_inside_the_context():
    x = torch.ones(2, 3)
    witness_sums(x, x.sum(0))  # outside: ignored, nothing to record into
    with collecting_witnesses() as wit:
        with collecting_witnesses() as inner:
            witness_sums(x, x.sum(0))
        assert tensor_key(x) in inner and not wit
    assert tensor_key(x[:1]) != tensor_key(x)  # a view of other elements is another tensor


def test_a_per_token_gate_checks_the_tensor_itself(device, deferred, checked_sizes):
    """MoBA's per-token gate pools q in blocks of one token: its "sums" are an fp32 copy of q,
    larger than q, so q is checked itself; k's block sums still stand in for k."""
    q, k, v = rand_qkv(1, 4, 2, 128, 128, 16, device=device, seed=6)
    longattn.attention(q, k, v, method="moba", block_size=32, top_k=2, backend="reference")
    assert sorted(checked_sizes) == sorted([q.numel(), k.numel() // 32, v.numel()])
