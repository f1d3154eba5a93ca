"""The fast launch path (``longattn.kernels.launch``): its argument classes are at least as fine as
Triton's own specialisation (checked against Triton's ``native_specialize_impl`` on the CPU), and
on a GPU it launches the compiled kernel Triton would choose, for each class of arguments, with
the same results as ``kernel[grid](...)``; a warm call does not go through Triton's own path.
Under the interpreter every call goes through Triton's own path."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

import longattn
from longattn.kernels import interpreting
from longattn.kernels.launch import arg_classes, fast, hooks_installed

from .conftest import rand_qkv

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_class(a):
    """Triton's specialisation of a non-constexpr argument (type and attribute)."""
    return native_specialize_impl(BaseBackend, a, False, True, True)


def _sample_args():
    ints = [0, 1, -1, 2, 15, 16, 17, -16, -17, 24, 40, -24, (1 << 31) - 8, 31, 32, 48, 49, 127, 128, 4096, 4097, 65536 * 128,
            (1 << 31) - 16, (1 << 31) - 1, 1 << 31, (1 << 31) + 16, (1 << 31) + 1, -(1 << 31), -(1 << 31) - 1,
            -(1 << 31) - 16, 1 << 40, (1 << 40) + 3, (1 << 63) - 1, 1 << 63, (1 << 63) + 16, (1 << 63) + 7]
    base = torch.zeros(64, dtype=torch.float32)
    tensors = [base[i:] for i in range(5)]  # addresses 0, 4, 8, 12, 16 bytes past an aligned one
    tensors += [base.view(torch.bfloat16)[i:] for i in range(9)]
    tensors += [base.view(torch.int32), base.view(torch.int32)[3:], base.view(torch.uint8)[16:]]
    return ints + tensors + [0.5, 1.0, 16.0, True, False, None]


def test_equal_classes_mean_equal_triton_specialisations():
    args = _sample_args()
    classes = [arg_classes((a,)) for a in args]
    for (a, ca), (b, cb) in itertools.combinations(zip(args, classes), 2):
        if ca == cb:
            assert _triton_class(a) == _triton_class(b), (a, b, ca)
    # and the classes tell apart what Triton does (so the check above is not vacuous)
    distinct_triton = {str(_triton_class(a)) for a in args}
    assert len(distinct_triton) >= 12


def test_unknown_argument_types_have_no_class():
    with pytest.raises(TypeError, match="no launch class"):
        arg_classes((object(),))
    with pytest.raises(TypeError, match="no launch class"):
        arg_classes((16, 2 + 1j))


def test_installed_launch_hooks_are_seen():
    from triton import knobs

    assert not hooks_installed()  # the default: empty hook chains
    hook = lambda metadata: None  # noqa: E731
    for chain in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        chain.add(hook)
        try:
            assert hooks_installed()
        finally:
            chain.remove(hook)
    assert not hooks_installed()


@triton.jit
def _scaled_copy(x_ptr, out_ptr, n, stride, alpha, BLOCK: tl.constexpr, NEGATE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride, mask=offs < n, other=0.0)
    y = x * alpha
    if NEGATE:
        y = -y
    tl.store(out_ptr + offs, y, mask=offs < n)


def _expected(x, n, stride, alpha, negate):
    y = x[::stride][:n].float() * alpha
    return (-y if negate else y).to(x.dtype)


