"""`diffmem reproduce`: the paper's two tables for one model, in one resumable run (METHOD.md sections 1, 3, 5).

Detection: for each number of generations n (1 and 4 by default) and each scored-step setting (the first step,
the first 10, all), Wen et al.'s `MagnitudeDetector` scores the memorized and the non-memorized prompts into
OUT/detection/*.jsonl (the rows `diffmem detect` writes, plus seconds per prompt);
`diffmem.measures.detection` turns them
into AUC, TPR at 1% and 3% FPR. Mitigation: the memorized prompts are generated with no mitigation, with the
embedding optimisation at its target loss and with each baseline (OUT/mitigation/<method>/, as `diffmem
mitigate` writes them), and every generation is measured against the prompt's training image and caption: on a
real model by SSCD similarity (a copy above 0.5) and CLIP score, on the testbed by its own copy similarity and
alignment classifier. Every scan and generation resumes where it stopped; the report (OUT/report.md,
OUT/report.json, OUT/plots/) is rewritten after each stage, so a long run shows its tables as they fill.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import InputError
from diffmem.io.durable import write_atomic

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]
"""(stage, done, total): called as a scan advances."""

@dataclass
class ReproduceSettings:
    """Everything that fixes the two tables; the defaults are the paper's protocol."""

    model: str
    memorized: Path
    normal: Path
    out: Path
    generations: tuple[int, ...] = (1, 4)
    steps: tuple[str, ...] = ("first", "10", "all")
    seed: int = 0
    num_inference_steps: int = 50
    guidance_scale: float | None = None
    batch_size: int = 32
    methods: tuple[str, ...] | None = None
    """Mitigation methods (None: those of Wen et al.'s table, `table_methods(paper=True)`)."""
    mitigation_prompts: int | None = None
    mitigation_generations: int = 4
    target_loss: float | None = None
    iters: int = 10
    lr: float = 0.05
    k: int = 4
    sigma: float = 0.1
    references: Path | None = None
    sscd: Path | None = None
    sscd_preprocessing: str = "sscd"
    clip: str | None = None
    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    aesthetic: Path | None = None
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    dataset: str | None = None
    data: Path | None = None

    def __post_init__(self) -> None:
        if self.methods is None:
            from diffmem.mitigate.base import table_methods

            self.methods = table_methods(paper=True)

    def check(self) -> None:
        """One InputError line for settings no run can use (before anything is loaded or computed)."""
        from diffmem.detectors.base import parse_steps
        from diffmem.mitigate import MITIGATIONS

        if not self.generations or min(self.generations) < 1 or self.mitigation_generations < 1:
            raise InputError("--generations and --mitigation-generations take whole numbers of at least 1")
        for steps in self.steps:
            parse_steps(steps, self.num_inference_steps)
        unknown = [m for m in self.methods or () if m not in MITIGATIONS]
        if unknown:
            raise InputError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(MITIGATIONS)}")
        from diffmem.measures.images import PREPROCESSING

        if self.sscd_preprocessing not in PREPROCESSING:
            raise InputError(f"SSCD preprocessing must be one of {', '.join(PREPROCESSING)}, "
                             f"not {self.sscd_preprocessing!r}")
        if self.mitigation_prompts is not None and self.mitigation_prompts < 0:
            raise InputError("--mitigation-prompts must be 0 or more")
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out} is a file; give a folder for the report")

    @property
    def testbed(self) -> bool:
        from diffmem.testbed.bundled import TESTBED_NAMES

        return self.model in TESTBED_NAMES


