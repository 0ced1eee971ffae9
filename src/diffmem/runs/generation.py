"""The generation run behind `diffmem generate` and `diffmem mitigate` (also run by `reproduce` and `compare`).

It writes OUT/images/<index>_<generation>.png (index: the prompt's position in the prompt file) and one
OUT/results.jsonl row per prompt, and resumes where it stopped when rerun on the same OUT with the same settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffmem.console import progress_bar, say, shorten, stderr
from diffmem.errors import InputError
from diffmem.mitigate import ALL_METHODS
from diffmem.registry import model_id


def run(prompts: Path, out: Path, model: str, method: str, settings: dict[str, Any], column: str | None,
        device: str | None, dtype: str | None, allow_pickle: bool = False, pipe: Any = None,
        echo: Callable[[str], None] = print) -> None:
    """Read the prompts, resume OUT/results.jsonl, generate the pending prompts and write images and rows
    (`pipe`: `model` already loaded, e.g. by `diffmem reproduce`, which runs every method on one pipeline)."""
    from diffmem.io.prompts import read_prompts
    from diffmem.io.results import ResultWriter
    from diffmem.models.loading import parse_device, parse_dtype

    if method not in ALL_METHODS:
        raise InputError(f"--method must be one of {', '.join(ALL_METHODS)}, not {method!r}")
    parse_dtype(dtype)
    prompt_file = read_prompts(prompts, column)
    if notice := prompt_file.skipped_summary():
        say(stderr, f"notice: {notice}")
    torch_device = parse_device(device)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the images and results.jsonl")
    match = {"model": model_id(model), "method": method, **settings}
    match["max_iters"] = match.pop("iters")
    index: dict[str, int] = {}
    for i, prompt in enumerate(prompt_file.prompts):
        index.setdefault(prompt, i)
    with ResultWriter(out / "results.jsonl", match=match) as writer:
        if writer.repaired:
            say(stderr, f"notice: {writer.path}: {writer.repaired}")
        todo = writer.pending(prompt_file.prompts)
        resumed = len(index) - len(todo)
        if resumed:
            say(stderr, f"notice: resuming {out}: {resumed} of {len(index)} prompts already generated")
        counts = _generate_into(writer, out, todo, index, model, torch_device, dtype, method, settings, match,
                                allow_pickle, pipe) if todo else {}
    parts = [f"{resumed} were already done", f"{counts.get('flagged', 0)} flagged",
             f"{counts.get('mitigated', 0)} mitigated", f"{counts.get('unreached', 0)} missed the target loss"]
    echo(f"generated {len(todo)} prompts -> {out}; {', '.join(parts)}")


def _generate_into(writer: Any, out: Path, todo: list[str], index: dict[str, int], model: str, device: Any,
                   dtype: str | None, method: str, settings: dict[str, Any], match: dict[str, Any],
                   allow_pickle: bool = False, pipe: Any = None) -> dict[str, int]:
    """Load the model (unless `pipe` is given), generate `todo` prompt by prompt, save each prompt's PNGs, then
    append its row."""
    import torch

    from diffmem.mitigate import iter_generate
    from diffmem.models.loading import load_pipeline, parse_dtype, quiet_diffusers

    quiet_diffusers()
    if pipe is None:
        with stderr.status(f"loading {model} ..."):
            pipe = load_pipeline(model, device=device, dtype=parse_dtype(dtype), allow_pickle=allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    counts = {"flagged": 0, "mitigated": 0, "unreached": 0}
    with progress_bar(len(todo), "generating") as progress:
        try:
            for images, decision in iter_generate(pipe, todo, method, **settings):
                i = index[decision.prompt]
                names = []
                for g, image in enumerate(pipe.numpy_to_pil(images)):
                    names.append(f"images/{i}_{g}.png")
                    _save_png(image, out / names[-1], len(writer))
                counts["flagged"] += bool(decision.flagged)
                counts["mitigated"] += decision.mitigated
                if decision.reached is False:
                    counts["unreached"] += 1
                    final = "nan" if decision.final_loss is None else f"{decision.final_loss:.4g}"
                    say(progress.console, f'notice: prompt "{shorten(decision.prompt)}" did not reach --target-loss '
                        f"{settings['target_loss']:g} in {decision.iters} iterations (final loss {final}); "
                        "its images use the last embedding")
                writer.write({"index": i, **decision.to_dict(), "images": names, **match})
                progress.advance(progress.task_ids[0])
        except torch.cuda.OutOfMemoryError:
            raise InputError(f"out of memory on {pipe.device}: lower --generations") from None
    return counts


def _save_png(image: Any, path: Path, done: int) -> None:
    """Save a PNG whole (a temporary file renamed over `path`, so a kill never leaves half an image under its
    name); a write error (disk full, file size limit) is one line saying the finished prompts are kept."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {exc.strerror or exc}; the {done} prompts finished are kept, "
                         "rerun to resume") from None
