"""`diffmem methods`: every registered detector and mitigation, from the registries (`DETECTORS`, `MITIGATIONS`)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer


def rows() -> list[dict[str, Any]]:
    """One row per method: name, kind, paper, cost, minimum generations, published figure and its options."""
    from diffmem.detectors import DETECTORS
    from diffmem.mitigate import MITIGATIONS

    found = [{"name": name, "kind": "detector", "paper": cls.paper, "cost": cls.cost, "scores": cls.scores,
              "min_generations": cls.min_generations, "published": cls.published,
              "options": sorted(cls.Config.rule(k).option for k in cls.Config.names())}
             for name, cls in DETECTORS.items()]
    found += [{"name": name, "kind": "mitigation", "paper": cls.paper, "cost": cls.cost, "min_generations": 1,
               "published": cls.published, "options": sorted(cls.Config.rule(k).option for k in cls.Config.names())}
              for name, cls in MITIGATIONS.items()]
    return found


def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per method, not a list.")] = False,
) -> None:
    """List every detector (`diffmem detect --detector`) and mitigation (`diffmem mitigate --method`): paper, cost,
    minimum generations and the published SD v1.4 figure."""
    found = rows()
    if as_json:
        typer.echo("\n".join(json.dumps(row) for row in found))
        return
    lines = []
    for kind in ("detector", "mitigation"):
        lines.append(f"{kind}s:")
        for row in (r for r in found if r["kind"] == kind):
            lines.append(f"  {row['name']}: {row['paper'] or 'plain sampling'}")
            if row["cost"]:
                lines.append(f"    cost: {row['cost']}")
            if kind == "detector":
                lines.append(f"    scores: {row['scores']}; at least {row['min_generations']} generation"
                             f"{'s' if row['min_generations'] > 1 else ''}")
            if row["published"]:
                lines.append(f"    published: {row['published']}")
    typer.echo("\n".join(lines))
