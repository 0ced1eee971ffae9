"""Do the testbed's trigger words trigger? Each triggered planted prompt with and without its trigger word.

For the planted items whose caption ends in ", <trigger>": the share whose generations copy the training image
(copy similarity >= COPY_THRESHOLD in >= 2 of 4 seeds; DDIM 50, guidance 7.5) and the first-step score (n=4),
with the caption as trained and with the trigger removed; the same for as many untriggered planted items, as a
baseline. Results: DATA.md, "Trigger words". About 2 min on 2 CPU cores:
    python tools/trigger_check.py
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch

from diffmem.detectors.magnitude import MagnitudeDetector
from diffmem.models.loading import load_pipeline, quiet_diffusers
from diffmem.testbed.quality import generate
from diffmem.testbed.recipe import shipped_recipe
from diffmem.testbed.scenes import render_items
from diffmem.testbed.similarity import COPY_THRESHOLD, own_similarity


def measure(pipe, captions: list[str], train: np.ndarray) -> dict:
    """Copy rate (>= 2 of 4 seeds), mean copy similarity and mean first-step score (n=4) of `captions`."""
    images, _ = generate(pipe, captions, generations=4, seed=0)
    sims = own_similarity(images, train)
    scores = [s.score for s in MagnitudeDetector(pipe, generations=4, batch_size=256).score(captions)]
    return {"copied_2_of_4": float(((sims >= COPY_THRESHOLD).sum(1) >= 2).mean()),
            "mean_similarity": float(sims.mean()), "mean_first_step_score": float(np.mean(scores)), "n": len(captions)}


def main() -> None:
    quiet_diffusers()
    pipe = load_pipeline("testbed", device="cpu", dtype=torch.float32)
    planted = shipped_recipe().splits().planted
    triggered = [i for i in planted if i.scene.trigger]
    plain = [i for i in planted if not i.scene.trigger][: len(triggered)]
    report = {
        "triggered, as trained": measure(pipe, [i.caption for i in triggered], render_items(triggered)),
        "triggered, trigger removed": measure(
            pipe, [replace(i.scene, trigger=None).caption for i in triggered], render_items(triggered)),
        "untriggered (baseline)": measure(pipe, [i.caption for i in plain], render_items(plain)),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
