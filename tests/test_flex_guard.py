"""The FlexAttention guard: a recompile-limit hit must never run the dense eager fallback.

The compiled path needs a GPU, so the guard's logic is driven here with stand-in compiled
entries that raise torch's own FailOnRecompileLimitHit, and the real entry builder is checked
to give each rebuilt entry its own code object (torch.compile keys its cache on it)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.exc as dynamo_exc

from longattn.backends import flex as flex_backend


class FakeEntry:
    def __init__(self, fail: bool):
        self.fail = fail
        self.calls = 0

    def __call__(self, q, k, v, block_mask, scale, enable_gqa, aux):
        self.calls += 1
        assert torch._dynamo.config.fail_on_recompile_limit_hit, "guard must make limit hits raise"
        if self.fail:
            raise dynamo_exc.FailOnRecompileLimitHit("limit")
        return q.clone(), torch.zeros(q.shape[:3])


def _install(monkeypatch, entries):
    queue = list(entries)
    monkeypatch.setattr(flex_backend, "_entry", queue.pop(0))
    monkeypatch.setattr(flex_backend, "_new_entry", lambda: queue.pop(0))


def test_limit_hit_rebuilds_once_then_succeeds(monkeypatch):
    first, second = FakeEntry(fail=True), FakeEntry(fail=False)
    _install(monkeypatch, [first, second])
    q = torch.randn(1, 2, 4, 8)
    with pytest.warns(RuntimeWarning, match="rebuilding the compiled entry with a fresh cache"):
        out, lse = flex_backend.compiled_flex_call(q, q, q, None, 1.0, False, {})
    assert torch.equal(out, q) and first.calls == 1 and second.calls == 1
    assert flex_backend._entry is second


def test_second_limit_hit_raises_instead_of_falling_back(monkeypatch):
    _install(monkeypatch, [FakeEntry(fail=True), FakeEntry(fail=True)])
    q = torch.randn(1, 2, 4, 8)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="refusing the eager fallback"):
        flex_backend.compiled_flex_call(q, q, q, None, 1.0, False, {})


def test_each_entry_has_its_own_code_object():
    a, b = flex_backend._new_entry(), flex_backend._new_entry()
    code_a = a._torchdynamo_orig_callable.__code__
    code_b = b._torchdynamo_orig_callable.__code__
    assert code_a is not code_b and code_a.co_name != code_b.co_name
