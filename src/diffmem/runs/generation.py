"""The generation run behind `diffmem generate` and `diffmem mitigate` (also run by `reproduce` and `compare`).

It writes OUT/images/<index>_<generation>.png (index: the prompt's position in the prompt file) and one
OUT/results.jsonl row per prompt, and resumes where it stopped when rerun on the same OUT with the same settings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffmem.console import say, shorten, stderr
from diffmem.errors import InputError
from diffmem.io.durable import replace_file
from diffmem.registry import model_id
from diffmem.runs.rows import OutputError, Row, RowsRun, Say, Work, process_state, run_rows


def run(prompts: Path, out: Path, model: str, method: str, settings: dict[str, Any], column: str | None,
        device: str | None, dtype: str | None, allow_pickle: bool = False, pipe: Any = None,
        echo: Callable[[str], None] = print) -> None:
    """Read the prompts, resume OUT/results.jsonl, generate the pending prompts and write images and rows
    (`pipe`: `model` already loaded, e.g. by `diffmem reproduce`, which runs every method on one pipeline).

    Without `pipe`, under `accelerate launch` with several processes, the prompts are generated data-parallel
    (`diffmem.runs.rows`): each process saves the PNGs of the prompts it generated, the main process writes the
    rows in input order. With `pipe` (or in one process) it is one process's run."""
    from diffmem.io.prompts import read_prompts
    from diffmem.mitigate import MITIGATIONS
    from diffmem.models.loading import parse_device, parse_dtype

    MITIGATIONS.lookup(method, "--method")
    parse_dtype(dtype)
    state, torch_device = (None, parse_device(device)) if pipe is not None else process_state(device)

    def read() -> list[str]:
        prompt_file = read_prompts(prompts, column)
        if notice := prompt_file.skipped_summary():
            say(stderr, f"notice: {notice}")
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file; give a folder for the images and results.jsonl")
        return prompt_file.prompts

    match = {"model": model_id(model), "method": method, **settings}
    match["max_iters"] = match.pop("iters")
    counts = {"flagged": 0, "mitigated": 0, "unreached": 0, "errors": 0}

    def load(done: RowsRun) -> Work:
        return _work(done, out, model, pipe, torch_device, dtype, allow_pickle, method, settings, match)

    def check(rows: list[Row], tell: Say) -> None:
        """Count the decisions and say which prompts missed the target loss."""
        for row in rows:
            if row.get("error"):
                counts["errors"] += 1
                tell(f'warning: prompt "{shorten(row["prompt"])}": {row["error"]}; its images are black')
            counts["flagged"] += bool(row["flagged"])
            counts["mitigated"] += row["mitigated"]
            if row["reached"] is False:
                counts["unreached"] += 1
                final = "nan" if row["final_loss"] is None else f"{row['final_loss']:.4g}"
                tell(f'notice: prompt "{shorten(row["prompt"])}" did not reach --target-loss '
                     f"{settings['target_loss']:g} in {row['iters']} iterations (final loss {final}); "
                     "its images use the last embedding")

    done = run_rows(out / "results.jsonl", read, match, load, state=state, name=out, verb="generated",
                    loading=None if pipe is not None else f"loading {model} ...", bar="generating", check=check)
    if state is None or state.is_main_process:
        parts = [f"{done.resumed} were already done", f"{counts['flagged']} flagged",
                 f"{counts['mitigated']} mitigated", f"{counts['unreached']} missed the target loss"]
        if counts["errors"]:
            parts.append(f"{counts['errors']} non-finite (black images)")
        echo(f"generated {len(done.todo)} prompts{done.where()} -> {out}; {', '.join(parts)}")


def _work(done: RowsRun, out: Path, model: str, pipe: Any, device: Any, dtype: str | None, allow_pickle: bool,
          method: str, settings: dict[str, Any], match: dict[str, Any]) -> Work:
    """Load the model (unless `pipe` is given) and return the per-prompt work: generate, save its PNGs as
    OUT/images/<index>_<generation>.png (index: the prompt's position in the prompt file), return its row."""
    from diffmem.mitigate import iter_generate
    from diffmem.models.loading import load_pipeline, parse_dtype, quiet_diffusers

    quiet_diffusers()
    if pipe is None:
        pipe = load_pipeline(model, device=device, dtype=parse_dtype(dtype), allow_pickle=allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    index: dict[str, int] = {}
    for i, prompt in enumerate(done.prompts):
        index.setdefault(prompt, i)

    def rows(prompts: list[str]) -> list[Row]:
        made = []
        for images, decision in iter_generate(pipe, prompts, method, **settings):
            i = index[decision.prompt]
            images, error = finite_images(images)
            names = []
            for g, image in enumerate(pipe.numpy_to_pil(images)):
                names.append(f"images/{i}_{g}.png")
                _save_png(image, out / names[-1])
            made.append({"index": i, **decision.to_dict(), "images": names, "error": error, **match})
        return made

    return Work(rows, pipe.device, "lower --generations")


NON_FINITE = "non-finite image (NaN/inf: an overflow, e.g. fp16, a huge --guidance or --sigma, or damaged weights)"
"""A generation row's `error` when its sampled images hold NaN or inf (the images are saved black there)."""


def finite_images(images: Any) -> tuple[Any, str | None]:
    """The images with NaN and inf set to black, and NON_FINITE when there were any (None otherwise): a row says
    so instead of a cast warning and silently black images."""
    import numpy as np

    array = np.asarray(images)
    if np.isfinite(array).all():
        return images, None
    return np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0), NON_FINITE


def _save_png(image: Any, path: Path) -> None:
    """Save a PNG whole (a temporary file renamed over `path`, so a kill never leaves half an image under its
    name); a write error (disk full, file size limit) is one line, to which the run adds the prompts it keeps."""
    replace_file(path, lambda tmp: image.save(tmp, format="PNG"), done="", error=OutputError)
