"""Fine-tune the denoiser of a diffusers pipeline on a folder of images and captions (`diffmem train`): the UNet
of SD 1.x/2.x/XL, or SD3's transformer by rectified flow (`FlowObjective`; its text encoders stay frozen).

The data: `NAME.png`/`NAME.jpg` (also .jpeg, .webp, .bmp) with its caption in `NAME.txt` beside it, or an image
folder with a `metadata.jsonl` (the Hugging Face imagefolder layout: `file_name` and a `text`, `caption` or
`prompt` column). Unusable files are skipped and listed. Images whose size is not the model's resolution
(`default_size`: the denoiser's sample size times the VAE factor) are resized (shorter side) and center-cropped,
and counted.
Every image is encoded once by the pipeline's VAE into a latent cache in `--out`; batches are a function of
(seed, step) alone, so a resumed run is exact. Training is `diffmem.training.loop.train`, the loop the testbed recipe
uses, with the magnitude filter of METHOD.md section 4 when a threshold is given.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffmem.errors import InputError, ModelLoadError, UnsupportedModelError
from diffmem.io.durable import exclusive, write_atomic
from diffmem.io.files import (
    MAX_PROMPT_FILE_BYTES,
    check_prompt_text,
    json_problem,
    read_json_object,
    read_user_bytes,
)
from diffmem.models.denoiser import default_size
from diffmem.models.families import NAMES, SD3, UNET, family
from diffmem.registry import model_id
from diffmem.training.loop import (
    FILTER_AT,
    BatchFn,
    FlowObjective,
    TrainConfig,
    checkpoint_dir,
    checkpoint_step,
    filter_timestep,
    measure_magnitudes,
    train,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_COLUMNS = ("text", "caption", "prompt")
CAPTION_AUGS = ("rta",)
RTA_TOKENS = 4
"""Random tokens `--caption-aug rta` inserts into each training caption."""
CALIBRATION_PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
SUGGESTED_PERCENTILE = 99.0
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""The parts of a UNet pipeline folder training needs (an SD3 folder has `transformer/` in place of `unet/`)."""

Notice = Callable[[str], None]


@dataclass
class ImageCaptions:
    """Images with their captions found in a data folder, and the files skipped with the reason."""

    root: Path
    layout: str
    items: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fingerprint: str = ""


@dataclass
class LatentData:
    """The training set as VAE latents (scaled like the pipeline's denoiser sees them) with captions."""

    latents: torch.Tensor
    captions: list[str]
    files: list[str]
    skipped: list[tuple[str, str]]
    resized: int
    layout: str


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _clean_caption(text: str, where: str = "") -> str:
    """A caption by the text rule of prompt files (`check_prompt_text`: a NUL, another control character, a lone
    surrogate or over 20,000 characters is one InputError line naming `where`), whitespace collapsed; "" when
    blank (only whitespace and invisible characters)."""
    if check_prompt_text(text, where) is None:
        return ""
    return " ".join(text.split())


