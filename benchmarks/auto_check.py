"""What ``backend="auto"`` resolves to on this GPU, and its time beside every explicit backend
(median of 5 CUDA-event-timed calls after one warm-up; ``train`` times forward + backward).
B = 1, H = 32, Hkv = 8, D = 128, bf16, causal, T in {1k, 2k, 4k, 16k}; the explicit Flex column for
MoBA and NSA only up to 4k (compilation time; ``auto`` itself may still choose Flex above).
Writes ``$OUT/auto_check.json``; one JSON line per case on stdout.

    PYTHONPATH=src python3 benchmarks/auto_check.py
"""
import json, os, sys, warnings
import torch
sys.path.insert(0, "src")
import longattn
from longattn.api import resolve_backend, validate_inputs
from _timing import median_ms  # benchmarks/_timing.py

CFG = {"topk": {"block_size": 128, "top_k": 16}, "window": {"window": 4096}, "moba": {}, "nsa": {}}
rows = []
for name, cfg in CFG.items():
    for T in (1024, 2048, 4096, 16384):
        if name == "nsa" and T < 4096: continue
        for grad in (False, True):
            if name == "nsa" and grad: continue
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
            k = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
            v = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
            spec = longattn.get_method(name)
            inp = validate_inputs(q, k, v, causal=True, scale=None)
            with torch.set_grad_enabled(grad):
                chosen = resolve_backend(spec, inp, spec.make_config(**cfg), "auto")
            times = {}
            for be in ["auto"] + [b for b in spec.all_backends() if b != "reference"]:
                if be == "flex" and name in ("moba", "nsa") and T > 4096: continue  # compile time
                try:
                    with warnings.catch_warnings(record=True) as w:
                        warnings.simplefilter("always")
                        if grad:
                            do = torch.randn_like(q)
                            f = lambda be=be: torch.autograd.grad(longattn.attention(q, k, v, method=name, backend=be, **cfg), (q, k, v), do)
                        else:
                            f = lambda be=be: longattn.attention(q, k, v, method=name, backend=be, **cfg)
                        with torch.set_grad_enabled(grad):
                            times[be] = round(median_ms(f, 5), 3)
                    if any("cannot serve" in str(x.message) or "failed on this call" in str(x.message) for x in w):
                        times[be] = f"{times[be]} (fell back)"
                except Exception as ex:
                    times[be] = f"EXC {type(ex).__name__}"
            row = dict(method=name, T=T, mode="train" if grad else "infer", auto=chosen, ms=times)
            rows.append(row); print(json.dumps(row), flush=True)
            del q, k, v; torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "auto_check.json"), "w"), indent=1)
