"""`diffmem fetch-references`, `diffmem reproduce` and `diffmem compare`: from a memorized-prompt file to the
paper's tables, and every detector and mitigation on one model; torch loads only inside the commands."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer

from diffmem.cli.common import AllowPickleOpt
from diffmem.console import progress_bar, say, shorten, stderr
from diffmem.errors import InputError


def fetch_references(
    prompts: Annotated[
        Path, typer.Option("--prompts", help="Prompt file with a 'url' per prompt, e.g. data/sdv1_500_memorized.jsonl.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the images, manifest.jsonl and report.json.")],
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per connect or read.")] = 15.0,
    deadline: Annotated[float, typer.Option("--deadline", help="Seconds per download attempt in all.")] = 60.0,
    retries: Annotated[
        int, typer.Option("--retries", min=0, help="Further attempts after a timeout, connection error, 429 or 5xx.")
    ] = 2,
    max_mb: Annotated[float, typer.Option("--max-mb", help="Largest image accepted, in MiB.")] = 20.0,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Parallel downloads.")] = 8,
) -> None:
    """Download the training image of each prompt (its 'url'); a rerun fetches only what is still missing."""
    from diffmem.io.references import REPORT, FetchSettings, read_wanted
    from diffmem.io.references import fetch_references as fetch

    settings = FetchSettings(timeout=timeout, deadline=deadline, retries=retries, max_bytes=int(max_mb * 2**20),
                             workers=workers)
    settings.check()
    total = len(read_wanted(prompts))  # a bad file fails here, before any bar is drawn
    with progress_bar(total, "fetching") as progress:

        def show(outcome: Any) -> None:
            if outcome.error:
                say(progress.console, f"warning: {shorten(outcome.url, 80)}: {outcome.error}")
            progress.advance(progress.task_ids[0])

        report = fetch(prompts, out, settings, on_outcome=show)
        progress.update(progress.task_ids[0], completed=total)
    typer.echo(f"fetched {report.fetched} images -> {out}; {report.already} were already there, "
               f"{len(report.failed)} failed" + (f" (listed in {out / REPORT}; rerun to retry them)"
                                                  if report.failed else ""))


def _numbers(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated list of whole numbers, e.g. `--generations 1,4`."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{option} takes comma-separated whole numbers, e.g. 1,4; not {text!r}") from None
    if not values:
        raise InputError(f"{option} needs at least one number")
    return values


NormalOpt = Annotated[
    Path | None, typer.Option("--normal", help="Non-memorized reference prompts, any prompt format; default: those "
                              "of --dataset.")
]
DatasetOpt = Annotated[
    str | None, typer.Option("--dataset", help="A benchmark of `diffmem datasets list`, fetched into --data.")
]
DataOpt = Annotated[Path, typer.Option("--data", help="Root folder of `diffmem datasets fetch`.")]


def _words(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of names, e.g. `--methods none,rta` (None: not given)."""
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


