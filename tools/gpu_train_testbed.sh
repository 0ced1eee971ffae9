#!/usr/bin/env bash
# The testbed recipe on one GPU (issue: "it should fit in 10 minutes on one H100-class GPU"): the same
# `diffmem testbed train` as on the CPU, with --device cuda, and the weights sent back flat through $OUT (the
# device tool returns at most 8 files of 16 MiB, two folders deep): each component's fp16 safetensors, plus a
# tarball of configs, tokenizer, recipe and logs. Rebuild the testbed folder from them with
#     tar xzf meta.tgz -C DEST && for c in unet text_encoder vae; do
#         cp $c.safetensors DEST/pipeline/$c/; done   # (file names inside as in a diffusers folder)
# Expects `.whl/` with the wheels the GPU image lacks (diffusers, importlib_metadata; see the device README).
# Not run yet: no GPU was lent in the session that wrote it; the CPU run of the same recipe is in
# src/diffmem/testbed/weights/log/.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=/tmp/testbed_work
D=/tmp/testbed
start=$SECONDS
python3 -m diffmem.cli testbed train --work "$W" --dest "$D" --device cuda > "$OUT/train.log" 2>&1 || {
    tail -n 30 "$OUT/train.log"; exit 1; }
echo "testbed train: $((SECONDS - start)) s" | tee -a "$OUT/train.log"
cp "$D/pipeline/unet/diffusion_pytorch_model.safetensors" "$OUT/unet.safetensors"
cp "$D/base_unet/diffusion_pytorch_model.safetensors" "$OUT/base_unet.safetensors"
cp "$D/pipeline/text_encoder/model.safetensors" "$OUT/text_encoder.safetensors"
cp "$D/pipeline/vae/diffusion_pytorch_model.safetensors" "$OUT/vae.safetensors"
cp "$W"/stage1/log.jsonl "$D/stage1_log.jsonl" && cp "$W"/stage2/log.jsonl "$D/stage2_log.jsonl"
tar czf "$OUT/meta.tgz" -C "$D" --exclude='*.safetensors' .
ls -la "$OUT"
