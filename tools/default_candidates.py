"""Candidates for the default mitigation (issue #32) on testbed v2: each one on all 64 memorized and the first 128
held-out prompts, 4 seeds, DDIM 50, through the frontier's own measures (`diffmem.testbed.mitigation_eval`).

    OMP_NUM_THREADS=1 .venv/bin/python tools/default_candidates.py runs/default_candidates

One JSON file per candidate and prompt set in OUT (a rerun skips those written), then the table docs/results.md
quotes ("A default candidate"). About 5 minutes per candidate on one core.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

from diffmem.models.loading import load_pipeline, quiet_diffusers
from diffmem.testbed.mitigation_eval import measure, measure_heldout
from diffmem.testbed.recipe import shipped_recipe
from diffmem.testbed.scenes import render_many

CANDIDATES: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "embedding (the model's target)": ("embedding", {}),
    "delayed guidance, unconditional until t 700": ("delayed-guidance", {"early_guidance": 0.0,
                                                                         "transition_timestep": 700.0}),
    "embedding-delayed (default: slack 1.25, until t 800)": ("embedding-delayed", {}),
    "embedding-delayed, slack 1.23 (target 0.74)": ("embedding-delayed", {"target_slack": 0.74 / 0.6015847697854042}),
    "embedding-delayed, slack 1.11 (target 0.67)": ("embedding-delayed", {"target_slack": 0.67 / 0.6015847697854042}),
    "embedding-delayed, opposite guidance -1 before t 800": ("embedding-delayed", {"early_guidance": -1.0}),
    "embedding-delayed, until t 750": ("embedding-delayed", {"transition_timestep": 750.0}),
    "embedding-delayed, slack 1.375, until t 750": ("embedding-delayed", {"transition_timestep": 750.0,
                                                                          "target_slack": 1.375}),
    "embedding-delayed, slack 1.5, until t 700": ("embedding-delayed", {"transition_timestep": 700.0,
                                                                        "target_slack": 1.5}),
    "embedding-delayed, slack 1.375, until t 700": ("embedding-delayed", {"transition_timestep": 700.0,
                                                                          "target_slack": 1.375}),
    "embedding-delayed, slack 1.75, until t 650": ("embedding-delayed", {"transition_timestep": 650.0,
                                                                         "target_slack": 1.75}),
}
COMMON = {"generations": 4, "seed": 0, "num_inference_steps": 50}


def main(out: Path) -> None:
    quiet_diffusers()
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("testbed", device="cpu")
    splits = shipped_recipe().splits()
    memorized, heldout = splits.planted, splits.heldout[:128]
    own = render_many([i.scene for i in memorized], [i.seed for i in memorized])
    repeated = splits.planted + splits.anchors  # what a held-out generation may leak, as the frontier checks
    leaked = render_many([i.scene for i in repeated], [i.seed for i in repeated])
    rows = []
    for k, (name, (method, options)) in enumerate(CANDIDATES.items()):
        settings = {**COMMON, **({"method_options": options} if options else {})}
        row = {}
        for part, run in (("memorized", partial(measure, pipe, memorized, method, own, **settings)),
                          ("heldout", partial(measure_heldout, pipe, heldout, method, leaked, **settings))):
            path = out / f"{k:02d}_{part}.json"
            if not path.is_file():
                result = {key: v for key, v in run().items() if not key.startswith("_")}
                path.write_text(json.dumps({"name": name, **result}))
            row[part] = json.loads(path.read_text())
        rows.append(row)
        print(f"{name}: {row['memorized']['memorization_rate']:.3f} memorized, "
              f"{row['memorized']['aligned']:.3f} / {row['heldout']['aligned']:.3f} aligned", flush=True)
    plain = rows[0]["memorized"]["cpu_seconds_per_prompt"]
    print("\n| candidate | memorized | aligned, memorized prompts | aligned, held-out prompts | CPU cost |")
    print("|---|---|---|---|---|")
    for row in rows:
        m, h = row["memorized"], row["heldout"]
        print(f"| {m['name']} | {100 * m['memorization_rate']:.1f} % | {100 * m['aligned']:.1f} % | "
              f"{100 * h['aligned']:.1f} % | {m['cpu_seconds_per_prompt'] / plain:.2f}x |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/default_candidates"))
