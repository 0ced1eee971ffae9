"""Measure inference-time mitigation on the testbed: the mitigation frontier (memorization rate, alignment and cost
of every method as its strength moves).

Every method generates the memorized prompts and held-out prompts from the same initial noises as the unmitigated
run (DDIM, 4 seeds); a memorized prompt counts as memorized when at least 2 of its generations copy its training
image (the quality report's criterion), a held-out prompt as copying when a generation copies a memorized (planted
or anchor) image. Each method's strength moves over `SWEEPS` (multiples of its default). Cost is seconds per prompt
over a plain (`none`) generation of the same set in the same run. Each measurement is written to OUT/parts/ as it
finishes, most informative first (`plan`), so a rerun with the same settings resumes; the table and figure are
rewritten from whatever parts exist (`write_frontier`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.errors import InputError
from diffmem.io.durable import replace_file, save_figure, write_atomic
from diffmem.io.files import read_json_object, read_user_json
from diffmem.mitigate import generate
from diffmem.mitigate.base import KEYWORDS, MITIGATIONS, Calibrating, default_mitigation, table_methods
from diffmem.models.families import family
from diffmem.testbed.figures import copy_grid
from diffmem.testbed.quality import alignment, best_copy
from diffmem.testbed.scenes import Item, paraphrases, render_many
from diffmem.testbed.similarity import COPY_THRESHOLD, own_similarity


def _images(result_images: list[Any]) -> np.ndarray:
    """The pipeline's per-prompt (G, H, W, 3) arrays as one (N, G, 3, H, W) array."""
    return np.stack([np.moveaxis(np.asarray(img), -1, 1) for img in result_images])