def _dedupe(prompts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def _read(path: Path, what: str) -> list[str]:
    from diffmem.io.prompts import read_prompts

    prompts = _dedupe(read_prompts(path).prompts)
    if not prompts:
        raise InputError(f"{path} holds no {what} prompts")
    return prompts


# ----------------------------------------------------------------------------------------------- detection


def scan(pipe: Callable[[], Any], prompts: list[str], path: Path, match: dict[str, Any], steps: str,
         settings: Any, progress: Progress | None = None,
         make_detector: Callable[[Any], Any] | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    """Score `prompts` into the result file `path` (resuming it), timing each batch; returns prompt -> row and how
    many prompts this call scored.

    `match` holds the `diffmem detect` settings of the rows; each row adds `seconds`, its share of its batch's
    wall time (text encoding, denoiser calls and the host copy). `make_detector(pipe)` builds the detector (default:
    Wen et al.'s at `steps`); `settings` gives seed, num_inference_steps and batch_size."""
    from diffmem.detectors.magnitude import MagnitudeDetector
    from diffmem.io.results import read_results
    from diffmem.runs.rows import Row, RowsRun, Work, run_rows

    def load(_: RowsRun) -> Work:
        loaded = pipe()
        detector = make_detector(loaded) if make_detector is not None else MagnitudeDetector(
            loaded, steps=steps, generations=match["generations"], seed=settings.seed,
            guidance_scale=match["guidance_scale"], num_inference_steps=settings.num_inference_steps,
            batch_size=settings.batch_size)

        def rows(chunk: list[str]) -> list[Row]:
            began = time.perf_counter()
            scores = detector.score(chunk)  # ends with a host copy: the device has finished
            seconds = (time.perf_counter() - began) / len(chunk)
            return [{**s.to_dict(), **match, "seconds": seconds} for s in scores]

        return Work(rows, loaded.device, f"lower --batch-size ({settings.batch_size})")

    def advance(done: int, total: int) -> None:
        if progress is not None:
            progress(path.stem, done, total)

    run = run_rows(path, lambda: prompts, match, load, per_batch=max(1, settings.batch_size // match["generations"]),
                   notices=False, progress=advance)
    rows = {row["prompt"]: row for row in read_results(path)}
    return {p: rows[p] for p in prompts}, len(run.todo)


def detection_row(n: int, steps: str, mem: list[dict[str, Any]], normal: list[dict[str, Any]], plot: Path,
                  redraw: bool = True) -> dict[str, Any]:
    """AUC, TPR at 1% and 3% FPR, the threshold at 1% FPR and time per prompt of one (n, steps) setting, and its
    ROC curve in `plot` (drawn again only if `redraw` or missing)."""
    from diffmem.measures.detection import evaluate_scores
    from diffmem.measures.plots import plot_roc

    pos, neg = [r["score"] for r in mem], [r["score"] for r in normal]
    ev = evaluate_scores(pos, neg)
    if redraw or not plot.is_file():
        plot_roc(pos, neg, plot, title=f"n = {n}, steps: {steps}")
    return {"generations": n, "steps": steps, **ev.to_dict(),
            "seconds_per_prompt": statistics.fmean(r["seconds"] for r in mem + normal), "plot": str(plot)}


# ---------------------------------------------------------------------------------------------- mitigation


class Measures:
    """How a prompt's generations are compared with its training image and its caption (None: not measured)."""

    copy_name = "copy similarity"
    align_name = "alignment"
    threshold = math.nan

    def copy(self, prompt: str, images: list[np.ndarray]) -> np.ndarray | None:
        """(G,) similarity of each generation (H, W, 3 floats in [0, 1]) to the prompt's training image(s)."""
        return None

    def copies(self, sims: np.ndarray) -> np.ndarray:
        """Which generations count as copies."""
        return sims > self.threshold

    def align(self, prompt: str, images: list[np.ndarray]) -> np.ndarray | None:
        """(G,) agreement of each generation with the prompt."""
        return None

    def aesthetic(self, images: list[np.ndarray]) -> np.ndarray | None:
        """(G,) aesthetic score of each generation."""
        return None

    def copied(self, prompt: str, images: list[np.ndarray], sims: np.ndarray) -> np.ndarray:
        """Which generations copy the prompt's training image (default: `copies` of their similarity)."""
        return self.copies(sims)


class PaperMeasures(Measures):
    """SSCD similarity to the fetched training image(s) (the highest over a prompt's references, as Wen et al.
    take it) and CLIP score against the prompt; either is left out when its model was not given."""

    align_name = "CLIP score"

    def __init__(self, sscd: Any, clip: Any, references: dict[str, list[Path]], aesthetic: Any = None,
                 templates: dict[str, list[tuple[Path, Path]]] | None = None) -> None:
        from diffmem.measures.images import SSCD_COPY_THRESHOLD

        self.sscd, self.clip, self.references = sscd, clip, references
        self.predictor, self.templates = aesthetic, templates or {}
        self.copy_name = f"SSCD similarity ({getattr(sscd, 'preprocessing', '-')} preprocessing)"
        self.threshold = SSCD_COPY_THRESHOLD
        self._ref_desc: dict[str, Any] = {}

    def copy(self, prompt: str, images: list[np.ndarray]) -> np.ndarray | None:
        from diffmem.measures.images import sscd_descriptors

        if self.sscd is None or not self.references.get(prompt):
            return None
        if prompt not in self._ref_desc:
            self._ref_desc[prompt] = sscd_descriptors(self.sscd, self.references[prompt])
        sims = sscd_descriptors(self.sscd, images) @ self._ref_desc[prompt].T
        return sims.max(dim=1).values.numpy()

    def align(self, prompt: str, images: list[np.ndarray]) -> np.ndarray | None:
        from diffmem.measures.images import clip_score

        return None if self.clip is None else clip_score(self.clip, images, [prompt] * len(images)).numpy()

    def aesthetic(self, images: list[np.ndarray]) -> np.ndarray | None:
        from diffmem.measures.aesthetic import aesthetic_scores

        return None if self.predictor is None else aesthetic_scores(self.predictor, images).numpy()

    def copied(self, prompt: str, images: list[np.ndarray], sims: np.ndarray) -> np.ndarray:
        """SSCD copies, or for a template verbatim (Webster's TV) also a match by Webster's masked measure."""
        from diffmem.measures.membench import template_copies

        copies = self.copies(sims)
        return copies | template_copies(images, self.templates[prompt]) if self.templates.get(prompt) else copies


@functools.cache
def testbed_splits() -> Any:
    """The shipped testbed's data splits (its ground truth), built once per process (they take seconds)."""
    from diffmem.testbed.recipe import shipped_recipe

    return shipped_recipe().splits()


class TestbedMeasures(Measures):
    """The testbed's ground truth: copy similarity to the planted training rendering (a copy at or above its
    COPY_THRESHOLD) and the attribute classifier's alignment with the caption."""

    copy_name = "testbed copy similarity"
    align_name = "aligned (testbed classifier)"

    def __init__(self, prompts: Sequence[str]) -> None:
        from diffmem.testbed.similarity import COPY_THRESHOLD

        planted = {item.caption: item for item in testbed_splits().planted}
        unknown = [p for p in prompts if p not in planted]
        if unknown:
            raise InputError(f"{len(unknown)} memorized prompts are not planted testbed captions (e.g. "
                             f"{unknown[0]!r}): write them with `diffmem testbed prompts --split memorized`")
        self.items = planted
        self.threshold = COPY_THRESHOLD

    def copies(self, sims: np.ndarray) -> np.ndarray:
        return sims >= self.threshold

    @staticmethod
    def _stack(images: list[np.ndarray]) -> np.ndarray:
        return np.stack([np.moveaxis(im, -1, 0) for im in images])[None]  # (1, G, 3, H, W)

    def copy(self, prompt: str, images: list[np.ndarray]) -> np.ndarray | None:
        from diffmem.testbed.scenes import render_items
        from diffmem.testbed.similarity import own_similarity

        return own_similarity(self._stack(images), render_items([self.items[prompt]]))[0]

    def align(self, prompt: str, images: list[np.ndarray]) -> np.ndarray | None:
        from diffmem.testbed.quality import alignment

        ok = alignment(self._stack(images), [self.items[prompt]])
        return None if ok is None else ok[0].astype(float)


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def mitigation_row(method: str, folder: Path, measures: Measures, generations: int) -> dict[str, Any]:
    """Memorization rate (at least half of a prompt's generations copy), any-copy rate, mean similarity,
    alignment and seconds per prompt of one method's generations in `folder`."""
    from diffmem.io.results import read_results

    rows = read_results(folder / "results.jsonl")
    from diffmem.measures.membench import membench_metrics

    need = math.ceil(generations / 2)
    sims, copies, aligned, aligns, aesthetics = [], [], [], [], []
    for row in rows:
        images = [_png(folder / name) for name in row["images"]]
        sim = measures.copy(row["prompt"], images)
        if sim is not None:
            sims.append(sim)
            copies.append(int(measures.copied(row["prompt"], images, sim).sum()))
        align = measures.align(row["prompt"], images)
        if align is not None:
            aligned.append(float(align.mean()))
            aligns.append(align)
        beauty = measures.aesthetic(images)
        if beauty is not None:
            aesthetics.append(beauty)
    out: dict[str, Any] = {
        "method": method, "prompts": len(rows), "measured": len(sims),
        "memorization_rate": _mean([c >= need for c in copies]),
        "any_copy_rate": _mean([c >= 1 for c in copies]),
        "mean_similarity": float(np.mean(np.concatenate(sims))) if sims else None,
        "alignment": _mean(aligned),
        "seconds_per_prompt": _mean([r["seconds"] for r in rows]),
        "membench": membench_metrics(*((sims, aligns) if isinstance(measures, PaperMeasures) else ([], [])),
                                     aesthetics),  # SSCD and CLIP columns only on a real model's measures
    }
    from diffmem.mitigate import MITIGATIONS

    if "target_loss" in MITIGATIONS[method].Config.names():  # it optimises towards the target loss
        out["target_loss"] = rows[0]["target_loss"]
        out["target_reached"] = _mean([bool(r["reached"]) for r in rows])
        out["mean_final_loss"] = _mean([r["final_loss"] for r in rows if r["final_loss"] is not None])
    return out


def run_mitigations(out: Path, prompts: Sequence[str], settings: Any, method_settings: Callable[[str], dict],
                    generations: int, measures: Measures, report: Any, save: Callable[[], None], log: Log,
                    pipe: Callable[[], Any]) -> None:
    """Generate `prompts` with each of `settings.methods` into `out/mitigation/<method>` (resuming what is done),
    measure each method's row into `report.mitigation`, and `save` the report after each."""
    from diffmem.runs.generation import run as generate_method

    folder = out / "mitigation"
    folder.mkdir(parents=True, exist_ok=True)
    prompt_file = folder / "prompts.jsonl"
    write_atomic(prompt_file, "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    for method in settings.methods:
        method_dir = folder / method
        if not _complete(method_dir / "results.jsonl", prompts):
            log(f"mitigation, {method}: generating {len(prompts)} prompts x {generations}")
            generate_method(prompt_file, method_dir, settings.model, method, method_settings(method), None,
                            settings.device, settings.dtype, settings.allow_pickle, pipe=pipe())
        log(f"mitigation, {method}: measuring")
        report.mitigation.append(mitigation_row(method, method_dir, measures, generations))
        save()


def _complete(path: Path, prompts: Sequence[str]) -> bool:
    """Whether a result file already holds a row for every prompt."""
    from diffmem.io.results import read_results

    if not path.is_file():
        return False
    try:
        done = {row.get("prompt") for row in read_results(path, allow_partial=True)}
    except InputError:
        return False
    return set(prompts) <= done


def plot_mitigation(rows: list[dict[str, Any]], measures: Measures, path: Path) -> Path | None:
    """Memorization rate against alignment, one point per method (None when either is missing)."""
    points = [r for r in rows if r["memorization_rate"] is not None and r["alignment"] is not None]
    if not points:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4), layout="constrained")
    ax = fig.subplots()
    for r in points:
        ax.plot(r["alignment"], r["memorization_rate"], "o")
        ax.annotate(r["method"], (r["alignment"], r["memorization_rate"]), fontsize=8, textcoords="offset points",
                    xytext=(4, 4))
    ax.set_xlabel(measures.align_name)
    ax.set_ylabel("memorization rate (share of prompts)")
    ax.set_title("mitigation: memorization against alignment", fontsize=9)
    ax.grid(True, alpha=0.3)
    from diffmem.io.durable import save_figure

    return save_figure(fig, path, dpi=120)


# -------------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """The two tables and what a reader needs to interpret them."""

    settings: dict[str, Any]
    detection: list[dict[str, Any]] = field(default_factory=list)
    mitigation: list[dict[str, Any]] = field(default_factory=list)
    measures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


def _f(value: Any, digits: int = 3, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.1%}" if pct else f"{value:.{digits}f}"


def markdown(report: Report) -> str:
    """The report as Markdown: settings, the detection table, the mitigation table, notes and plots."""
    from diffmem.measures.detection import TPR_CONVENTION

    s = report.settings
    lines = [f"# diffmem reproduce: {s['model']}", "",
             f"Memorized prompts: {s['n_memorized']} ({s['memorized']}); non-memorized: {s['n_normal']} "
             f"({s['normal']}). Seed {s['seed']}, {s['num_inference_steps']} sampling steps, guidance "
             f"{s['guidance_scale']:g}.", "",
             "## Detection (Wen et al.: mean text-conditional noise magnitude)", "",
             "| n | steps scored | AUC | TPR@1%FPR | TPR@3%FPR | threshold at 1% FPR | s / prompt |",
             "|---|---|---|---|---|---|---|"]
    for r in report.detection:
        lines.append(f"| {r['generations']} | {r['steps']} | {_f(r['auc'])} | {_f(r['tpr_at_1fpr'])} | "
                     f"{_f(r['tpr_at_3fpr'])} | {r['threshold']:.4g} | {_f(r['seconds_per_prompt'], 4)} |")
    lines += ["", f"TPR@x%FPR: {TPR_CONVENTION}. Time per prompt: wall time of each batch (text encoding, "
              f"denoiser calls, host copy) over its prompts, batch {s['batch_size']} rows.", ""]
    m = report.measures
    if report.mitigation:
        lines += [f"## Mitigation ({s['mitigation_generations']} generations of each of "
                  f"{report.mitigation[0]['prompts']} memorized prompts)", "",
                  f"| method | memorization rate (>= {math.ceil(s['mitigation_generations'] / 2)} of "
                  f"{s['mitigation_generations']} copy) | any generation copies | mean {m['copy']} | "
                  f"{m['align']} | s / prompt |", "|---|---|---|---|---|---|"]
        for r in report.mitigation:
            name = r["method"] + (f" (target loss {r['target_loss']:.4g}, reached {_f(r['target_reached'], pct=True)})"
                                  if "target_reached" in r else "")
            lines.append(f"| {name} | {_f(r['memorization_rate'], pct=True)} | {_f(r['any_copy_rate'], pct=True)} | "
                         f"{_f(r['mean_similarity'])} | {_f(r['alignment'])} | {_f(r['seconds_per_prompt'], 2)} |")
        lines += ["", f"A generation is a copy when its {m['copy']} is {m['rule']}."]
        lines += membench_markdown(report.mitigation)
    lines += [""] + [f"- {note}" for note in report.notes]
    lines += ["", "Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).relative_to(s['out'])})" for p in report.plots)
              if report.plots else ""]
    return "\n".join(lines).rstrip() + "\n"


def membench_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """MemBench's table (max and top-3 SSCD, share above 0.5, CLIP and aesthetic score), when any is measured."""
    keys = ("max_sscd", "top3_sscd", "sscd_above_half", "clip_score", "aesthetic_score")
    if not any(r.get("membench", {}).get(k) is not None for r in rows for k in keys):
        return []
    lines = ["", "### MemBench metrics (per prompt, then averaged over prompts)", "",
             "| method | max SSCD | top-3 SSCD | SSCD > 0.5 | CLIP score | aesthetic score |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mb = r.get("membench", {})
        lines.append(f"| {r['method']} | {_f(mb.get('max_sscd'))} | {_f(mb.get('top3_sscd'))} | "
                     f"{_f(mb.get('sscd_above_half'), pct=True)} | {_f(mb.get('clip_score'))} | "
                     f"{_f(mb.get('aesthetic_score'))} |")
    return lines


def write_report(report: Any, out: Path, render: Callable[[Any], str] | None = None) -> None:
    """OUT/report.json and OUT/report.md (rewritten whole, so they always hold the latest complete tables);
    `render` writes the Markdown (default: this module's `markdown`)."""
    from diffmem.io.results import to_jsonable

    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(to_jsonable(asdict(report)), indent=2) + "\n"),
                       ("report.md", (render or markdown)(report))):
        write_atomic(out / name, text)


