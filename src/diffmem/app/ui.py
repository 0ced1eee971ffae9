"""The Gradio page of `diffmem serve`: type a prompt, see its verdict, curve, highlighted words and fixes.

Every model call goes through Gradio's queue with one shared concurrency slot (`concurrency_id="model"`);
errors are shown as a message in the page, never as a traceback. The HTML pieces are plain functions of the
service's results, so they are testable without a browser.
"""

from __future__ import annotations

import html
import logging
import math
import os
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: never phone home

import gradio as gr  # noqa: E402

from diffmem.app.service import Analysis, Service, png_base64  # noqa: E402
from diffmem.errors import DiffmemError  # noqa: E402
from diffmem.explanation.render import html_highlight  # noqa: E402

log = logging.getLogger("diffmem.app")
N_SUGGESTIONS = 5

CSS = """
.gradio-container { max-width: 1180px !important; margin: 0 auto !important; }
.dm-header h1 { font-size: 1.45rem; margin: 0 0 2px 0; }
.dm-header p { margin: 2px 0; color: var(--body-text-color-subdued); font-size: 0.9rem; }
.dm-header code { font-size: 0.85rem; }
.dm-verdict { border-radius: 8px; padding: 12px 16px; border: 1px solid; }
.dm-verdict .dm-title { font-size: 1.25rem; font-weight: 700; }
.dm-verdict .dm-line { margin-top: 4px; font-size: 0.95rem; }
.dm-flagged { background: #fdecea; border-color: #e0a39c; color: #7a1d14; }
.dm-clear { background: #e9f6ec; border-color: #9fd0ab; color: #1d5c2c; }
.dm-error { background: #fff6e0; border-color: #e5c46f; color: #6b4e00; }
.dm-idle { background: var(--block-background-fill); border-color: var(--border-color-primary);
           color: var(--body-text-color-subdued); }
.dm-gauge { position: relative; height: 8px; border-radius: 4px; background: #e5e7eb; margin-top: 10px; }
.dm-gauge .dm-fill { position: absolute; left: 0; top: 0; bottom: 0; border-radius: 4px; }
.dm-gauge .dm-mark { position: absolute; top: -4px; bottom: -4px; width: 2px; background: #111827; }
.dm-section { font-weight: 600; margin: 4px 0 6px 0; }
.dm-note { color: var(--body-text-color-subdued); font-size: 0.85rem; margin-top: 4px; }
.diffmem-attribution { font-size: 1.1rem; line-height: 2.1; margin: 0; }
.dm-images { display: flex; gap: 18px; flex-wrap: wrap; }
.dm-images figure { margin: 0; text-align: center; }
.dm-images img { width: 192px; height: 192px; image-rendering: pixelated; border-radius: 6px;
                 border: 1px solid var(--border-color-primary); }
.dm-images figcaption { font-size: 0.85rem; margin-top: 4px; }
.dm-suggestion { text-align: left !important; justify-content: flex-start !important; }
"""

_EMPTY = '<div class="dm-verdict dm-idle" data-verdict="none">Type a prompt and press <b>Screen</b>.</div>'


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def header_html(service: Service) -> str:
    """Title, model, the threshold and where it came from, and the settings behind every number."""
    th = service.threshold
    return (
        '<div class="dm-header"><h1>diffmem · memorization screen</h1>'
        f"<p>model <code>{html.escape(service.model)}</code> · threshold <b>{_fmt(th.value)}</b> from: "
        f'<span id="threshold-source">{html.escape(th.source)}</span></p>'
        f"<p>{html.escape(service.settings.describe())} · JSON API: <code>POST /api/detect</code>, "
        "<code>POST /api/explain</code>, schema at <code>/openapi.json</code></p></div>"
    )


