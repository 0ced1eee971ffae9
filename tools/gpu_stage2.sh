#!/usr/bin/env bash
# Training-time mitigation on the testbed (README, "Mitigate at training"), as run on one GPU machine:
# stage 2 of the recipe three ways from the shipped base UNet (none, the magnitude filter at the calibrated TAU,
# random token addition), each measured with `diffmem testbed quality`. Same commands as on a CPU, with
# --device cuda. Expects `.whl/` with the wheels the machine lacks (diffusers, importlib_metadata) and
# `.gpu/` with the cached planted and seen-once latents (runs/<work>/latents_{planted,stage2_unique}.safetensors);
# everything ends up in $OUT/results.tgz, refreshed after every step so that a cut-off run still returns its part.
# Ran once (2026-12-04, H200) against the not-shipped v2 testbed: calibrate 29 s, stage 2 123 s / 166 s (none /
# filter, process start included), quality 38 s / 33 s; the device time ran out during the RTA run.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=/tmp/w
R=$W/results
mkdir -p "$W/base" "$R"
cp .gpu/latents_*.safetensors "$W/base/"
pack() { tar czf "$OUT/results.tgz" -C "$W" results; }
run() {  # name, command...: time it, keep its output
  local name=$1; shift
  local t0=$SECONDS rc
  "$@" > "$R/$name.txt" 2>&1
  rc=$?
  echo "$name rc=$rc wall_s=$((SECONDS - t0))" | tee -a "$R/times.txt"
  pack
}
nvidia-smi -L > "$R/env.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" >> "$R/env.txt" 2>&1
DM=(python3 -m diffmem.cli)
# a quick dry run on a CPU: DEV=cpu S2="--train-steps 2" Q="--generations 1 --num-inference-steps 2 --heldout 4" tools/gpu_stage2.sh
DEV=${DEV:-cuda}
read -ra S2 <<< "${S2:-}"
read -ra Q <<< "${Q:---heldout 128}"
run calibrate "${DM[@]}" testbed stage2 --calibrate --work "$W/base" --device "$DEV"
cp "$W/base/calibration.json" "$R/"
TAU=$(python3 -c "import json; print(json.load(open('$W/base/calibration.json'))['suggested_tau'])")
for v in none filter rta; do
  mkdir -p "$W/$v"
  cp "$W"/base/latents_*.safetensors "$W/$v/"
  case $v in none) extra=();; filter) extra=(--filter-threshold "$TAU");; rta) extra=(--caption-aug rta);; esac
  run "stage2_$v" "${DM[@]}" testbed stage2 --work "$W/$v" --dest "$W/$v/pipe" --device "$DEV" "${S2[@]}" "${extra[@]}"
  cp "$W/$v/summary.json" "$R/summary_$v.json"
  cp "$W/$v/stage2/log.jsonl" "$R/log_$v.jsonl"
  run "quality_$v" "${DM[@]}" testbed quality --model "$W/$v/pipe" "${Q[@]}" --device "$DEV" --out "$W/q_$v"
  cp "$W/q_$v/quality.json" "$R/quality_$v.json"
  cp "$W/q_$v/copies.png" "$R/copies_$v.png"
  pack
done
