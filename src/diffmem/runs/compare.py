"""`diffmem compare`: every detector and every mitigation on one model, one table each, in one resumable run.

Detection: each detector of `diffmem.detectors.DETECTORS` at each number of generations n scores the memorized and
the non-memorized prompts into OUT/detection/<detector>_n<n>_<memorized|normal>.jsonl (`diffmem detect` rows plus
`seconds`, each prompt's share of its batch's wall time), then AUC and TPR at 1% FPR, and the time per prompt
over that of Wen et al.'s first step at n = 1 (the cost column). Detectors that compare a prompt's generations with
each other (nemo, carlini) have no n = 1 row. The step-norm score needs a stable range of ordinary updates: it is fit
on the even-indexed non-memorized prompts (saved as OUT/step_norm_range.json, for `diffmem detect --stable-range`)
and the step-norm row is evaluated on the odd-indexed ones only.
Mitigation: the first `mitigation_prompts` memorized prompts are generated with each method (OUT/mitigation/<method>/,
as `diffmem mitigate` writes them) and measured against their training images, as `diffmem reproduce` does (on the
testbed by its own copy similarity and alignment). Thresholds that depend on the model are calibrated on the
non-memorized prompts unless given, and recorded in OUT/calibration.json: the embedding target loss (the median
first-step score), SAIL's threshold (the median SAIL loss of their own initial noises), NeMo's SSIM threshold
(mean + 1 std of the pairwise residual MS-SSIM, the authors' recipe) and NeMo's neuron statistics
(OUT/nemo_stats.pt). Every scan and generation resumes; the report (OUT/report.md, OUT/report.json) is rewritten after
each stage. Published SD v1.4 figures stand beside each row, with their sources (`PUBLISHED`).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffmem.errors import InputError
from diffmem.models.defaults import ModelDefaults
from diffmem.runs.reproduce import Log, Progress, Report, ReproduceSettings, _f, membench_markdown

DEFAULT_DETECTORS = ("wen", "anisotropy", "sharpness", "ren-le", "ren-ae", "bright-ending", "nemo", "step-norm",
                     "carlini")
DEFAULT_METHODS = ("none", "embedding", "rta", "rna", "cwr", "gni", "attention", "sail", "nemo")

_NOT_FOUND = "no figure verified here (see the paper)"
PUBLISHED: dict[str, str] = {
    "wen": "AUC 0.960, TPR@1% 0.760 (n=1; Wen et al., ICLR 2024); re-run by Jeon et al.: AUC 0.976 / 0.992, "
           "TPR@1% 0.896 / 0.944 (n=1 / 4)",
    "anisotropy": "AUC 0.994 / 0.999, TPR@1% 0.935 / 0.984 (n=1 / 4; Asthana & Belagiannis, ICLR 2026)",
    "sharpness": "AUC 0.987 / 0.998, TPR@1% 0.908 / 0.982 (n=1 / 4; Jeon et al., ICML 2025)",
    "ren-le": _NOT_FOUND + ": Ren et al., ECCV 2024, arXiv 2403.11052",
    "ren-ae": _NOT_FOUND + ": Ren et al., ECCV 2024, arXiv 2403.11052",
    "bright-ending": _NOT_FOUND + ": Chen et al., ICLR 2025, arXiv 2410.21665",
    "nemo": _NOT_FOUND + ": Hintersdorf et al., NeurIPS 2024, arXiv 2406.02366 (threshold 0.428 on SD v1.4)",
    "step-norm": "AUC > 0.999 (Huang et al., KDD 2026, arXiv 2605.22050, abstract)",
    "carlini": "AUC 0.940, TPR@1% 0.232 (n=16; Carlini et al. 2023 re-run by Jeon et al., ICML 2025)",
    "none": "",
    "embedding": _NOT_FOUND + ": Wen et al., ICLR 2024",
    "rta": _NOT_FOUND + ": Somepalli et al. 2023",
    "rna": _NOT_FOUND + ": Somepalli et al. 2023",
    "cwr": _NOT_FOUND + ": Somepalli et al. 2023",
    "gni": _NOT_FOUND + ": Somepalli et al. 2023",
    "attention": _NOT_FOUND + ": Ren et al., ECCV 2024",
    "sail": _NOT_FOUND + ": Jeon et al., ICML 2025",
    "nemo-method": _NOT_FOUND + ": Hintersdorf et al., NeurIPS 2024",
}
"""Published Stable Diffusion v1.4 figures (the 500 memorized prompts of Webster 2023; METHOD.md section 7), as the
papers state them; TPR conventions differ between papers."""


@dataclass
class CompareSettings(ReproduceSettings):
    """Everything that fixes the two tables: `diffmem reproduce`'s settings (its `steps` unused: each detector
    scores its own steps), the detectors, and the peer mitigations' thresholds (None: calibrated)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    mitigation_prompts: int | None = 64
    detectors: tuple[str, ...] = DEFAULT_DETECTORS
    sail_threshold: float | None = None
    nemo_threshold: float | None = None

    def check(self) -> None:
        """One InputError line for settings no run can use."""
        from diffmem.detectors import DETECTORS
        from diffmem.measures.images import PREPROCESSING
        from diffmem.mitigate import ALL_METHODS

        for what, given, known in (("--detectors", self.detectors, DETECTORS), ("--methods", self.methods,
                                                                                ALL_METHODS)):
            unknown = [name for name in given if name not in known]
            if unknown:
                raise InputError(f"{what}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        if not self.generations or min(self.generations) < 1 or self.mitigation_generations < 1:
            raise InputError("--generations and --mitigation-generations take whole numbers of at least 1")
        if self.num_inference_steps < 2:
            raise InputError("--num-inference-steps must be at least 2 (step-norm measures updates between steps)")
        if self.mitigation_prompts is not None and self.mitigation_prompts < 0:
            raise InputError("--mitigation-prompts must be 0 or more")
        if self.sscd_preprocessing not in PREPROCESSING:
            raise InputError(f"SSCD preprocessing must be one of {', '.join(PREPROCESSING)}")
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out} is a file; give a folder for the report")