def _generate(pipe, items: Sequence[Item], method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Generate `items` with one method: the images, their alignment, time per prompt (wall and this process's
    CPU, which other jobs on a shared machine leave alone), final losses, targets."""
    cpu = time.process_time()
    res = generate(pipe, [i.caption for i in items], method, **settings)
    cpu = (time.process_time() - cpu) / max(len(items), 1)
    imgs = _images(res.images)
    ok = alignment(imgs, list(items))
    losses = [d.final_loss for d in res.decisions if d.final_loss is not None]
    reached = [bool(d.reached) for d in res.decisions if d.reached is not None]
    return {"method": method, "n": len(items), "aligned": None if ok is None else float(ok.mean()),
            "seconds_per_prompt": float(np.mean([d.seconds for d in res.decisions])), "cpu_seconds_per_prompt": cpu,
            "mean_final_loss": float(np.mean(losses)) if losses else None,
            "target_reached": float(np.mean(reached)) if reached else None, "_images": imgs}


def measure(pipe, items: Sequence[Item], method: str, own: np.ndarray, **settings: Any) -> dict[str, Any]:
    """Generate memorized `items` with one method; memorization rate, alignment, time per prompt, and the images."""
    row = _generate(pipe, items, method, settings)
    sims = own_similarity(row["_images"], own)
    copies = (sims >= COPY_THRESHOLD).sum(axis=1)
    return {**row, "memorization_rate": float((copies >= 2).mean()), "memorized_any_seed": float((copies >= 1).mean()),
            "mean_copy_similarity": float(sims.mean()), "_sims": sims}


def measure_heldout(pipe, items: Sequence[Item], method: str, memorized_images: np.ndarray,
                    **settings: Any) -> dict[str, Any]:
    """Generate held-out `items` with one method; alignment, the share copying a memorized image, time per prompt."""
    row = _generate(pipe, items, method, settings)
    best = best_copy(row["_images"], memorized_images)
    return {**row, "copies_memorized": float((best >= COPY_THRESHOLD).any(axis=1).mean())}


class Parts:
    """Finished measurements of one evaluation in `out/parts/`: a rerun with the same settings reuses them (rows
    as JSON, images where the picture needs them as .npy), a rerun with other settings is refused."""

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        self.dir = Path(out) / "parts"
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = self.dir / "settings.json"
        if read_user_json(stamp, "resume stamp", missing=None) not in (None, settings):
            raise InputError(f"{out} holds a mitigation evaluation with other settings: use the same options to "
                             "resume it, or another --out")
        write_atomic(stamp, json.dumps(settings, indent=2, sort_keys=True))

    def stored(self, key: str) -> dict[str, Any] | None:
        """The stored row `key` (without images), or None when it has not finished."""
        path = self.dir / f"{key}.json"
        return read_json_object(path, "stored evaluation row") if path.is_file() else None

    def row(self, key: str, measure: Callable[[], dict[str, Any]], images: bool = False) -> dict[str, Any]:
        """The stored row `key`, else `measure()` stored (with its `_images` and `_sims` when `images`)."""
        path = self.dir / f"{key}.json"
        if path.is_file() and (not images or (self.dir / f"{key}_images.npy").is_file()):
            row = read_json_object(path, "stored evaluation row")
            if images:
                row |= {"_images": np.load(self.dir / f"{key}_images.npy"),
                        "_sims": np.load(self.dir / f"{key}_sims.npy")}
            return row
        row = measure()
        if images:
            for part in ("images", "sims"):
                replace_file(self.dir / f"{key}_{part}.npy", partial(_save_npy, array=row[f"_{part}"]))
        write_atomic(path, json.dumps({k: v for k, v in row.items() if not k.startswith("_")}))
        return row


@dataclass(frozen=True)
class Sweep:
    """How one method's strength moves: the option of its `Config` that sets it, and the values swept as multiples
    of the value it resolves to by default (its published or calibrated one: the factor 1)."""

    option: str
    factors: tuple[float, ...]


SWEEPS: dict[str, Sweep] = {
    "embedding": Sweep("target_loss", (0.8, 0.9, 1.0, 1.1)),  # the model's target loss (its held-out median)
    "rta": Sweep("k", (0.25, 0.5, 1.0, 2.0)),  # words inserted: 1, 2, 4, 8
    "rna": Sweep("k", (0.25, 0.5, 1.0, 2.0)),
    "cwr": Sweep("k", (0.25, 0.5, 1.0, 2.0)),
    "gni": Sweep("sigma", (1.0, 3.0, 10.0, 30.0)),  # embedding noise: 0.1, 0.3, 1, 3
    "attention": Sweep("c1", (0.84, 0.92, 1.0, 1.2)),  # Ren et al.'s 1.25: 1.05, 1.15, 1.25, 1.5 (1: no change)
    "sail": Sweep("sail_threshold", (0.8, 0.9, 1.0)),  # lower accepts fewer noises: stronger
    "nemo": Sweep("nemo_threshold", (0.7, 0.8, 0.9, 1.0)),  # lower takes more prompts as memorized: stronger
    "delayed-guidance": Sweep("early_guidance", (1.0, 0.0, -2.0)),  # conditional alone, unconditional, opposite
    "initial-noise": Sweep("apply_cfg_step", (1.0, 2.0, 3.0)),  # unguided steps 0-4, 0-8, 0-12
    "prss": Sweep("search_target", (0.5, 1.0, 2.0)),  # 1/6, 1/3, 2/3 of the target loss
    "embedding-delayed": Sweep("target_slack", (0.8, 0.9, 1.0, 1.1)),  # stop at 1.2, 1.35, 1.5, 1.65x the target
}
"""Each mitigation's strength sweep for the frontier (plain sampling has none); the one table of them."""


def strength_option(method: str) -> str:
    """The option that sets `method`'s strength; one error line for a method with none."""
    if method not in SWEEPS:
        able = ", ".join(f"{m} ({MITIGATIONS[m].Config.rule(w.option).option})" for m, w in SWEEPS.items())
        raise InputError(f"{method} has no strength to sweep; the methods that have one: {able}")
    return SWEEPS[method].option


def check_strength(method: str, value: Any) -> float:
    """`value` checked by the rule of `method`'s own strength option (one error line naming it), as a number."""
    checked = MITIGATIONS[method].Config.check_value(strength_option(method), value)
    if checked is None:
        raise InputError(f"{method}: a strength is a number")
    return float(checked)


def parse_strengths(texts: Iterable[str]) -> dict[str, tuple[float, ...]]:
    """`--strength METHOD=V[,V...]` (repeatable): each method's values, checked by its own `Config` before any model
    loads (one error line for a value out of range, an unknown method or one without a strength)."""
    out: dict[str, tuple[float, ...]] = {}
    for text in texts:
        method, sep, values = text.partition("=")
        method = method.strip()
        if not sep or not values.strip():
            raise InputError(f"--strength must be METHOD=VALUE[,VALUE...], not {text!r}")
        MITIGATIONS.lookup(method, "--strength")
        try:
            numbers = [float(v) for v in values.split(",") if v.strip()]
        except ValueError as exc:
            raise InputError(f"--strength {method}= must be comma-separated numbers, not {values!r}") from exc
        out[method] = tuple(dict.fromkeys(check_strength(method, v) for v in numbers))
    return out


def write_paraphrases(items: Sequence[Item], out: Path) -> Path:
    """OUT/paraphrases.json: each caption's paraphrases from the testbed's grammar (PRSS's `--paraphrases`)."""
    path = Path(out) / "paraphrases.json"
    write_atomic(path, json.dumps({i.caption: paraphrases(i.scene) for i in items}, indent=2))
    return path


def parse_methods(text: str) -> tuple[str, ...] | None:
    """`--methods`: comma-separated registered names, `all` (every method the testbed can run: it supplies PRSS's
    paraphrases), or empty (None: Wen et al.'s table)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        return None
    if names == ["all"]:
        return (*table_methods(), *(n for n, cls in MITIGATIONS.items() if cls.needs and not cls.plain))
    for name in names:
        MITIGATIONS.lookup(name, "--methods")
    return tuple(dict.fromkeys(names))


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A measurement without its images."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


SETS = ("memorized", "heldout")


@dataclass(frozen=True)
class Point:
    """One measurement of the frontier: a method at one strength (None: plain sampling) on one prompt set."""

    set: str
    method: str
    strength: float | None = None
    default: bool = True

    @property
    def key(self) -> str:
        """Its part's name in OUT/parts/."""
        if self.strength is None:
            return f"{self.set}-{self.method}"
        return f"{self.set}-{self.method}-{SWEEPS[self.method].option}-{self.strength:.6g}"


def plan(defaults: Mapping[str, float | None], values: Mapping[str, Sequence[float]],
         sets: Sequence[str] = SETS) -> list[Point]:
    """The frontier's parts, most informative first: every method at its default strength (`defaults`, in order;
    None: no strength) on the memorized set, then on the held-out set, then each other strength of `values` on
    both sets, point by point."""
    points = [Point(s, m, d) for s in sets for m, d in defaults.items()]
    for method, swept in values.items():
        for value in swept:
            if value != defaults.get(method):
                points += [Point(s, method, value, default=False) for s in sets]
    return points


def calibrate(pipe, method: str, normal: Sequence[str], out: Path, generations: int, seed: int, steps: int,
              log: Callable[[str], None]) -> dict[str, Any]:
    """`method`'s model-dependent options (SAIL's threshold, NeMo's statistics and threshold) calibrated by the
    method on `normal` prompts (held-out prompts outside the evaluated ones); the target loss stays the model's."""
    from diffmem.config import SamplingConfig

    generation = SamplingConfig(generations=generations, seed=seed, num_inference_steps=steps)
    found = MITIGATIONS[method].calibrate(Calibrating(pipe, list(normal), generation, 256, {}, out, {}, log))
    return {k: v for k, v in found.items() if k != "target_loss"}


def _calibrated(method: str) -> bool:
    """Whether `method` has options to calibrate besides the target loss (which the run gives)."""
    return bool(set(MITIGATIONS[method].calibrated) - {"target_loss"})


def method_settings(method: str, known: Mapping[str, Any], strength: float | None) -> dict[str, Any]:
    """`generate`'s settings for `method` at `strength` (None: its default): its keyword options and its
    `method_options` from `known` (the run's target loss, calibrated options, the paraphrase file)."""
    cls = MITIGATIONS[method]
    values = {k: v for k, v in known.items() if k in cls.Config.names()}
    if strength is not None:
        values[SWEEPS[method].option] = strength
    settings = {k: v for k, v in values.items() if k in KEYWORDS}
    options = {k: v for k, v in values.items() if k not in KEYWORDS}
    return settings | ({"method_options": options} if options else {})


def default_strength(method: str, known: Mapping[str, Any], pipe) -> float | None:
    """The strength `method` runs at by default (its `Config` resolved for the model, with `known` values); None
    for a method without one, or whose default the method resolves itself (SAIL uncalibrated)."""
    from diffmem.models.defaults import ModelDefaults

    if method not in SWEEPS:
        return None
    config = MITIGATIONS[method].Config.from_values(known).resolved(ModelDefaults.of(pipe))
    value = getattr(config, SWEEPS[method].option)
    return None if value is None else float(value)


def frontier_report(pipe, memorized: Sequence[Item], heldout: Sequence[Item], out: Path, target_loss: float,
                    methods: Sequence[str] | None = None, strengths: Mapping[str, Sequence[float]] | None = None,
                    sweep: bool = True, calibration_prompts: Sequence[Item] = (), generations: int = 4, seed: int = 0,
                    steps: int = 50, iters: int = 10, lr: float = 0.05,
                    progress: Callable[[str], None] | None = None, parts: Parts | None = None) -> dict[str, Any]:
    """Every method (default: Wen et al.'s table) at its default strength and, with `sweep`, at each of its `SWEEPS`
    values (`strengths`: given values instead, per method) on the memorized and held-out prompts, in `plan` order;
    each part goes to `parts` as it finishes and OUT/frontier.md, .png and .json are rewritten from them."""
    say = progress or (lambda msg: None)
    methods = table_methods(paper=True) if methods is None else methods
    common = dict(generations=generations, seed=seed, num_inference_steps=steps, iters=iters, lr=lr)
    parts = parts or Parts(out, {"prompts": [i.caption for i in memorized], "heldout": len(heldout),
                                 "target_loss": target_loss, **common})
    known: dict[str, Any] = {"target_loss": target_loss}
    for method in [m for m in methods if _calibrated(m)] if calibration_prompts else []:
        say(f"calibration of {method} on {len(calibration_prompts)} other held-out prompts")
        known |= _public(parts.row(f"calibration-{method}", partial(
            calibrate, pipe, method, [i.caption for i in calibration_prompts], out, generations, seed, steps, say)))
    if "prss" in methods:
        known["paraphrases"] = str(write_paraphrases([*memorized, *heldout], out))
    defaults = {m: default_strength(m, known, pipe) for m in methods}
    values = {m: swept_values(m, d, (strengths or {}).get(m), sweep) for m, d in defaults.items()}
    points = plan(defaults, values, SETS if heldout else SETS[:1])
    own = render_many([i.scene for i in memorized], [i.seed for i in memorized])
    leaked = _memorized_images() if heldout else np.zeros(0)
    images, frontier = {}, {}
    for point in points:
        say(f"{point.set}: {point.method}" + ("" if point.strength is None else f" {point.strength:g}"))
        settings = {**common, **method_settings(point.method, known, point.strength)}
        if point.set == "memorized":
            keep = point.default and point.method in ("none", "embedding")  # the picture's
            row = parts.row(point.key, partial(measure, pipe, memorized, point.method, own, **settings), images=keep)
            if keep:
                images[point.method] = (row["_images"], row["_sims"])
        else:
            parts.row(point.key, partial(measure_heldout, pipe, heldout, point.method, leaked, **settings))
        frontier = write_frontier(out, points, parts)
    if "none" in images and "embedding" in images:
        _picture(memorized, own, images["none"], images["embedding"], out / "mitigation.png")
    from diffmem.models.defaults import ModelDefaults

    return {"n_prompts": len(memorized), "n_heldout": len(heldout), "target_loss": target_loss,
            "settings": {**common, "guidance": ModelDefaults.of(pipe).guidance_scale},
            "calibration": {k: v for k, v in known.items() if k not in ("target_loss", "paraphrases")},
            **frontier}


def swept_values(method: str, default: float | None, given: Sequence[float] | None, sweep: bool) -> tuple[float, ...]:
    """`method`'s strengths: those `given`, else with `sweep` its `SWEEPS` multiples of `default` (the factor 1 is
    the default itself), each checked by its `Config`; none for a method without a default strength."""
    if given is not None:
        return tuple(given)
    if not sweep or default is None:
        return ()
    return tuple(default if f == 1 else check_strength(method, _rounded(f * default)) for f in SWEEPS[method].factors)


def _rounded(value: float) -> float:
    """A swept value to 4 significant digits (stable part names across runs)."""
    return float(f"{value:.4g}")


def _memorized_images() -> np.ndarray:
    """The testbed's repeated training images (planted and anchors): what a held-out generation may leak."""
    from diffmem.testbed.recipe import shipped_recipe

    splits = shipped_recipe().splits()
    repeated = splits.planted + splits.anchors
    return render_many([i.scene for i in repeated], [i.seed for i in repeated])


def frontier_rows(points: Sequence[Point], parts: Parts) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per method and strength from the finished parts (memorized and held-out measures side by side, cost
    as a ratio to plain sampling of the same set), and the keys of the parts not finished yet."""
    stored = {p.key: parts.stored(p.key) for p in points}
    missing = [key for key, row in stored.items() if row is None]
    rows: dict[tuple[str, float | None], dict[str, Any]] = {}
    for p in points:
        row = rows.setdefault((p.method, p.strength), {
            "method": p.method, "option": SWEEPS[p.method].option if p.method in SWEEPS else None,
            "strength": p.strength, "default": p.default})
        got = stored[p.key]
        if got is None:
            continue
        ratio = _cost(got, stored.get(Point(p.set, "none").key))
        if p.set == "memorized":
            row |= {k: got.get(k) for k in ("memorization_rate", "memorized_any_seed", "mean_copy_similarity",
                                            "aligned", "seconds_per_prompt", "cpu_seconds_per_prompt",
                                            "mean_final_loss", "target_reached")}
            row["cost"] = ratio
        else:
            row |= {"heldout_aligned": got.get("aligned"), "heldout_copies_memorized": got.get("copies_memorized"),
                    "heldout_seconds_per_prompt": got["seconds_per_prompt"],
                    "heldout_cpu_seconds_per_prompt": got.get("cpu_seconds_per_prompt"), "heldout_cost": ratio}
    order = {method: n for n, method in enumerate(dict.fromkeys(p.method for p in points))}
    return sorted(rows.values(), key=lambda r: (order[r["method"]], _strength_order(r))), missing


def _cost(row: Mapping[str, Any], plain: Mapping[str, Any] | None) -> float | None:
    """A part's cost over plain sampling of the same set: the ratio of CPU seconds per prompt (wall seconds for
    parts that lack them), None without a plain part."""
    unit = "cpu_seconds_per_prompt" if plain and plain.get("cpu_seconds_per_prompt") and row.get(
        "cpu_seconds_per_prompt") else "seconds_per_prompt"
    return row[unit] / plain[unit] if plain and plain.get(unit) else None


def _strength_order(row: Mapping[str, Any]) -> float:
    """A row's place in its method's curve: by strength value (plain sampling has none)."""
    return math.inf if row["strength"] is None else row["strength"]


MEMORIZATION_TARGET, ALIGNMENT_POINTS, COST_TARGET = 0.10, 0.05, 2.0
"""Issue #32's target: memorization rate <= 10 %, alignment within 5 points of plain held-out generations, at most
2x the cost of a plain generation."""


def meets_target(row: Mapping[str, Any], reference: float | None) -> bool | None:
    """Whether a frontier row meets the target (on the memorized set's alignment), None until it is measured."""
    values = (row.get("memorization_rate"), row.get("aligned"), row.get("cost"), reference)
    if reference is None or any(v is None for v in values):
        return None
    return bool(row["memorization_rate"] <= MEMORIZATION_TARGET and row["aligned"] >= reference - ALIGNMENT_POINTS
                and row["cost"] <= COST_TARGET)


def write_frontier(out: Path, points: Sequence[Point], parts: Parts) -> dict[str, Any]:
    """OUT/frontier.md (the table, the parts still missing), frontier.png and frontier.json from the finished parts;
    returns what frontier.json holds."""
    rows, missing = frontier_rows(points, parts)
    plain = next((r for r in rows if r["method"] == "none"), {})
    reference = plain.get("heldout_aligned")
    for row in rows:
        row["meets_target"] = meets_target(row, reference)
    result = {"reference_heldout_aligned": reference, "frontier": rows, "missing_parts": missing,
              "parts": len(points)}
    write_atomic(Path(out) / "frontier.json", json.dumps(result, indent=2))
    write_atomic(Path(out) / "frontier.md", frontier_markdown(rows, missing, reference, len(points)))
    _plot_frontier(rows, reference, Path(out) / "frontier.png")
    return result


def frontier_markdown(rows: Sequence[Mapping[str, Any]], missing: Sequence[str], reference: float | None,
                      n_parts: int) -> str:
    """The frontier table in Markdown, then the parts not finished yet."""
    def pct(v: Any) -> str:
        return "" if v is None else f"{100 * v:.1f} %"

    def ratio(v: Any) -> str:
        return "" if v is None else f"{v:.2f}x"

    lines = [f"Plain held-out generations aligned: {pct(reference) or 'not measured yet'}. Target: memorization "
             f"<= {MEMORIZATION_TARGET:.0%}, aligned within {100 * ALIGNMENT_POINTS:.0f} points of that, cost <= "
             f"{COST_TARGET:g}x plain.", "",
             "| method | strength | memorization rate | copied in any seed | aligned (memorized) | aligned (held-out) "
             "| held-out copying a memorized image | cost, memorized / held-out | meets target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        strength = "" if r["strength"] is None else f"{r['option']} {r['strength']:.4g}" + (
            " (default)" if r["default"] else "")
        cost = " / ".join(ratio(r.get(k)) for k in ("cost", "heldout_cost")).strip(" /")
        lines.append(f"| {r['method']} | {strength} | {pct(r.get('memorization_rate'))} | "
                     f"{pct(r.get('memorized_any_seed'))} | {pct(r.get('aligned'))} | {pct(r.get('heldout_aligned'))} "
                     f"| {pct(r.get('heldout_copies_memorized'))} | {cost} | "
                     f"{ {True: 'yes', False: 'no', None: ''}[r.get('meets_target')] } |")
    lines += ["", f"Finished parts: {n_parts - len(missing)} of {n_parts}."]
    if missing:
        lines.append("Missing parts: " + ", ".join(missing) + ".")
    return "\n".join(lines) + "\n"


def _plot_frontier(rows: Sequence[Mapping[str, Any]], reference: float | None, path: Path) -> None:
    """Memorization rate against alignment (memorized prompts; held-out prompts), each method's curve as its
    strength moves (labels: the strength), plain held-out alignment as a line and the target as a box."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    colors = colormaps["tab20"]
    fig = Figure(figsize=(11, 4.8))
    axes = fig.subplots(1, 2, sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, key, label in zip(axes, ("aligned", "heldout_aligned"),
                              ("memorized prompts aligned (mitigated)", "held-out prompts aligned (mitigated)"),
                              strict=True):
        for method in methods:
            curve = [r for r in rows if r["method"] == method and r.get(key) is not None
                     and r.get("memorization_rate") is not None]
            if not curve:
                continue
            xs, ys = [r[key] for r in curve], [r["memorization_rate"] for r in curve]
            if method == "none":
                ax.plot(xs, ys, "k*", ms=11, label="no mitigation")
                continue
            n = methods.index(method)
            line = ax.plot(xs, ys, "-" + "osv^DPX"[n % 7], ms=4, lw=1, color=colors((2 * n + n // 10) % 20),
                           label=f"{method} ({SWEEPS[method].option})")[0]
            for r, x, y in zip(curve, xs, ys, strict=True):
                ax.annotate(f"{r['strength']:.3g}", (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3),
                            color=line.get_color())
            ax.plot([x for r, x in zip(curve, xs, strict=True) if r["default"]],
                    [y for r, y in zip(curve, ys, strict=True) if r["default"]], "s", ms=7, mfc="none",
                    color=line.get_color())
        if reference is not None:
            ax.axvline(reference, color="grey", ls="--", lw=1, label="plain held-out aligned")
            ax.add_patch(Rectangle((reference - ALIGNMENT_POINTS, 0), 1 - reference + ALIGNMENT_POINTS,
                                   MEMORIZATION_TARGET, color="green", alpha=0.12, label="target"))
        ax.set_xlabel(label)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("memorization rate (memorized prompts copied in >= 2 seeds)")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=6, loc="upper left")
    fig.suptitle("testbed mitigation frontier (squares: each method's default strength)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def guard_report(pipe, memorized: Sequence[Item], heldout: Sequence[Item], threshold: float, target_loss: float,
                 generations: int = 4, seed: int = 0, steps: int = 50, iters: int = 10, lr: float = 0.05,
                 identical_check: int = 64, progress: Callable[[str], None] | None = None,
                 parts: Parts | None = None) -> dict[str, Any]:
    """The guard end to end (`generate --guard`): memorized and held-out prompts generated with the default
    mitigation (`default_mitigation`) applied to those scoring >= `threshold`. Memorization rate, flagged shares
    (false flags on the held-out prompts), alignment, and whether unflagged prompts gave the plain pipeline's
    images bit for bit (checked on the first `identical_check` prompts of each set against a plain generation)."""
    say = progress or (lambda msg: None)
    common = dict(generations=generations, seed=seed, num_inference_steps=steps, iters=iters, lr=lr,
                  target_loss=target_loss)
    method = default_mitigation(family(pipe))
    result: dict[str, Any] = {"threshold": threshold, "target_loss": target_loss, "method": method}
    for name, items in (("memorized", list(memorized)), ("heldout", list(heldout))):
        say(f"guard ({method}), {name} prompts")
        run = partial(_guard_part, pipe, method, name, items, threshold, common, identical_check, say)
        result[name] = run() if parts is None else parts.row(f"guard_{method}_{name}_{threshold:.6g}", run)
    return result


def _guard_part(pipe, method: str, name: str, items: list[Item], threshold: float, common: dict[str, Any],
                identical_check: int, say: Callable[[str], None]) -> dict[str, Any]:
    """The guard on one prompt set (`guard_report`'s row for it)."""
    guarded = generate(pipe, [i.caption for i in items], method, threshold=threshold, **common)
    imgs = _images(guarded.images)
    flagged = np.array([bool(d.flagged) for d in guarded.decisions])
    ok = alignment(imgs, items)
    part: dict[str, Any] = {"n": len(items), "flagged": float(flagged.mean()),
                            "aligned": None if ok is None else float(ok.mean()),
                            "seconds_per_prompt": float(np.mean([d.seconds for d in guarded.decisions]))}
    if name == "memorized":
        own = render_many([i.scene for i in items], [i.seed for i in items])
        copies = (own_similarity(imgs, own) >= COPY_THRESHOLD).sum(axis=1)
        part |= {"memorization_rate": float((copies >= 2).mean()),
                 "memorized_among_unflagged": float((copies[~flagged] >= 2).mean()) if (~flagged).any() else None,
                 "unflagged_share_plus_10_points": float((~flagged).mean()) + 0.10}
    check = [k for k in range(min(identical_check, len(items))) if not flagged[k]]
    if check:
        say(f"plain generation of {len(check)} unflagged {name} prompts")
        plain = _images(generate(pipe, [items[k].caption for k in check], "none", **common).images)
        part["unflagged_bit_identical"] = bool(all(np.array_equal(plain[j], imgs[k]) for j, k in enumerate(check)))
        part["unflagged_checked"] = len(check)
    return part


def _picture(items: Sequence[Item], own: np.ndarray, plain: tuple[np.ndarray, np.ndarray],
             mitigated: tuple[np.ndarray, np.ndarray], path: Path, n: int = 4) -> None:
    """Training image | unmitigated generations, then training image | mitigated generations, for n prompts."""
    rows = []
    for k in range(min(n, len(items))):
        rows.append((f"#{items[k].index} plain", own[k], plain[0][k], plain[1][k]))
        rows.append((f"#{items[k].index} mitigated", own[k], mitigated[0][k], mitigated[1][k]))
    copy_grid(rows, path, COPY_THRESHOLD, title="testbed: training image, unmitigated and mitigated generations")


def _save_npy(path: Path, array: Any) -> None:
    """`np.save` to exactly `path` (np.save given a name adds .npy to it)."""
    with path.open("wb") as f:
        np.save(f, array)
