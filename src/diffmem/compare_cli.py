"""`diffmem compare`: every detector and mitigation on one model, one table each (see `diffmem.compare`).

Registered on the `diffmem` app by `diffmem.cli`; torch loads only inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.compare import DEFAULT_DETECTORS, DEFAULT_METHODS
from diffmem.errors import InputError
from diffmem.options import AllowPickleOpt
from diffmem.paper_cli import _numbers, _words, run_report


def compare(
    memorized: Annotated[Path, typer.Option("--memorized", help="Memorized prompts (e.g. `diffmem testbed prompts "
                                            "--split memorized`, or data/sdv1_500_memorized.jsonl).")],
    normal: Annotated[Path, typer.Option("--normal", help="Non-memorized reference prompts, any prompt format.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder: report.md, report.json, detection/, "
                                      "mitigation/, calibration.json.")],
    model: Annotated[str, typer.Option("--model", help="Local diffusers folder, hub id, or 'testbed'.")] = "testbed",
    detectors: Annotated[str, typer.Option("--detectors", help="Detectors, comma-separated.")] = ",".join(
        DEFAULT_DETECTORS),
    generations: Annotated[str, typer.Option("--generations", help="Detection: numbers of generations n.")] = "1,4",
    methods: Annotated[str, typer.Option("--methods", help="Mitigation methods, comma-separated.")] = ",".join(
        DEFAULT_METHODS),
    mitigation_prompts: Annotated[
        int | None, typer.Option("--mitigation-prompts", help="Mitigate the first N memorized prompts (default 64; "
                                 "-1: all).")
    ] = 64,
    mitigation_generations: Annotated[
        int, typer.Option("--mitigation-generations", min=1, help="Images per prompt in the mitigation table.")
    ] = 4,
    target_loss: Annotated[float | None, typer.Option("--target-loss", help="embedding's target (default: "
                                                      "calibrated on the non-memorized prompts).")] = None,
    sail_threshold: Annotated[float | None, typer.Option("--sail-threshold", help="sail's threshold (default: "
                                                         "calibrated).")] = None,
    nemo_threshold: Annotated[float | None, typer.Option("--nemo-threshold", help="nemo's MS-SSIM threshold "
                                                         "(default: calibrated).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Generation g starts from the noise of seed S+g.")] = 0,
    num_inference_steps: Annotated[
        int, typer.Option("--num-inference-steps", min=2, help="Sampling schedule length.")
    ] = 50,
    guidance: Annotated[float | None, typer.Option("--guidance", help="CFG scale (default: the model's own).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Detection: rows per denoiser call.")] = 32,
    references: Annotated[
        Path | None, typer.Option("--references", help="Training images: a `diffmem fetch-references` folder.")
    ] = None,
    sscd: Annotated[Path | None, typer.Option("--sscd", help="SSCD TorchScript file.")] = None,
    sscd_preprocessing: Annotated[str, typer.Option("--sscd-preprocessing", help="'sscd' or 'wen'.")] = "sscd",
    clip: Annotated[str | None, typer.Option("--clip", help="CLIPModel folder or hub id for the CLIP score.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32, float16 or bfloat16.")] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Every detector (AUC, TPR@1%FPR, cost) and every mitigation (memorization, alignment, time) on one model, beside
    the published SD v1.4 figures; rerun the same command to resume."""
    from diffmem.cli import DType
    from diffmem.compare import CompareSettings
    from diffmem.compare import compare as run

    if dtype is not None and dtype not in {d.value for d in DType}:
        raise InputError(f"--dtype must be one of {', '.join(d.value for d in DType)}, not {dtype!r}")
    settings = CompareSettings(
        model=model, memorized=memorized, normal=normal, out=out, detectors=_words(detectors),
        generations=_numbers(generations, "--generations"), methods=_words(methods),
        mitigation_prompts=None if mitigation_prompts == -1 else mitigation_prompts,
        mitigation_generations=mitigation_generations, target_loss=target_loss, sail_threshold=sail_threshold,
        nemo_threshold=nemo_threshold, seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance,
        batch_size=batch_size, references=references, sscd=sscd, sscd_preprocessing=sscd_preprocessing, clip=clip,
        device=device, dtype=dtype, allow_pickle=allow_pickle)
    run_report(run, settings, out)
