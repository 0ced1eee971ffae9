"""Dev tool: write the testbed's stage-2 fine-tuning data as an image folder for `diffmem train`.

The recipe's stage-2 batches mix planted items (repeated), seen-once items and replayed stage-1 items; a folder
repeats a planted item by holding copies of its file. By default each planted item gets 8 files and the unique
and replayed items are as many as keep the shipped recipe's batch mix (for 32:6:26 of 64: 1,024 planted files,
192 seen-once, 832 replayed; 1,200 steps of 64 then show each planted item about 300 times, as the recipe does):

    python tools/export_testbed_data.py out/testbed_stage2
    diffmem train --model testbed-base --data out/testbed_stage2 --out runs/ft --calibrate
    diffmem train --model testbed-base --data out/testbed_stage2 --out runs/ft --steps 1200 --batch-size 64 \
        --lr 1e-3 --filter-threshold TAU

Images are 8-bit PNGs of the renders the recipe trains on (as floats), with NAME.txt captions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffmem.testbed.recipe import shipped_recipe
from diffmem.testbed.scenes import render_items


def main() -> None:
    """Render the chosen items and write NAME.png + NAME.txt pairs and an index of what each file is."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--planted-copies", type=int, default=8, help="files per planted item")
    ap.add_argument("--unique", type=int, help="seen-once items, the first N of stage 2's (default: the mix)")
    ap.add_argument("--replay", type=int, help="stage-1 items, the first N (default: the mix)")
    args = ap.parse_args()
    cfg = shipped_recipe()
    splits = cfg.splits()
    planted_files = len(splits.planted) * args.planted_copies
    total = round(planted_files * cfg.stage2_batch / cfg.stage2_planted_rows)
    if args.unique is None:
        args.unique = round(total * cfg.stage2_unique_rows / cfg.stage2_batch)
    if args.replay is None:
        args.replay = max(0, total - planted_files - args.unique)
    groups = {"planted": splits.planted, "unique": splits.stage2_unique[: args.unique],
              "replay": splits.stage1[: args.replay]}
    args.out.mkdir(parents=True, exist_ok=True)
    index = []
    for group, items in groups.items():
        images = (np.clip(render_items(items), 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
        copies = args.planted_copies if group == "planted" else 1
        for item, pixels in zip(items, images, strict=True):
            for copy in range(copies):
                name = f"{group}_{item.index:06d}_{copy}"
                Image.fromarray(pixels).save(args.out / f"{name}.png")
                (args.out / f"{name}.txt").write_text(item.caption + "\n")
                index.append({"file": f"{name}.png", "group": group, "index": item.index})
    (args.out.parent / f"{args.out.name}.index.json").write_text(json.dumps(index))
    print(f"wrote {len(index)} image and caption pairs to {args.out}")


if __name__ == "__main__":
    main()
