#!/usr/bin/env bash
# One GPU call that checks and times what the CPU cannot: run from the repository root on the
# device machine, results under $OUT. Each step is time-boxed so one slow step cannot eat the
# call; a step that times out leaves its partial log (and the suite's resumable JSON lines).
#   STEPS="tests conformance prefill decode nsa sweep" bash benchmarks/device_check.sh
# Steps:
#   tests        the Triton kernel tests compiled on the GPU (block-sparse, decode, NSA, NSA decode)
#   conformance  the conformance cases still to pass on a GPU (docs/results/gpu-conformance-not-yet-run.txt),
#                then the sparse methods' dense-masked sdpa path
#   prefill      suite: full/top-k/MoBA/window forward+backward at 2k-32k (ours, dense masked, cuDNN,
#                FlashAttention; then Flex top-k at 4k-16k): the break-even lengths of `auto`
#   decode       suite: top-k and Quest decoding at 128k (B = 1, 4 with lengths 128k ... 32k, and 16
#                sequences of 128k each, the issue's sparse-decoding target)
#   nsa          suite NSA forward at 8k-64k (Flex at 8k) and benchmarks/nsa_phases.py
#   sweep        benchmarks/tile_sweep.py at 64k
#   nsatrain     NSA training: benchmarks/nsa_train_phases.py at 64k, then the suite's NSA and dense
#                forward + backward at 16k and 64k
#   decodesweep  benchmarks/decode_sweep.py: sparse decoding at 128k, split-K counts, selection alone
#   auto2        benchmarks/auto_check.py for sink and BigBird (512-16k), the other methods below 1k
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
STEPS=${STEPS:-tests conformance prefill decode nsa}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} TORCHINDUCTOR_COMPILE_THREADS=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch,triton,transformers,sys;print(sys.version.split()[0],torch.__version__,triton.__version__,transformers.__version__)"
  date -u; } > "$OUT/env.txt" 2>&1
for step in $STEPS; do
  el "$step"
  case $step in
    tests) LONGATTN_TEST_DEVICE=cuda timeout 120 python3 -m pytest tests/test_block_sparse_kernel.py tests/test_decode.py \
             tests/test_nsa_kernel.py $(ls tests/test_decode_nsa.py 2>/dev/null) -o addopts="" -p no:cacheprovider -q -n 8 \
             > "$OUT/tests.log" 2>&1; echo "rc=$?" >> "$OUT/tests.log"; tail -2 "$OUT/tests.log" ;;
    conformance) ids=$(grep -v '^#' docs/results/gpu-conformance-not-yet-run.txt)
             if [ -n "$ids" ]; then
             LONGATTN_TEST_DEVICE=cuda timeout 240 python3 -m pytest $ids \
             -o addopts="" -p no:cacheprovider -v -n 14 > "$OUT/conformance.log" 2>&1; echo "rc=$?" >> "$OUT/conformance.log"
             grep -c PASSED "$OUT/conformance.log"; grep -E "^FAILED" "$OUT/conformance.log" | head
             else echo "no conformance ids pending"; fi
             # the dense-masked sdpa path of the sparse methods (new; no compilation)
             LONGATTN_TEST_DEVICE=cuda timeout 90 python3 -m pytest tests/test_conformance.py \
             -k "sdpa and not full-sdpa" -o addopts="" -p no:cacheprovider -q -n 14 > "$OUT/conformance_sdpa.log" 2>&1
             echo "rc=$?" >> "$OUT/conformance_sdpa.log"; tail -3 "$OUT/conformance_sdpa.log" ;;
    prefill) # ours, dense masked (a sparse method's sdpa path) and dense at 2k-32k: the break-even lengths of
             # `auto` (64k and 128k are in docs/results/suite-2026-11-29.jsonl); then Flex top-k with what is left
             timeout 180 python3 benchmarks/suite.py --out "$OUT" --sizes 2k,4k,8k,16k,32k --hkv 8 \
             --methods full,topk,moba,window --backends ours,sdpa-cudnn,sdpa-flash,dense-mask --ops fwd,bwd \
             --max-seconds 170 > "$OUT/suite_prefill.log" 2>&1
             timeout 80 python3 benchmarks/suite.py --out "$OUT" --sizes 4k,8k,16k --hkv 8 --methods topk \
             --backends flex --ops fwd,bwd --max-seconds 70 >> "$OUT/suite_prefill.log" 2>&1
             tail -40 "$OUT/suite_prefill.log" ;;
    decode) timeout 60 python3 benchmarks/suite.py --out "$OUT" --sizes 128k --hkv 8 --methods full,topk,quest --ops decode \
             --max-seconds 55 > "$OUT/suite_decode.log" 2>&1
            timeout 60 python3 benchmarks/suite.py --out "$OUT" --sizes 128k --hkv 8 --methods full,topk,quest --ops decode \
             --decode-batch 16 --decode-lengths fixed --max-seconds 55 >> "$OUT/suite_decode.log" 2>&1
            grep -E "^decode" "$OUT/suite_decode.log" | tail -30 ;;
    nsa) timeout 90 python3 benchmarks/suite.py --out "$OUT" --sizes 8k,16k,32k,64k --hkv 8 --methods nsa --ops fwd \
             --backends ours --max-seconds 80 > "$OUT/suite_nsa.log" 2>&1
         timeout 45 python3 benchmarks/suite.py --out "$OUT" --sizes 8k --hkv 8 --methods nsa --ops fwd --backends flex \
             --max-seconds 40 >> "$OUT/suite_nsa.log" 2>&1
         timeout 100 python3 benchmarks/nsa_phases.py --T 65536 --out "$OUT/nsa_phases.json" > "$OUT/nsa_phases.log" 2>&1
         tail -30 "$OUT/nsa_phases.log" ;;
    sweep) timeout 90 python3 benchmarks/tile_sweep.py --out "$OUT/tiles.jsonl" --max-seconds 80 > "$OUT/tiles.log" 2>&1
           tail -24 "$OUT/tiles.log" ;;
    nsatrain) timeout 150 python3 benchmarks/nsa_train_phases.py --T 65536 --out "$OUT/nsa_train_phases.json" \
             > "$OUT/nsa_train_phases.log" 2>&1; tail -8 "$OUT/nsa_train_phases.log"
         timeout 120 python3 benchmarks/suite.py --out "$OUT" --sizes 16k,64k --hkv 8 --methods full,nsa \
             --backends ours,sdpa-cudnn,sdpa-flash --ops fwd,bwd --max-seconds 110 > "$OUT/suite_nsatrain.log" 2>&1
         tail -16 "$OUT/suite_nsatrain.log" ;;
    decodesweep) timeout 90 python3 benchmarks/decode_sweep.py --out "$OUT/decode_sweep.jsonl" > "$OUT/decode_sweep.log" 2>&1
             tail -20 "$OUT/decode_sweep.log" ;;
    auto2) export OUT
         { timeout 150 python3 benchmarks/auto_check.py --methods sink,bigbird --lengths 512,1k,2k,4k,16k \
             --name auto_check_sink_bigbird.json
           timeout 60 python3 benchmarks/auto_check.py --methods topk,window,moba --lengths 256,512 \
             --name auto_check_short.json; } > "$OUT/auto2.log" 2>&1; tail -40 "$OUT/auto2.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
el done
