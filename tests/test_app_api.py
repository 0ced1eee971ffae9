"""The JSON HTTP API of `diffmem serve` over real HTTP: good input, bad input, limits, the queue, the schema."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from diffmem.app.service import Limits, Service, Threshold, threshold_from_options
from diffmem.errors import InputError


@pytest.fixture(scope="module")
def client(app_server: str):
    """An httpx client on the live testbed server."""
    with httpx.Client(base_url=app_server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def splits():
    """The testbed's ground truth (planted = memorized, heldout = never trained on)."""
    from diffmem.testbed.recipe import shipped_recipe

    return shipped_recipe().splits()


def _error(response: httpx.Response, status: int) -> str:
    """Assert a JSON error with `status` and one `error` line and no traceback; return the line."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"]
    assert "Traceback" not in response.text
    return body["error"]


# --------------------------------------------------------------------------------------------- good input

def test_info_says_where_the_threshold_comes_from(client: httpx.Client, testbed_service: Service) -> None:
    info = client.get("/api/info").json()
    assert info["model"] == "testbed"
    assert info["threshold"] == testbed_service.threshold.value
    assert info["threshold_source"] == "calibrated at startup on 512 held-out testbed prompts at 1% FPR"
    assert info["limits"]["max_batch"] == 64


def test_detect_scores_match_the_library(client: httpx.Client, testbed_service: Service, splits) -> None:
    from diffmem.detectors.magnitude import detect

    prompts = [splits.planted[0].caption, splits.heldout[0].caption, "a red circle"]
    body = client.post("/api/detect", json={"prompts": prompts}).json()
    assert body["threshold"] == testbed_service.threshold.value
    assert [r["prompt"] for r in body["results"]] == prompts
    expected = detect(testbed_service.pipe, prompts, steps="first", generations=1, seed=0)
    for row, ref in zip(body["results"], expected, strict=True):
        assert row["score"] == pytest.approx(ref.score, rel=1e-5)
        assert row["flagged"] == (row["score"] >= body["threshold"])
        assert len(row["magnitudes"]) == 1 and len(row["magnitudes"][0]) == 1
        assert row["error"] is None and row["truncated"] is False


def test_detect_flags_memorized_not_heldout(client: httpx.Client, splits, memorized_prompt: str) -> None:
    """The real behaviour on the testbed: a planted caption is flagged, a held-out one is not."""
    body = client.post("/api/detect", json={"prompts": [memorized_prompt,
                                                         splits.heldout[0].caption]}).json()
    memorized, heldout = body["results"]
    assert heldout["flagged"] is False
    assert memorized["flagged"] is True, f"planted score {memorized['score']} < threshold {body['threshold']}"


def test_detect_curve_covers_every_step(client: httpx.Client, splits) -> None:
    prompt = splits.heldout[1].caption
    plain = client.post("/api/detect", json={"prompts": [prompt]}).json()["results"][0]
    curve = client.post("/api/detect", json={"prompts": [prompt], "curve": True}).json()["results"][0]
    assert len(curve["magnitudes"][0]) == len(curve["timesteps"]) == 50
    assert curve["scored_steps"] == 1
    assert curve["score"] == pytest.approx(plain["score"], rel=1e-5)


def test_explain_words_and_suggestions(client: httpx.Client, splits, memorized_prompt: str) -> None:
    prompt = memorized_prompt
    body = client.post("/api/explain", json={"prompt": prompt}).json()
    assert [w["text"] for w in body["words"]] == prompt.split()
    assert all(isinstance(w["significance"], float) for w in body["words"])
    assert body["flagged"] == (body["score"] >= body["threshold"])
    for s in body["suggestions"]:
        assert s["score"] < body["threshold"] and s["prompt"] != prompt
    if not body["flagged"]:
        assert body["suggestions"] == []


def _png(text: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def test_generate_plain_and_mitigated(client: httpx.Client, splits, memorized_prompt: str) -> None:
    body = client.post("/api/generate", json={"prompt": memorized_prompt}).json()
    assert _png(body["plain_png"]).shape == _png(body["mitigated_png"]).shape == (32, 32, 3)
    assert _png(body["training_png"]).shape == (32, 32, 3)
    sims = body["copy_similarity"]
    assert -1 <= sims["plain"] <= 1 and -1 <= sims["mitigated"] <= 1 and sims["copy_threshold"] == 0.95
    assert body["num_inference_steps"] == 25
    assert body["mitigation"]["iters"] <= 10
    assert body["error"] is None


def test_generate_says_when_an_image_is_not_finite(testbed_service, splits, monkeypatch) -> None:
    """NaN/inf pixels (an overflow, damaged weights) come back black and said, as `diffmem generate`'s rows say."""
    sample = testbed_service._sample
    monkeypatch.setattr(testbed_service, "_sample", lambda **kw: sample(**kw) * np.nan)
    out = testbed_service.generate_pair(splits.heldout[0].caption)
    assert "non-finite" in out["error"] and np.isfinite(out["plain"]).all() and not out["plain"].any()


