"""`fetch-references` against a local HTTP server on 127.0.0.1 serving good, missing, slow, oversized, flaky and
non-image responses: limits, retries, resume and the failure report."""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from diffmem.errors import InputError
from diffmem.io.references import MANIFEST, REPORT, FetchSettings, fetch_references, file_stem, reference_files


def image_bytes(fmt: str, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buffer, format=fmt)
    return buffer.getvalue()


PNG, JPEG = image_bytes("PNG", (200, 30, 30)), image_bytes("JPEG", (30, 30, 200))
LIMIT = 50_000  # bytes: the oversized answers send more


class Site:
    """What the server answers and how often each path was asked for."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.slow_seconds = 2.0

    def answer(self, path: str) -> tuple[int, dict[str, str], bytes, float]:
        """(status, headers, body, seconds to wait first) for a path."""
        image = {"content-type": "image/png"}
        if path == "/good.png":
            return 200, image, PNG, 0.0
        if path == "/good.jpg":
            return 200, {"content-type": "image/jpeg; charset=binary"}, JPEG, 0.0
        if path == "/redirect":
            return 302, {"location": "/good.jpg"}, b"", 0.0
        if path == "/flaky.png":  # a 503 the first time, then the image
            return (503, {}, b"busy", 0.0) if self.hits[path] == 1 else (200, image, PNG, 0.0)
        if path == "/slow.png":
            return 200, image, PNG, self.slow_seconds
        if path == "/big-declared.png":
            return 200, image, PNG + bytes(2 * LIMIT), 0.0
        if path == "/big-streamed.png":  # no content-length: the size shows only while reading
            return 200, {**image, "content-length": ""}, PNG + bytes(2 * LIMIT), 0.0
        if path == "/page.jpg":
            return 200, {"content-type": "text/html"}, b"<html>cookie wall</html>", 0.0
        if path == "/fake.jpg":
            return 200, {"content-type": "image/jpeg"}, b"\xff\xd8 not really a jpeg", 0.0
        return 404, {"content-type": "text/plain"}, b"not found", 0.0


@pytest.fixture
def site() -> Iterator[tuple[Site, str]]:
    """A threaded stdlib HTTP server on a free 127.0.0.1 port; yields its state and base URL."""
    state = Site()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            state.hits[self.path] += 1
            status, headers, body, wait = state.answer(self.path)
            time.sleep(wait)
            try:
                self.send_response(status)
                if headers.get("content-length", None) != "":
                    self.send_header("content-length", str(len(body)))
                for name, value in headers.items():
                    if value:
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (timeout, size limit): nothing to answer
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.handle_error = lambda *args: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


PATHS = ["/good.png", "/good.jpg", "/redirect", "/flaky.png", "/slow.png", "/big-declared.png",
         "/big-streamed.png", "/page.jpg", "/fake.jpg", "/missing.jpg"]
FAST = FetchSettings(timeout=0.4, deadline=5.0, retries=1, backoff=0.01, max_bytes=LIMIT, workers=4)


def prompt_file(tmp_path: Path, base: str, paths: list[str] = PATHS) -> Path:
    path = tmp_path / "memorized.jsonl"
    path.write_text("".join(json.dumps({"caption": f"caption of {p}", "url": base + p}) + "\n" for p in paths))
    return path


def test_fetch_limits_retries_and_report(site: tuple[Site, str], tmp_path: Path) -> None:
    state, base = site
    out = tmp_path / "refs"
    report = fetch_references(prompt_file(tmp_path, base), out, FAST)
    assert (report.total, report.fetched, report.already) == (10, 4, 0)
    errors = {o.url.removeprefix(base): (o.error, o.attempts) for o in report.failed}
    assert errors == {
        "/slow.png": ("timed out (limit 0.4 s)", 2),
        "/big-declared.png": (f"too large: {len(PNG) + 2 * LIMIT} bytes declared, the limit is {LIMIT}", 1),
        "/big-streamed.png": (f"too large: over the limit of {LIMIT} bytes", 1),
        "/page.jpg": ("not an image: content-type text/html", 1),
        "/fake.jpg": ("not a decodable image (UnidentifiedImageError)", 1),
        "/missing.jpg": ("HTTP 404", 1),
    }
    rows = {r["url"].removeprefix(base): r for r in map(json.loads, (out / MANIFEST).read_text().splitlines())}
    assert set(rows) == {"/good.png", "/good.jpg", "/redirect", "/flaky.png"}
    assert rows["/flaky.png"]["attempts"] == 2 and state.hits["/flaky.png"] == 2  # a 503 is retried
    for path, data, ext in (("/good.png", PNG, ".png"), ("/good.jpg", JPEG, ".jpg"), ("/redirect", JPEG, ".jpg")):
        assert rows[path]["file"] == file_stem(base + path) + ext
        assert (out / rows[path]["file"]).read_bytes() == data
    assert not list(out.glob("*.part"))
    written = json.loads((out / REPORT).read_text())
    assert written["fetched"] == 4 and len(written["failed"]) == 6
    assert {f["error"] for f in written["failed"]} >= {"HTTP 404", "timed out (limit 0.4 s)"}
    refs = reference_files(out)
    assert refs["caption of /good.png"] == [out / rows["/good.png"]["file"]] and "caption of /page.jpg" not in refs


def test_rerun_fetches_only_what_is_missing(site: tuple[Site, str], tmp_path: Path) -> None:
    state, base = site
    out = tmp_path / "refs"
    file = prompt_file(tmp_path, base, ["/good.png", "/slow.png", "/missing.jpg"])
    first = fetch_references(file, out, FAST)
    assert (first.fetched, len(first.failed)) == (1, 2)
    state.slow_seconds = 0.0  # the slow host recovers
    again = fetch_references(file, out, FAST)
    assert (again.fetched, again.already, [o.url for o in again.failed]) == (1, 1, [base + "/missing.jpg"])
    assert state.hits["/good.png"] == 1 and state.hits["/missing.jpg"] == 2  # done once; failures retried
    assert len((out / MANIFEST).read_text().splitlines()) == 2


def test_cli(site: tuple[Site, str], tmp_path: Path, cli: Callable) -> None:
    _, base = site
    file = prompt_file(tmp_path, base, ["/good.png", "/missing.jpg"])
    out = tmp_path / "refs"
    result = cli("fetch-references", "--prompts", file, "--out", out, "--timeout", 2, "--retries", 0)
    assert result.exit_code == 0, result.output
    assert "fetched 1 images" in result.stdout and "1 failed" in result.stdout
    assert "missing.jpg: HTTP 404" in result.stderr

    no_urls = tmp_path / "plain.txt"
    no_urls.write_text("a prompt without a url\n")
    for args, fragment in ((["--prompts", no_urls], "no 'url' field"), (["--prompts", file, "--timeout", 0],
                                                                         "--timeout")):
        bad = cli("fetch-references", *args, "--out", tmp_path / "x")
        assert bad.exit_code == 2 and "Traceback" not in bad.output
        last = bad.stderr.strip().splitlines()
        assert len(last) == 1 and last[0].startswith("error:") and fragment in last[0]
    with pytest.raises(InputError, match="no manifest.jsonl"):
        reference_files(tmp_path / "x")
