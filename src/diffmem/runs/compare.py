"""`diffmem compare`: every detector and every mitigation on one model, one table each, in one resumable run.

Detection: each detector of `diffmem.detectors.DETECTORS` at each number of generations n scores the memorized and
the non-memorized prompts into OUT/detection/<detector>_n<n>_<memorized|normal>.jsonl (`diffmem detect` rows plus
`seconds`, each prompt's share of its batch's wall time), then AUC and TPR at 1% FPR, and the time per prompt
over that of Wen et al.'s first step at n = 1 (the cost column). Detectors that compare a prompt's generations with
each other (nemo, carlini) have no n = 1 row; a detector that cannot run on the model (`UnsupportedModelError`: it
reads UNet cross-attention maps a transformer lacks, a flow model's first step where its settings need another)
has an n/a row with the reason, listed under the table. The step-norm score needs a stable range of ordinary
updates: it is fit on the even-indexed non-memorized prompts (saved as OUT/step_norm_range.json, for `diffmem
detect --stable-range`) and the step-norm row is evaluated on the odd-indexed ones only.
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
import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffmem.errors import InputError, UnsupportedModelError
from diffmem.io.durable import write_atomic
from diffmem.io.files import read_json_object
from diffmem.models.defaults import ModelDefaults
from diffmem.runs.reproduce import Log, Progress, Report, ReproduceSettings, _f, membench_markdown


def __getattr__(name: str) -> Any:
    """Views of the registries, for callers of the former constants: `DEFAULT_DETECTORS` (every registered
    detector), `DEFAULT_METHODS` (every mitigation, plain sampling first) and `PUBLISHED` (each detector's published
    SD v1.4 figures, `Detector.published`)."""
    from diffmem.detectors import DETECTORS
    from diffmem.mitigate.base import table_methods

    if name == "DEFAULT_DETECTORS":
        return tuple(DETECTORS)
    if name == "DEFAULT_METHODS":
        return table_methods()
    if name == "PUBLISHED":
        return {key: cls.published for key, cls in DETECTORS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class CompareSettings(ReproduceSettings):
    """Everything that fixes the two tables: `diffmem reproduce`'s settings (its `steps` unused: each detector
    scores its own steps), the detectors, and the peer mitigations' thresholds (None: calibrated)."""

    mitigation_prompts: int | None = 64
    detectors: tuple[str, ...] | None = None
    """Detectors (None: every registered one)."""
    sail_threshold: float | None = None
    nemo_threshold: float | None = None

    def __post_init__(self) -> None:
        from diffmem.detectors import DETECTORS
        from diffmem.mitigate.base import table_methods

        if self.methods is None:
            self.methods = table_methods()
        if self.detectors is None:
            self.detectors = tuple(DETECTORS)

    def check(self) -> None:
        """One InputError line for settings no run can use."""
        from diffmem.detectors import DETECTORS
        from diffmem.measures.images import PREPROCESSING
        from diffmem.mitigate import MITIGATIONS
        from diffmem.mitigate.base import GenerationConfig

        for what, given, known in (("--detectors", self.detectors, DETECTORS), ("--methods", self.methods,
                                                                                MITIGATIONS)):
            unknown = [name for name in given or () if name not in known]
            if unknown:
                raise InputError(f"{what}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        if not self.generations or min(self.generations) < 1 or self.mitigation_generations < 1:
            raise InputError("--generations and --mitigation-generations take whole numbers of at least 1")
        for name in self.detectors or ():  # each detector's settings, checked by its own config
            for n in self.generations:
                if n >= DETECTORS[name].min_generations:
                    detector_config(name, n, self, self.guidance_scale)
        GenerationConfig(generations=self.mitigation_generations, seed=self.seed,
                         num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale)
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


def detector_config(name: str, n: int, settings: CompareSettings, guidance: float | None) -> Any:
    """The config of detector `name` at n generations with the run's settings (its own defaults otherwise; each
    detector takes the settings it declares)."""
    from diffmem.detectors import DETECTORS

    return DETECTORS[name].Config.from_values({"generations": n, "seed": settings.seed,
                                                "batch_size": settings.batch_size, "guidance_scale": guidance,
                                                "num_inference_steps": settings.num_inference_steps})


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
    from diffmem.detectors import DETECTORS, MagnitudeDetector
    from diffmem.registry import model_id
    from diffmem.runs.reproduce import scan

    out = settings.out
    base = {"model": model_id(settings.model), "seed": settings.seed, "guidance_scale": guidance,
            "num_inference_steps": settings.num_inference_steps}
    wen = MagnitudeDetector.name  # its first step at n = 1 is the cost unit
    detectors = settings.detectors or ()
    runs = [(wen, 1)] + [(d, n) for d in detectors for n in settings.generations if (d, n) != (wen, 1)]
    wen_normal: dict[int, list[float]] = {}
    unit = None
    for name, n in runs:
        cls = DETECTORS[name]
        if n < cls.min_generations:
            report.detection.append({"detector": name, "generations": n, "auc": None, "tpr_at_1fpr": None,
                                     "tpr_at_3fpr": None, "seconds_per_prompt": None, "cost": None,
                                     "note": f"needs at least {cls.min_generations} generations"})
            continue
        config = detector_config(name, n, settings, settings.guidance_scale)  # resolved for the model it loads
        match = {**base, "detector": name, "steps": config.n_steps, "generations": n}
        rows, scored = {}, 0
        try:
            for kind, prompts in (("memorized", mem), ("normal", normal)):
                found, new = scan(pipe, prompts, out / "detection" / f"{name}_n{n}_{kind}.jsonl", match, "first",
                                  settings, progress, functools.partial(cls, config=config))
                rows[kind], scored = list(found.values()), scored + new
        except UnsupportedModelError as exc:  # refused when built, before scoring anything
            log(f"detection, {name}, n={n}: n/a, {exc}")
            report.detection.append({"detector": name, "generations": n, "auc": None, "tpr_at_1fpr": None,
                                     "tpr_at_3fpr": None, "seconds_per_prompt": None, "cost": None,
                                     "note": f"n/a on this model: {exc}", "unsupported": str(exc)})
            write_report(report, out)
            continue
        log(f"detection, {name}, n={n}: scored {scored} prompts, {len(mem) + len(normal) - scored} were already "
            "scored")
        if name == wen:
            wen_normal[n] = [r["score"] for r in rows["normal"] if r["score"] is not None]
        pos, neg, neg_rows = cls.split_scores(rows["memorized"], rows["normal"], out)
        row = _detection_row(name, n, rows["memorized"], neg_rows, pos, neg)
        if (name, n) == (wen, 1):
            unit = row["seconds_per_prompt"]
            if wen not in detectors or 1 not in settings.generations:
                continue
        row["cost"] = None if not unit else row["seconds_per_prompt"] / unit
        report.detection.append(row)
        write_report(report, out)
    return wen_normal


# ---------------------------------------------------------------------------------------------- calibration


def _calibrate(settings: CompareSettings, pipe: Any, normal: list[str], wen_normal: dict[int, list[float]],
               log: Log) -> dict[str, Any]:
    """The model-dependent options of the mitigations, each calibrated by its method on the non-memorized prompts
    (`Mitigation.calibrate`; cached in OUT/calibration.json, and a value given in the settings wins)."""
    from diffmem.config import SamplingConfig
    from diffmem.mitigate import MITIGATIONS
    from diffmem.mitigate.base import Calibrating

    path = settings.out / "calibration.json"
    cached = read_json_object(path, "calibration cache", missing={})  # damaged: one line naming it
    generation = SamplingConfig(generations=settings.mitigation_generations, seed=settings.seed,
                                num_inference_steps=settings.num_inference_steps)
    cal: dict[str, Any] = {}
    for method in settings.methods or ():
        cls = MITIGATIONS[method]
        given = {key: getattr(settings, key, None) for key in cls.calibrated}
        known = {key: value if value is not None else cached.get(key) for key, value in given.items()}
        known = {key: value for key, value in known.items() if value is not None}
        found = {} if set(known) == set(cls.calibrated) else cls.calibrate(Calibrating(
            pipe, normal, generation, settings.batch_size, wen_normal, settings.out, known, log))
        cal.update({**found, **known})
    write_atomic(path, json.dumps({**cached, **cal}, indent=2) + "\n")
    return cal


def _method_settings(method: str, settings: CompareSettings, cal: dict[str, Any],
                     defaults: ModelDefaults) -> dict[str, Any]:
    """The `diffmem mitigate` settings of one method's generations, with the options calibrated for it."""
    from diffmem.mitigate import MITIGATIONS
    from diffmem.mitigate.base import KEYWORDS

    cls = MITIGATIONS[method]
    calibrated = {key: cal[key] for key in cls.calibrated if cal.get(key) is not None}
    gen: dict[str, Any] = dict(threshold=None, generations=settings.mitigation_generations, seed=settings.seed,
                               num_inference_steps=settings.num_inference_steps,
                               guidance_scale=defaults.resolve_guidance(settings.guidance_scale),
                               target_loss=defaults.target_loss, iters=settings.iters, lr=settings.lr, k=settings.k,
                               sigma=settings.sigma)
    gen.update({key: value for key, value in calibrated.items() if key in KEYWORDS})
    if cls.Config.names() - set(KEYWORDS):
        gen["method_options"] = {key: value for key, value in calibrated.items() if key not in KEYWORDS}
    return gen


# -------------------------------------------------------------------------------------------------- report


def markdown(report: CompareReport) -> str:
    """The report as Markdown: settings, one detection table, one mitigation table, calibration and notes."""
    from diffmem.detectors import DETECTORS
    from diffmem.measures.detection import TPR_CONVENTION
    from diffmem.mitigate import MITIGATIONS

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
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(costs) + f" | "
                     f"{DETECTORS[name].published} |")
    lines += ["", f"TPR@x%FPR: {TPR_CONVENTION}. Cost: seconds per prompt (text encoding, denoiser calls, decoding "
              f"where a detector generates images; batch {s['batch_size']} rows) over Wen et al.'s first step at "
              "n = 1 on the same run. n/a: the detector needs more generations (nemo and carlini compare a prompt's "
              "generations), cannot run on this model (below) or was not run.", ""]
    refused: dict[str, str] = {}
    for r in report.detection:
        if r.get("unsupported"):
            refused.setdefault(r["detector"], r["unsupported"])
    if refused:
        lines += [f"- {name}: n/a on this model: {why}" for name, why in refused.items()] + [""]
    if report.mitigation:
        m = report.measures
        n_mit = s["mitigation_generations"]
        lines += [f"## Mitigation ({n_mit} generations of each of {report.mitigation[0]['prompts']} memorized "
                  "prompts)", "",
                  f"| method | memorization rate (>= {math.ceil(n_mit / 2)} of {n_mit} copy) | any generation copies | "
                  f"mean {m['copy']} | {m['align']} | s / prompt | published, SD v1.4 |",
                  "|---|---|---|---|---|---|---|"]
        for r in report.mitigation:
            published = MITIGATIONS[r["method"]].published
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
    from diffmem.detectors import DETECTORS

    chosen = [DETECTORS[name] for name in settings.detectors or ()]
    for cls in chosen:
        if len(normal) < cls.min_references:
            raise InputError(f"{cls.name} needs at least {cls.min_references} non-memorized prompts ({cls.note})")
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
    report.notes += [f"{cls.name}: {cls.note}" for cls in chosen if cls.note]
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
