"""`make bench` starts: benchmarks/bench.py imports what the package exports today (a refactor once left it
importing a name that no longer existed, and nothing ran it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_bench_script_imports_and_parses_its_options() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--sd3-only" in done.stdout and "--skip-sd3" in done.stdout
