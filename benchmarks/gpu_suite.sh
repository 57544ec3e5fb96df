#!/usr/bin/env bash
# Every GPU measurement the open benchmark targets still need, in one call on one CUDA machine (about 8 min on
# an H200): the MoE speed table (moe_speed.py, with the correctness check first) and the Nexus table at the
# issue's reference budget (nexus_table.py --reference). Logs and JSON go to $OUT; models to $WORK.
#
#   benchmarks/gpu_suite.sh prepare   # here, with network: copy the data into local/, fetch missing wheels
#   benchmarks/gpu_suite.sh           # there: install local wheels if any, run both benchmarks
#   SMOKE=1 benchmarks/gpu_suite.sh   # the same commands on the CPU at toy budgets, to test the script
#
# SHARED holds seeds/seed-s and corpus/{code,de,ja,ru,es}.{train,valid}.jsonl (default: local/shared, else
# ../shared). A machine whose Python lacks the project's dependencies gets the wheels in .whl/ on its path.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPES=${RECIPES:-"paper,paper-keep,targeted,targeted:new_share=0.35,targeted:row_old_weight=1;passes=5"}
EXT_SEEDS=${EXT_SEEDS:-0}  # e.g. 0,1,2: each extension once per run seed, and a table of their spread
LABELS=${LABELS:-0}  # 1: also the MoEs trained on labels only (--moe-distill none), with the same experts
COMPILE=${COMPILE:-default}  # moe_speed.py --compile modes, e.g. default,reduce-overhead (CUDA graphs)

if [ "${1:-}" = prepare ]; then
    mkdir -p local/shared/seeds local/shared/corpus
    cp -r "${SHARED:-../shared}/seeds/seed-s" local/shared/seeds/
    for d in code de ja ru es; do cp "${SHARED:-../shared}/corpus/$d".{train,valid}.jsonl local/shared/corpus/; done
    # the project's needs that a CUDA image with torch/transformers/peft/accelerate usually lacks, at the versions
    # installed here (pydantic pins its pydantic-core exactly)
    pins=$(python3 -c "import importlib.metadata as m
for n in 'pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess tomli-w'.split():
    print(f'{n}=={m.version(n)}')")
    rm -rf .whl
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
    grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
    du -sh local .whl
    exit 0
fi

SHARED=${SHARED:-$( [ -d local/shared ] && echo local/shared || echo ../shared )}
OUT=${OUT:-bench-out/gpu}
WORK=${WORK:-bench-out/gpu-work}
mkdir -p "$OUT" "$WORK"
if [ -d .whl ] && ! python3 -c "import pydantic, datasets" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'device:', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/device.txt"

if [ "${SMOKE:-0}" = 1 ]; then
    speed=(--device cpu --check --tokens 256 --repeats 1 --configs 8x1)
    table=(--device cpu --expert-steps 2 --batch-size 2 --seq-len 32 --eval-blocks 2)
else
    speed=(--device cuda --check --ours grouped_mm --compile "$COMPILE")
    table=(--device cuda --bf16 --reference)
fi
python3 benchmarks/moe_speed.py "${speed[@]}" 2>&1 | tee "$OUT/moe_speed.log"
python3 benchmarks/nexus_table.py --shared "$SHARED" "${table[@]}" --out "$WORK/nexus" --json "$OUT/nexus.json" \
    --recipes "$RECIPES" --ext-seeds "$EXT_SEEDS" 2>&1 | tee "$OUT/nexus.log"
if [ "$LABELS" = 1 ]; then
    mkdir -p "$WORK/nexus-labels"
    cp -r "$WORK/nexus/experts" "$WORK/nexus/store" "$WORK/nexus-labels/"
    python3 benchmarks/nexus_table.py --shared "$SHARED" "${table[@]}" --out "$WORK/nexus-labels" \
        --json "$OUT/nexus-labels.json" --moe-distill none --recipes targeted --linear-recipes targeted \
        --ext-seeds "$EXT_SEEDS" 2>&1 | tee "$OUT/nexus-labels.log"
fi