def test_openapi_documents_the_schema(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/api/detect", "/api/explain", "/api/generate", "/api/info"):
        assert path in spec["paths"]
    schemas = spec["components"]["schemas"]
    assert {"DetectRequest", "DetectResponse", "ExplainRequest", "ExplainResponse", "ErrorResponse"} <= set(schemas)
    assert "prompts" in schemas["DetectRequest"]["properties"]
    assert "413" in spec["paths"]["/api/detect"]["post"]["responses"]
    assert client.get("/docs").status_code == 404  # the interactive docs would load a script from a CDN


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"prompts": []}, 400, "empty list"),
        ({"prompts": ["fine", 3]}, 422, "prompts.1"),
        ({"prompts": "a single string"}, 422, "prompts"),
        ({"prompts": ["ok", "   "]}, 400, "prompt 1 is empty"),
        ({"prompts": ["x" * 1001]}, 413, "limit is 1000"),
        ({"prompts": ["a cat"] * 65}, 413, "limit is 64"),
        ({}, 422, "prompts"),
        ({"prompts": ["a"], "extra": 1}, 422, "extra"),
        ({"prompts": ["a"], "curve": "often"}, 422, "curve"),
    ],
)
def test_detect_bad_input(client: httpx.Client, body: dict, status: int, words: str) -> None:
    assert words in _error(client.post("/api/detect", json=body), status)


def test_limits_are_inclusive(client: httpx.Client) -> None:
    assert client.post("/api/detect", json={"prompts": ["y" * 1000]}).status_code == 200
    assert client.post("/api/detect", json={"prompts": ["a dog"] * 64}).status_code == 200


@pytest.mark.parametrize(
    ("path", "content", "status"),
    [
        ("/api/detect", b"{not json", 422),
        ("/api/detect", b"[1, 2]", 422),
        ("/api/explain", json.dumps({"prompt": ""}).encode(), 400),
        ("/api/explain", json.dumps({"prompt": "z" * 5000}).encode(), 413),
        ("/api/explain", json.dumps({"prompt": None}).encode(), 422),
        ("/api/generate", json.dumps({"prompt": " \n "}).encode(), 400),
        ("/api/detect", json.dumps({"prompts": ["p" * 999] * 400}).encode(), 413),  # body over the size limit
    ],
)
def test_bad_bodies(client: httpx.Client, path: str, content: bytes, status: int) -> None:
    _error(client.post(path, content=content, headers={"content-type": "application/json"}), status)


def test_unknown_route_or_method_is_a_json_error(client: httpx.Client) -> None:
    assert "use POST" in _error(client.get("/api/detect"), 405)
    assert "openapi.json" in _error(client.post("/api/nothing", json={}), 404)
    assert "use POST" in _error(client.options("/api/detect"), 405)  # answered here, not by the page at /


# --------------------------------------------------------------------------------------------- threshold

