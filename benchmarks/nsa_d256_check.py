"""GPU check of NSA at D = 256 (the tiles chosen for sm_90's shared memory): ``backend="triton"``
against the fp32 reference, forward for bf16 / fp16 / fp32 inputs with fp32 and input-dtype
compressed tokens, backward for bf16 and fp32 (H = 8, Hkv = 2, paper defaults). Prints each
error, the same dtype's plain PyTorch error, and OK/BAD by DESIGN.md's bound (2 x plain + floor);
the last line counts the BAD ones.

    python3 benchmarks/nsa_d256_check.py > $OUT/d256.log        # T = 1024 and 4096 (TS=...)
    DEV=cpu TS=160 TRITON_INTERPRET=1 python3 benchmarks/nsa_d256_check.py  # interpreter smoke run

(The interpreter truncates bf16 where a GPU rounds, so its bf16 rows can read BAD; the GPU's are
the check.)
"""
import torch, longattn, warnings
torch.manual_seed(0)
import os, sys
dev = os.environ.get("DEV", "cuda")
TS = [int(x) for x in os.environ.get("TS", "1024,4096").split(",")]
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}
def err(a, b): return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
bad = 0
for T in TS:
  for dt in (torch.bfloat16, torch.float16, torch.float32):
    for cmp in ("float32", "input"):
      q = torch.randn(1, 8, T, 256, device=dev).to(dt); k = torch.randn(1, 2, T, 256, device=dev).to(dt); v = torch.randn(1, 2, T, 256, device=dev).to(dt)
      train = dt != torch.float16
      ins = [t.clone().requires_grad_(train) for t in (q, k, v)]
      with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = longattn.attention(*ins, method="nsa", backend="triton", compressed_dtype=cmp)
      r_in = [t.detach().float().requires_grad_(train) for t in (q, k, v)]
      ref = longattn.attention(*r_in, method="nsa", backend="reference", compressed_dtype=cmp)
      p_in = [t.detach().clone().requires_grad_(train) for t in (q, k, v)]
      plain = longattn.attention(*p_in, method="nsa", backend="reference", compressed_dtype=cmp)
      e, pe = err(out, ref), err(plain, ref)
      ok = e <= 2 * pe + FLOOR[dt]; bad += not ok
      line = f"T={T} {str(dt)[6:]:8s} cmp={cmp:7s} fwd err {e:.2e} plain {pe:.2e} {'OK' if ok else 'BAD'}"
      if train:
        g = torch.randn_like(out)
        with warnings.catch_warnings():
          warnings.simplefilter("error")  # no fallback in the backward either
          ga = torch.autograd.grad(out, ins, g)
        gr = torch.autograd.grad(ref, r_in, g.float()); gp = torch.autograd.grad(plain, p_in, g)
        for n, a, r, p in zip("qkv", ga, gr, gp):
          e, pe = err(a, r), err(p, r); ok = e <= 2 * pe + FLOOR[dt]; bad += not ok
          line += f" | d{n} {e:.2e}/{pe:.2e} {'OK' if ok else 'BAD'}"
      print(line, flush=True)
print("D256 BAD =", bad)