@dataclass
class CompareReport(Report):
    """`diffmem reproduce`'s report with the thresholds calibrated for the mitigations."""

    calibration: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- detection


def _detector_factory(name: str, n: int, settings: CompareSettings, guidance: float) -> Callable[[Any], Any]:
    """`pipe -> detector` for `name` at n generations with the run's settings (the authors' defaults otherwise)."""
    from diffmem.detectors import DETECTORS

    cls = DETECTORS[name]
    options: dict[str, Any] = {"generations": n, "seed": settings.seed,
                               "num_inference_steps": settings.num_inference_steps, "batch_size": settings.batch_size}
    if "guidance_scale" in inspect.signature(cls).parameters:
        options["guidance_scale"] = guidance
    return lambda pipe: cls(pipe, **options)


def _steps(name: str, num_inference_steps: int) -> int:
    """The `steps` setting a detector's rows record (bright-ending scores every step, the others one)."""
    return num_inference_steps if name == "bright-ending" else 1


def _step_norm_scores(rows: list[dict[str, Any]], band: Any) -> list[float | None]:
    """Step-norm scores of `rows` against a stable range, recomputed from their stored update norms."""
    import torch

    out: list[float | None] = []
    for row in rows:
        if row["score"] is None:
            out.append(None)
            continue
        out.append(float(band.excursion(torch.tensor(row["magnitudes"], dtype=torch.float64)).mean()))
    return out


def _detection_row(name: str, n: int, mem: list[dict[str, Any]], normal: list[dict[str, Any]],
                   pos: list[float | None], neg: list[float | None]) -> dict[str, Any]:
    from diffmem.measures.detection import evaluate_scores

    ev = evaluate_scores(pos, neg)
    return {"detector": name, "generations": n, "auc": ev.auc, "tpr_at_1fpr": ev.tpr_at_1fpr,
            "tpr_at_3fpr": ev.tpr_at_3fpr, "n_memorized": ev.n_pos, "n_normal": ev.n_neg,
            "seconds_per_prompt": statistics.fmean(r["seconds"] for r in mem + normal)}


