"""`diffmem serve`: a web page and a JSON HTTP API to screen, explain and fix prompts (issue #7).

Layers: `service` (plain Python over a loaded pipeline: `screen`, `explain_prompt`, `generate_pair`), `api`
(FastAPI routes with pydantic schemas and JSON errors), `ui` (the Gradio page) and `server` (both on one
FastAPI app, served by uvicorn on 127.0.0.1). Only `service` is imported here: the web stack loads on demand.
"""

from __future__ import annotations

from diffmem.app.service import (
    LimitError,
    Limits,
    Service,
    Settings,
    Threshold,
    calibrate_testbed,
    resolve_threshold,
    threshold_from_options,
)

__all__ = ["LimitError", "Limits", "Service", "Settings", "Threshold", "calibrate_testbed", "resolve_threshold",
           "threshold_from_options"]