def test_fast_launches_match_triton_for_every_class():
    launcher = fast(_scaled_copy)
    assert fast(_scaled_copy) is launcher
    launcher.cache.clear()
    slow0 = launcher.slow_launches
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4096, generator=g).to(DEV)
    # each case is a new class (alignment of x, stride 1 / 16 / other, dtype, constexpr), run twice
    cases = [(base, 1000, 1, False), (base[1:], 1000, 1, False), (base, 200, 16, False), (base[3:], 200, 17, True),
             (base.to(torch.float16), 1000, 1, False), (base, 1000, 2, True), (base[16:], 300, 3, False)]
    for x, n, stride, negate in cases:
        for rep in range(2):
            out = torch.full((n,), float("nan"), device=DEV, dtype=x.dtype)
            alpha = 0.5 * 4**rep  # a power of two: exact in fp16 (the interpreter may round unlike torch)
            fast(_scaled_copy)[(triton.cdiv(n, 128),)](x, out, n, stride, alpha, BLOCK=128, NEGATE=negate)
            torch.testing.assert_close(out, _expected(x, n, stride, alpha, negate), rtol=0, atol=0)
    if interpreting():
        assert launcher.slow_launches - slow0 == 2 * len(cases)  # the interpreter: Triton's own path
        assert not launcher.cache
    else:
        assert launcher.slow_launches - slow0 == len(cases)  # the first call of each class only
        assert len(launcher.cache) == len(cases)


def test_positional_constexprs_go_through_tritons_own_path():
    launcher = fast(_scaled_copy)
    x = torch.arange(64, dtype=torch.float32, device=DEV)
    out = torch.empty_like(x)
    slow0 = launcher.slow_launches
    for _ in range(2):
        launcher[(1,)](x, out, 64, 1, 2.0, 64, False)
    assert launcher.slow_launches - slow0 == 2
    torch.testing.assert_close(out, 2 * x, rtol=0, atol=0)


def _slow_launches() -> int:
    from longattn.kernels.launch import _FAST

    return sum(k.slow_launches for k in _FAST.values())


def _topk(q, k, v):
    return longattn.attention(q, k, v, method="topk", backend="triton", block_size=64, top_k=4)


def _topk_train(q, k, v):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = longattn.attention(q, k, v, method="topk", backend="triton", block_size=64, top_k=4)
    out.float().square().sum().backward()
    return torch.cat([out.flatten(), q.grad.flatten(), k.grad.flatten(), v.grad.flatten()])


def _nsa_train(q, k, v):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = longattn.attention(q, k, v, method="nsa", backend="triton", compress_block=32, compress_stride=16,
                             select_block=64, num_selected=4, window=128)
    out.float().square().sum().backward()
    return torch.cat([out.flatten(), q.grad.flatten(), k.grad.flatten(), v.grad.flatten()])


def _moba(q, k, v):
    return longattn.attention(q, k, v, method="moba", backend="triton", block_size=128, top_k=3)


def _decode(q, k, v):
    from longattn.decode import select_topk_blocks, sparse_decode

    lens = torch.tensor([1024, 700], device=q.device)
    qd = q[:, :, -1:]
    idx, cnt = select_topk_blocks(qd, k, lens, block_size=64, top_k=4, backend="triton")
    return sparse_decode(qd, k, v, lens, idx, cnt, block_size=64, backend="triton")


def _nsa_decode(q, k, v):
    from longattn.decode_nsa import nsa_decode
    from longattn.methods.nsa import NSAConfig

    lens = torch.tensor([1024, 700], device=q.device)
    cfg = NSAConfig(compress_block=32, compress_stride=16, select_block=64, num_selected=4, window=128)
    return nsa_decode(q[:, :, -1:], k, v, lens, config=cfg, backend="triton")


@pytest.mark.skipif(DEV != "cuda", reason="the fast path runs on a GPU (the interpreter takes Triton's own)")
@pytest.mark.parametrize("path", [_topk, _topk_train, _nsa_train, _moba, _decode, _nsa_decode])
def test_a_warm_call_launches_every_kernel_without_tritons_own_path(path):
    """The third call of each path (same shapes, fresh tensors of the same addresses' alignment)
    runs every kernel through the fast path, with the same results as the first two."""
    outs = []
    for rep in range(3):
        q, k, v = rand_qkv(2, 8, 2, 1024, 1024, 64, dtype=torch.bfloat16, device=DEV, seed=5)
        if rep == 2:
            slow = _slow_launches()
        outs.append(path(q, k, v))
    assert _slow_launches() == slow
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
