"""The testbed recipe: train a VAE, pretrain a base model on unique items, then fine-tune with planted duplicates.

Stage 0 trains the autoencoder; stage 1 trains UNet and text encoder on unique items (the "foundation model");
stage 2 freezes text encoder and VAE and fine-tunes the UNet on a mix of planted items, repeated many times,
and unique items each seen once. Every stage is seeded and resumable; stages 1 and 2 use `diffmem.training.loop`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from diffmem.io.durable import write_atomic
from diffmem.io.files import read_json_object
from diffmem.models.defaults import ModelDefaults
from diffmem.models.families import network
from diffmem.testbed.model import VAE_CONFIG, assemble_pipeline, build_components
from diffmem.testbed.scenes import Splits, build_splits, render_many
from diffmem.training.loop import TrainConfig, train


@dataclass
class RecipeConfig:
    """Every knob of the testbed recipe; the defaults took 2.6 hours on 2 CPU cores (DATA.md, "Recipe v2")."""

    seed: int = 0
    n_stage1: int = 100000
    n_planted: int = 64
    n_triggered: int = 16
    n_anchor: int = 64
    n_heldout: int = 512
    prediction_type: str = "v_prediction"
    vae_steps: int = 8000
    vae_batch: int = 32
    vae_lr: float = 3e-3
    vae_crop: int = 16
    stage1_steps: int = 5000
    stage1_batch: int = 64
    stage1_lr: float = 1e-3
    stage1_word_dropout: float = 0.05
    stage2_steps: int = 3000
    stage2_batch: int = 64
    stage2_planted_rows: int = 20
    stage2_anchor_rows: int = 5
    stage2_unique_rows: int = 5
    stage2_lr: float = 1e-3
    checkpoint_every: int = 250
    n_stage2_unique: int = 16000  # the first stage2_steps * stage2_unique_rows are each seen exactly once
    guidance_scale: float = 2.5  # the testbed's default guidance, chosen by measurement after training
    architecture: str = "unet"  # "unet" (SD 1/2: UNet, DDIM) or "sd3" (MMDiT, rectified flow; `sd3_recipe`)

    def __post_init__(self) -> None:
        """Check the recipe once, whoever builds it (code, recipe.json or `--set`): ValueError, one line."""
        for f in fields(self):  # each field holds its default's type (an int is a float too, a bool is neither)
            value, kind = getattr(self, f.name), type(f.default)
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise ValueError(f"recipe: {f.name} must be a {kind.__name__}, not {type(value).__name__}")
        numbers = {k: v for k, v in asdict(self).items() if isinstance(v, (int, float))}
        bad = [k for k, v in numbers.items() if not (v >= 0 and (isinstance(v, int) or math.isfinite(v)))]
        bad += [name for name in ("stage1_batch", "stage2_batch", "checkpoint_every", "stage1_lr", "stage2_lr",
                                  "vae_batch", "vae_lr", "vae_crop") if not getattr(self, name) > 0]
        if bad:
            raise ValueError(f"recipe: {', '.join(dict.fromkeys(bad))} must be finite and non-negative (batches, "
                             "learning rates and checkpoint_every positive)")
        if not self.stage1_word_dropout < 1:
            raise ValueError(f"recipe: stage1_word_dropout must be below 1, not {self.stage1_word_dropout}")
        if self.stage2_replay_rows < 0:
            raise ValueError(f"recipe: stage-2 planted + anchor + unique rows exceed the batch ({self.stage2_batch})")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"recipe: prediction_type must be epsilon or v_prediction, not {self.prediction_type!r}")

    @property
    def stage2_replay_rows(self) -> int:
        """Rows of each stage-2 batch left for stage-1 replay (the batch less planted, anchor and unique rows)."""
        return self.stage2_batch - self.stage2_planted_rows - self.stage2_anchor_rows - self.stage2_unique_rows

    @property
    def n_seen_once(self) -> int:
        """How many stage-2 unique items the fine-tune actually sees (each exactly once)."""
        return min(self.n_stage2_unique, self.stage2_steps * self.stage2_unique_rows)

    def with_overrides(self, pairs: Sequence[str]) -> RecipeConfig:
        """This recipe with `key=value` overrides (the tools' `--set`), each value read as its field's type; an
        unknown key or an unreadable value is one InputError line.

            >>> RecipeConfig().with_overrides(["stage2_anchor_rows=10", "stage2_lr=5e-4"]).stage2_anchor_rows
            10
        """
        from diffmem.errors import InputError

        kinds = {f.name: type(getattr(self, f.name)) for f in fields(self)}
        changes: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in kinds:
                raise InputError(f"--set {pair[:60]!r}: expected KEY=VALUE with KEY one of {', '.join(kinds)}")
            try:
                changes[key] = kinds[key](value)
            except ValueError:
                raise InputError(f"--set {key}: {value[:60]!r} is not a {kinds[key].__name__}") from None
        try:
            return replace(self, **changes)
        except ValueError as e:
            raise InputError(f"--set: {str(e)[:300]}") from None

    def splits(self) -> Splits:
        return build_splits(
            seed=self.seed,
            n_stage1=self.n_stage1,
            n_planted=self.n_planted,
            n_triggered=self.n_triggered,
            n_anchor=self.n_anchor,
            n_stage2_unique=self.n_stage2_unique,
            n_heldout=self.n_heldout,
        )


ARCHITECTURES = ("unet", "sd3")
CALIBRATION = slice(128, 192)
"""The held-out prompts the testbed's transition curve is calibrated on: those after the frontier's 128 evaluated
ones, where it calibrates SAIL and NeMo (`diffmem testbed mitigation --heldout 128`)."""


def sd3_recipe(seed: int = 0) -> RecipeConfig:
    """The SD3 testbed's recipe: the UNet testbed's data splits, VAE and text encoder (frozen), an MMDiT trained
    by rectified flow in the same two stages (a transformer's stage-1 learning rate; stage 2 at the UNet's 1e-3
    with 28 planted rows of 64, where 5e-4 and 20 left 62.5 % of memorized prompts reproduced; docs/results.md)."""
    return RecipeConfig(seed=seed, architecture="sd3", vae_steps=0, stage1_lr=5e-4, stage2_planted_rows=28,
                        guidance_scale=3.0)


Progress = Callable[[str, int, int], None]


def _to_model_range(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float() * 2 - 1


def _random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random `size` x `size` crops at multiples of 4 px: the VAE is convolutional, so training on crops costs
    a fraction of full images and it still encodes whole images."""
    n, _, h, w = x.shape
    if size >= h:
        return x
    offs = torch.randint(0, (h - size) // 4 + 1, (n, 2), generator=gen) * 4
    return torch.stack([img[:, i : i + size, j : j + size] for img, (i, j) in zip(x, offs.tolist(), strict=True)])


def _edge_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical pixel differences: keeps edges and corners that L1/L2 alone blur
    (at equal steps it lifted the round trip's shape accuracy from 79% to 87%; DATA.md)."""
    return sum((F.l1_loss(rec.diff(dim=d), x.diff(dim=d)) for d in (-1, -2)), torch.zeros(()))


def train_vae(cfg: RecipeConfig, splits: Splits, out: Path, device: torch.device, progress: Progress) -> Any:
    """Stage 0: an AutoencoderKL (4x downsampling) on crops of stage-1 renders; L1 + L2 + edge + tiny KL."""
    final = out / "vae"
    if (final / "config.json").is_file():
        return AutoencoderKL.from_pretrained(final).to(device)
    torch.manual_seed(cfg.seed)
    vae: Any = AutoencoderKL(**VAE_CONFIG)
    vae = vae.to(device)
    items = splits.stage1
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(items), (cfg.vae_batch,), generator=gen).tolist()
        x = _to_model_range(render_many([items[i].scene for i in idx], [items[i].seed for i in idx]))
        x = _random_crops(x, cfg.vae_crop, gen).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + _edge_loss(rec, x) + 1e-6 * post.kl().mean()
        for group in opt.param_groups:
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
            group["lr"] = cfg.vae_lr * min(1.0, (step + 1) / 100) * cosine
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress("vae", step + 1, cfg.vae_steps)
    vae.eval()
    with torch.no_grad():
        sample = splits.stage1[:2048]
        z = encode_items(vae, sample, device)
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(final)
    return vae


@torch.no_grad()
def encode_items(vae: Any, items, device: torch.device, batch: int = 512) -> torch.Tensor:
    """Unscaled latent means of the items' renders, on the CPU (the targets the denoiser learns)."""
    out = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        x = _to_model_range(render_many([i.scene for i in chunk], [i.seed for i in chunk])).to(device)
        out.append(vae.encode(x).latent_dist.mean.cpu())
    return torch.cat(out)


def latents_for(vae: Any, items, device: torch.device, cache: Path) -> torch.Tensor:
    """Scaled latents of `items`, cached in `cache` so that a resumed run skips re-encoding (a cache of another
    number of items, left by another recipe, is encoded again)."""
    if cache.is_file():
        cached = load_file(str(cache))["latents"]
        if len(cached) == len(items):
            return cached
    z = encode_items(vae, items, device) * vae.config.scaling_factor
    save_file({"latents": z.contiguous()}, str(cache))
    return z


def drop_words(caption: str, p: float, gen: torch.Generator) -> str:
    """`caption` with each word left out with probability `p`, as real captions leave things unsaid; the
    image stays the same, so the text encoder learns which words carry pixels and which do not."""
    words = caption.split()
    keep = (torch.rand(len(words), generator=gen) >= p).tolist()
    return " ".join(w for w, k in zip(words, keep, strict=True) if k)


def _stage1_draw(n_items: int, cfg: RecipeConfig, step: int) -> tuple[torch.Tensor, torch.Generator]:
    """Stage-1 step `step`'s items (uniform over `n_items`) and the generator its word dropout goes on with."""
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    return torch.randint(0, n_items, (cfg.stage1_batch,), generator=gen), gen


def stage1_picks(n_items: int, cfg: RecipeConfig) -> Callable[[int], torch.Tensor]:
    """Which of the `n_items` stage-1 items step `step` shows (what `stage1_batches` trains on)."""
    return lambda step: _stage1_draw(n_items, cfg, step)[0]


def stage1_batches(latents: torch.Tensor, captions: list[str], cfg: RecipeConfig):
    """Uniform random unique items with word dropout; batch at step s depends only on (seed, s)."""

    def batch(step: int):
        idx, gen = _stage1_draw(len(captions), cfg, step)
        return latents[idx], [drop_words(captions[i], cfg.stage1_word_dropout, gen) for i in idx.tolist()]

    return batch


Pool = tuple[torch.Tensor, list[str]]


def stage2_picks(sizes: Sequence[int], cfg: RecipeConfig) -> Callable[[int], list[torch.Tensor]]:
    """Which items stage-2 step `step` shows, as indices into its four sources (planted, anchors, seen-once,
    stage-1 replay, of `sizes` items each): planted items and trigger anchors (the triggered captions without
    their trigger, other renderings) drawn at random, so each repeats many times, the next `stage2_unique_rows`
    seen-once items in order, and stage-1 items replayed at random for the rest."""
    n_planted, n_anchors, n_unique_items, n_stage1 = sizes
    n_unique, n_replay = cfg.stage2_unique_rows, cfg.stage2_replay_rows

    def picks(step: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(cfg.seed * 104729 + step)
        p = torch.randint(0, n_planted, (cfg.stage2_planted_rows,), generator=gen)
        a = torch.randint(0, max(1, n_anchors), (cfg.stage2_anchor_rows if n_anchors else 0,), generator=gen)
        u = torch.arange(step * n_unique, (step + 1) * n_unique) % max(1, n_unique_items)  # wraps only if steps grow
        r = torch.randint(0, n_stage1, (n_replay,), generator=gen)
        return [p, a, u, r]

    return picks


def stage2_batches(planted: Pool, anchors: Pool, unique: Pool, replay: Pool, cfg: RecipeConfig):
    """Each stage-2 batch: the latents and captions of `stage2_picks`' items."""
    sources = (planted, anchors, unique, replay)
    picks = stage2_picks([len(src[1]) for src in sources], cfg)

    def batch(step: int):
        chosen = list(zip(sources, picks(step), strict=True))
        lat = torch.cat([src[0][idx] for src, idx in chosen if len(idx)])
        caps = [src[1][i] for src, idx in chosen for i in idx.tolist()]
        return lat, caps

    return batch


def _stage2_pools(splits: Splits, zp, za, zu, z1) -> tuple[Pool, Pool, Pool, Pool]:
    """Latents and captions of stage 2's four sources: planted, anchors, seen-once, stage-1 replay."""
    parts = (splits.planted, splits.anchors, splits.stage2_unique, splits.stage1)
    return tuple((z, [i.caption for i in items]) for z, items in zip((zp, za, zu, z1), parts, strict=True))  # type: ignore[return-value]


def stage2_config(cfg: RecipeConfig, filter_threshold: float | None = None,
                  filter_timestep: int | None = None, filter_persist: bool = False) -> TrainConfig:
    """The training settings of stage 2 (UNet only), optionally with the magnitude filter of METHOD.md section 4."""
    return TrainConfig(steps=cfg.stage2_steps, batch_size=cfg.stage2_batch, lr=cfg.stage2_lr, seed=cfg.seed + 1,
                       warmup=50, train_text_encoder=False, checkpoint_every=cfg.checkpoint_every,
                       filter_threshold=filter_threshold, filter_timestep=filter_timestep,
                       filter_persist=filter_persist)


def with_rta(batch_fn, tokenizer, k: int, seed: int):
    """`batch_fn` with random token addition (k tokens) on every caption, seeded by (seed, step, row)."""
    from diffmem.mitigate.baselines import rta

    def batch(step: int):
        latents, captions = batch_fn(step)
        return latents, [rta(c, tokenizer, k, seed=(seed * 1_000_033 + step) * 4096 + row)
                         for row, c in enumerate(captions)]

    return batch


def _training_device(device: str | None) -> torch.device:
    """`device`, or CUDA when present, else the CPU (the recipe does not train on MPS unless asked)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class _Stage2:
    """What a rerun of a shipped testbed's stage 2 starts from: its recipe, its pipeline (frozen), its stage-1
    base network, stage 2's batch function and the objective (None: the UNet's; SD3's rectified flow)."""

    cfg: RecipeConfig
    pipe: Any
    base: Any
    batch: Callable
    objective: Any

    def timestep(self, filter_at: str) -> int | None:
        """Where the filter measures d (`--filter-at`) on this model."""
        from diffmem.training.finetune import model_filter_timestep

        return model_filter_timestep(self.pipe, self.objective, filter_at)

    def magnitudes(self, net: Any, latents: torch.Tensor, captions: list[str], timestep: int | None) -> Any:
        """The filter's d of every sample under `net` (at `timestep`, else at random training timesteps), from
        noise seeded by the recipe's seed: the same draws for every network measured."""
        from diffmem.training.loop import measure_magnitudes

        gen = torch.Generator().manual_seed(self.cfg.seed + 7)
        pipe = self.pipe
        return measure_magnitudes(net.eval(), pipe.text_encoder, pipe.tokenizer, pipe.scheduler, latents, captions,
                                  torch.arange(len(captions)), gen, timestep=timestep,
                                  objective=self.objective).double().numpy()


def _stage2_setup(work: Path, dev: torch.device, steps: int | None = None, architecture: str = "unet",
                  overrides: Sequence[str] = ()) -> _Stage2:
    """The shipped testbed of `architecture` ready to rerun stage 2; `steps` overrides its stage-2 length and
    `overrides` (`key=value`, `RecipeConfig.with_overrides`) stage 2's mix (rows per batch, learning rate)."""
    from dataclasses import replace

    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from diffmem.models.loading import load_pipeline
    from diffmem.testbed import weights_dir, weights_root
    from diffmem.training.loop import FlowObjective

    cfg = shipped_recipe(weights_root(architecture)).with_overrides(overrides)
    if steps is not None:
        cfg = replace(cfg, stage2_steps=steps)
    work.mkdir(parents=True, exist_ok=True)
    splits = cfg.splits()
    name = "testbed-sd3" if architecture == "sd3" else "testbed"
    pipe: Any = load_pipeline(name, device=dev, dtype=torch.float32)  # not CUDA's float16: it trains
    for part in ("vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).requires_grad_(False)
    z1, zp, za, zu = _latent_pools(pipe.vae, splits, dev, work)
    cls: Any = SD3Transformer2DModel if architecture == "sd3" else UNet2DConditionModel
    base = cls.from_pretrained(weights_dir(base=True, architecture=architecture)).to(dev, torch.float32)
    batch2 = stage2_batches(*_stage2_pools(splits, zp, za, zu, z1), cfg)
    return _Stage2(cfg, pipe, base, batch2, FlowObjective(pipe) if architecture == "sd3" else None)


def _stage2_sample(batch2: Callable, batches: int) -> tuple[torch.Tensor, list[str]]:
    """The first `batches` stage-2 batches as one set of latents and captions."""
    parts = [batch2(step) for step in range(batches)]
    return torch.cat([p[0] for p in parts]), [c for p in parts for c in p[1]]


def calibrate_stage2(work: Path, batches: int = 32, device: str | None = None, filter_at: str = "first-step",
                     architecture: str = "unet") -> dict:
    """TAU for the testbed's stage 2 as `diffmem train --calibrate` chooses it for a folder: magnitudes of the
    base model on the first `batches` stage-2 batches (the data as the fine-tune sees it) where the filter
    measures them (`filter_at`)."""
    from diffmem.training.finetune import magnitude_summary

    run = _stage2_setup(work, _training_device(device), architecture=architecture)
    timestep = run.timestep(filter_at)
    latents, captions = _stage2_sample(run.batch, batches)
    d = run.magnitudes(run.base, latents, captions, timestep)
    result = {"model": f"testbed base {'transformer' if architecture == 'sd3' else 'UNet'}", "filter_at": filter_at,
              "timestep": timestep, "measurements": len(d), **magnitude_summary(d)}
    (work / "calibration.json").write_text(json.dumps(result, indent=2))
    return result


def stage2_row_kinds(cfg: RecipeConfig) -> list[str]:
    """What each row of a stage-2 batch is, in `stage2_batches`' order: planted, anchor, unique, replay."""
    return (["planted"] * cfg.stage2_planted_rows + ["anchor"] * cfg.stage2_anchor_rows
            + ["unique"] * cfg.stage2_unique_rows + ["replay"] * cfg.stage2_replay_rows)


def stage2_separation(work: Path, batches: int = 16, device: str | None = None,
                      probe_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900), architecture: str = "unet") -> dict:
    """Where the filter's d separates planted samples from ordinary ones (seen-once and replayed stage-1 items) on
    the shipped, memorizing UNet: AUC and the shares at or above each rule's calibrated TAU (the base UNet's
    p99), for d at each sample's training timestep (the paper's rule) and at the first sampling step, and the
    AUC at fixed probe timesteps."""
    import numpy as np

    from diffmem.measures.detection import roc_auc
    from diffmem.training.loop import FILTER_AT

    run = _stage2_setup(work, _training_device(device), architecture=architecture)
    cfg, pipe, base = run.cfg, run.pipe, run.base
    latents, captions = _stage2_sample(run.batch, batches)
    kinds = np.array(stage2_row_kinds(cfg) * batches)
    planted, ordinary = kinds == "planted", np.isin(kinds, ("unique", "replay"))

    def d(net: Any, timestep: int | None) -> np.ndarray:  # the same noise and timesteps for both networks
        return run.magnitudes(net, latents, captions, timestep)

    result: dict[str, Any] = {"samples": len(captions), "planted": int(planted.sum()), "ordinary": int(ordinary.sum())}
    for rule in FILTER_AT:
        timestep = run.timestep(rule)
        before, after = d(base, timestep), d(network(pipe), timestep)
        tau = float(np.percentile(before, 99))
        result[rule] = {"timestep": timestep, "tau_base_p99": tau,
                        "auc_base_unet": roc_auc(before[planted], before[ordinary]),
                        "auc_shipped_unet": roc_auc(after[planted], after[ordinary]),
                        "planted_at_or_above_tau": float((after[planted] >= tau).mean()),
                        "ordinary_at_or_above_tau": float((after[ordinary] >= tau).mean())}
    result["auc_shipped_unet_at_timestep"] = {}
    for t in probe_timesteps:
        after = d(network(pipe), t)
        result["auc_shipped_unet_at_timestep"][str(t)] = roc_auc(after[planted], after[ordinary])
    (work / "separation.json").write_text(json.dumps(result, indent=2))
    return result


def rerun_stage2(work: Path, dest: Path, filter_threshold: float | None = None, caption_aug: str | None = None,
                 rta_tokens: int = 4, device: str | None = None, progress: Progress | None = None,
                 steps: int | None = None, filter_at: str = "first-step", filter_persist: bool = False,
                 architecture: str = "unet") -> dict:
    """Stage 2 of the shipped recipe again, from the shipped base UNet, with a training-time mitigation (the
    magnitude filter and/or random token addition to captions); saves the pipeline to `dest`."""
    if caption_aug not in (None, "rta"):
        from diffmem.errors import InputError

        raise InputError(f"--caption-aug must be 'rta', not {caption_aug!r}")
    dev = _training_device(device)
    progress = progress or (lambda stage, i, n: None)
    t0 = time.time()
    run = _stage2_setup(work, dev, steps, architecture)
    cfg, pipe, net, batch2 = run.cfg, run.pipe, run.base, run.batch
    timestep = run.timestep(filter_at)
    if caption_aug == "rta":
        batch2 = with_rta(batch2, pipe.tokenizer, rta_tokens, cfg.seed)
    result = train(net, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batch2,
                   stage2_config(cfg, filter_threshold, timestep, filter_persist), work / "stage2",
                   progress=lambda s, r: progress("stage2", s, cfg.stage2_steps), objective=run.objective)
    pipe.register_modules(**{"transformer" if architecture == "sd3" else "unet": net})
    pipe.save_pretrained(dest)
    write_defaults(pipe, dest, cfg)  # the shipped model's guidance, its own target loss
    summary = {"filter_threshold": filter_threshold, "filter_at": filter_at if filter_threshold is not None else None,
               "filter_persist": filter_persist, "dropped_captions": result["dropped_captions"],
               "caption_aug": caption_aug, "wall_s": time.time() - t0,
               "excluded_share": result["excluded_share"]}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


class _StageClock:
    """Wall time per stage, added up over every process of a resumed run (interrupted parts included) and kept
    in `work/timings.json`."""

    def __init__(self, work: Path) -> None:
        self.path = work / "timings.json"
        self.timings: dict[str, float] = read_json_object(self.path, "timings file", missing={})

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:  # an interrupted part counts too: a resumed run's time is the sum of its parts
            self.timings[f"{name}_s"] = self.timings.get(f"{name}_s", 0.0) + time.time() - t0
            self.timings["total_s"] = sum(v for k, v in self.timings.items() if k != "total_s")
            write_atomic(self.path, json.dumps(self.timings, indent=2))


def _latent_pools(vae: Any, splits: Splits, dev: torch.device, work: Path) -> tuple[torch.Tensor, ...]:
    """Scaled latents (cached in `work`) of the stage-1, planted, anchor and seen-once items."""
    return tuple(latents_for(vae, items, dev, work / f"latents_{name}.safetensors") for name, items in (
        ("stage1", splits.stage1), ("planted", splits.planted), ("anchors", splits.anchors),
        ("stage2_unique", splits.stage2_unique)))


def run_recipe(cfg: RecipeConfig, work: Path, dest: Path | None, device: str | None = None,
               progress: Progress | None = None) -> dict:
    """Run all stages in `work` (resumable), then save the pipeline and base network to `dest` in diffusers
    format."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(asdict(cfg), indent=2))
    dev = _training_device(device)
    progress = progress or (lambda stage, i, n: None)
    clock = _StageClock(work)
    splits = cfg.splits()
    if cfg.architecture == "sd3":
        return _run_sd3(cfg, splits, work, dest, dev, progress, clock)
    comps = build_components(cfg.seed, cfg.prediction_type)
    with clock.stage("vae"):
        vae = train_vae(cfg, splits, work, dev, progress)
        vae.requires_grad_(False)

    with clock.stage("encode"):
        z1, zp, za, zu = _latent_pools(vae, splits, dev, work)

    unet, text_encoder = comps["unet"].to(dev), comps["text_encoder"].to(dev)
    base_unet = work / "base_unet.safetensors"
    with clock.stage("stage1"):
        cfg1 = TrainConfig(steps=cfg.stage1_steps, batch_size=cfg.stage1_batch, lr=cfg.stage1_lr, seed=cfg.seed,
                           train_text_encoder=True, checkpoint_every=cfg.checkpoint_every)
        batch1 = stage1_batches(z1, [i.caption for i in splits.stage1], cfg)
        train(unet, text_encoder, comps["tokenizer"], comps["scheduler"], batch1, cfg1, work / "stage1",
              progress=lambda s, r: progress("stage1", s, cfg.stage1_steps))
        save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, str(base_unet))

    with clock.stage("stage2"):
        text_encoder.requires_grad_(False)
        batch2 = stage2_batches(*_stage2_pools(splits, zp, za, zu, z1), cfg)
        train(unet, text_encoder, comps["tokenizer"], comps["scheduler"], batch2, stage2_config(cfg),
              work / "stage2", progress=lambda s, r: progress("stage2", s, cfg.stage2_steps))

    pipe = assemble_pipeline({**comps, "unet": unet.cpu(), "text_encoder": text_encoder.cpu(), "vae": vae.cpu()})
    if dest is not None:
        save_testbed(pipe, base_unet, dest, cfg, clock.timings, model_defaults(pipe, splits, cfg))
    return clock.timings


def _run_sd3(cfg: RecipeConfig, splits: Splits, work: Path, dest: Path | None, dev: torch.device,
             progress: Progress, clock: _StageClock) -> dict:
    """The SD3 testbed's stages: an MMDiT over the UNet testbed's VAE latents and frozen text encoder, stage 1 on
    unique items, stage 2 with planted duplicates, both by rectified flow (`FlowObjective`)."""
    from diffusers import StableDiffusion3Pipeline

    from diffmem.models.loading import load_pipeline
    from diffmem.testbed.model import build_sd3_components
    from diffmem.training.loop import FlowObjective

    unet_testbed: Any = load_pipeline("testbed", device="cpu", dtype=torch.float32)
    pipe: Any = StableDiffusion3Pipeline(**build_sd3_components(unet_testbed.text_encoder, unet_testbed.vae,
                                                                cfg.seed))
    pipe.to(dev)
    pipe.vae.requires_grad_(False)
    with clock.stage("encode"):
        z1, zp, za, zu = _latent_pools(pipe.vae, splits, dev, work)
    objective, net = FlowObjective(pipe), pipe.transformer
    base = work / "base_transformer.safetensors"
    with clock.stage("stage1"):
        cfg1 = TrainConfig(steps=cfg.stage1_steps, batch_size=cfg.stage1_batch, lr=cfg.stage1_lr, seed=cfg.seed,
                           checkpoint_every=cfg.checkpoint_every)
        batch1 = stage1_batches(z1, [i.caption for i in splits.stage1], cfg)
        train(net, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batch1, cfg1, work / "stage1",
              progress=lambda s, r: progress("stage1", s, cfg.stage1_steps), objective=objective)
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(base))
    with clock.stage("stage2"):
        batch2 = stage2_batches(*_stage2_pools(splits, zp, za, zu, z1), cfg)
        train(net, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batch2, stage2_config(cfg), work / "stage2",
              progress=lambda s, r: progress("stage2", s, cfg.stage2_steps), objective=objective)
    pipe.to("cpu")
    if dest is not None:
        save_testbed(pipe, base, dest, cfg, clock.timings, model_defaults(pipe, splits, cfg))
    return clock.timings


def model_defaults(pipe: Any, splits: Splits, cfg: RecipeConfig) -> ModelDefaults:
    """What the testbed's folder tells every command (diffmem.json): its guidance scale, its mitigation target (the
    median first-step score, n=4, of its held-out prompts, a typical non-memorized score) and its transition curve
    (`transition_curve` on held-out prompts 129-192, those the frontier calibrates on, never evaluated; all of them
    in a recipe with fewer)."""
    from diffmem.detectors.magnitude import MagnitudeDetector
    from diffmem.mitigate.delayed_guidance import transition_curve

    rows = MagnitudeDetector(pipe, generations=4, batch_size=256).score([i.caption for i in splits.heldout])
    scores = [r.score for r in rows if r.score is not None]
    defaults = ModelDefaults.of(pipe).override(guidance_scale=cfg.guidance_scale,
                                               target_loss=float(np.median(scores)))
    defaults.attach(pipe)  # the curve is sampled at the testbed's own guidance
    ordinary = splits.heldout[CALIBRATION] or splits.heldout  # a small recipe (tests) has fewer than 129
    curve = transition_curve(pipe, [i.caption for i in ordinary])
    return defaults.override(transition_curve=curve)


def write_defaults(pipe: Any, folder: Path, cfg: RecipeConfig) -> ModelDefaults:
    """Write `model_defaults` to `folder`'s diffmem.json, so that every command measures a stage-2 variant at
    the testbed's guidance."""
    defaults = model_defaults(pipe, cfg.splits(), cfg)
    defaults.save(folder)
    return defaults


def save_testbed(pipe, base: Path, dest: Path, cfg: RecipeConfig, timings: dict,
                 defaults: ModelDefaults) -> None:
    """Write the pipeline (fp16 safetensors, loads as float32 by default) with its `defaults` (diffmem.json) and
    the stage-1 base network (`base`, a safetensors state dict) to `dest` (as `base_unet` or `base_transformer`)."""
    from diffmem.models.families import network

    if dest.exists():
        shutil.rmtree(dest)
    pipe.to(torch.float16).save_pretrained(dest / "pipeline")
    defaults.save(dest / "pipeline")
    net = network(pipe)
    stage1 = net.__class__.from_config(net.config)
    stage1.load_state_dict(load_file(str(base)))
    stage1.to(torch.float16).save_pretrained(dest / base_folder(cfg))
    (dest / "recipe.json").write_text(json.dumps({"recipe": asdict(cfg), "timings": timings}, indent=2))
    pipe.to(torch.float32)


def base_folder(cfg: RecipeConfig) -> str:
    """Where a testbed folder keeps its stage-1 base network."""
    return "base_transformer" if cfg.architecture == "sd3" else "base_unet"


def shipped_recipe(dest: Path | None = None) -> RecipeConfig:
    """The recipe the shipped weights were trained with (their ground truth depends on it)."""
    from diffmem.errors import ModelLoadError
    from diffmem.testbed import WEIGHTS

    path = (dest or WEIGHTS) / "recipe.json"
    if not path.is_file():
        raise ModelLoadError(f"no testbed recipe at {path}: run `diffmem testbed train`")
    recipe = read_json_object(path, "testbed recipe", ModelLoadError).get("recipe")
    if not isinstance(recipe, dict):
        raise ModelLoadError(f"{path} has no 'recipe' object: run `diffmem testbed train`")
    try:
        return RecipeConfig(**recipe)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a testbed recipe ({str(e)[:200]})") from None
