"""Why the mean of d_t over all 50 steps detects worse than the first step on the testbeds (issue #31).

For the planted (memorized) and the first N held-out items, at fixed timesteps: the denoising loss of the
unconditional prediction (empty prompt) and of the conditional one on the item's own render, the same noise for
both, and d (the distance between the two predictions, as the detector measures it). If the unconditional
model has learned the planted images (caption dropout shows each about 90 times without its caption), its loss on
them falls below held-out items' once x_t has some structure, and d falls with it: the text is no longer needed to
reach the copy. Usage:

    python tools/unconditional_recall.py [--model testbed] [--heldout 256]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from diffmem.models.families import network
from diffmem.models.loading import load_pipeline, quiet_diffusers
from diffmem.testbed.quality import training_objective
from diffmem.testbed.recipe import encode_items, shipped_recipe

TIMESTEPS = (980, 900, 800, 700, 600, 500, 400, 300, 200, 100)


@torch.no_grad()
def recall(pipe: Any, items: list, seed: int = 0) -> dict[int, dict[str, float]]:
    """Mean unconditional loss, conditional loss and d at each of TIMESTEPS over `items`."""
    net, obj = network(pipe), training_objective(pipe)
    z = encode_items(pipe.vae, items, net.device) * pipe.vae.config.scaling_factor
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    cond, uncond = obj.encode([i.caption for i in items], net.device), obj.encode([""] * len(items), net.device)
    out = {}
    for step in TIMESTEPS:
        t = torch.full((len(z),), step, dtype=torch.long)
        x = obj.noisy(z, noise, t)
        pc, pu = obj.predict(net, x, t, cond).float(), obj.predict(net, x, t, uncond).float()
        target = obj.target(z, noise, t).float()
        out[step] = {"uncond_loss": float(((pu - target) ** 2).mean()), "cond_loss": float(((pc - target) ** 2).mean()),
                     "d": float((pc - pu).flatten(1).norm(dim=1).mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--heldout", type=int, default=256)
    args = ap.parse_args()
    quiet_diffusers()
    pipe = load_pipeline(args.model, device="cpu", dtype=torch.float32)
    splits = shipped_recipe().splits()
    res = {"planted": recall(pipe, splits.planted), "heldout": recall(pipe, splits.heldout[: args.heldout])}
    print("t     uncond loss planted / held-out   cond loss planted / held-out   d planted / held-out")
    for t in TIMESTEPS:
        p, h = res["planted"][t], res["heldout"][t]
        print(f"{t:4d}  {p['uncond_loss']:.3f} / {h['uncond_loss']:.3f}   {p['cond_loss']:.3f} / {h['cond_loss']:.3f}"
              f"   {p['d']:.3f} / {h['d']:.3f}")
    print(json.dumps({k: {str(t): v for t, v in r.items()} for k, r in res.items()}))


if __name__ == "__main__":
    main()
