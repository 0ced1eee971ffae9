"""The service behind `diffmem serve`: screen, explain and fix prompts on one loaded pipeline, in plain Python.

The web page and the HTTP API are thin wrappers over `Service`; nothing here imports a web framework, so the
same calls run in a script or a test. One lock serializes model calls: a diffusers pipeline is not
thread-safe (its scheduler holds state) and a small CPU gains nothing from running two at once.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.errors import InputError
from diffmem.io.files import check_prompt, read_user_json
from diffmem.models.defaults import ModelDefaults


class LimitError(InputError):
    """A request exceeds a size limit of the service (prompt length, batch size): HTTP 413."""


@dataclass(frozen=True)
class Limits:
    """Request limits: characters per prompt, prompts per detect call, requests waiting for the model."""

    max_prompt_chars: int = 1000
    max_batch: int = 64
    max_queue: int = 16
    concurrency: int = 1

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_batch", "max_queue", "concurrency"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True)
class Settings:
    """Detection settings (those the threshold was calibrated with) and the generate button's settings."""

    steps: str | int = "first"
    generations: int = 1
    seed: int = 0
    guidance_scale: float | None = None  # None: the model's own (`diffmem.models.defaults.ModelDefaults`)
    num_inference_steps: int = 50
    batch_size: int = 32
    generate_steps: int = 25
    mitigate_iters: int = 10
    target_loss: float | None = None  # the mitigation's first-step target; None: the model's own, as the CLI's

    def __post_init__(self) -> None:
        """Checked by the configs of the methods the page runs: Wen et al.'s detector (the score), the shared
        generation (the Generate button) and the embedding optimisation."""
        from diffmem.detectors.magnitude import MagnitudeConfig
        from diffmem.mitigate.base import GenerationConfig
        from diffmem.mitigate.embedding import EmbeddingConfig

        MagnitudeConfig(steps=self.steps, generations=self.generations, seed=self.seed,
                        guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                        batch_size=self.batch_size)
        self.explain_config()
        GenerationConfig(seed=self.seed, generations=self.generations, num_inference_steps=self.generate_steps,
                         guidance_scale=self.guidance_scale)
        EmbeddingConfig(target_loss=self.target_loss, iters=self.mitigate_iters)
        if self.target_loss is not None and not math.isfinite(self.target_loss):
            raise InputError(f"--target-loss must be a finite number, not {self.target_loss}")

    @property
    def scored_steps(self) -> int:
        """How many leading sampling steps a score averages."""
        from diffmem.detectors.base import parse_steps

        return parse_steps(self.steps, self.num_inference_steps)

    def explain_config(self) -> Any:
        """The page's explanation settings (`ExplainConfig`: leave-one-out on the score's own settings)."""
        from diffmem.explanation.attribution import ExplainConfig

        return ExplainConfig(method="leave-one-out", steps=self.steps, **self.detection_kwargs())

    def detection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `MagnitudeDetector` and `explain` that fix a score."""
        return dict(generations=self.generations, seed=self.seed, guidance_scale=self.guidance_scale,
                    num_inference_steps=self.num_inference_steps)

    def describe(self) -> str:
        """One line for the page: how scores and images are computed."""
        steps = "first step" if self.scored_steps == 1 else f"first {self.scored_steps} steps"
        gens = f"{self.generations} generation" + ("s" if self.generations > 1 else "")
        guidance = "the model's" if self.guidance_scale is None else f"{self.guidance_scale:g}"
        return (f"score: {steps}, {gens}, seed {self.seed}, guidance {guidance}, "
                f"DDIM {self.num_inference_steps}; generate: DDIM {self.generate_steps} steps, "
                f"mitigation {self.mitigate_iters} iterations")


@dataclass(frozen=True)
class Threshold:
    """The detection threshold (flag `score >= value`) and, for the reader, where it came from."""

    value: float
    source: str


def _read_calibration(path: Path) -> Threshold:
    """A threshold from a JSON file with a numeric `threshold` field, as `diffmem evaluate --json` writes."""
    data = read_user_json(path, "calibration file")
    value = data.get("threshold") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{path} has no numeric 'threshold' field (write one with `diffmem evaluate --json`)")
    source = f"calibration file {path}"
    if isinstance(data.get("target_fpr"), int | float) and isinstance(data.get("n_neg"), int):
        source += f" ({data['target_fpr']:.0%} FPR on {data['n_neg']} non-memorized prompts)"
    return Threshold(float(value), source)


def threshold_from_options(model: str, threshold: float | None = None, calibration: Path | None = None,
                           defaults: ModelDefaults | None = None) -> Threshold | None:
    """The threshold `--threshold` or `--calibration` gives, else the model's own calibrated one (`defaults`, read
    before loading); None on the testbed without any (calibrate it with `calibrate_testbed`); any other model needs
    one of them. Runs before the model loads."""
    from diffmem.testbed.bundled import TESTBED_NAMES

    if threshold is not None and calibration is not None:
        raise InputError("give --threshold or --calibration, not both")
    if threshold is not None:
        if not math.isfinite(threshold):
            raise InputError(f"--threshold must be a finite number, not {threshold}")
        return Threshold(float(threshold), "the --threshold option")
    if calibration is not None:
        return _read_calibration(Path(calibration))
    if defaults is not None and defaults.detection_threshold is not None:
        return Threshold(defaults.detection_threshold, f"the model's own ({defaults.where('detection_threshold')})")
    if model not in TESTBED_NAMES:
        raise InputError(
            f"{model} needs a detection threshold: pass --threshold T or --calibration FILE "
            "(the JSON of `diffmem evaluate --json` on its memorized and non-memorized prompts)"
        )
    return None


def calibrate_testbed(pipe: Any, settings: Settings) -> Threshold:
    """The threshold flagging 1% of the testbed's held-out (never trained on) prompts, scored with `settings`."""
    from diffmem.detectors.calibration import calibrate_detection
    from diffmem.detectors.magnitude import MagnitudeDetector
    from diffmem.testbed.recipe import shipped_recipe

    heldout = [item.caption for item in shipped_recipe().splits().heldout]
    det = MagnitudeDetector(pipe, steps=settings.steps, batch_size=max(settings.batch_size, 64),
                            **settings.detection_kwargs())
    cal = calibrate_detection(det, heldout)
    return Threshold(cal.threshold, f"calibrated at startup on {len(heldout)} held-out testbed prompts at "
                                    f"{cal.fpr:.0%} FPR")


