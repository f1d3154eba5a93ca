"""What ``backend="auto"`` resolves to on this GPU, and its time beside every explicit backend
(median of ``--reps`` (5) CUDA-event-timed calls after one warm-up; ``train`` times forward + backward).
B = 1, H = 32, Hkv = 8, D = 128, bf16, causal; lengths and methods from the arguments (default:
top-k, window, MoBA and NSA at 1k, 2k, 4k, 16k; NSA from 4k); the explicit Flex column for
MoBA and NSA only up to ``--flex-max`` (compilation time; ``auto`` itself may still choose Flex
above). Writes ``$OUT/<--name>`` (default ``auto_check.json``) at the end; one JSON line per case on stdout.

    PYTHONPATH=src python3 benchmarks/auto_check.py
    PYTHONPATH=src python3 benchmarks/auto_check.py --methods sink,bigbird --lengths 256,512,1k,2k,4k,16k
"""
import argparse, json, os, sys, warnings
import torch
sys.path.insert(0, "src")
import longattn
from longattn.api import resolve_backend, validate_inputs
from _timing import median_ms  # benchmarks/_timing.py

# the suite's configurations (top-k 16 of 128, window 4096, MoBA / NSA paper defaults); sink and
# BigBird at their defaults
CFG = {"topk": {"block_size": 128, "top_k": 16}, "window": {"window": 4096}, "moba": {}, "nsa": {},
       "sink": {}, "bigbird": {}}
ap = argparse.ArgumentParser()
ap.add_argument("--methods", default="topk,window,moba,nsa")
ap.add_argument("--lengths", default="1k,2k,4k,16k")
ap.add_argument("--modes", default="infer,train")
ap.add_argument("--flex-max", type=int, default=4096, help="longest T of the explicit Flex column for moba/nsa")
ap.add_argument("--name", default="auto_check.json")
ap.add_argument("--skip", default="", help="comma-separated explicit backends not to time (e.g. flex: its compile per shape)")
ap.add_argument("--reps", type=int, default=5, help="timed calls per median")
a = ap.parse_args()
LENGTHS = [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in a.lengths.split(",")]
MODES = a.modes.split(",")
rows = []
for name in a.methods.split(","):
    cfg = CFG[name]
    for T in LENGTHS:
        for grad in [m == "train" for m in MODES]:
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
                if be == "flex" and name in ("moba", "nsa") and T > a.flex_max: continue  # compile time
                if be in a.skip.split(","): continue
                try:
                    with warnings.catch_warnings(record=True) as w:
                        warnings.simplefilter("always")
                        if grad:
                            do = torch.randn_like(q)
                            f = lambda be=be: torch.autograd.grad(longattn.attention(q, k, v, method=name, backend=be, **cfg), (q, k, v), do)
                        else:
                            f = lambda be=be: longattn.attention(q, k, v, method=name, backend=be, **cfg)
                        with torch.set_grad_enabled(grad):
                            times[be] = round(median_ms(f, a.reps), 3)
                    if any("cannot serve" in str(x.message) or "failed on this call" in str(x.message) for x in w):
                        times[be] = f"{times[be]} (fell back)"
                except Exception as ex:
                    times[be] = f"EXC {type(ex).__name__}"
            row = dict(method=name, T=T, mode="train" if grad else "infer", auto=chosen, ms=times)
            rows.append(row); print(json.dumps(row), flush=True)
            del q, k, v; torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), a.name), "w"), indent=1)