def verdict_html(row: dict[str, Any], threshold: float) -> str:
    """The verdict box: flagged or not, the score against the threshold, and a gauge with the threshold mark."""
    score = row.get("score")
    if score is None:
        return error_html(row.get("error") or "no score")
    flagged = bool(row["flagged"])
    top = max(score, threshold) * 1.25 or 1.0
    cls, title = ("dm-flagged", "Likely memorized") if flagged else ("dm-clear", "Not flagged")
    relation = "≥" if flagged else "<"
    color = "#d9534f" if flagged else "#3c9a5f"
    truncated = ""
    if row.get("truncated"):
        truncated = (f'<div class="dm-note">The text encoder cut off: '
                     f"“{html.escape(row.get('truncated_text', ''))}”.</div>")
    return (
        f'<div class="dm-verdict {cls}" data-verdict="{"flagged" if flagged else "clear"}" id="verdict-box" '
        f'data-prompt="{html.escape(row["prompt"])}">'
        f'<div class="dm-title">{title}</div>'
        f'<div class="dm-line">score <b data-score="{score!r}">{_fmt(score)}</b> {relation} threshold '
        f"<b>{_fmt(threshold)}</b></div>"
        f'<div class="dm-gauge"><div class="dm-fill" style="width:{100 * score / top:.1f}%;background:{color}">'
        f'</div><div class="dm-mark" style="left:{100 * threshold / top:.1f}%" title="threshold"></div></div>'
        f"{truncated}</div>"
    )


def error_html(message: str) -> str:
    """A request's error as a message box in the page."""
    return (f'<div class="dm-verdict dm-error" data-verdict="error" role="alert"><div class="dm-title">'
            f'Cannot do that</div><div class="dm-line">{html.escape(message)}</div></div>')


def curve_svg(row: dict[str, Any], threshold: float, width: int = 540, height: int = 230) -> str:
    """An SVG line chart of `d_t` over the sampling steps: one thin line per generation, their mean bold, the
    scored steps shaded, the threshold dashed."""
    mags = [[v for v in g] for g in row.get("magnitudes") or []]
    n = max((len(g) for g in mags), default=0)
    if not n:
        return ""
    finite = [v for g in mags for v in g if v is not None and math.isfinite(v)]
    top = max([*finite, threshold]) * 1.12 or 1.0
    left, right, up, down = 52, 12, 12, 40
    w, h = width - left - right, height - up - down

    def x(i: int) -> float:
        return left + (w * i / (n - 1) if n > 1 else w / 2)

    def y(v: float) -> float:
        return up + h * (1 - v / top)

    def path(values: list[float | None]) -> str:
        pts = [f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        return "M" + " L".join(pts) if pts else ""

    parts = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="noise magnitude per sampling step" id="curve-svg" style="max-width:{width}px">']
    k = row.get("scored_steps", 1)
    band = x(min(k, n) - 1) - x(0)
    parts.append(f'<rect x="{x(0) - 4:.1f}" y="{up}" width="{band + 8:.1f}" height="{h}" fill="#fde68a" '
                 'opacity="0.55"><title>scored steps</title></rect>')
    for j in range(5):
        v = top * j / 4
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end" '
                     f'fill="#6b7280">{v:.3g}</text>')
    for i in sorted({0, *range(9, n, 10), n - 1}):
        parts.append(f'<text x="{x(i):.1f}" y="{up + h + 15}" font-size="11" text-anchor="middle" '
                     f'fill="#6b7280">{i + 1}</text>')
    parts.append(f'<text x="{left + w / 2:.1f}" y="{height - 4}" font-size="12" text-anchor="middle" '
                 'fill="#374151">sampling step (1 = first, pure noise)</text>')
    parts.append(f'<text x="14" y="{up + h / 2:.1f}" font-size="12" text-anchor="middle" fill="#374151" '
                 f'transform="rotate(-90 14 {up + h / 2:.1f})">‖ε(x,prompt) − ε(x,∅)‖</text>')
    for g in mags if len(mags) > 1 else []:
        parts.append(f'<path d="{path(g)}" fill="none" stroke="#93c5fd" stroke-width="1"/>')
    mean = []
    for i in range(n):
        vals = [g[i] for g in mags if i < len(g) and g[i] is not None and math.isfinite(g[i])]
        mean.append(sum(vals) / len(vals) if vals else None)
    parts.append(f'<path d="{path(mean)}" fill="none" stroke="#1d4ed8" stroke-width="2"/>')
    parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
                 'stroke="#dc2626" stroke-dasharray="5,4" stroke-width="1.5"/>'
                 f'<text x="{left + w * 0.45:.1f}" y="{y(threshold) - 5:.1f}" font-size="11" text-anchor="middle" '
                 'fill="#dc2626">threshold (applies to the score over the shaded steps)</text>')
    parts.append("</svg>")
    return "".join(parts)