def scan_folder(data: Path) -> ImageCaptions:
    """Pair each image of `data` with its caption (either layout); list what cannot be used, and why."""
    root = Path(data).expanduser()
    if not root.exists():
        raise InputError(f"--data {data}: no such folder")
    if not root.is_dir():
        raise InputError(f"--data {data} is a file; give the folder of images and captions")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                        p.relative_to(root).parts))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise InputError(f"--data {data} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    metadata = root / "metadata.jsonl"
    found = _from_metadata(root, metadata, images) if metadata.is_file() else _from_caption_files(root, images, files)
    stats = [(_relative(p, root), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    found.fingerprint = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    if not found.items:
        reasons = "; ".join(f"{name}: {why}" for name, why in found.skipped[:3])
        raise InputError(f"--data {data}: no usable image and caption pairs ({len(found.skipped)} files skipped, "
                         f"e.g. {reasons})")
    return found


def _from_caption_files(root: Path, images: list[Path], files: list[Path]) -> ImageCaptions:
    """`NAME.png` + `NAME.txt` pairs."""
    found = ImageCaptions(root, "caption files")
    captions = {p.with_suffix("") for p in files if p.suffix == ".txt"}
    for image in images:
        text_file = image.with_suffix(".txt")
        if image.with_suffix("") not in captions:
            found.skipped.append((_relative(image, root), f"no caption file {text_file.name}"))
            continue
        try:
            text = read_user_bytes(text_file, "caption file").decode("utf-8").removeprefix("\ufeff")
            caption = _clean_caption(text, str(text_file))
        except UnicodeDecodeError:
            found.skipped.append((_relative(image, root), f"{text_file.name} is not UTF-8 text"))
            continue
        if not caption:
            found.skipped.append((_relative(image, root), f"{text_file.name} is empty"))
            continue
        found.items.append((image, caption))
    stems = {p.with_suffix("") for p in images}
    for stem in sorted(captions - stems):
        found.skipped.append((_relative(stem.with_suffix(".txt"), root), "caption file without an image"))
    return found


def _from_metadata(root: Path, metadata: Path, images: list[Path]) -> ImageCaptions:
    """The Hugging Face imagefolder layout: `metadata.jsonl` rows with `file_name` and a caption column."""
    found = ImageCaptions(root, "metadata.jsonl")
    captioned: dict[Path, str] = {}
    column = None
    data = read_user_bytes(metadata, "metadata file", MAX_PROMPT_FILE_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{metadata} is not valid UTF-8 (line {where}); save it as UTF-8") from None
    text = text.removeprefix("\ufeff")  # the text rule: a leading BOM is dropped
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        if not line.strip():
            continue
        row, problem = json_problem(line)
        if problem is not None:
            raise InputError(f"{metadata}: line {number} is not JSON ({problem.removeprefix('invalid JSON ')})")
        if not isinstance(row, dict) or "file_name" not in row:
            raise InputError(f"{metadata}: line {number} has no 'file_name' field")
        column = column or next((c for c in CAPTION_COLUMNS if c in row), None)
        if column is None:
            raise InputError(f"{metadata}: line {number} has no caption column ({', '.join(CAPTION_COLUMNS)})")
        name = str(row["file_name"])
        path = root / name
        caption = row.get(column)
        at = f"{metadata} line {number}"
        if not path.resolve().is_relative_to(root.resolve()):  # an absolute path or ../ names no image of --data
            found.skipped.append((name, "outside --data (metadata.jsonl may name only files in the folder)"))
        elif not path.is_file():
            found.skipped.append((name, "listed in metadata.jsonl but missing"))
        elif not isinstance(caption, str) or not _clean_caption(caption, at):
            found.skipped.append((name, f"empty or missing '{column}' in metadata.jsonl"))
        else:
            captioned[path] = _clean_caption(caption, at)
    for image in images:
        if image in captioned:
            found.items.append((image, captioned[image]))
        else:
            found.skipped.append((_relative(image, root), "not in metadata.jsonl (no caption)"))
    return found


def model_resolution(pipe: Any) -> int:
    """The image size the pipeline's denoiser is built for: its `sample_size` times `vae_scale_factor`."""
    return default_size(pipe)


def _load_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """RGB pixels of `path` in [-1, 1] (C, H, W) at `size` x `size`, and whether it had to be resized."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        rgb = img.convert("RGB")
    resized = rgb.size != (size, size)
    if resized:  # shorter side to `size`, then the centre square
        scale = size / min(rgb.size)
        w, h = max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))
        rgb = rgb.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        rgb = rgb.crop((left, top, left + size, top + size))
    pixels = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return pixels, resized


@torch.no_grad()
def encode_folder(pipe: Any, found: ImageCaptions, batch: int = 8) -> LatentData:
    """Encode every readable image with the pipeline's VAE (`latent_dist.mean`, scaled); unreadable ones are
    skipped and listed."""
    vae, size = pipe.vae, model_resolution(pipe)
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
    skipped, files, captions, chunks = list(found.skipped), [], [], []
    pending: list[np.ndarray] = []
    resized = 0

    def flush() -> None:
        if pending:
            x = torch.from_numpy(np.stack(pending)).to(vae.device, vae.dtype)
            chunks.append(((vae.encode(x).latent_dist.mean - shift) * scale).float().cpu())
            pending.clear()

    for path, caption in found.items:
        try:
            pixels, was_resized = _load_image(path, size)
        except Exception as exc:  # PIL raises many types for broken files; the user needs the file and cause
            skipped.append((_relative(path, found.root), f"unreadable image ({type(exc).__name__}: {exc})"))
            continue
        resized += was_resized
        pending.append(pixels)
        files.append(_relative(path, found.root))
        captions.append(caption)
        if len(pending) == batch:
            flush()
    flush()
    if not files:
        raise InputError(f"--data {found.root}: none of its {len(found.items)} captioned images could be read")
    # Row-major like the cache reads back (the VAE may return channels-last): the same layout, the same numerics.
    return LatentData(torch.cat(chunks).contiguous(), captions, files, skipped, resized, found.layout)


def _dataset_index(index: Path) -> dict[str, Any]:
    """The latent cache's dataset.json, checked, or one line saying it is damaged (the checkpoint is kept)."""
    cached = read_json_object(index, "latent cache index")
    shapes = {"key": dict, "captions": list, "files": list, "skipped": list, "resized": int, "layout": str}
    wrong = [name for name, kind in shapes.items() if not isinstance(cached.get(name), kind)]
    if wrong or not all(isinstance(s, list) and len(s) == 2 for s in cached["skipped"]):
        raise InputError(f"{index} is damaged (its {wrong[0] if wrong else 'skipped'} field); delete it to encode "
                         "--data again (the checkpoint is kept)")
    return cached


def _cached_latents(tensors: Path) -> torch.Tensor:
    """The latent cache's tensor, or one line saying the file is damaged."""
    try:
        return load_file(str(tensors))["latents"]
    except (SafetensorError, OSError, KeyError) as exc:
        raise InputError(f"{tensors} is damaged ({' '.join(str(exc).split())[:200]}); delete it and dataset.json to "
                         "encode --data again (the checkpoint is kept)") from None


def prepare_data(pipe: Any, found: ImageCaptions, out: Path, key: dict, resuming: bool) -> tuple[LatentData, bool]:
    """The latents of the scanned folder `found`, from the cache in `out` when it was made from the same files and
    model (always when resuming: the data may not change under a run); returns them and whether they were cached."""
    key = {**key, "fingerprint": found.fingerprint, "resolution": model_resolution(pipe)}
    index, tensors = out / "dataset.json", out / "latents.safetensors"
    if index.is_file() and tensors.is_file():
        cached = _dataset_index(index)
        if cached["key"] == key:
            return LatentData(_cached_latents(tensors), cached["captions"], cached["files"],
                              [(name, why) for name, why in cached["skipped"]], cached["resized"],
                              cached["layout"]), True
        if resuming:
            raise InputError(f"--data {found.root} changed since the checkpoint in {out} was written (files added, "
                             "removed or modified); restore it, or start a new run with another --out")
    encoded = encode_folder(pipe, found)
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_file({"latents": encoded.latents.contiguous()}, str(out / "latents.tmp"))
    except SafetensorError as exc:  # disk full, file size limit (OSError is the CLI's one line already)
        raise InputError(f"cannot write the latent cache in {out}: {' '.join(str(exc).split())[:300]}") from None
    os.replace(out / "latents.tmp", tensors)
    record = {"key": key, "layout": encoded.layout, "files": encoded.files, "captions": encoded.captions,
              "skipped": encoded.skipped, "resized": encoded.resized}
    write_atomic(index, json.dumps(record, indent=1))
    return encoded, False


def epoch_batches(data: LatentData, batch_size: int, seed: int,
                  augment: Callable[[str, int], str] | None = None) -> BatchFn:
    """Batches that walk through seeded shuffles of the data, one epoch after another: the batch of a step
    depends on (seed, step) alone. `augment(caption, position)` rewrites captions (e.g. RTA)."""
    n = len(data.captions)

    @lru_cache(maxsize=4)
    def order(epoch: int) -> list[int]:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 65_537 + epoch)).tolist()

    def batch(step: int) -> tuple[torch.Tensor, list[str]]:
        positions = range(step * batch_size, (step + 1) * batch_size)
        idx = [order(p // n)[p % n] for p in positions]
        captions = [data.captions[i] for i in idx]
        if augment is not None:
            captions = [augment(c, p) for c, p in zip(captions, positions, strict=True)]
        return data.latents[idx], captions

    return batch


def _rta_augment(tokenizer: Any, settings: FinetuneSettings) -> Callable[[str, int], str]:
    """RTA (METHOD.md section 4's baseline) seeded by the run's seed and the caption's position in the stream of
    training samples, so that a resumed run sees the same captions."""
    from diffmem.mitigate.baselines import rta

    def augment(caption: str, position: int) -> str:
        return rta(caption, tokenizer, settings.rta_tokens, seed=settings.seed * 1_000_033 + position)

    return augment


@dataclass
class FinetuneSettings:
    """What fixes a fine-tuning run: a resumed run must keep all of it but `steps`."""

    model: str
    data: str
    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-5
    filter_threshold: float | None = None
    filter_at: str = "first-step"
    filter_persist: bool = False
    caption_aug: str | None = None
    rta_tokens: int = RTA_TOKENS
    seed: int = 0

    def normalized(self) -> FinetuneSettings:
        """Checked settings with the model and data as absolute paths (a resume may start from elsewhere)."""
        self.check()
        return replace(self, model=model_id(self.model), data=str(Path(self.data).expanduser().resolve()))

    def check(self) -> None:
        """Fail with one line on option values that cannot train."""
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("--steps and --batch-size must be at least 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise InputError(f"--lr must be a positive number, not {self.lr}")
        if self.filter_threshold is not None and (math.isnan(self.filter_threshold) or self.filter_threshold < 0):
            raise InputError(f"--filter-threshold must be a number >= 0, not {self.filter_threshold}")
        if self.filter_at not in FILTER_AT:
            raise InputError(f"--filter-at must be one of {', '.join(FILTER_AT)}, not {self.filter_at!r}")
        if self.filter_persist and self.caption_aug is not None:
            raise InputError("--filter-persist keys on the caption text, which --caption-aug changes at every "
                             "step: use one of them")
        if self.caption_aug is not None and self.caption_aug not in CAPTION_AUGS:
            raise InputError(f"--caption-aug must be one of {', '.join(CAPTION_AUGS)}, not {self.caption_aug!r}")
        if self.rta_tokens < 1:
            raise InputError("--rta-tokens must be at least 1")


@dataclass
class FinetuneResult:
    """What a `finetune` call did: the trained pipeline, where it went, and the loop's statistics."""

    pipe: Any
    pipeline_dir: Path
    stats: dict
    data: LatentData
    main_process: bool


def check_model_folder(model: str) -> None:
    """Fail with one line if a local model folder lacks a pipeline part training needs (a UNet above all)."""
    from diffmem.registry import is_named_model

    path = Path(model).expanduser()
    if is_named_model(model) or not path.is_dir():
        return
    parts = tuple("transformer" if p == "unet" and (path / "transformer").is_dir() else p for p in PIPELINE_PARTS)
    missing = [part for part in parts if not (path / part).is_dir()]
    if missing:
        raise ModelLoadError(f"{model} has no {', '.join(p + '/' for p in missing)}: diffmem train fine-tunes "
                             "the denoiser of a full diffusers pipeline folder (" + ", ".join(parts) + ")")


def load_for_training(model: str, device: torch.device, allow_pickle: bool = False) -> Any:
    """The pipeline in float32 (mixed precision is accelerate's business), its text encoders and VAE frozen; a
    family `diffmem train` cannot train is one line (`training_objective`)."""
    from diffmem.models.loading import load_pipeline, quiet_diffusers

    check_model_folder(model)
    quiet_diffusers()
    pipe: Any = load_pipeline(model, device=device, dtype=torch.float32, allow_pickle=allow_pickle)
    training_objective(pipe)
    pipe.vae.requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    return pipe


def training_objective(pipe: Any) -> tuple[Any, FlowObjective | None]:
    """The network `diffmem train` trains and what it learns: the UNet (None: `train`'s default objective), or
    SD3's transformer by rectified flow; other families are refused with one line."""
    kind = family(pipe)
    if kind == UNET:
        return pipe.unet, None
    if kind == SD3:
        return pipe.transformer, FlowObjective(pipe)
    raise UnsupportedModelError(f"diffmem train fine-tunes Stable Diffusion UNet models and SD3, not {NAMES[kind]}")


def model_filter_timestep(pipe: Any, objective: FlowObjective | None, filter_at: str) -> int | None:
    """`filter_timestep` of the model: a flow model's first step is read off its own schedule (`Denoiser`)."""
    if objective is None or filter_at != "first-step":
        return filter_timestep(pipe.scheduler, filter_at)
    return objective.first_timestep()


def _check_out(out: Path, data: str) -> None:
    """Refuse an --out inside --data (its files would join the data and change it under a resumed run), and an
    --out that is a file."""
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the run")
    if Path(out).resolve().is_relative_to(data):
        raise InputError(f"--out {out} is inside --data {data}: choose an --out outside the image folder")


def _check_resume(settings: FinetuneSettings, out: Path, resume: bool, notice: Notice) -> int:
    """The step to resume from (0: a fresh run); refuses to overwrite a run or to resume a different one."""
    step = checkpoint_step(out)
    if not step:
        if resume:
            notice(f"notice: no checkpoint in {out}: starting from step 0")
        return 0
    if not resume:
        raise InputError(f"{out} already holds a training checkpoint: pass --resume to continue it, "
                         "or choose a new --out")
    saved_path = out / "finetune.json"
    saved = read_json_object(saved_path, "run settings file", missing={})
    mine = asdict(settings)
    differ = [k for k in mine if k != "steps" and k in saved and saved[k] != mine[k]]
    if differ:
        was = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {mine[k]})" for k in differ)
        raise InputError(f"--resume continues the run in {out}, which used {was}; "
                         "pass the same options, or choose a new --out")
    if saved.get("steps") not in (None, settings.steps):
        notice(f"notice: the run in {out} was set for {saved['steps']} steps, now {settings.steps}: "
               "the learning-rate schedule changes from here")
    return step


def finetune(
    settings: FinetuneSettings,
    out: Path,
    resume: bool = False,
    checkpoint_every: int = 500,
    log_every: int = 10,
    notice: Notice | None = None,
    progress: Callable[[int, dict], None] | None = None,
    allow_pickle: bool = False,
) -> FinetuneResult:
    """Fine-tune the UNet of `settings.model` on `settings.data`, checkpointing in `out/checkpoint` and
    writing the pipeline to `out/pipeline`. Under `accelerate launch` the processes train data-parallel; only
    the main one writes files and calls `notice` and `progress`.

        >>> import tempfile
        >>> from pathlib import Path
        >>> from diffmem.testbed.bundled import write_example_data
        >>> data, out = tempfile.TemporaryDirectory(), tempfile.TemporaryDirectory()  # images + captions, the run
        >>> _ = write_example_data(data.name, n=4)  # the testbed's own images of 4 planted captions
        >>> result = finetune(FinetuneSettings("testbed", data.name, steps=2, batch_size=2), Path(out.name))
        >>> result.stats["steps"], len(result.data.files), sorted(p.name for p in result.pipeline_dir.iterdir())[:3]
        (2, 4, ['model_index.json', 'scheduler', 'text_encoder'])
        >>> data.cleanup(), out.cleanup()
        (None, None)
    """
    from accelerate import Accelerator

    settings = settings.normalized()
    out = Path(out)
    _check_out(out, settings.data)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    with exclusive(out / "train.lock", f"--out {out}") if acc.is_main_process else nullcontext():  # one run per out
        return _finetune(settings, out, acc, resume, checkpoint_every, log_every, notice, progress, allow_pickle)


def _finetune(settings: FinetuneSettings, out: Path, acc: Any, resume: bool, checkpoint_every: int, log_every: int,
              notice: Notice | None, progress: Callable[[int, dict], None] | None,
              allow_pickle: bool) -> FinetuneResult:
    """`finetune` once its output folder is locked."""
    say = notice if notice is not None and acc.is_main_process else (lambda message: None)
    resumed = _check_resume(settings, out, resume, say)
    if resumed >= settings.steps:
        say(f"notice: the checkpoint in {out} is at step {resumed}: no step left to train, writing the pipeline")
    found = scan_folder(Path(settings.data))
    pipe = load_for_training(settings.model, acc.device, allow_pickle)
    with acc.main_process_first():
        data, cached = prepare_data(pipe, found, out, {"model": settings.model}, resuming=resumed > 0)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "finetune.json", json.dumps(asdict(settings), indent=2))
    report_data(data, Path(settings.data), out, cached, say)
    augment = _rta_augment(pipe.tokenizer, settings) if settings.caption_aug == "rta" else None
    net, objective = training_objective(pipe)
    batch_fn = epoch_batches(data, settings.batch_size, settings.seed, augment)
    cfg = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                      warmup=min(100, max(1, settings.steps // 10)), seed=settings.seed,
                      filter_threshold=settings.filter_threshold,
                      filter_timestep=model_filter_timestep(pipe, objective, settings.filter_at),
                      filter_persist=settings.filter_persist,
                      checkpoint_every=checkpoint_every,
                      log_every=log_every)
    net.train()
    stats = train(net, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batch_fn, cfg, out,
                  accelerator=acc, progress=progress if acc.is_main_process else None, objective=objective)
    net.eval()
    final = out / "pipeline"
    if acc.is_main_process:
        save_pipeline(pipe, final)
    acc.wait_for_everyone()
    return FinetuneResult(pipe, final, stats, data, acc.is_main_process)


def save_pipeline(pipe: Any, dest: Path) -> None:
    """`save_pretrained` into a temporary folder, then swap it in, so `dest` is always a whole pipeline."""
    import shutil

    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        pipe.save_pretrained(tmp)
    except (OSError, RuntimeError, SafetensorError) as exc:  # disk full, file size limit, read-only folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"cannot write the trained pipeline to {dest}: {' '.join(str(exc).split())[:300]}; "
                         "its checkpoint is kept: free space and rerun with --resume") from None
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def interrupted_message(out: Path) -> str:
    """What to tell a user who stopped a run: where its last checkpoint is and how to continue."""
    step = checkpoint_step(Path(out))
    if not step:
        return f"interrupted before the first checkpoint; nothing saved in {out}"
    return f"interrupted: checkpoint at step {step} in {checkpoint_dir(Path(out))}; rerun with --resume to continue"


def report_data(data: LatentData, root: Path, out: Path, cached: bool, say: Notice) -> None:
    """Tell the user what was skipped (every file, up to 20 on screen) and how many images were resized."""
    source = f"latents cached in {out}" if cached else f"encoded into {out / 'latents.safetensors'}"
    say(f"data: {len(data.files)} image and caption pairs from {root} ({data.layout}), {source}")
    if data.skipped:
        say(f"warning: skipped {len(data.skipped)} files of {root}:")
        for name, why in data.skipped[:20]:
            say(f"  {name}: {why}")
        if len(data.skipped) > 20:
            say(f"  ... and {len(data.skipped) - 20} more (all listed in {out / 'dataset.json'})")
    if data.resized:
        say(f"notice: {data.resized} images were not at the model's resolution: resized (shorter side) and "
            "center-cropped")


@torch.no_grad()
def calibrate(
    settings: FinetuneSettings,
    out: Path,
    measurements: int = 2000,
    batch_size: int = 16,
    notice: Notice | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Magnitudes `d` of the base model on the training data where the filter measures them (`filter_at`: the
    first sampling step, or random training timesteps), their percentiles and a suggested `--filter-threshold`;
    written to `out/calibration.json`.

        >>> import tempfile
        >>> from pathlib import Path
        >>> from diffmem.testbed.bundled import write_example_data
        >>> data, out = tempfile.TemporaryDirectory(), tempfile.TemporaryDirectory()  # images + captions, the run
        >>> _ = write_example_data(data.name, n=4)  # the testbed's own images of 4 planted captions
        >>> result = calibrate(FinetuneSettings("testbed", data.name), Path(out.name), measurements=8)
        >>> result["samples"], result["measurements"], result["suggested_tau"] == result["percentiles"]["99"]
        (4, 8, True)
        >>> data.cleanup(), out.cleanup()
        (None, None)
    """
    settings = settings.normalized()
    out = Path(out)
    _check_out(out, settings.data)
    say = notice or (lambda message: None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = scan_folder(Path(settings.data))
    pipe = load_for_training(settings.model, device, allow_pickle)
    in_use = checkpoint_step(out) > 0  # never re-encode under a run's checkpoint
    data, cached = prepare_data(pipe, found, out, {"model": settings.model}, resuming=in_use)
    report_data(data, Path(settings.data), out, cached, say)
    n = len(data.captions)
    gen = torch.Generator().manual_seed(settings.seed + 7)
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(measurements / n))])[:measurements]
    net, objective = training_objective(pipe)
    values = measure_magnitudes(net, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, data.latents,
                                data.captions, order, gen, batch_size, progress,
                                timestep=model_filter_timestep(pipe, objective, settings.filter_at),
                                objective=objective)
    result = calibration_summary(values, order, data, settings)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "calibration.json", json.dumps(result, indent=2))
    return result


def magnitude_summary(d: np.ndarray) -> dict:
    """Mean, max and percentiles of measured magnitudes, and the suggested `--filter-threshold` (a percentile)."""
    percentiles = {f"{p:g}": float(np.percentile(d, p)) for p in CALIBRATION_PERCENTILES}
    return {"mean": float(d.mean()), "max": float(d.max()), "percentiles": percentiles,
            "suggested_percentile": SUGGESTED_PERCENTILE, "suggested_tau": percentiles[f"{SUGGESTED_PERCENTILE:g}"]}


def calibration_summary(values: torch.Tensor, order: torch.Tensor, data: LatentData,
                        settings: FinetuneSettings) -> dict:
    """Percentiles of the measured magnitudes, the suggested threshold, and the files measuring highest."""
    d = values.double().numpy()
    summary = magnitude_summary(d)
    sums = np.bincount(order.numpy(), weights=d, minlength=len(data.files))
    counts = np.bincount(order.numpy(), minlength=len(data.files))
    means = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)
    top = np.argsort(-means, kind="stable")[:10]
    return {
        "model": settings.model,
        "data": settings.data,
        "samples": len(data.files),
        "measurements": len(d),
        "seed": settings.seed,
        "filter_at": settings.filter_at,
        "timesteps": ("the first sampling step (as the filter sees them)" if settings.filter_at == "first-step" else
                      "uniform over the training timesteps, one per measurement (as the filter sees them)"),
        **summary,
        "highest_files": [{"file": data.files[i], "mean_d": float(means[i]), "measurements": int(counts[i])}
                          for i in top if counts[i] > 0],
    }


def calibration_lines(result: dict, out: Path) -> list[str]:
    """The calibration's summary for the terminal."""
    cuts = ", ".join(f"p{p} {v:.4g}" for p, v in result["percentiles"].items())
    share = 100 - result["suggested_percentile"]
    lines = [
        f"d = ||eps(x_t, caption) - eps(x_t, '')|| of {result['model']} on {result['samples']} images "
        f"({result['measurements']} measurements at "
        f"{'the first sampling step' if result['filter_at'] == 'first-step' else 'random training timesteps'}):",
        f"  {cuts}, max {result['max']:.4g}, mean {result['mean']:.4g}",
        f"suggested --filter-threshold {result['suggested_tau']:.4g} (the p{result['suggested_percentile']:g}: "
        f"about {share:g}% of captioned samples excluded at the start of training)",
    ]
    if result["highest_files"]:
        top = result["highest_files"][0]
        lines.append(f"highest: {top['file']} (mean d {top['mean_d']:.4g}; more in calibration.json)")
    lines.append(f"wrote {Path(out) / 'calibration.json'}")
    return lines