def run_detection(settings: CompareSettings, pipe: Callable[[], Any], mem: list[str], normal: list[str],
                  guidance: float, report: CompareReport, log: Log,
                  progress: Progress | None) -> dict[int, list[float]]:
    """Every detector at every n (Wen's first step at n = 1 always, the cost unit); fills `report.detection` and
    returns the first-step Wen scores of the non-memorized prompts per n (for the embedding target)."""
    from diffmem.detectors import MIN_GENERATIONS, StableRange
    from diffmem.registry import model_id
    from diffmem.runs.reproduce import scan

    out = settings.out
    base = {"model": model_id(settings.model), "seed": settings.seed, "guidance_scale": guidance,
            "num_inference_steps": settings.num_inference_steps}
    runs = [("wen", 1)] + [(d, n) for d in settings.detectors for n in settings.generations if (d, n) != ("wen", 1)]
    wen_normal: dict[int, list[float]] = {}
    unit = None
    for name, n in runs:
        if n < MIN_GENERATIONS.get(name, 1):
            report.detection.append({"detector": name, "generations": n, "auc": None, "tpr_at_1fpr": None,
                                     "tpr_at_3fpr": None, "seconds_per_prompt": None, "cost": None,
                                     "note": f"needs at least {MIN_GENERATIONS[name]} generations"})
            continue
        match = {**base, "detector": name, "steps": _steps(name, settings.num_inference_steps), "generations": n}
        make = _detector_factory(name, n, settings, guidance)
        rows, scored = {}, 0
        for kind, prompts in (("memorized", mem), ("normal", normal)):
            found, new = scan(pipe, prompts, out / "detection" / f"{name}_n{n}_{kind}.jsonl", match, "first",
                              settings, progress, make)
            rows[kind], scored = list(found.values()), scored + new
        log(f"detection, {name}, n={n}: scored {scored} prompts, {len(mem) + len(normal) - scored} were already "
            "scored")
        if name == "wen":
            wen_normal[n] = [r["score"] for r in rows["normal"] if r["score"] is not None]
        neg_rows = rows["normal"]
        pos, neg = [r["score"] for r in rows["memorized"]], [r["score"] for r in neg_rows]
        if name == "step-norm":
            band = StableRange.from_rows(rows["normal"][0::2])
            band.save(out / "step_norm_range.json")
            neg_rows = rows["normal"][1::2]
            pos, neg = _step_norm_scores(rows["memorized"], band), _step_norm_scores(neg_rows, band)
        row = _detection_row(name, n, rows["memorized"], neg_rows, pos, neg)
        if (name, n) == ("wen", 1):
            unit = row["seconds_per_prompt"]
            if "wen" not in settings.detectors or 1 not in settings.generations:
                continue
        row["cost"] = None if not unit else row["seconds_per_prompt"] / unit
        report.detection.append(row)
        write_report(report, out)
    return wen_normal


# ---------------------------------------------------------------------------------------------- calibration