def reproduce(
    out: Annotated[
        Path, typer.Option("--out", help="Report folder: report.md, report.json, plots/, detection/, mitigation/.")
    ],
    memorized: Annotated[
        Path | None, typer.Option("--memorized", help="Memorized prompts (e.g. data/sdv1_500_memorized.jsonl); "
                                  "default: those of --dataset.")
    ] = None,
    normal: NormalOpt = None,
    dataset: DatasetOpt = None,
    data: DataOpt = Path("datasets"),
    aesthetic: Annotated[
        Path | None, typer.Option("--aesthetic", help="LAION aesthetic predictor file (.pth state dict, read "
                                  "weights-only), e.g. sac+logos+ava1-l14-linearMSE.pth.")
    ] = None,
    aesthetic_clip: Annotated[
        str, typer.Option("--aesthetic-clip", help="CLIP ViT-L/14 CLIPModel folder or hub id for the aesthetic score.")
    ] = "openai/clip-vit-large-patch14",
    model: Annotated[
        str, typer.Option("--model", help="Local diffusers folder, hub id, or 'testbed' (its own measures).")
    ] = "testbed",
    generations: Annotated[str, typer.Option("--generations", help="Detection: numbers of generations n.")] = "1,4",
    steps: Annotated[
        str, typer.Option("--steps", help="Detection: steps scored, each 'first', 'all' or a number k.")
    ] = "first,10,all",
    references: Annotated[
        Path | None, typer.Option("--references", help="Training images: a `diffmem fetch-references` folder.")
    ] = None,
    sscd: Annotated[
        Path | None, typer.Option("--sscd", help="SSCD TorchScript file, e.g. sscd_disc_mixup.torchscript.pt.")
    ] = None,
    sscd_preprocessing: Annotated[
        str, typer.Option("--sscd-preprocessing", help="'sscd' (the SSCD authors' 288x288 eval transform) or "
                          "'wen' (resize 256, centre crop 224, as Wen et al.'s evaluation).")
    ] = "sscd",
    clip: Annotated[
        str | None, typer.Option("--clip", help="CLIPModel folder or hub id for the CLIP score.")
    ] = None,
    methods: Annotated[
        str | None, typer.Option("--methods", help="Mitigation methods, comma-separated (default: those of Wen et "
                                 "al.'s table: none, embedding, rta, rna, cwr, gni; `diffmem methods` lists all).")
    ] = None,
    mitigation_prompts: Annotated[
        int | None, typer.Option("--mitigation-prompts", help="Mitigate only the first N memorized prompts.")
    ] = None,
    mitigation_generations: Annotated[
        int, typer.Option("--mitigation-generations", min=1, help="Images per prompt in the mitigation table.")
    ] = 4,
    target_loss: Annotated[
        float | None, typer.Option("--target-loss", help="Embedding method's target (default: the median "
                                   "first-step score of the non-memorized prompts).")
    ] = None,
    iters: Annotated[int, typer.Option("--iters", min=0, help="Embedding optimisation steps at most.")] = 10,
    k: Annotated[int, typer.Option("--k", min=0, help="Words inserted by rta, rna and cwr.")] = 4,
    sigma: Annotated[float, typer.Option("--sigma", help="Standard deviation of gni's noise.")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="Generation g starts from the noise of seed S+g.")] = 0,
    num_inference_steps: Annotated[
        int, typer.Option("--num-inference-steps", min=1, help="Sampling schedule length.")
    ] = 50,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="CFG scale (default: the model's own; 7.5 for SD).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Detection: (prompt, generation) rows per denoiser call.")
    ] = 32,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float32, float16 or bfloat16 (default: float16 on CUDA).")
    ] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """The paper's tables for one model: detection (AUC, TPR@1%/3% FPR, time) and mitigation (memorization rate,
    copy similarity, alignment); rerun the same command to resume."""
    from diffmem.models.loading import parse_dtype
    from diffmem.runs.reproduce import ReproduceSettings
    from diffmem.runs.reproduce import reproduce as run

    parse_dtype(dtype)
    memorized, normal = dataset_prompts(dataset, data, memorized, normal)
    settings = ReproduceSettings(
        model=model, memorized=memorized, normal=normal, out=out, generations=_numbers(generations, "--generations"),
        steps=_words(steps) or (), seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance,
        batch_size=batch_size, methods=_words(methods), mitigation_prompts=mitigation_prompts,
        mitigation_generations=mitigation_generations, target_loss=target_loss, iters=iters, k=k, sigma=sigma,
        references=references, sscd=sscd, sscd_preprocessing=sscd_preprocessing, clip=clip, device=device,
        dtype=dtype, allow_pickle=allow_pickle, aesthetic=aesthetic, aesthetic_clip=aesthetic_clip, dataset=dataset,
        data=data if dataset else None)
    run_report(run, settings, out)


def dataset_prompts(dataset: str | None, data: Path, memorized: Path | None,
                    normal: Path | None) -> tuple[Path, Path]:
    """The memorized and non-memorized prompt files: those given, else those of a fetched `--dataset`."""
    if dataset is not None:
        from diffmem.io.datasets import prepare

        prepared = prepare(dataset, data)
        memorized, normal = memorized or prepared.memorized, normal or prepared.normal
        if normal is None:
            raise InputError(f"{dataset} has no non-memorized prompts: give --normal FILE (e.g. "
                             f"{data}/ren-sd1/prompts/normal.jsonl after `diffmem datasets fetch ren-sd1`)")
    if memorized is None or normal is None:
        raise InputError("give --memorized and --normal prompt files, or --dataset NAME (see `diffmem datasets list`)")
    return memorized, normal


