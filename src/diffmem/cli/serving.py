"""`diffmem serve`: the web page and JSON HTTP API over one loaded model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.common import AllowPickleOpt, TokenOpt, deprecated_option, renamed


def serve(
    model: Annotated[
        str, typer.Option("--model", help="Local diffusers folder, hub id, or 'testbed'; fixed for the server's life.")
    ] = "testbed",
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this machine).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Detection threshold (flag score >= threshold).")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", help="JSON with a 'threshold' field, e.g. `evaluate --json`.")
    ] = None,
    steps: Annotated[str, typer.Option("--steps", help="'first', 'all' or k leading steps per score.")] = "first",
    generations: Annotated[int, typer.Option("--generations", min=1, help="Initial noises per score.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first generation's initial noise.")] = 0,
    num_inference_steps: Annotated[
        int | None, typer.Option("--num-inference-steps", help="Sampling steps of the page's Generate button (25).")
    ] = None,
    generate_steps: Annotated[int | None, deprecated_option("--generate-steps", "--num-inference-steps")] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Mitigation iterations at most (10).")] = None,
    mitigate_iters: Annotated[int | None, deprecated_option("--mitigate-iters", "--iters")] = None,
    target_loss: Annotated[
        float | None, typer.Option("--target-loss", help="Mitigation's first-step target (default: the model's own, as "
                                      "`diffmem mitigate`'s).")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="Guidance scale of generated images (default: the model's own).")
    ] = None,
    max_prompt_chars: Annotated[int, typer.Option("--max-prompt-chars", min=1, help="Longest prompt.")] = 1000,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most prompts per detect request.")] = 64,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests that may wait for the model.")] = 16,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")] = None,
    token: TokenOpt = None,
    allow_pickle: AllowPickleOpt = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option("--allowed-host", help="A host name (or address) clients use to reach this server, besides "
                     "loopback names and --host; repeatable. Requests naming any other Host get 400 (DNS rebinding)."),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="Largest request body to the page's routes, in MiB "
                            "(the /api limit follows --max-prompt-chars and --max-batch).")
    ] = 1.0,
) -> None:
    """Web page and JSON HTTP API: screen, explain and fix prompts (page at /, API at /api, schema /openapi.json)."""
    from diffmem.app.server import serve as run_server
    from diffmem.app.service import Limits, Settings
    from diffmem.models.loading import parse_device, quiet_diffusers

    settings = Settings(steps=steps, generations=generations, seed=seed,
                        generate_steps=renamed(num_inference_steps, generate_steps, "--generate-steps",
                                               "--num-inference-steps", Settings.generate_steps),
                        mitigate_iters=renamed(iters, mitigate_iters, "--mitigate-iters", "--iters",
                                               Settings.mitigate_iters),
                        target_loss=target_loss, guidance_scale=guidance)
    limits = Limits(max_prompt_chars=max_prompt_chars, max_batch=max_batch, max_queue=max_queue)
    quiet_diffusers()
    run_server(model, host=host, port=port, device=parse_device(device), threshold=threshold,
               calibration=calibration, settings=settings, limits=limits, echo=typer.echo, token=token,
               allow_pickle=allow_pickle, allowed_host=allowed_host or (), max_upload=int(max_upload_mb * 2**20))