def _calibrate(settings: CompareSettings, pipe: Any, normal: list[str], wen_normal: dict[int, list[float]],
               log: Log) -> dict[str, Any]:
    """The model-dependent thresholds of the mitigations, from the non-memorized prompts (cached in
    OUT/calibration.json; a value given in the settings wins)."""
    import torch

    from diffmem.detectors.base import initial_noise
    from diffmem.detectors.magnitude import MagnitudeDetector
    from diffmem.measures.ssim import pairwise_ms_ssim
    from diffmem.mitigate.nemo import NEMO_GENERATIONS, NEMO_SEED, NeuronStatistics, NoiseResiduals
    from diffmem.mitigate.sail import SailLoss
    from diffmem.models.conditioning import empty, encode

    path = settings.out / "calibration.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    n = settings.mitigation_generations
    cal: dict[str, Any] = {}
    methods = set(settings.methods)

    def resolve(key: str, given: float | None, compute: Callable[[], float]) -> None:
        cal[key] = given if given is not None else cached[key] if key in cached else compute()

    def median_first_step() -> float:
        scores = wen_normal.get(n) or [r.score for r in MagnitudeDetector(
            pipe, generations=n, seed=settings.seed, num_inference_steps=settings.num_inference_steps,
            batch_size=settings.batch_size).score(normal) if r.score is not None]
        return statistics.median(scores)

    def median_sail_loss() -> float:
        log(f"calibration: SAIL loss of {len(normal)} non-memorized prompts")
        noise = initial_noise(pipe, n, settings.seed).to(pipe.unet.device, torch.float32)
        losses: list[float] = []
        with torch.no_grad():
            uncond = empty(pipe)
            for prompt in normal:
                loss = SailLoss(pipe, encode(pipe, [prompt]), uncond, num_inference_steps=settings.num_inference_steps)
                losses += loss(noise).tolist()
        return statistics.median(losses)

    def residual_ssim_mean_plus_std() -> float:
        log(f"calibration: pairwise residual MS-SSIM of {len(normal)} non-memorized prompts")
        sims = []
        for prompt in normal:
            pair = pairwise_ms_ssim(NoiseResiduals(pipe, prompt, NEMO_GENERATIONS, NEMO_SEED,
                                                   settings.num_inference_steps)())
            i, j = torch.triu_indices(pair.shape[0], pair.shape[0], 1)
            sims.append(pair[i, j].cpu())
        values = torch.cat(sims)
        return float(values.mean() + values.std())

    if "embedding" in methods:
        resolve("target_loss", settings.target_loss, median_first_step)
    if "sail" in methods:
        resolve("sail_threshold", settings.sail_threshold, median_sail_loss)
    if "nemo" in methods:
        stats_path = settings.out / "nemo_stats.pt"
        if not stats_path.is_file():
            NeuronStatistics.fit(pipe, normal).save(stats_path)
        cal["nemo_stats"] = str(stats_path.resolve())
        resolve("nemo_threshold", settings.nemo_threshold, residual_ssim_mean_plus_std)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**cached, **cal}, indent=2) + "\n")
    return cal


def _method_settings(method: str, settings: CompareSettings, cal: dict[str, Any],
                     defaults: ModelDefaults) -> dict[str, Any]:
    """The `diffmem mitigate` settings of one method's generations (the embedding's target: the calibrated one)."""
    gen: dict[str, Any] = dict(threshold=None, generations=settings.mitigation_generations, seed=settings.seed,
                               num_inference_steps=settings.num_inference_steps,
                               guidance_scale=defaults.resolve_guidance(settings.guidance_scale),
                               target_loss=cal["target_loss"] if method == "embedding" else defaults.target_loss,
                               iters=settings.iters, lr=settings.lr, k=settings.k,
                               sigma=settings.sigma)
    options = {"sail": {"sail_threshold": cal.get("sail_threshold")},
               "nemo": {"nemo_stats": cal.get("nemo_stats"), "nemo_threshold": cal.get("nemo_threshold")},
               "attention": {}}.get(method)
    if options is not None:
        gen["method_options"] = {k: v for k, v in options.items() if v is not None}
    return gen


# -------------------------------------------------------------------------------------------------- report


