"""Render an `Attribution`: a terminal bar chart, a PNG bar chart, HTML with highlighted words."""

from __future__ import annotations

import html
from pathlib import Path

from diffmem.explanation.attribution import Attribution


def _shares(attr: Attribution) -> list[float]:
    """Each word's significance as a share of the largest (0 for negative or truncated words)."""
    values = [max(0.0, w.significance) for w in attr.words]
    top = max(values, default=0.0) or 1.0
    return [v / top for v in values]


def terminal_chart(attr: Attribution, width: int = 30):
    """A rich Table: one row per word with a proportional bar, most significant first.

    On the bundled testbed:

        >>> from diffmem import explain, load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> attribution = explain(pipe, shipped_recipe().splits().planted[0].caption)  # a memorized caption
        >>> table = terminal_chart(attribution)  # show it with rich.console.Console().print(table)
        >>> table.title, table.row_count, list(table.columns[0].cells)[:2]  # doctest: +ELLIPSIS
        ('leave-one-out significance (score 0.76...)', 10, ['orange', 'center'])
    """
    from rich.table import Table

    table = Table(title=f"{attr.method} significance (score {attr.score:.4f})", show_edge=False)
    table.add_column("word")
    table.add_column("significance", justify="right")
    table.add_column("")
    shares = _shares(attr)
    for i in sorted(range(len(attr.words)), key=lambda i: -attr.words[i].significance):
        w = attr.words[i]
        bar = "█" * max(0, round(shares[i] * width))
        note = " (cut off)" if w.truncated else ""
        table.add_row(w.text + note, f"{w.significance:.4g}", f"[red]{bar}[/red]")
    return table


def png_chart(attr: Attribution, path: str | Path) -> Path:
    """Save a horizontal bar chart of word significance, in prompt order.

    On the bundled testbed:

        >>> import tempfile
        >>> from PIL import Image
        >>> from diffmem import explain, load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> attribution = explain(pipe, shipped_recipe().splits().planted[0].caption)  # a memorized caption
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = png_chart(attribution, f"{folder}/significance.png")
        ...     print(path.name, Image.open(path).size)
        significance.png (660, 462)
    """
    from matplotlib.figure import Figure

    words = attr.words
    fig = Figure(figsize=(6, 0.3 * len(words) + 1.2))
    ax = fig.subplots()
    ys = list(range(len(words)))[::-1]
    ax.barh(ys, [w.significance for w in words], color=["#bbbbbb" if w.truncated else "#c0392b" for w in words])
    ax.set_yticks(ys, [w.text for w in words], fontsize=8)
    ax.set_xlabel(f"{attr.method} significance")
    ax.set_title(f"score {attr.score:.4f}", fontsize=9)
    fig.tight_layout()
    from diffmem.io.durable import save_figure

    return save_figure(fig, path, dpi=110)


def html_highlight(attr: Attribution) -> str:
    """The prompt as HTML, each word's background red in proportion to its significance.

    On the bundled testbed:

        >>> from diffmem import explain, load_pipeline
        >>> from diffmem.testbed.recipe import shipped_recipe
        >>> pipe = load_pipeline("testbed", device="cpu")
        >>> attribution = explain(pipe, shipped_recipe().splits().planted[0].caption)  # a memorized caption
        >>> page = html_highlight(attribution)
        >>> page.startswith('<p class="diffmem-attribution">'), page.count('class="diffmem-word"')
        (True, 10)
    """
    spans = []
    for w, share in zip(attr.words, _shares(attr), strict=True):
        title = f"significance {w.significance:.4g}" + (" (cut off by the text encoder)" if w.truncated else "")
        style = f"background: rgba(220, 50, 47, {0.08 + 0.82 * share:.2f}); padding: 1px 3px; border-radius: 3px"
        if w.truncated:
            style = "text-decoration: line-through; color: #888"
        spans.append(f'<span class="diffmem-word" style="{style}" title="{html.escape(title)}">'
                     f"{html.escape(w.text)}</span>")
    return '<p class="diffmem-attribution">' + " ".join(spans) + "</p>"
