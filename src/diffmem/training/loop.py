"""The denoiser training loop: read it top to bottom. One loop serves the testbed recipe and user fine-tunes.

Batches come from `batch_fn(step) -> (latents, captions)`, a deterministic function of the step, so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run sees. Under `accelerate launch` each
process takes its slice of the global batch (data parallel; gradients are averaged by accelerate).
Optionally (METHOD.md section 4) samples whose text-conditional magnitude reaches `filter_threshold` are
dropped from the loss, d measured at each sample's training timestep (the paper's rule) or, with
`filter_timestep`, at one fixed timestep such as the first sampling step (the detector's own score); a global
batch the filter leaves empty skips its optimizer update; with `filter_persist` a flagged caption stays out of
the loss for the rest of the run (its set is kept in the checkpoint). Ctrl-C (or SIGTERM)
ends the current step, writes a checkpoint and raises KeyboardInterrupt.

What the network learns is an `Objective`: `UNetObjective` (the default: DDPM noising, epsilon or v targets, a
CLIP text encoder) or `FlowObjective` (SD3: rectified flow, METHOD.md section 8). The filter's d is the
text-conditional difference of `Parameterization.to_score`, the detector's score (epsilon, or a flow model's
velocity).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffmem.errors import InputError
from diffmem.io.durable import write_atomic
from diffmem.io.files import MAX_PROMPT_FILE_BYTES, json_problem, read_json_object, read_user_bytes
from diffmem.models.attention import repeated_context_token
from diffmem.models.conditioning import Conditioning, empty, encode
from diffmem.models.denoiser import Denoiser, Parameterization
from diffmem.models.families import SD3, call_default, family

BatchFn = Callable[[int], tuple[torch.Tensor, list[str]]]


@dataclass
class TrainConfig:
    """Settings of one training run; saved beside its checkpoints.

    For example:

        >>> cfg = TrainConfig(steps=1000, batch_size=8, lr=1e-5, filter_threshold=0.9)  # METHOD.md section 4's filter
        >>> cfg.filter_timestep is None, cfg.filter_persist, cfg.checkpoint_every  # d at each sample's own timestep
        (True, False, 500)
    """

    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    caption_dropout: float = 0.1
    train_text_encoder: bool = False
    filter_threshold: float | None = None
    filter_timestep: int | None = None  # where the filter measures d: None = each sample's training timestep
    filter_persist: bool = False  # a caption the filter flags stays out of the loss for the rest of the run
    checkpoint_every: int = 500
    log_every: int = 50


def _tokens(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser learns to predict: the noise (epsilon models) or the velocity (v-prediction)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, t)


class UNetObjective:
    """The diffusion objective of the UNet family: `x_t = scheduler.add_noise(x0, eps, t)` at a uniform integer
    timestep, the target `training_target`, the text of `text_encoder` (trainable with `train_text_encoder`)."""

    def __init__(self, text_encoder, tokenizer, scheduler) -> None:
        self.text_encoder, self.tokenizer, self.scheduler = text_encoder, tokenizer, scheduler
        self._empty: torch.Tensor | None = None

    def timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=gen)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return training_target(self.scheduler, latents, noise, t)

    def encode(self, captions: list[str], device, grad: bool = False) -> torch.Tensor:
        ids = _tokens(self.tokenizer, captions, device)
        with torch.set_grad_enabled(grad):
            return self.text_encoder(ids)[0]

    def predict(self, net, noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return net(noisy, t, encoder_hidden_states=cond).sample

    def magnitudes(self, net, noisy: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        if self._empty is None:
            self._empty = _tokens(self.tokenizer, [""], noisy.device)
        return sample_magnitudes(net, self.text_encoder, self.scheduler, noisy, t, pred, self._empty.to(noisy.device))


class FlowObjective:
    """Rectified flow for SD3 (METHOD.md section 8), as diffusers' train_dreambooth_sd3 trains it: `x_t = (1 - s)
    x0 + s eps`, target `v = eps - x0`, the timestep one of the scheduler's (shifted) training timesteps picked by
    `u ~ logit-normal(0, 1)` (its default `weighting_scheme`, unit loss weights); drawn here from the step's seeded
    generator. The text encoders stay frozen; the network is called through `Denoiser.predict`."""

    def __init__(self, pipe) -> None:
        self.pipe, self.denoiser = pipe, Denoiser(pipe)
        self.scheduler = pipe.scheduler
        self.param = Parameterization.of(self.scheduler)
        if self.param.kind != "flow":
            raise InputError(f"{type(self.scheduler).__name__} is not a flow-matching scheduler")
        self.train_timesteps = type(self.scheduler).from_config(self.scheduler.config).timesteps.float()
        self._empty: Conditioning | None = None
        # SD3 without T5 conditions on `max_sequence_length` rows of zeros after the CLIP tokens: all alike, so
        # the network is trained on one of them standing for all (`repeated_context_token`, exact)
        self.copies = int(call_default(pipe, "max_sequence_length")) if (
            family(pipe) == SD3 and pipe.text_encoder_3 is None) else 0
        self.rows = pipe.tokenizer_max_length + 1 if self.copies else 0  # the CLIP tokens and one row of zeros

    def _compact(self, cond: Conditioning) -> Conditioning:
        """`cond` with its trailing rows of T5 zeros as one row (when `copies`)."""
        if not self.copies or cond.prompt_embeds.shape[1] == self.rows:  # already (`collapsed_t5_rows`)
            return cond
        return cond.replace(prompt_embeds=cond.prompt_embeds[:, : self.rows])

    def first_timestep(self, num_inference_steps: int = 50) -> int:
        """The first step of a plain call's schedule (`s = 1` for SD3: `x_T` is the noise, whatever the image)."""
        return int(self.denoiser.schedule(num_inference_steps).timesteps[0])

    def timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        u = torch.sigmoid(torch.randn(n, generator=gen))  # logit-normal, mean 0, std 1
        idx = (u * self.train_timesteps.numel()).long().clamp(max=self.train_timesteps.numel() - 1)
        return self.train_timesteps[idx]

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.param.sigma(t, latents).to(latents.dtype)
        return (1 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - latents

    @torch.no_grad()
    def encode(self, captions: list[str], device, grad: bool = False) -> Conditioning:
        return self._compact(encode(self.pipe, captions).to(device))

    def predict(self, net, noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if not self.copies:
            return self.denoiser.predict(noisy, t, cond, model=net)
        with repeated_context_token(getattr(net, "module", net), self.copies, self.rows):  # DDP: the module inside
            return self.denoiser.predict(noisy, t, cond, model=net)

    @torch.no_grad()
    def magnitudes(self, net, noisy: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Per sample `|| v(x_t, prompt) - v(x_t, '') ||_2` (`to_score`): the detector's measure."""
        if self._empty is None:
            self._empty = self._compact(empty(self.pipe).to(noisy.device))
        pred_u = self.predict(net, noisy, t, self._empty.expand(noisy.shape[0]))
        diff = self.param.to_score(pred.detach(), noisy, t) - self.param.to_score(pred_u, noisy, t)
        return diff.flatten(1).float().norm(dim=1)


Objective = UNetObjective | FlowObjective


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    batch_fn: BatchFn,
    cfg: TrainConfig,
    out: Path,
    accelerator: Accelerator | None = None,
    progress: Callable[[int, dict], None] | None = None,
    objective: Objective | None = None,
) -> dict:
    """Train `unet` (and `text_encoder` if `cfg.train_text_encoder`) for `cfg.steps`, resuming from `out`.
    `unet` is the denoiser network; `objective` what it learns (`UNetObjective` of the other arguments unless
    given: `FlowObjective(pipe)` trains an SD3 transformer).

    Two steps on the bundled testbed's generations of four captions:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from diffmem import load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> captions = [item.caption for item in shipped_recipe().splits().planted[:4]]
        >>> latents = pipe(captions, num_inference_steps=10, output_type="latent").images  # what the UNet learns
        >>> cfg = TrainConfig(steps=2, batch_size=4, warmup=1, log_every=1)
        >>> with tempfile.TemporaryDirectory() as out:  # a deterministic batch function: resumable runs
        ...     stats = train(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
        ...                   lambda step: (latents, captions), cfg, out)
        ...     stats["steps"], checkpoint_step(Path(out)), len((Path(out) / "log.jsonl").read_text().splitlines())
        (2, 2, 2)
    """
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    obj = objective or UNetObjective(text_encoder, tokenizer, scheduler)
    if cfg.train_text_encoder and not isinstance(obj, UNetObjective):
        raise InputError("train_text_encoder trains a UNet model's CLIP encoder; a flow model's encoders stay frozen")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        write_atomic(out / "train_config.json", json.dumps(asdict(cfg), indent=2))
    text_encoder.requires_grad_(cfg.train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if cfg.train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    start = load_checkpoint_weights(out, unet, text_encoder if cfg.train_text_encoder else None)
    if cfg.train_text_encoder:
        unet, text_encoder, opt = acc.prepare(unet, text_encoder, opt)
    else:  # DistributedDataParallel refuses a model with nothing to train
        unet, opt = acc.prepare(unet, opt)
        text_encoder = text_encoder.to(acc.device)
    dropped: set[str] = set()  # captions flagged so far (kept out for good when cfg.filter_persist)
    if start:
        state = read_state(checkpoint_dir(out))
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        dropped = set(state.get("dropped", []))
    log_path = out / "log.jsonl"
    if acc.is_main_process:
        _trim_log(log_path, start)
    t0 = time.time()
    totals = {"excluded": 0, "seen": 0, "skipped": 0}  # filtered-out samples, samples, skipped updates
    window = dict.fromkeys(totals, 0)  # the same since the last log record
    with _deferred_stop() as stop_requested:
        for step in range(start, cfg.steps):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            latents, captions = batch_fn(step)
            originals = captions
            drop = torch.rand(len(captions), generator=gen) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
            noise = torch.randn(latents.shape, generator=gen)
            t = obj.timesteps(len(captions), gen)
            rows = slice(acc.process_index, None, acc.num_processes)  # this process's share of the global batch
            latents, noise, t = latents[rows].to(acc.device), noise[rows].to(acc.device), t[rows].to(acc.device)

            noisy = obj.noisy(latents, noise, t)
            cond = obj.encode(captions[rows], acc.device, grad=cfg.train_text_encoder)
            pred = obj.predict(unet, noisy, t, cond)
            target = obj.target(latents, noise, t)
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

            keep = torch.ones_like(per_sample, dtype=torch.bool)
            kept = None  # how many samples of the global batch stay in the loss (counted only when filtering)
            if cfg.filter_threshold is not None:
                keep = _filter(obj, unet, cfg.filter_timestep, latents, noisy, t, pred, cond, gen, rows,
                               len(captions)) < cfg.filter_threshold
                if cfg.filter_persist:  # this step's flags join the set, then every caption in it stays out
                    mine = originals[rows]
                    dropped.update(_gather_strings(acc, [c for c, k in zip(mine, keep.tolist(), strict=True) if not k]))
                    keep &= torch.tensor([c not in dropped for c in mine], dtype=torch.bool, device=keep.device)
                kept = int(acc.gather(keep.long().sum().reshape(1)).sum().item())  # the same on every process
            # Filtering normalises by the global kept count, so that accelerate's average over processes is the
            # mean over the kept samples of the whole batch.
            denominator = keep.sum().clamp(min=1) if kept is None else max(kept, 1) / acc.num_processes
            loss = (per_sample * keep).sum() / denominator
            opt.zero_grad(set_to_none=True)
            if kept != 0:
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
            else:  # the filter emptied the batch: no update (weight decay and momentum would still move weights)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
                    sched.step()  # the schedule follows the step count, skipped steps included

            counts = {"excluded": 0 if kept is None else len(captions) - kept, "seen": len(captions),
                      "skipped": int(kept == 0)}
            for key, n in counts.items():
                totals[key] += n
                window[key] += n
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                record = {
                    "step": step + 1,
                    "loss": acc.gather(loss.detach().reshape(1)).mean().item(),
                    "lr": sched.get_last_lr()[0],
                    "excluded": None if kept is None else window["excluded"] / window["seen"],
                    "elapsed_s": round(time.time() - t0, 1),
                }
                if kept is not None:  # counts over the steps since the previous record, all processes together
                    record |= {"excluded_samples": window["excluded"], "samples": window["seen"],
                               "skipped_steps": window["skipped"]}
                    if cfg.filter_persist:
                        record["dropped_captions"] = len(dropped)
                window = dict.fromkeys(totals, 0)
                if acc.is_main_process:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                if progress is not None:
                    progress(step + 1, record)
            elif progress is not None:
                progress(step + 1, {})
            saved = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
            if saved:
                _checkpoint(out, step + 1, acc, unet, text_encoder, opt, sched, cfg.train_text_encoder, dropped)
            if _any_process(acc, stop_requested()):
                if not saved:
                    _checkpoint(out, step + 1, acc, unet, text_encoder, opt, sched, cfg.train_text_encoder, dropped)
                raise KeyboardInterrupt(f"stopped after step {step + 1}; checkpoint written to {out / 'checkpoint'}")
    acc.wait_for_everyone()
    return {
        "steps": cfg.steps,
        "resumed_from": start,
        "excluded_share": totals["excluded"] / totals["seen"] if totals["seen"] else 0.0,
        "skipped_steps": totals["skipped"],
        "dropped_captions": len(dropped),
        "wall_s": time.time() - t0,
    }


@torch.no_grad()
def sample_magnitudes(unet, text_encoder, scheduler, noisy, t, pred, empty_ids) -> torch.Tensor:
    """Per sample `|| eps(x_t, prompt) - eps(x_t, '') ||_2` given the conditional prediction `pred` (one extra
    no-grad forward with the empty prompt); the filter's and `diffmem train --calibrate`'s measure."""
    empty = text_encoder(empty_ids)[0].expand(noisy.shape[0], -1, -1)
    pred_u = unet(noisy, t, encoder_hidden_states=empty).sample
    param = Parameterization.of(scheduler)
    eps_c = param.to_epsilon(pred.detach(), noisy, t)
    eps_u = param.to_epsilon(pred_u, noisy, t)
    return (eps_c - eps_u).flatten(1).float().norm(dim=1)


def _gather_strings(acc, strings: list[str]) -> list[str]:
    """`strings` of every process (this process's alone when there is one)."""
    if acc.num_processes == 1:
        return strings
    from accelerate.utils import gather_object

    return list(gather_object(strings))


@torch.no_grad()
def filter_magnitudes(unet, text_encoder, scheduler, timestep: int | None, latents, noisy, t, pred, cond, empty_ids,
                      gen: torch.Generator, rows: slice, global_batch: int) -> torch.Tensor:
    """The filter's d of this process's samples: at their training timestep `t` (reusing `pred`), or at the fixed
    `timestep` with fresh noise drawn from `gen` for the global batch (the same draws under any process count)."""
    obj = UNetObjective(text_encoder, None, scheduler)
    obj._empty = empty_ids
    return _filter(obj, unet, timestep, latents, noisy, t, pred, cond, gen, rows, global_batch)


@torch.no_grad()
def _filter(obj: Objective, net, timestep: int | None, latents, noisy, t, pred, cond, gen: torch.Generator,
            rows: slice, global_batch: int) -> torch.Tensor:
    """`filter_magnitudes` for any objective."""
    if timestep is None:
        return obj.magnitudes(net, noisy, t, pred)
    noise = torch.randn((global_batch, *latents.shape[1:]), generator=gen)[rows].to(latents.device)
    tf = torch.full_like(t, timestep)
    noisy_f = obj.noisy(latents, noise, tf)
    pred_f = obj.predict(net, noisy_f, tf, cond.detach() if isinstance(cond, torch.Tensor) else cond)
    return obj.magnitudes(net, noisy_f, tf, pred_f)


def first_sampling_timestep(scheduler, num_inference_steps: int = 50) -> int:
    """The timestep of the first denoising step of a `num_inference_steps` schedule: where the detector scores."""
    schedule = scheduler.__class__.from_config(scheduler.config)
    schedule.set_timesteps(num_inference_steps)
    return int(schedule.timesteps[0])


FILTER_AT = ("first-step", "train")  # where the filter measures d: the first sampling step, or the training timestep


def filter_timestep(scheduler, filter_at: str) -> int | None:
    """The `TrainConfig.filter_timestep` of `--filter-at`: the first step of a 50-step schedule (the detector's
    score, default), or None for each sample's training timestep (the paper's rule)."""
    if filter_at not in FILTER_AT:
        raise InputError(f"--filter-at must be one of {', '.join(FILTER_AT)}, not {filter_at!r}")
    return first_sampling_timestep(scheduler) if filter_at == "first-step" else None


@torch.no_grad()
def measure_magnitudes(unet, text_encoder, tokenizer, scheduler, latents: torch.Tensor, captions: list[str],
                       order: torch.Tensor, gen: torch.Generator, batch_size: int = 16,
                       progress: Callable[[int, int], None] | None = None,
                       timestep: int | None = None, objective: Objective | None = None) -> torch.Tensor:
    """`sample_magnitudes` of items `order` (indices into latents/captions), each at a random training timestep
    drawn from `gen` (or at `timestep`), as the filter would see them: the measure behind a calibrated
    `filter_threshold` (`objective` as `train`'s)."""
    obj = objective or UNetObjective(text_encoder, tokenizer, scheduler)
    device = next(unet.parameters()).device
    values = torch.empty(len(order))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = obj.timesteps(len(idx), gen)
        if timestep is not None:
            t = torch.full_like(t, timestep)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        noisy = obj.noisy(x0, noise, t)
        cond = obj.encode([captions[i] for i in idx.tolist()], device)
        pred = obj.predict(unet, noisy, t, cond)
        values[start : start + len(idx)] = obj.magnitudes(unet, noisy, t, pred).cpu()
        if progress is not None:
            progress(start + len(idx), len(order))
    return values


@contextmanager
def _deferred_stop() -> Iterator[Callable[[], bool]]:
    """Turn SIGINT/SIGTERM into a request the loop honours after its current step; a second one stops at once."""
    requests: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield lambda: False
        return

    def handler(signum: int, frame) -> None:
        if requests:
            raise KeyboardInterrupt
        requests.append(signum)

    before = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requests)
    finally:
        for sig, old in before.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _any_process(acc, flag: bool) -> bool:
    """Whether `flag` is set on any process (so that all processes stop after the same step)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.gather(torch.tensor([int(flag)], device=acc.device)).sum().item())


def _checkpoint(out: Path, step: int, acc, unet, text_encoder, opt, sched, with_text: bool,
                dropped: set[str] | None = None) -> None:
    """Write `checkpoint/` as a whole: weights (safetensors), optimizer and schedule state (safetensors + JSON)
    and step go into `checkpoint.tmp/`, which then replaces it. A kill at any moment leaves a whole checkpoint
    (`checkpoint/`, or `checkpoint.old/` between the two renames) that `checkpoint_dir` finds."""
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    if not final.exists() and old.exists():  # a kill between the renames below: the old one is the last whole one
        old.rename(final)
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir()
    try:
        save_file(_cpu_state(acc.unwrap_model(unet)), str(tmp / "unet.safetensors"))
        if with_text:
            save_file(_cpu_state(acc.unwrap_model(text_encoder)), str(tmp / "text_encoder.safetensors"))
        write_state(tmp, {"opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                          "dropped": sorted(dropped or ())})
    except (OSError, RuntimeError, SafetensorError) as exc:  # disk full, file size limit, read-only folder
        shutil.rmtree(tmp, ignore_errors=True)
        last = checkpoint_step(out)
        kept = f"; the checkpoint of step {last} is kept" if last else ""
        raise InputError(f"cannot write a checkpoint in {out}: {_first_line(exc)}{kept}") from None
    if final.exists():
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


STATE_TENSORS, STATE_JSON, LEGACY_STATE = "state.safetensors", "state.json", "state.pt"
"""Optimizer and schedule state: tensors in safetensors, the rest in JSON (older checkpoints: a torch pickle)."""


def write_state(folder: Path, state: dict) -> None:
    """Save a state dict (optimizer, schedule, step) without pickle: its tensors into `STATE_TENSORS`, everything
    else into `STATE_JSON` with references to them (JSON keeps Python floats exactly)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _to_json(state, tensors)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
    write_atomic(folder / STATE_JSON, json.dumps(tree))


def read_state(folder: Path) -> dict:
    """The state `write_state` saved in `folder`, or an older checkpoint's `state.pt` (loaded with
    `weights_only=True`: tensors and plain containers only, no code)."""
    if (folder / STATE_JSON).is_file():
        tree = state_json(folder)
        try:
            return _from_json(tree, load_file(str(folder / STATE_TENSORS)))
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{folder} is damaged ({' '.join(str(exc).split())[:200]}); {_kept(folder)}") from None
    return torch.load(folder / LEGACY_STATE, map_location="cpu", weights_only=True)


def state_json(folder: Path) -> dict:
    """A checkpoint's state.json, or one line saying it is damaged; the checkpoint is left as it is."""
    try:
        tree = read_json_object(folder / STATE_JSON, "checkpoint state file")
    except InputError as exc:
        raise InputError(f"{exc}; {_kept(folder)}") from None
    step = tree.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"{folder / STATE_JSON} is damaged: no whole 'step' field; {_kept(folder)}")
    return tree


def _kept(folder: Path) -> str:
    return (f"the checkpoint in {folder} is kept as it is: restore it from a copy, or start a new run with another "
            "--out")


def _to_json(obj, tensors: dict[str, torch.Tensor]):
    """`obj` as JSON-able data; tensors are moved into `tensors` and replaced by {"__tensor__": name}, dicts with
    non-string keys (the optimizer's parameter indices) by {"__int_keys__": ...}, tuples by lists."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_json(v, tensors) for k, v in obj.items()}
        if not all(isinstance(k, int) for k in obj):
            raise TypeError(f"cannot save dict keys of types {sorted({type(k).__name__ for k in obj})}")
        return {"__int_keys__": {str(k): _to_json(v, tensors) for k, v in obj.items()}}
    if isinstance(obj, list | tuple):
        return [_to_json(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot save a {type(obj).__name__} in a checkpoint's state")


def _from_json(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of `_to_json`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__int_keys__"}:
            return {int(k): _from_json(v, tensors) for k, v in obj["__int_keys__"].items()}
        return {k: _from_json(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v, tensors) for v in obj]
    return obj


def checkpoint_dir(out: Path) -> Path:
    """The folder of the last whole checkpoint of the run in `out`: `checkpoint/`, or `checkpoint.old/` when a
    kill fell between `_checkpoint`'s two renames (then `checkpoint/` is missing)."""
    final, old = Path(out) / "checkpoint", Path(out) / "checkpoint.old"
    return old if not _has_state(final) and _has_state(old) else final


def _has_state(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file() or (folder / LEGACY_STATE).is_file()


def checkpoint_step(out: Path) -> int:
    """The step of the last whole checkpoint in `out`, 0 when there is none."""
    folder = checkpoint_dir(out)
    if not _has_state(folder):
        return 0
    if (folder / STATE_JSON).is_file():
        return int(state_json(folder)["step"])
    return int(read_state(folder)["step"])


def _trim_log(log_path: Path, step: int) -> None:
    """Keep the log records of steps up to `step` (where the run resumes) and drop the rest: records a killed
    run wrote after its last checkpoint (written again as those steps rerun) and a torn last line."""
    if not log_path.is_file():
        return
    data = read_user_bytes(log_path, "training log", MAX_PROMPT_FILE_BYTES)
    kept = []
    for line in data.split(b"\n"):
        record, problem = json_problem(line.decode("utf-8", "replace"))
        if problem is not None:
            continue  # a blank or torn line
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line.decode() + "\n")
    if "".join(kept).encode() != data:
        write_atomic(log_path, "".join(kept))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def load_checkpoint_weights(out: Path, unet, text_encoder=None) -> int:
    """Load checkpoint weights of `out` into unprepared models (before `train`); returns its step or 0."""
    step = checkpoint_step(out)
    if not step:
        return 0
    ckpt = checkpoint_dir(out)
    unet.load_state_dict(load_file(str(ckpt / "unet.safetensors")))
    if text_encoder is not None and (ckpt / "text_encoder.safetensors").is_file():
        text_encoder.load_state_dict(load_file(str(ckpt / "text_encoder.safetensors")))
    return step