# ----------------------------------------------------------------------------------------------------- run


def _measures(settings: ReproduceSettings, mitigation_prompts: list[str], device: Any) -> tuple[Measures, list[str]]:
    """The measures of this model (loaded now, so that a bad file fails before hours of generation) and notes."""
    if settings.testbed:
        return TestbedMeasures(mitigation_prompts), []
    from diffmem.io.references import reference_files
    from diffmem.measures.images import load_clip, load_sscd

    notes = []
    sscd = None if settings.sscd is None else load_sscd(settings.sscd, device, settings.sscd_preprocessing)
    clip = None if settings.clip is None else load_clip(settings.clip, device)
    refs = {} if settings.references is None else reference_files(settings.references)
    if settings.references is not None:  # a prompt file naming URLs: each prompt gets the images of its URLs
        refs.update({p: f for p, f in reference_files(settings.references, settings.memorized).items() if f})
    aesthetic, templates = None, {}
    if settings.aesthetic is not None:
        from diffmem.measures.aesthetic import load_aesthetic

        aesthetic = load_aesthetic(settings.aesthetic, settings.aesthetic_clip, device)
    if settings.dataset is not None:
        from diffmem.io.datasets import prepare

        templates = prepare(settings.dataset, settings.data or Path("datasets")).templates
        if templates:
            notes.append(f"{len(templates)} template-verbatim (TV) prompts: a generation also counts as a copy when "
                         "Webster's masked squared error to one of its templates is below 2500")
    if sscd is None or settings.references is None:
        notes.append("no copy columns: give --sscd (an SSCD TorchScript file) and --references (a folder of "
                     "`diffmem fetch-references`)")
    else:
        missing = sum(1 for p in mitigation_prompts if not refs.get(p))
        if missing:
            notes.append(f"{missing} of {len(mitigation_prompts)} memorized prompts have no reference image "
                         f"(failed downloads: {settings.references}/report.json); the copy columns leave them out")
    if clip is None:
        notes.append("no CLIP score: give --clip (a CLIPModel folder or hub id)")
    return PaperMeasures(sscd, clip, refs, aesthetic, templates), notes


