"""The scoring run behind `diffmem detect`: one result row per distinct prompt, resumable, and data-parallel under
`accelerate launch` (`diffmem.runs.rows`: each process scores its slice of every global batch on its own device,
the main process writes the rows in input order)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffmem.console import say, shorten, stderr
from diffmem.runs.rows import Row, RowsRun, Say, Work, process_state, run_rows


def run(prompts: Path, out: Path, model: str, settings: dict[str, Any], column: str | None, device: str | None,
        dtype: str | None, batch_size: int, allow_pickle: bool = False, echo: Callable[[str], None] = print) -> None:
    """Score the prompts of the file `prompts` into the result file `out` (resuming it) with the detector
    `settings` names (`settings`: the row fields that fix a score), then `echo` the one-line summary (main process).
    `batch_size` counts (prompt, generation) rows per denoiser call; scores do not depend on it."""
    from diffmem.io.prompts import PromptFile, read_prompts

    state, torch_device = process_state(device)
    found: list[PromptFile] = []

    def read() -> list[str]:
        prompt_file = read_prompts(prompts, column)
        if notice := prompt_file.skipped_summary():
            say(stderr, f"notice: {notice}")
        found.append(prompt_file)
        return prompt_file.prompts

    counts = {"truncated": 0, "errors": 0}
    limit: list[int] = []

    def load(_: RowsRun) -> Work:
        from diffmem.models.conditioning import text_window
        from diffmem.models.loading import load_pipeline, parse_dtype, quiet_diffusers

        quiet_diffusers()
        pipe: Any = load_pipeline(model, device=torch_device, dtype=parse_dtype(dtype), allow_pickle=allow_pickle)
        pipe.set_progress_bar_config(disable=True)  # load_pipeline does it too; the CLI must never show tqdm
        limit.append(text_window(pipe)[1])  # the prompt tokens the longest text encoder keeps
        detector = make_detector(pipe, settings, batch_size)

        def rows(chunk: list[str]) -> list[Row]:
            return [{**s.to_dict(), **settings} for s in detector.score(chunk)]

        return Work(rows, pipe.device, f"lower --batch-size ({batch_size})")

    def check(rows: list[Row], tell: Say) -> None:
        """Count and warn about truncated prompts and null scores."""
        for row in rows:
            name = f'prompt "{shorten(row["prompt"])}"'
            if row["truncated"]:
                counts["truncated"] += 1
                tell(f"warning: {name} has {row['n_tokens']} tokens, over the text encoder's {limit[0]}; scored "
                     f'without the cut-off words "{row["truncated_text"].strip()}"')
            if row["error"]:
                counts["errors"] += 1
                tell(f"warning: {name}: {row['error']}; its score is null")

    done = run_rows(out, read, settings, load, per_batch=max(1, batch_size // settings["generations"]), state=state,
                    verb="scored", loading=f"loading {model} ...", bar="scoring prompts", check=check)
    if state.is_main_process:
        prompt_file = found[0]
        parts = [f"{done.resumed} were already in the file", f"{len(prompt_file.skipped)} empty rows skipped"]
        if duplicates := len(prompt_file) - done.distinct:
            parts.append(f"{duplicates} repeated prompts written once")
        parts += [f"{counts['truncated']} truncated", f"{counts['errors']} errors (null score)"]
        echo(f"scored {len(done.todo)} prompts{done.where()} -> {out}; {', '.join(parts)}")


def make_detector(pipe: Any, settings: dict[str, Any], batch_size: int) -> Any:
    """The detector a `diffmem detect` run's settings name (each detector takes the settings its `Config`
    declares)."""
    from diffmem.detectors import DETECTORS, StableRange

    values = {**settings, "batch_size": batch_size}
    if "stable_range" in settings:
        values["stable_range"] = StableRange(**{k: tuple(v) for k, v in settings["stable_range"].items()})
    detector = DETECTORS.lookup(settings["detector"], "--detector")
    return detector(pipe, detector.Config.from_values(values))
