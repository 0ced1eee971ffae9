#!/usr/bin/env bash
# The mitigation frontier of issue #32 on testbed v2 (docs/results.md, "Mitigation frontier"): every registered
# mitigation, each swept over its strength, on all 64 memorized and the first 128 held-out prompts, 4 seeds, DDIM 50,
# on one CPU thread. Resumable: rerun it and it continues from OUT/parts/ (first seeded from the copy in the repo).
#   tools/frontier.sh          # run or resume (hours; meant to run in the background, see below)
#   tools/frontier.sh save     # copy the finished rows (JSON, no images) to benchmarks/frontier_parts/
# Background: nohup tools/frontier.sh > runs/frontier.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/frontier}
KEEP=benchmarks/frontier_parts
shopt -s nullglob
if [ "${1:-}" = save ]; then  # calibration rows name a local file (NeMo's statistics): recomputed, not kept
    mkdir -p "$KEEP"
    cp -- "$OUT"/parts/settings.json "$OUT"/parts/memorized-*.json "$OUT"/parts/heldout-*.json "$KEEP/"
    du -sh "$KEEP"
    exit 0
fi
mkdir -p "$OUT/parts"
kept=("$KEEP"/*.json)
if [ ${#kept[@]} -gt 0 ]; then cp -n -- "${kept[@]}" "$OUT/parts/"; fi  # never over a row measured here
exec env OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
    .venv/bin/diffmem testbed mitigation --out "$OUT" --methods all --heldout 128 --generations 4 \
    --num-inference-steps 50 --no-guard
