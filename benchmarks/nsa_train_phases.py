"""Time each phase of NSA's training step (forward + backward, backend "triton") on the GPU.

Each phase is timed forward alone and forward + backward (gradients of q, k, v for a fixed
random output gradient): the compressed branch (mean pooling + the NSA kernel with its backward
kernels), the selected branch (block-sparse kernels over the per-token selection, built once),
the window branch, and the whole ``longattn.attention(method="nsa", backend="triton")`` call;
SDPA dense causal (cuDNN and FlashAttention back ends, K/V expanded to every query head) in the
same process. Median of CUDA-event timings; one JSON object to ``--out`` and a table on stdout.

    python3 benchmarks/nsa_train_phases.py --T 65536 --out $OUT/nsa_train_phases.json
"""

from __future__ import annotations

import argparse
import json

import torch
from _timing import median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="nsa_train_phases.json")
    ap.add_argument("--cmp-bwd", default=None,
                    help="launch settings of the compressed-branch backward kernels, e.g. num_warps=4,num_stages=2")
    args = ap.parse_args()

    import longattn
    from longattn.kernels.nsa import LAUNCH_OVERRIDES, compressed_attention

    if args.cmp_bwd:
        LAUNCH_OVERRIDES["cmp_bwd"] = {k: int(v) for k, v in (kv.split("=") for kv in args.cmp_bwd.split(","))}
    from longattn.methods import nsa as m
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    B, H, D, T = 1, 32, 128, args.T
    q, k, v = (torch.randn(B, h, T, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (H, args.hkv, args.hkv))
    do = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    cfg = longattn.get_method("nsa").make_config()
    scale = D ** -0.5
    l, d = cfg.compress_block, cfg.compress_stride
    with torch.no_grad():  # the selection the triton path builds (kernel scores and ranking)
        k_cmp, v_cmp = m.nsa_compress(k, v, cfg)
        _, sel = m._kernel_compressed(q, k_cmp, v_cmp, cfg, kv_len=T, scale=scale)

    def compressed():
        kc, vc = m.nsa_compress(k, v, cfg)
        return compressed_attention(q, kc, vc, kv_len=T, compress_block=l, compress_stride=d, scale=scale)[0]

    phases = {
        "compressed_branch": compressed,
        "selected_branch": lambda: m.nsa_selected_branch(q, k, v, sel, scale=scale, backend="triton"),
        "window_branch": lambda: m.nsa_window_branch(q, k, v, cfg, scale=scale, backend="triton"),
        "whole_call": lambda: longattn.attention(q, k, v, method="nsa", backend="triton"),
    }
    kx, vx = (t.detach().repeat_interleave(H // args.hkv, 1).requires_grad_() for t in (k, v))
    for name, be in (("sdpa_cudnn_dense", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash_dense", SDPBackend.FLASH_ATTENTION)):
        def dense(be=be):
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(q, kx, vx, is_causal=True)
        phases[name] = dense

    res: dict[str, dict[str, float]] = {}
    for name, fn in phases.items():
        inputs = (q, kx, vx) if name.startswith("sdpa") else (q, k, v)
        with torch.no_grad():
            fwd = median_ms(fn, args.reps)
        both = median_ms(lambda fn=fn, inputs=inputs: torch.autograd.grad(fn(), inputs, do), args.reps)
        torch.cuda.synchronize()
        res[name] = {"fwd_ms": round(fwd, 3), "fwd_bwd_ms": round(both, 3), "bwd_ms": round(both - fwd, 3)}
        print(f"{name:22s} fwd {fwd:9.2f} ms   fwd+bwd {both:9.2f} ms   bwd {both - fwd:9.2f} ms", flush=True)
        with open(args.out, "w") as f:  # rewritten after every phase: a crash keeps what ran
            json.dump({"T": T, "B": B, "H": H, "Hkv": args.hkv, "D": D, "dtype": "bfloat16",
                       "launch_overrides": LAUNCH_OVERRIDES,
                       "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "phases": res}, f, indent=1)


if __name__ == "__main__":
    main()