def compare(
    out: Annotated[Path, typer.Option("--out", help="Report folder: report.md, report.json, detection/, "
                                      "mitigation/, calibration.json.")],
    memorized: Annotated[
        Path | None, typer.Option("--memorized", help="Memorized prompts (e.g. `diffmem testbed prompts --split "
                                  "memorized`, or data/sdv1_500_memorized.jsonl); default: those of --dataset.")
    ] = None,
    normal: NormalOpt = None,
    dataset: DatasetOpt = None,
    data: DataOpt = Path("datasets"),
    model: Annotated[str, typer.Option("--model", help="Local diffusers folder, hub id, or 'testbed'.")] = "testbed",
    detectors: Annotated[str | None, typer.Option("--detectors", help="Detectors, comma-separated (default: every "
                                                  "one `diffmem methods` lists).")] = None,
    generations: Annotated[str, typer.Option("--generations", help="Detection: numbers of generations n.")] = "1,4",
    methods: Annotated[str | None, typer.Option("--methods", help="Mitigation methods, comma-separated (default: "
                                                "every one `diffmem methods` lists).")] = None,
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
        int, typer.Option("--num-inference-steps", help="Sampling schedule length.")
    ] = 50,
    guidance: Annotated[float | None, typer.Option("--guidance", help="CFG scale (default: the model's own).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Detection: rows per denoiser call.")] = 32,
    references: Annotated[
        Path | None, typer.Option("--references", help="Training images: a `diffmem fetch-references` folder.")
    ] = None,
    sscd: Annotated[Path | None, typer.Option("--sscd", help="SSCD TorchScript file.")] = None,
    sscd_preprocessing: Annotated[str, typer.Option("--sscd-preprocessing", help="'sscd' or 'wen'.")] = "sscd",
    clip: Annotated[str | None, typer.Option("--clip", help="CLIPModel folder or hub id for the CLIP score.")] = None,
    aesthetic: Annotated[Path | None, typer.Option("--aesthetic", help="LAION aesthetic predictor file (.pth, "
                                                   "read weights-only).")] = None,
    aesthetic_clip: Annotated[str, typer.Option("--aesthetic-clip", help="CLIP ViT-L/14 for the aesthetic score.")
                              ] = "openai/clip-vit-large-patch14",
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="float32, float16 or bfloat16.")] = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Every detector (AUC, TPR@1%FPR, cost) and every mitigation (memorization, alignment, time) on one model, beside
    the published SD v1.4 figures; rerun the same command to resume."""
    from diffmem.models.loading import parse_dtype
    from diffmem.runs.compare import CompareSettings
    from diffmem.runs.compare import compare as run

    parse_dtype(dtype)
    memorized, normal = dataset_prompts(dataset, data, memorized, normal)
    settings = CompareSettings(
        model=model, memorized=memorized, normal=normal, out=out, detectors=_words(detectors),
        generations=_numbers(generations, "--generations"), methods=_words(methods),
        mitigation_prompts=None if mitigation_prompts == -1 else mitigation_prompts,
        mitigation_generations=mitigation_generations, target_loss=target_loss, sail_threshold=sail_threshold,
        nemo_threshold=nemo_threshold, seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance,
        batch_size=batch_size, references=references, sscd=sscd, sscd_preprocessing=sscd_preprocessing, clip=clip,
        device=device, dtype=dtype, allow_pickle=allow_pickle, aesthetic=aesthetic, aesthetic_clip=aesthetic_clip,
        dataset=dataset, data=data if dataset else None)
    run_report(run, settings, out)


def run_report(run: Any, settings: Any, out: Path) -> None:
    """Check `settings`, run `run(settings, log, progress)` with a bar per scan, and say where the report is."""
    from diffmem.models.loading import quiet_diffusers

    settings.check()
    quiet_diffusers()
    stack = ExitStack()
    with stack:
        report = run(settings, log=lambda m: say(stderr, m), progress=stage_bars(stack))
    typer.echo(f"wrote {out / 'report.md'} ({len(report.detection)} detection rows, "
               f"{len(report.mitigation)} mitigation rows)")


def stage_bars(stack: ExitStack) -> Any:
    """A `(stage, done, total)` progress callback drawing one bar per scan in `stack`, closed when the scan ends
    (the mitigation stage draws its own)."""
    shown: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if shown.get("stage") != stage:
            stack.close()
            shown.update(stage=stage, bar=stack.enter_context(progress_bar(total, stage)))
        shown["bar"].update(shown["bar"].task_ids[0], completed=done)
        if done >= total:
            stack.close()
            shown.clear()

    return progress
