"""Candidates for the default mitigation (issue #32) on testbed v2: each one on all 64 memorized prompts (and, for
the rows that need it, the first 128 held-out prompts), 4 seeds, DDIM 50, through the frontier's own measures
(`diffmem.testbed.mitigation_eval`).

    OMP_NUM_THREADS=1 .venv/bin/python tools/default_candidates.py runs/default_candidates

One JSON file per candidate and prompt set in OUT (a rerun skips those written), then the table docs/results.md
quotes ("A default that meets the target"). A candidate with a quantile samples under a transition curve
recalibrated at it (`transition_curve` on held-out prompts 129-192) instead of the model's own. About 2 minutes per
candidate and set of 64 prompts on one core.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from diffmem.mitigate.delayed_guidance import transition_curve
from diffmem.models.defaults import ModelDefaults
from diffmem.models.loading import load_pipeline, quiet_diffusers
from diffmem.testbed.mitigation_eval import measure, measure_heldout
from diffmem.testbed.recipe import CALIBRATION, shipped_recipe
from diffmem.testbed.scenes import render_many


class Candidate(NamedTuple):
    name: str
    method: str
    options: dict[str, Any]
    heldout: bool = False  # also measured on the held-out prompts
    quantile: float | None = None  # None: the model's own transition curve


def static(transition: float, slack: float) -> dict[str, Any]:
    """embedding-delayed with one transition for every generation (the rule before the curve)."""
    return {"transition_timestep": transition, "latest_timestep": transition, "target_slack": slack}


CANDIDATES = [
    Candidate("none", "none", {}, heldout=True),
    Candidate("embedding-delayed, default: slack 1.5, curve (40th percentile), t 800 to 680", "embedding-delayed",
              {}, heldout=True),
    Candidate("embedding (target 0.60, the model's own)", "embedding", {}, heldout=True),
    Candidate("embedding-delayed, static: slack 1.25, t 800 (the first default)", "embedding-delayed",
              static(800.0, 1.25)),
    Candidate("embedding-delayed, static: slack 1.5, t 700", "embedding-delayed", static(700.0, 1.5)),
    Candidate("embedding-delayed, static: slack 1.5, t 680", "embedding-delayed", static(680.0, 1.5)),
    Candidate("embedding-delayed, curve at the median", "embedding-delayed", {}, quantile=0.5),
    Candidate("embedding-delayed, curve, t 800 to 650", "embedding-delayed", {"latest_timestep": 650.0}),
]
COMMON = {"generations": 4, "seed": 0, "num_inference_steps": 50}


def main(out: Path) -> None:
    quiet_diffusers()
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("testbed", device="cpu")
    own_defaults = ModelDefaults.of(pipe)
    splits = shipped_recipe().splits()
    memorized, heldout = splits.planted, splits.heldout[:128]
    own = render_many([i.scene for i in memorized], [i.seed for i in memorized])
    repeated = splits.planted + splits.anchors  # what a held-out generation may leak, as the frontier checks
    leaked = render_many([i.scene for i in repeated], [i.seed for i in repeated])
    rows = []
    for k, c in enumerate(CANDIDATES):
        settings = {**COMMON, **({"method_options": c.options} if c.options else {})}
        row = {}
        for part, run in (("memorized", partial(measure, pipe, memorized, c.method, own, **settings)),
                          ("heldout", partial(measure_heldout, pipe, heldout, c.method, leaked, **settings))):
            path = out / f"{k:02d}_{part}.json"
            if part == "heldout" and not c.heldout:
                continue
            if not path.is_file():
                curve = None if c.quantile is None else transition_curve(
                    pipe, [i.caption for i in splits.heldout[CALIBRATION]], quantile=c.quantile, **COMMON)
                own_defaults.override(**({} if curve is None else {"transition_curve": curve})).attach(pipe)
                result = {key: v for key, v in run().items() if not key.startswith("_")}
                own_defaults.attach(pipe)
                path.write_text(json.dumps({"name": c.name, **result}))
            row[part] = json.loads(path.read_text())
        rows.append(row)
        print(f"{c.name}: {row['memorized']['memorization_rate']:.3f} memorized, "
              f"{row['memorized']['aligned']:.3f} aligned", flush=True)
    plain = rows[0]["memorized"]["cpu_seconds_per_prompt"]
    print("\n| candidate | memorized | aligned, memorized prompts | aligned, held-out prompts | CPU cost |")
    print("|---|---|---|---|---|")
    for row in rows:
        m, h = row["memorized"], row.get("heldout")
        held = "" if h is None else f"{100 * h['aligned']:.1f} %"
        print(f"| {m['name']} | {100 * m['memorization_rate']:.1f} % | {100 * m['aligned']:.1f} % | {held} | "
              f"{m['cpu_seconds_per_prompt'] / plain:.2f}x |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/default_candidates"))
