#!/usr/bin/env bash
# `make release-check`: build the wheel and sdist, `twine check` them, check the wheel ships the testbed, then
# install the wheel in a clean virtual environment (torch pinned by requirements-dev.txt in the same pip call, so
# pip never pulls a CUDA build) and run `diffmem --help` and a small `diffmem detect --model testbed` from there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

rm -rf dist
if ! "$PY" -m build --outdir dist . > "$WORK/build.log" 2>&1; then
    echo "release-check: the isolated build failed (no package index?); building without isolation"
    tail -n 5 "$WORK/build.log"
    "$PY" -m build --no-isolation --skip-dependency-check --outdir dist . > "$WORK/build.log" 2>&1 \
        || { cat "$WORK/build.log"; exit 1; }
fi
"$PY" -m twine check --strict dist/*
wheel=$(ls dist/*.whl)

"$PY" - "$wheel" <<'EOF'
import sys, zipfile

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
needed = ["diffmem/py.typed", "diffmem/testbed/DATA.md", "diffmem/testbed/assets/alignment.safetensors",
          "diffmem/testbed/weights/pipeline/model_index.json",
          "diffmem/testbed/weights/pipeline/unet/diffusion_pytorch_model.safetensors",
          "diffmem/testbed/weights/base_unet/diffusion_pytorch_model.safetensors", "diffmem/cli/__main__.py"]
missing = [n for n in needed if n not in names]
assert not missing, f"the wheel lacks {missing}"
print(f"release-check: {sys.argv[1]} holds {len(names)} files, the testbed weights among them")
EOF

"$PY" -m venv "$WORK/venv"
{ "$WORK/venv/bin/pip" install -q --upgrade pip && "$WORK/venv/bin/pip" install -q -c requirements-dev.txt "$wheel"
} > "$WORK/pip.log" 2>&1 || { grep -v "^WARNING: Location" "$WORK/pip.log"; exit 1; }
cd "$WORK"  # nothing of the source tree on the path: the installed wheel alone
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
venv/bin/python - <<'EOF'
import importlib.metadata as md
from pathlib import Path

import diffmem

assert "site-packages" in diffmem.__file__, diffmem.__file__
assert diffmem.__version__ == md.version("diffmem"), (diffmem.__version__, md.version("diffmem"))
import torch

assert not torch.version.cuda, f"pip installed a CUDA torch ({torch.__version__}): keep torch pinned"
print(f"release-check: diffmem {diffmem.__version__} from {Path(diffmem.__file__).parent}, torch {torch.__version__}")
EOF
venv/bin/diffmem --help > help.txt
grep -q "detect" help.txt
printf 'a red circle at the top left on a striped background\na blue diamond at the bottom right on a plain background\n' > prompts.txt
venv/bin/diffmem detect --model testbed --prompts prompts.txt --out scores.jsonl
test "$(wc -l < scores.jsonl)" -eq 2
echo "release-check: passed in $((SECONDS - start)) s"