def words_html(analysis: Analysis) -> str:
    """The prompt with each word highlighted by its significance, with a one-line legend."""
    attr = analysis.attribution
    note = ("Redder words raise the memorization score more (the score's drop when the word is deleted; hover for "
            "the value).")
    if attr.cut_off:
        note += f" Struck-through words were cut off by the text encoder: “{html.escape(attr.cut_off)}”."
    return f'<div id="words-box">{html_highlight(attr)}<div class="dm-note">{note}</div></div>'


def suggestions_note(analysis: Analysis) -> str:
    """What the suggestion buttons are, or why there are none."""
    if not analysis.row["flagged"]:
        return '<div class="dm-note">Not flagged: no edit is needed.</div>'
    if not analysis.suggestions:
        return ('<div class="dm-note">No edit tried (dropping or replacing the top words) scores below the '
                "threshold; try rephrasing the highlighted words.</div>")
    return ('<div class="dm-note">Edits that score below the threshold, least change first. '
            "Click one to use it.</div>")


def images_html(out: dict[str, Any]) -> str:
    """Plain and mitigated images side by side, with the training image and copy similarities on the testbed."""
    sims = out.get("copy_similarity")
    mit = out["mitigation"]

    def figure(name: str, image: Any, caption: str) -> str:
        return (f'<figure data-image="{name}"><img alt="{name} image" src="data:image/png;base64,'
                f'{png_base64(image)}"/><figcaption>{caption}</figcaption></figure>')

    def copy(key: str) -> str:
        if not sims:
            return ""
        value = sims[key]
        tag = " — a copy" if value >= sims["copy_threshold"] else ""
        return f"<br>copy similarity {value:.3f}{tag}"

    figs = [
        figure("plain", out["plain"], f"<b>plain</b>{copy('plain')}"),
        figure("mitigated", out["mitigated"], f"<b>mitigated</b> (score {_fmt(mit['score'])}){copy('mitigated')}"),
    ]
    if out.get("training") is not None and sims:
        figs.append(figure("training", out["training"],
                           f"<b>training image</b><br>(copy at ≥ {sims['copy_threshold']:.2f})"))
    delayed = mit.get("method") == "embedding-delayed"
    if mit["iters"] == 0 and mit["reached"]:
        same = "" if delayed else ", so both images are the same"
        how = (f"no optimisation needed (first-step loss {_fmt(mit['initial_loss'])} is already at or below the "
               f"target {_fmt(mit['target_loss'])}{same})")
    else:
        iters = f"{mit['iters']} iteration" + ("" if mit["iters"] == 1 else "s")
        reached = "reached" if mit["reached"] else "did not reach"
        how = (f"{iters} on the prompt embedding, loss {_fmt(mit['initial_loss'])} → {_fmt(mit['final_loss'])} "
               f"({reached} the target {_fmt(mit['target_loss'])})")
    if delayed:
        step = mit.get("guidance_from_step")
        how += ("; then sampled unguided until step " + str(step) + " (where its d_t met the model's transition "
                "curve or the latest timestep), guided after" if step is not None else "; then sampled unguided")
    note = (f"Same initial noise (seed {out['seed']}), DDIM {out['num_inference_steps']} steps. Mitigation: {how}. "
            f"{out['seconds']:.1f} s.")
    return (f'<div id="images-box" data-prompt="{html.escape(out["prompt"])}"><div class="dm-images">'
            f'{"".join(figs)}</div><div class="dm-note">{note}</div></div>')