def markdown(report: CompareReport) -> str:
    """The report as Markdown: settings, one detection table, one mitigation table, calibration and notes."""
    from diffmem.measures.detection import TPR_CONVENTION

    s = report.settings
    ns = [int(n) for n in s["generations"]]
    lines = [f"# diffmem compare: {s['model']}", "",
             f"Memorized prompts: {s['n_memorized']} ({s['memorized']}); non-memorized: {s['n_normal']} "
             f"({s['normal']}). Seed {s['seed']}, {s['num_inference_steps']} sampling steps, guidance "
             f"{s['guidance_scale']:g}.", "", "## Detection", "",
             "| detector | " + " | ".join(f"AUC n={n} | TPR@1%FPR n={n}" for n in ns) + " | "
             + " | ".join(f"cost n={n}" for n in ns) + " | published, SD v1.4 |",
             "|---|" + "---|" * (3 * len(ns) + 1)]
    by_key = {(r["detector"], r["generations"]): r for r in report.detection}
    for name in s["detectors"]:
        cells = [f"{_f(by_key.get((name, n), {}).get('auc'))} | {_f(by_key.get((name, n), {}).get('tpr_at_1fpr'))}"
                 for n in ns]
        costs = [(f"{c:.2f}x" if (c := by_key.get((name, n), {}).get("cost")) is not None else "n/a") for n in ns]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(costs) + f" | {PUBLISHED[name]} |")
    lines += ["", f"TPR@x%FPR: {TPR_CONVENTION}. Cost: seconds per prompt (text encoding, denoiser calls, decoding "
              f"where a detector generates images; batch {s['batch_size']} rows) over Wen et al.'s first step at "
              "n = 1 on the same run. n/a: the detector needs more generations (nemo and carlini compare a prompt's "
              "generations) or was not run.", ""]
    if report.mitigation:
        m = report.measures
        n_mit = s["mitigation_generations"]
        lines += [f"## Mitigation ({n_mit} generations of each of {report.mitigation[0]['prompts']} memorized "
                  "prompts)", "",
                  f"| method | memorization rate (>= {math.ceil(n_mit / 2)} of {n_mit} copy) | any generation copies | "
                  f"mean {m['copy']} | {m['align']} | s / prompt | published, SD v1.4 |",
                  "|---|---|---|---|---|---|---|"]
        for r in report.mitigation:
            published = PUBLISHED["nemo-method" if r["method"] == "nemo" else r["method"]]
            lines.append(f"| {r['method']} | {_f(r['memorization_rate'], pct=True)} | "
                         f"{_f(r['any_copy_rate'], pct=True)} | {_f(r['mean_similarity'])} | {_f(r['alignment'])} | "
                         f"{_f(r['seconds_per_prompt'], 2)} | {published} |")
        lines += ["", f"A generation is a copy when its {m['copy']} is {m['rule']}."]
        lines += membench_markdown(report.mitigation)
    if report.calibration:
        lines += ["", "Calibrated on the non-memorized prompts: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.calibration.items()) + "."]
    lines += [""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: CompareReport, out: Path) -> None:
    """OUT/report.json and OUT/report.md, rewritten whole."""
    from diffmem.runs.reproduce import write_report as write

    write(report, out, markdown)


# ----------------------------------------------------------------------------------------------------- run


def compare(settings: CompareSettings, log: Log = print, progress: Progress | None = None) -> CompareReport:
    """Run (or resume) every scan, calibration and generation, then measure and write the report; returns it."""
    import torch

    from diffmem.models.loading import load_pipeline, parse_device
    from diffmem.runs.reproduce import _measures, _read, run_mitigations

    settings.check()
    out = settings.out
    mem, normal = _read(settings.memorized, "memorized"), _read(settings.normal, "non-memorized")
    if len(normal) < 4 and "step-norm" in settings.detectors:
        raise InputError("step-norm needs at least 4 non-memorized prompts (half fit its range, half test it)")
    limit = len(mem) if settings.mitigation_prompts is None else min(settings.mitigation_prompts, len(mem))
    mitigation_prompts = mem[:limit]
    device = parse_device(settings.device)
    defaults = ModelDefaults.for_model(settings.model)
    guidance = defaults.resolve_guidance(settings.guidance_scale)
    measures, notes = _measures(settings, mitigation_prompts, device)  # type: ignore[arg-type]

    @functools.cache
    def pipe() -> Any:
        log(f"loading {settings.model} ...")
        dtype = getattr(torch, settings.dtype) if settings.dtype else None
        if settings.testbed and dtype is None:
            dtype = torch.float32
        loaded = load_pipeline(settings.model, device=device, dtype=dtype, allow_pickle=settings.allow_pickle)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    plain = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    report = CompareReport(settings={**plain, "guidance_scale": guidance, "n_memorized": len(mem),
                                     "n_normal": len(normal)},
                           measures={"copy": measures.copy_name, "align": measures.align_name,
                                     "rule": f"{'at or ' if settings.testbed else ''}above {measures.threshold:g}"},
                           notes=notes)
    if "step-norm" in settings.detectors:
        report.notes.append("step-norm: stable range fit on the even-indexed non-memorized prompts "
                            "(step_norm_range.json), evaluated on the odd-indexed ones")
    wen_normal = run_detection(settings, pipe, mem, normal, guidance, report, log, progress)
    write_report(report, out)
    if limit == 0 or not settings.methods:
        return report
    report.calibration = _calibrate(settings, pipe(), normal, wen_normal, log)
    calibration = report.calibration
    run_mitigations(out, mitigation_prompts, settings,
                    lambda method: _method_settings(method, settings, calibration, defaults),
                    settings.mitigation_generations, measures, report, lambda: write_report(report, out), log, pipe)
    return report
