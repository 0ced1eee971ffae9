"""`diffmem explain`: which words of a prompt drive its memorization score (or, with --neurons, which neurons)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from diffmem.cli.common import AllowPickleOpt, ForceOpt, ModelOpt
from diffmem.console import say, stderr
from diffmem.errors import InputError
from diffmem.io.durable import check_output_path
from diffmem.io.files import check_prompt_text


def explain(
    prompt: Annotated[str, typer.Argument(help="The prompt to explain.")],
    model: ModelOpt = "testbed",
    method: Annotated[
        str, typer.Option("--method", help="'leave-one-out' (one batched scoring of every word's deletion; ranks "
                                           "better) or 'gradient' (one forward + backward).")
    ] = "leave-one-out",
    steps: Annotated[str, typer.Option("--steps", help="'first', 'all' or a number k of leading steps.")] = "first",
    generations: Annotated[int, typer.Option("--generations", min=1, help="Initial noises averaged.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first generation's initial noise.")] = 0,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a bar chart PNG of word significance.")] = None,
    suggest: Annotated[bool, typer.Option("--suggest", help="Propose edits scoring below --threshold.")] = False,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Detection threshold for --suggest (see `evaluate`).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a chart.")] = False,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = None,
    neurons: Annotated[
        bool, typer.Option("--neurons", help="Instead: the cross-attention value neurons that carry the prompt's "
                           "memorization (NeMo, Hintersdorf et al. 2024).")
    ] = False,
    nemo_stats: Annotated[
        Path | None, typer.Option("--nemo-stats", help="--neurons: value-neuron statistics of non-memorized prompts "
                                  "(a file `diffmem compare` writes; without it, top-k selection alone).")
    ] = None,
    allow_pickle: AllowPickleOpt = False,
    force: ForceOpt = False,
) -> None:
    """Which words of PROMPT drive its memorization score: per-token and per-word significance (or, with
    --neurons, which value neurons)."""
    from diffmem.explanation.attribution import ExplainConfig, suggest_edits
    from diffmem.explanation.attribution import explain as explain_prompt
    from diffmem.explanation.render import png_chart, terminal_chart
    from diffmem.models.loading import load_pipeline, parse_device, quiet_diffusers

    if neurons:
        _explain_neurons(prompt, model, seed, nemo_stats, as_json, device, allow_pickle)
        return
    config = ExplainConfig(method=method, steps=steps, generations=generations, seed=seed)
    if suggest and threshold is None:
        raise InputError("--suggest needs --threshold (calibrate one with `diffmem evaluate`)")
    if check_prompt_text(prompt) is None:  # the text rule of prompt files and the API
        raise InputError("the prompt is empty: there is nothing to explain")
    config.check_prompt(prompt)  # its word budget, before the model loads
    if plot is not None:
        check_output_path(plot, "--plot", image=True, force=force)
    quiet_diffusers()
    with stderr.status(f"loading {model} ..."):
        pipe: Any = load_pipeline(model, device=parse_device(device), allow_pickle=allow_pickle)
    attr = explain_prompt(pipe, prompt, config=config)
    if attr.cut_off:
        say(stderr, f'warning: the text encoder cut off "{attr.cut_off}"; those words have no significance')
    if len(attr.words) and all(w.significance <= 0 for w in attr.words):
        say(stderr, "notice: no word raises the score (e.g. a prompt of only stop words)")
    suggestions = suggest_edits(pipe, attr, threshold) if suggest and threshold is not None else []
    if plot:
        png_chart(attr, plot)
    if as_json:
        out = attr.to_dict()
        if suggest:
            out["suggestions"] = [vars(s) for s in suggestions]
        typer.echo(json.dumps(out))
        return
    Console().print(terminal_chart(attr))
    if suggest:
        if not suggestions:
            typer.echo(f"no edit tried scores below {threshold}")
        for s in suggestions:
            typer.echo(f"{s.score:.4f}  {s.prompt}   ({s.change})")
    if plot:
        typer.echo(f"wrote {plot}")


def _explain_neurons(prompt: str, model: str, seed: int, stats: Path | None, as_json: bool, device: str | None,
                     allow_pickle: bool) -> None:
    """`diffmem explain --neurons`: NeMo's localisation of PROMPT, one line per value layer with neurons."""
    from diffmem.mitigate.nemo import NeuronStatistics, localize, value_layer_names
    from diffmem.models.loading import load_pipeline, parse_device, quiet_diffusers

    if not prompt.strip():
        raise InputError("the prompt is empty: there is nothing to explain")
    statistics = None if stats is None else NeuronStatistics.load(stats)
    quiet_diffusers()
    with stderr.status(f"loading {model} ..."):
        pipe: Any = load_pipeline(model, device=parse_device(device), allow_pickle=allow_pickle)
    found = localize(pipe, prompt, statistics, seed=seed)
    names = value_layer_names(pipe.unet)
    if as_json:
        typer.echo(json.dumps({"prompt": prompt, **found.to_dict(), "layers": names}))
        return
    if not found.memorized:
        typer.echo("not memorized by NeMo's test: no two seeds' noise residuals are alike")
        return
    typer.echo(f"{found.count} neurons; residual MS-SSIM with them off: {found.refined_ssim:.3f}")
    for name, layer in zip(names, found.neurons, strict=True):
        if layer:
            typer.echo(f"{name}.to_v  {', '.join(map(str, layer))}")