def test_threshold_options(tmp_path: Path) -> None:
    assert threshold_from_options("testbed") is None  # calibrated at startup
    assert threshold_from_options("/some/model", threshold=1.5) == Threshold(1.5, "the --threshold option")
    cal = tmp_path / "eval.json"
    cal.write_text(json.dumps({"auc": 0.99, "threshold": 2.25, "target_fpr": 0.01, "n_neg": 500}))
    got = threshold_from_options("/some/model", calibration=cal)
    assert got is not None and got.value == 2.25 and "1% FPR on 500" in got.source and str(cal) in got.source
    with pytest.raises(InputError, match="needs a detection threshold"):
        threshold_from_options("/some/model")
    with pytest.raises(InputError, match="not both"):
        threshold_from_options("testbed", threshold=1.0, calibration=cal)
    cal.write_text(json.dumps({"auc": 0.9}))
    with pytest.raises(InputError, match="no numeric 'threshold'"):
        threshold_from_options("testbed", calibration=cal)
    with pytest.raises(InputError, match="not found"):
        threshold_from_options("testbed", calibration=tmp_path / "missing.json")


def test_serve_cli_errors(cli, sd1_dir: Path, tmp_path: Path) -> None:
    res = cli("serve", "--model", sd1_dir, "--port", "7999")
    assert res.exit_code == 2 and "needs a detection threshold" in res.stderr
    res = cli("serve", "--threshold", "1", "--calibration", tmp_path / "x.json", "--port", "7999")
    assert res.exit_code == 2 and "not both" in res.stderr
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        res = cli("serve", "--threshold", "1", "--port", busy.getsockname()[1])
    assert res.exit_code == 2 and "cannot listen" in res.stderr


# ------------------------------------------------------------------------------------------------- queue

class _SlowService(Service):
    """A model-free service whose screening waits for an event: holds the model queue on demand."""

    def __init__(self) -> None:
        super().__init__(None, "stub", Threshold(1.0, "test"), limits=Limits(max_queue=1, concurrency=1))
        self.release = threading.Event()

    def screen(self, prompts, curve=False):
        self.release.wait(120)
        return [{"prompt": p, "score": 0.5, "flagged": False, "threshold": 1.0, "scored_steps": 1,
                 "magnitudes": [[0.5]], "timesteps": [981.0], "n_tokens": 1, "truncated": False,
                 "truncated_text": "", "error": None} for p in prompts]


def test_queue_is_bounded_and_does_not_block_the_server() -> None:
    from diffmem.app.server import BackgroundServer, create_api_app

    service = _SlowService()
    app = create_api_app(service)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        results: list[int] = []
        workers = [threading.Thread(target=lambda: results.append(
            c.post("/api/detect", json={"prompts": ["slow"]}).status_code)) for _ in range(2)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 120
        while app.state.model_queue.pending < 2 and time.monotonic() < deadline:  # one running, one waiting
            time.sleep(0.02)
        assert app.state.model_queue.pending == 2
        assert c.get("/api/info").status_code == 200  # answered while the model is held: the event loop is free
        full = c.post("/api/detect", json={"prompts": ["one too many"]})
        assert "queue is full" in _error(full, 503) and full.headers["retry-after"] == "2"
        _error(c.post("/api/detect", json={"prompts": []}), 400)  # bad input is refused without queueing
        service.release.set()
        for w in workers:
            w.join(20)
        assert results == [200, 200]
        assert c.post("/api/detect", json={"prompts": ["after"]}).status_code == 200


def test_page_loads_while_the_model_works(client: httpx.Client, testbed_service: Service, splits,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow request (generate) holds the model, not the server: the page is served meanwhile. The generation
    is held on an event until the page has come back, so the order does not depend on the machine's speed."""
    release, started = threading.Event(), threading.Event()
    real = testbed_service.generate_pair

    def held(prompt: str):
        started.set()
        release.wait(120)
        return real(prompt)

    monkeypatch.setattr(testbed_service, "generate_pair", held)
    answers: list[int] = []
    worker = threading.Thread(target=lambda: answers.append(
        client.post("/api/generate", json={"prompt": splits.heldout[2].caption}).status_code))
    worker.start()
    assert started.wait(60)
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert not answers  # the generation is still held while the page was served
    release.set()
    worker.join(120)
    assert answers == [200]


def test_testbed_examples_show_what_they_say(testbed_service: Service, splits) -> None:
    """The page's examples: a planted caption the threshold flags and a held-out one it does not."""
    memorized, heldout = testbed_service.testbed_examples()
    assert memorized in {i.caption for i in splits.planted} and heldout in {i.caption for i in splits.heldout}
    flagged = [row["flagged"] for row in testbed_service.screen([memorized, heldout])]
    assert flagged == [True, False]
