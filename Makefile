# All set-up happens here: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out/demo

# glibc's allocator makes torch training 3-4x slower on small CPUs.
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 4294967296
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo test bench lint docs release-check train-testbed train-testbed-sd3 quality quality-sd3 clean kill-test soak fuzz

$(VENV)/.installed: pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c requirements-dev.txt -e '.[dev]'
	# CLIP's BPE merges (read as a data file by `diffmem testbed train`; open_clip itself is never imported)
	$(VENV)/bin/pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/diffmem testbed demo --out $(OUT)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench.py

# SIGKILL at seeded moments, then rerun: detect, generate and train end as an uninterrupted run (minutes).
kill-test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -m kill tests/test_kills.py -s

# The readers fuzzed with 20,000 examples each (`make test` runs 60): every input reads or is one line (minutes);
# the HTTP API likewise: never a 500, every 4xx a JSON error line.
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz OMP_NUM_THREADS=1 $(PY) -m pytest tests/test_io_fuzz.py tests/test_api_fuzz.py -p no:cacheprovider --hypothesis-show-statistics

# `diffmem serve` under load on 127.0.0.1 for 10 minutes; shorten with SOAK_ARGS="--minutes 3".
soak: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/soak.py $(SOAK_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

# The documentation site (MkDocs) into site/; a warning fails the build, as in CI.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Wheel and sdist build, twine check, then the wheel in a clean venv: `diffmem --help` and a testbed detect.
release-check: setup
	PY=$(PY) bash tools/release_check.sh

train-testbed: setup
	$(VENV)/bin/diffmem testbed train

quality: setup
	$(VENV)/bin/diffmem testbed quality --out out/quality

# The SD3 testbed (MMDiT, rectified flow): rebuild it, and measure it as `quality` measures the UNet testbed.
train-testbed-sd3: setup
	$(VENV)/bin/diffmem testbed train --architecture sd3 --work runs/testbed-sd3

quality-sd3: setup
	$(VENV)/bin/diffmem testbed quality --model testbed-sd3 --out out/quality-sd3

clean:
	rm -rf $(VENV) out site dist
