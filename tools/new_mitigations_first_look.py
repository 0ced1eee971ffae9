"""First look at the 2025 mitigations on testbed v2 (docs/results.md): 8 memorized prompts, 2 seeds, 50 DDIM steps,
each method at its defaults. Usage: python tools/new_mitigations_first_look.py OUT (resumes from OUT/parts)."""
import json
import sys
from functools import partial
from pathlib import Path

from diffmem import load_pipeline
from diffmem.models.defaults import ModelDefaults
from diffmem.testbed.mitigation_eval import Parts, _public, frontier_report, measure
from diffmem.testbed.recipe import shipped_recipe
from diffmem.testbed.scenes import render_many

out = Path(sys.argv[1])
pipe = load_pipeline("testbed", device="cpu")
pipe.set_progress_bar_config(disable=True)
items = shipped_recipe().splits().planted[:8]
target = ModelDefaults.of(pipe).target_loss
common = dict(generations=2, seed=0, steps=50)
parts = Parts(out, {"prompts": [i.caption for i in items], "target_loss": target, **common})
rep = frontier_report(pipe, items, [], out, target, methods=("none", "embedding", "delayed-guidance",
                      "initial-noise", "prss"), sweep=False, progress=print, parts=parts, **common)
own = render_many([i.scene for i in items], [i.seed for i in items])
row = parts.row("initial-noise_sample", partial(measure, pipe, items, "initial-noise", own, generations=2, seed=0,
                num_inference_steps=50, method_options={"variant": "sample"}))
rep["frontier"].append({**_public(row), "method": "initial-noise --variant sample"})
for r in rep["frontier"]:
    print(json.dumps({k: r.get(k) for k in ("method", "memorization_rate", "memorized_any_seed", "aligned",
                                            "seconds_per_prompt", "mean_final_loss")}))
(out / "first_look.json").write_text(json.dumps(rep, indent=2))