def _fail(exc: Exception) -> str:
    """An exception as a message for the page (a user error's own line, else a generic one, logged)."""
    if isinstance(exc, DiffmemError):
        return error_html(str(exc))
    log.exception("internal error")
    return error_html(f"internal error ({type(exc).__name__}); the server log has the details")


def build_ui(service: Service) -> gr.Blocks:
    """The page: prompt, Screen and Generate, verdict, magnitude curve, highlighted words, suggestions, images."""
    threshold = service.threshold.value

    def on_screen(prompt: str) -> list[Any]:
        hidden = [gr.update(visible=False, value="")] * N_SUGGESTIONS
        try:
            a = service.analyse(prompt or "")
        except Exception as exc:  # shown in the page: a user error's message, never a traceback
            return [_fail(exc), "", "", [], *hidden, "", ""]
        buttons = [gr.update(visible=True, value=f"{s['prompt']}   ·   {s['change']}, score {_fmt(s['score'])}")
                   for s in a.suggestions[:N_SUGGESTIONS]]
        buttons += hidden[len(buttons):]
        return [verdict_html(a.row, threshold), curve_svg(a.row, threshold), words_html(a), a.suggestions,
                *buttons, suggestions_note(a), ""]

    def on_generate(prompt: str) -> str:
        try:
            return images_html(service.generate_pair(prompt or ""))
        except Exception as exc:
            return _fail(exc)

    with gr.Blocks(title="diffmem", analytics_enabled=False) as demo:
        gr.HTML(header_html(service))
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(label="Prompt", placeholder="a prompt to screen before generating", lines=2,
                                max_lines=4, max_length=service.limits.max_prompt_chars, elem_id="prompt", scale=6)
            with gr.Column(scale=1, min_width=150):
                screen_btn = gr.Button("Screen", variant="primary", elem_id="screen-button")
                generate_btn = gr.Button("Generate", elem_id="generate-button")
        if service.is_testbed:
            gr.Examples([[example] for example in service.testbed_examples()], inputs=[prompt],
                        label="Testbed examples: a planted (memorized) caption and a held-out one")
        with gr.Row():
            with gr.Column(scale=1):
                verdict = gr.HTML(_EMPTY, elem_id="verdict")
                gr.HTML('<div class="dm-section">Noise magnitude per sampling step</div>')
                curve = gr.HTML("", elem_id="curve")
            with gr.Column(scale=1):
                gr.HTML('<div class="dm-section">Which words drive the score</div>')
                words = gr.HTML("", elem_id="words")
                gr.HTML('<div class="dm-section">Suggested edits</div>')
                note = gr.HTML("", elem_id="suggestions-note")
                state = gr.State([])
                buttons = [gr.Button("", visible=False, size="sm", elem_id=f"suggestion-{i}",
                                     elem_classes=["dm-suggestion"]) for i in range(N_SUGGESTIONS)]
        gr.HTML('<div class="dm-section">Plain and mitigated generation</div>')
        images = gr.HTML('<div class="dm-note">Press <b>Generate</b> to sample the prompt plainly and with its '
                         "mitigated embedding, from the same noise.</div>", elem_id="images")

        outputs = [verdict, curve, words, state, *buttons, note, images]
        run: dict[str, Any] = {"concurrency_id": "model", "show_progress": "minimal"}  # one model slot for all
        screen_btn.click(on_screen, [prompt], outputs, **run)
        prompt.submit(on_screen, [prompt], outputs, **run)
        # Generate screens the prompt first, so the verdict on the page is always that of the images shown
        generate_btn.click(on_screen, [prompt], outputs, **run).then(on_generate, [prompt], [images], **run)
        for i, button in enumerate(buttons):
            button.click(lambda s, i=i: s[i]["prompt"] if i < len(s) else gr.update(), [state], [prompt],
                         queue=False).then(on_screen, [prompt], outputs, **run)
    demo.queue(default_concurrency_limit=service.limits.concurrency, max_size=service.limits.max_queue)
    return demo


def theme() -> Any:
    """Gradio's default theme with local fonts only (no request leaves the machine)."""
    return gr.themes.Default(primary_hue="blue", neutral_hue="slate",
                             font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])