def resolve_threshold(
    model: str, pipe: Any, settings: Settings, threshold: float | None = None, calibration: Path | None = None
) -> Threshold:
    """The threshold from `--threshold` or `--calibration`, else the model's own; on the testbed without any,
    calibrated now on its held-out ground-truth prompts at 1% FPR; any other model needs one of them."""
    fixed = threshold_from_options(model, threshold, calibration, ModelDefaults.of(pipe))
    return fixed or calibrate_testbed(pipe, settings)


def png_base64(image: np.ndarray) -> str:
    """An (H, W, 3) image in [0, 1] as base64 PNG text (for JSON and for `<img src="data:...">`)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Analysis:
    """What the page shows for one prompt: its screening row, its attribution and suggested edits."""

    row: dict[str, Any]
    attribution: Any
    suggestions: list[dict[str, Any]] = field(default_factory=list)


def _norm(text: str) -> str:
    return " ".join(text.split())


class Service:
    """Screen, explain and generate on one pipeline with one threshold; every call is validated and locked."""

    def __init__(self, pipe: Any, model: str, threshold: Threshold, settings: Settings | None = None,
                 limits: Limits | None = None) -> None:
        from diffmem.testbed.bundled import TESTBED_NAMES

        self.pipe = pipe
        self.model = model
        self.threshold = threshold
        settings, defaults = settings or Settings(), ModelDefaults.of(pipe)
        self.settings = replace(settings, guidance_scale=defaults.resolve_guidance(settings.guidance_scale),
                                target_loss=defaults.resolve_target_loss(settings.target_loss))
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._training: dict[str, Any] = {}
        if model in TESTBED_NAMES:
            from diffmem.testbed.recipe import shipped_recipe

            self._training = {_norm(item.caption): item for item in shipped_recipe().splits().planted}

    @property
    def is_testbed(self) -> bool:
        """Whether the model has ground truth (training images of its planted captions)."""
        return bool(self._training)

    def testbed_examples(self) -> tuple[str, str]:
        """Example prompts for the page: the first planted caption (split order) that the threshold flags and the
        first held-out one it does not, so the examples show what they say (the testbed flags 59 % of its planted
        captions at n=1 and 1 % FPR, not all)."""
        from diffmem.testbed.recipe import shipped_recipe

        splits = shipped_recipe().splits()
        candidates = [[i.caption for i in items[:16]] for items in (splits.planted, splits.heldout)]
        with self._lock:
            rows = self._screen(candidates[0] + candidates[1], curve=False)
        flags = [bool(r["flagged"]) for r in rows]
        n = len(candidates[0])
        memorized = next((c for c, f in zip(candidates[0], flags[:n], strict=True) if f), candidates[0][0])
        heldout = next((c for c, f in zip(candidates[1], flags[n:], strict=True) if not f), candidates[1][0])
        return memorized, heldout

    def info(self) -> dict[str, Any]:
        """The model, threshold and its source, settings and limits (GET /api/info)."""
        return {
            "model": self.model,
            "threshold": self.threshold.value,
            "threshold_source": self.threshold.source,
            "settings": asdict(self.settings),
            "limits": asdict(self.limits),
            "testbed": self.is_testbed,
        }

    # ------------------------------------------------------------------------------------------ validation

    def check_prompt(self, prompt: object, where: str = "the prompt") -> str:
        """`prompt` if it is a non-blank string within the length limit, else a one-line InputError."""
        # the text rule of prompt files, the CLI and the library (lone surrogates, control characters, blank text)
        check_prompt(prompt, where, max_chars=None)
        assert isinstance(prompt, str)
        if len(prompt) > self.limits.max_prompt_chars:
            raise LimitError(f"{where} has {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}")
        return prompt

    def check_explainable(self, prompt: object) -> str:
        """`check_prompt`, then the explanation's word budget (`ExplainConfig.check_prompt`: a `LimitError`)."""
        text = self.check_prompt(prompt)
        try:
            self.settings.explain_config().check_prompt(text)
        except InputError as exc:
            raise LimitError(str(exc)) from None
        return text

    def check_prompts(self, prompts: object) -> list[str]:
        """A non-empty list of valid prompts within the batch limit, else a one-line InputError."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InputError("prompts must be a list of strings")
        if not prompts:
            raise InputError("prompts is an empty list: give at least one prompt")
        if len(prompts) > self.limits.max_batch:
            raise LimitError(f"{len(prompts)} prompts in one request; the limit is {self.limits.max_batch}")
        return [self.check_prompt(p, f"prompt {i}") for i, p in enumerate(prompts)]

    # --------------------------------------------------------------------------------------------- calls

    def screen(self, prompts: Sequence[str], curve: bool = False) -> list[dict[str, Any]]:
        """Score each prompt and give its verdict; with `curve`, magnitudes cover all sampling steps."""
        prompts = self.check_prompts(prompts)
        with self._lock:
            return self._screen(prompts, curve)

    def explain_prompt(self, prompt: str, suggest: bool = True) -> dict[str, Any]:
        """Word significance for the prompt's score and, when it is flagged, edits that score below the
        threshold (least change first)."""
        prompt = self.check_explainable(prompt)
        with self._lock:
            attr = self._explain(prompt)
            flagged = attr.score >= self.threshold.value
            edits = self._suggest(attr) if suggest and flagged else []
        return {
            "prompt": prompt,
            "score": attr.score,
            "flagged": flagged,
            "threshold": self.threshold.value,
            "method": attr.method,
            "words": [{"text": w.text, "significance": w.significance, "truncated": w.truncated}
                      for w in attr.words],
            "cut_off": attr.cut_off,
            "suggestions": edits,
        }

    def analyse(self, prompt: str) -> Analysis:
        """Everything the page shows after "Screen": score with the all-steps curve, attribution, edits."""
        prompt = self.check_explainable(prompt)
        with self._lock:
            row = self._screen([prompt], curve=True)[0]
            attr = self._explain(prompt)
            edits = self._suggest(attr) if row["flagged"] else []
        return Analysis(row, attr, edits)

    def generate_pair(self, prompt: str) -> dict[str, Any]:
        """The plain image and the mitigated one from the same initial noise, with the mitigated embedding's
        score; on the testbed, a planted caption's training image and each image's copy similarity to it."""
        prompt = self.check_prompt(prompt)
        with self._lock:
            return self._generate(prompt)

    # ------------------------------------------------------------------------------------------- internals

    def _verdict(self, score: float | None) -> bool | None:
        return None if score is None else bool(score >= self.threshold.value)

    def _screen(self, prompts: list[str], curve: bool) -> list[dict[str, Any]]:
        from diffmem.detectors.magnitude import MagnitudeDetector

        s = self.settings
        det = MagnitudeDetector(self.pipe, steps="all" if curve else s.steps, batch_size=s.batch_size,
                                **s.detection_kwargs())
        k = s.scored_steps
        rows = []
        for res in det.score(prompts):
            mags = np.array([[math.nan if v is None else v for v in g] for g in res.magnitudes], dtype=float)
            scored = mags[:, :k]
            score = float(scored.mean()) if np.isfinite(scored).all() else None
            rows.append({
                "prompt": res.prompt,
                "score": score,
                "flagged": self._verdict(score),
                "threshold": self.threshold.value,
                "scored_steps": k,
                "magnitudes": res.magnitudes,
                "timesteps": res.timesteps,
                "n_tokens": res.n_tokens,
                "truncated": res.truncated,
                "truncated_text": res.truncated_text,
                "error": res.error,
            })
        return rows

    def _explain(self, prompt: str) -> Any:
        from diffmem.explanation.attribution import explain

        return explain(self.pipe, prompt, config=self.settings.explain_config())

    def _suggest(self, attr: Any) -> list[dict[str, Any]]:
        from diffmem.explanation.attribution import suggest_edits

        return [asdict(s) for s in suggest_edits(self.pipe, attr, self.threshold.value)]

    def _embedding_score(self, cond: Any) -> float:
        """The detection score of a conditioning (as for a prompt, without its text; any model family)."""
        from diffmem.detectors.magnitude import MagnitudeDetector
        from diffmem.models.denoiser import Denoiser

        s = self.settings
        det = MagnitudeDetector(self.pipe, steps=s.steps, **s.detection_kwargs())
        denoiser = Denoiser(self.pipe)
        mags, _ = det.magnitudes(cond.to(denoiser.device, denoiser.dtype))
        return float(mags.double().mean())

    @torch.no_grad()
    def _sample(self, prompt: str | None = None, cond: Any = None) -> np.ndarray:
        """One image of `prompt` by a plain pipeline call, or of the conditioning `cond` against the empty prompt,
        from the seed's noise, with the family's call arguments (`Denoiser.call_kwargs`)."""
        from diffmem.detectors.base import initial_noise
        from diffmem.models.denoiser import Denoiser

        s = self.settings
        assert s.guidance_scale is not None  # resolved in __init__
        denoiser = Denoiser(self.pipe)
        if cond is None:
            kwargs = {"prompt": prompt, **denoiser.call_options(embeddings=False),
                      **denoiser.guidance(s.guidance_scale, embeddings=False)}
        else:
            kwargs = denoiser.call_kwargs(cond, denoiser.empty(), s.guidance_scale)
        with denoiser.starting_from(initial_noise(self.pipe, 1, s.seed), [s.seed]) as start:
            out = self.pipe(**start, num_inference_steps=s.generate_steps, output_type="np", **kwargs)
        return np.asarray(out.images[0], dtype=np.float32)

    def _generate(self, prompt: str) -> dict[str, Any]:
        """The default mitigation (`default_mitigation`): the embedding optimised to the method's stopping loss,
        then one image sampled under its guidance schedule (Flux: the optimisation alone, Wen et al.'s method)."""
        from diffmem.mitigate import mitigate_embedding
        from diffmem.mitigate.base import default_mitigation
        from diffmem.mitigate.embedding_delayed import EmbeddingDelayed, EmbeddingDelayedConfig
        from diffmem.models.conditioning import as_conditioning
        from diffmem.models.defaults import ModelDefaults
        from diffmem.models.families import family
        from diffmem.runs.generation import finite_images

        s = self.settings
        assert s.guidance_scale is not None  # resolved in __init__
        method = default_mitigation(family(self.pipe))
        delayed = method == EmbeddingDelayed.name
        config = EmbeddingDelayedConfig(target_loss=s.target_loss, iters=s.mitigate_iters).resolved(
            ModelDefaults.of(self.pipe))  # the target: the model's own unless given, as `diffmem mitigate`'s
        assert config.target_loss is not None  # resolved
        target = config.stop_at if delayed else config.target_loss
        start = time.perf_counter()
        plain = self._sample(prompt=prompt)
        result = mitigate_embedding(self.pipe, prompt, generations=s.generations, seed=s.seed,
                                    target_loss=target, iters=s.mitigate_iters,
                                    guidance_scale=s.guidance_scale, num_inference_steps=s.num_inference_steps)
        cond = result.conditioning if result.conditioning is not None else as_conditioning(self.pipe,
                                                                                          result.embedding)
        switched: int | None = None
        if delayed:
            with config.schedule(self.pipe, s.guidance_scale) as schedule:
                mitigated = self._sample(cond=cond)
            switched = schedule.switched_at[0]
        else:
            mitigated = self._sample(cond=cond)
        plain, plain_error = finite_images(plain)  # NaN/inf pixels: black and said, as in `diffmem generate`'s rows
        mitigated, mitigated_error = finite_images(mitigated)
        out: dict[str, Any] = {
            "prompt": prompt,
            "seed": s.seed,
            "num_inference_steps": s.generate_steps,
            "plain": plain,
            "mitigated": mitigated,
            "mitigation": {
                "score": self._embedding_score(cond),
                "initial_loss": float(result.losses[0]),
                "final_loss": float(result.final_loss),
                "iters": int(result.iters),
                "reached": bool(result.reached),
                "target_loss": target,
                "method": method,
                "guidance_from_step": switched,
            },
            "training": None,
            "copy_similarity": None,
            "error": plain_error or mitigated_error,
        }
        item = self._training.get(_norm(prompt))
        if item is not None:
            from diffmem.testbed.scenes import render_many
            from diffmem.testbed.similarity import COPY_THRESHOLD, copy_similarity

            train = render_many([item.scene], [item.seed])
            sims = copy_similarity(np.stack([plain, mitigated]).transpose(0, 3, 1, 2), train)[:, 0]
            out["training"] = train[0].transpose(1, 2, 0)
            out["copy_similarity"] = {"plain": float(sims[0]), "mitigated": float(sims[1]),
                                      "copy_threshold": COPY_THRESHOLD}
        out["seconds"] = time.perf_counter() - start
        return out
