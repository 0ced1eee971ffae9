"""Memorization rate of a stage-2 training checkpoint (the testbed with the checkpoint's UNet): the share of the
64 planted prompts whose image is copied in at least 2 of 4 seeds (DDIM 50, the testbed's guidance), as
`diffmem testbed quality` counts it. Used to see when a filtered stage-2 run starts to memorize. Usage:

    python tools/testbed_checkpoint_memorization.py runs/tm_filter/stage2/checkpoint/unet.safetensors
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file

from diffmem.models.loading import load_pipeline, quiet_diffusers
from diffmem.testbed.quality import generate
from diffmem.testbed.recipe import shipped_recipe
from diffmem.testbed.scenes import render_many
from diffmem.testbed.similarity import COPY_THRESHOLD, own_similarity


def main(unet_file: str) -> None:
    quiet_diffusers()
    pipe = load_pipeline("testbed", device="cpu")
    pipe.unet.load_state_dict({k: v.float() for k, v in load_file(unet_file).items()})
    items = shipped_recipe().splits().planted
    images, _ = generate(pipe, [i.caption for i in items], generations=4)
    own = render_many([i.scene for i in items], [i.seed for i in items])
    copies = (own_similarity(images, own) >= COPY_THRESHOLD).sum(axis=1)
    print(f"memorized (>= 2 of 4 seeds copy): {(copies >= 2).mean():.1%}; any seed: {(copies >= 1).mean():.1%}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1])
