import os
import zlib

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
if os.environ.get("LONGATTN_TEST_DEVICE"):
    DEVICES = [os.environ["LONGATTN_TEST_DEVICE"]]
if "cuda" not in DEVICES:
    # CPU runs test the Triton kernels through the interpreter (must be set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every process (Python's ``hash`` of a
    string is salted per process, so seeds built from it change from run to run)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def rand_qkv(B, H, Hkv, Tq, Tk, D, *, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    """Fresh Gaussian inputs, generated on the CPU in fp32 (device-independent), then cast."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    out = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    return tuple(out)


def poison_device_memory(device: str, nbytes: int = 1 << 26) -> None:
    """Fill the caching allocator's free blocks with NaN, so an output element a kernel
    forgets to write reads back as NaN. Only meaningful on CUDA (the CPU allocator does not
    reuse freed blocks deterministically)."""
    if device == "cuda":
        junk = torch.full((nbytes // 4,), float("nan"), device=device)
        del junk


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