def _check_steps(settings: ReproduceSettings, defaults: Any) -> None:
    """Refuse, before any work, scored steps past the first on a pixel-space model whose folder says so (IF)."""
    from diffmem.detectors.base import parse_steps
    from diffmem.models.denoiser import own_steps_refusal
    from diffmem.models.folders import PIXEL_PIPELINES

    if defaults.pipeline in PIXEL_PIPELINES and any(parse_steps(s, settings.num_inference_steps) > 1
                                                    for s in settings.steps):
        raise InputError(own_steps_refusal(defaults.pipeline))


def reproduce(settings: ReproduceSettings, log: Log = print, progress: Progress | None = None) -> Report:
    """Run (or resume) every scan and generation, then measure and write the report; returns it."""
    import torch

    from diffmem.models.defaults import ModelDefaults
    from diffmem.models.loading import load_pipeline, parse_device
    from diffmem.registry import model_id

    settings.check()
    out = settings.out
    mem, normal = _read(settings.memorized, "memorized"), _read(settings.normal, "non-memorized")
    limit = len(mem) if settings.mitigation_prompts is None else settings.mitigation_prompts
    mitigation_prompts = mem[:limit]
    device = parse_device(settings.device)
    defaults = ModelDefaults.for_model(settings.model)
    _check_steps(settings, defaults)
    guidance = defaults.resolve_guidance(settings.guidance_scale)
    measures, notes = _measures(settings, mitigation_prompts, device)

    @functools.cache
    def pipe() -> Any:
        log(f"loading {settings.model} ...")
        dtype = getattr(torch, settings.dtype) if settings.dtype else None
        if settings.testbed and dtype is None:
            dtype = torch.float32  # the testbed's figures are float32's, on any device
        return load_pipeline(settings.model, device=device, dtype=dtype, allow_pickle=settings.allow_pickle)

    report = Report(settings={**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
                              "guidance_scale": guidance, "n_memorized": len(mem), "n_normal": len(normal)},
                    measures={"copy": measures.copy_name, "align": measures.align_name,
                              "rule": f"{'at or ' if settings.testbed else ''}above {measures.threshold:g}"},
                    notes=notes)
    base = {"model": model_id(settings.model), "detector": "wen", "seed": settings.seed,
            "guidance_scale": guidance, "num_inference_steps": settings.num_inference_steps}
    from diffmem.detectors.base import parse_steps

    wanted = [(n, s) for n in settings.generations for s in settings.steps]
    n_mit = settings.mitigation_generations
    from diffmem.mitigate import MITIGATIONS

    targeted = {m for m in settings.methods or () if "target_loss" in MITIGATIONS[m].calibrated}
    calibrate = bool(targeted) and settings.target_loss is None and limit > 0
    runs = wanted + ([(n_mit, "first")] if calibrate and (n_mit, "first") not in wanted else [])
    first_normal: dict[int, list[float]] = {}
    for n, steps in runs:
        n_steps = parse_steps(steps, settings.num_inference_steps)
        match = {**base, "steps": n_steps, "generations": n}
        name = f"n{n}_steps-{steps}"
        rows, scored = {}, 0
        for kind, prompts in (("memorized", mem), ("normal", normal)):
            rows[kind], new = scan(pipe, prompts, out / "detection" / f"{name}_{kind}.jsonl", match, steps,
                                   settings, progress)
            scored += new
        log(f"detection, n={n}, steps {steps}: scored {scored} prompts, {len(mem) + len(normal) - scored} were "
            "already scored")
        if n_steps == 1:
            first_normal[n] = [r["score"] for r in rows["normal"].values() if r["score"] is not None]
        if (n, steps) in wanted:
            plot = out / "plots" / f"roc_{name}.png"
            report.detection.append(detection_row(n, steps, list(rows["memorized"].values()),
                                                  list(rows["normal"].values()), plot, redraw=scored > 0))
            report.plots.append(str(plot))
        write_report(report, out)

    if limit == 0 or not settings.methods:
        return report
    target = settings.target_loss
    if target is None:
        target = statistics.median(first_normal[n_mit]) if calibrate else defaults.target_loss
        report.notes.append(f"embedding target loss {target:.4g}: the median first-step score (n={n_mit}) of the "
                            f"{len(first_normal.get(n_mit, []))} non-memorized prompts (give --target-loss to fix it)")
    def method_settings(method: str) -> dict[str, Any]:
        return dict(threshold=None, generations=n_mit, seed=settings.seed,
                    num_inference_steps=settings.num_inference_steps, guidance_scale=guidance,
                    target_loss=target if method in targeted else defaults.target_loss, iters=settings.iters,
                    lr=settings.lr, k=settings.k, sigma=settings.sigma)

    run_mitigations(out, mitigation_prompts, settings, method_settings, n_mit, measures, report,
                    lambda: write_report(report, out), log, pipe)
    picture = plot_mitigation(report.mitigation, measures, out / "plots" / "mitigation.png")
    if picture is not None:
        report.plots.append(str(picture))
    write_report(report, out)
    return report
