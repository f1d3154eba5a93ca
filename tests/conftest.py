import os
import zlib

# Under pytest-xdist, one intra-op thread per worker: on the 2-core CI machine two workers with
# two threads each ran the CPU-bound tests about 2x slower than with one each. Set before torch
# loads where possible (and for the subprocesses tests start), and again through torch below.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS) if _WORKERS else None
if _THREADS:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

if _THREADS:
    torch.set_num_threads(_THREADS)

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


def tiny_causal_lm(family: str = "llama", **extra):
    """A tiny randomly initialised ``transformers`` causal LM (2 layers, 4 query / 2 KV heads,
    head dim 16) of ``family`` ``llama``, ``qwen2`` or ``mistral``, seeded, in eval mode, on
    SDPA, generating exactly ``max_new_tokens`` (no eos)."""
    import transformers

    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    common.update(extra)
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    torch.manual_seed(0)
    cfg = cls_cfg(**common)
    cfg._attn_implementation = "sdpa"
    model = cls_model(cfg).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def limit_rank_launches(monkeypatch, slices: int) -> list[int]:
    """Cap the ranking kernel's launches at ``slices`` (batch x head) slices each (CUDA's limit
    is 65535) and record the slices of every launch made from then on."""
    import longattn.kernels.nsa as nsa_kernels
    from longattn.kernels.nsa import kernel as nsa_kernel

    monkeypatch.setattr(nsa_kernels, "MAX_RANK_SLICES", slices)
    launches: list[int] = []
    real = nsa_kernel._select_rank

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid[1])
            return real[grid]

    monkeypatch.setattr(nsa_kernel, "_select_rank", Counting())
    return launches
