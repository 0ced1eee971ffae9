"""Download the training images that a memorized-prompt file names by URL (`data/sdv1_500_memorized.jsonl`: one
`url` per caption), for the copy measure of `diffmem reproduce`.

Each download has a connect/read timeout, a deadline for the whole attempt, a size limit (checked against the
declared length and while reading) and a content-type check (image/*, or an octet stream), and the bytes must
decode as an image. Timeouts, connection errors, 429 and 5xx answers are retried with doubling back-off; other
failures are final. Files are written under a temporary name and renamed, then recorded in OUT/manifest.jsonl
(one row per URL, fsynced), so a rerun fetches only what is missing, failed URLs included. OUT/report.json lists
what failed in the latest run and why.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffmem.errors import InputError
from diffmem.io.durable import replace_file

MANIFEST = "manifest.jsonl"
REPORT = "report.json"
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
OCTET_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass(frozen=True)
class FetchSettings:
    """Limits of one download: seconds per connect/read, seconds per attempt in all, further attempts after a
    retryable failure, seconds before the first retry (doubling), bytes at most, parallel downloads."""

    timeout: float = 15.0
    deadline: float = 60.0
    retries: int = 2
    backoff: float = 1.0
    max_bytes: int = 20 * 2**20
    workers: int = 8

    def check(self) -> None:
        """One InputError line for a setting no download can use."""
        for name in ("timeout", "deadline"):
            if not getattr(self, name) > 0:
                raise InputError(f"--{name} must be a positive number of seconds, not {getattr(self, name)}")
        if self.retries < 0 or self.backoff < 0:
            raise InputError("--retries and the back-off must be 0 or more")
        if self.max_bytes < 1 or self.workers < 1:
            raise InputError("--max-mb and --workers must be positive")


@dataclass
class Wanted:
    """One reference image to fetch: its URL and the caption (prompt) it belongs to."""

    url: str
    caption: str


@dataclass
class Outcome:
    """What fetching one URL gave: the file written (relative to OUT) or the error, after `attempts` tries."""

    url: str
    caption: str
    file: str | None = None
    error: str | None = None
    attempts: int = 0
    bytes: int = 0
    content_type: str = ""


@dataclass
class FetchReport:
    """One run: how many URLs the file names, were fetched now, were already there, and what failed."""

    total: int
    fetched: int = 0
    already: int = 0
    failed: list[Outcome] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "fetched": self.fetched, "already": self.already,
                "failed": [{"url": o.url, "caption": o.caption, "error": o.error, "attempts": o.attempts}
                           for o in self.failed]}


class FetchError(Exception):
    """A failed attempt; `retry` says whether another attempt may succeed."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


def read_wanted(path: str | Path, column: str = "url") -> list[Wanted]:
    """The (url, caption) rows of a prompt file, each URL once; a row without a URL is one InputError line."""
    from diffmem.io.prompts import read_prompts

    prompt_file = read_prompts(path)
    wanted: dict[str, Wanted] = {}
    for number, record in enumerate(prompt_file.records, 1):
        urls = record_urls(record, column)
        if not urls:
            raise InputError(f"{path}: prompt {number} has no {column!r} field; fetch-references needs the "
                             "training image's URL per prompt (as data/sdv1_500_memorized.jsonl has)")
        for url in urls:
            wanted.setdefault(url, Wanted(url, record["prompt"]))
    return list(wanted.values())


def record_urls(record: dict[str, Any], column: str = "url") -> list[str]:
    """A prompt row's training-image URLs: its `column` string, or its `urls` list (as the files of
    `diffmem datasets` hold, where one prompt may have several images and one image several prompts)."""
    url, urls = record.get(column), record.get("urls")
    found = [url] if isinstance(url, str) else list(urls) if isinstance(urls, list) else []
    return [u.strip() for u in found if isinstance(u, str) and u.strip()]


def file_stem(url: str) -> str:
    """The file name (without extension) of a URL's image: stable across runs and edits of the prompt file."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def _content_type(response: Any) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip().lower()


def _read_limited(response: Any, settings: FetchSettings, start: float) -> bytes:
    """The body, refusing more than `max_bytes` (declared or read) or an attempt past its deadline."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_bytes:
        raise FetchError(f"too large: {int(declared)} bytes declared, the limit is {settings.max_bytes}")
    chunks, total = [], 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > settings.max_bytes:
            raise FetchError(f"too large: over the limit of {settings.max_bytes} bytes")
        if time.monotonic() - start > settings.deadline:
            raise FetchError(f"took longer than {settings.deadline:g} s", retry=True)
        chunks.append(chunk)
    return b"".join(chunks)


def image_extension(data: bytes) -> str:
    """The file extension of image bytes PIL can decode, or a FetchError."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.verify()
    except Exception as exc:  # PIL raises many types for bad data (and DecompressionBombError)
        raise FetchError(f"not a decodable image ({type(exc).__name__})") from None
    return EXTENSIONS.get(fmt or "", ".img")


def download(client: Any, url: str, settings: FetchSettings) -> tuple[bytes, str, str]:
    """One attempt: the image bytes, their extension and the content type, or a FetchError."""
    import httpx

    if not url.lower().startswith(("http://", "https://")):
        raise FetchError("not an http(s) URL")
    start = time.monotonic()
    try:
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise FetchError(f"HTTP {response.status_code}", retry=response.status_code in RETRY_STATUS)
            ctype = _content_type(response)
            if not (ctype.startswith("image/") or ctype in OCTET_TYPES):
                raise FetchError(f"not an image: content-type {ctype or 'missing'}")
            data = _read_limited(response, settings, start)
    except httpx.TimeoutException:
        raise FetchError(f"timed out (limit {settings.timeout:g} s)", retry=True) from None
    except httpx.TransportError as exc:
        raise FetchError(f"connection failed: {type(exc).__name__}", retry=True) from None
    except httpx.HTTPError as exc:
        raise FetchError(f"{type(exc).__name__}: {exc}") from None
    return data, image_extension(data), ctype


def fetch_one(client: Any, wanted: Wanted, out: Path, settings: FetchSettings,
              sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Fetch one URL with retries and write it to OUT/<stem><ext> (atomically); never raises."""
    outcome = Outcome(wanted.url, wanted.caption)
    for attempt in range(settings.retries + 1):
        outcome.attempts = attempt + 1
        try:
            data, ext, ctype = download(client, wanted.url, settings)
        except FetchError as exc:
            outcome.error = str(exc)
            if exc.retry and attempt < settings.retries:
                sleep(settings.backoff * 2**attempt)
                continue
            return outcome
        name = file_stem(wanted.url) + ext
        replace_file(out / name, data)
        outcome.file, outcome.error, outcome.bytes, outcome.content_type = name, None, len(data), ctype
        return outcome
    return outcome


def _client(settings: FetchSettings, what: str = "fetch-references") -> Any:
    try:
        import httpx
    except ModuleNotFoundError:
        raise InputError(f"{what} needs httpx: pip install 'diffmem[paper]'") from None

    return httpx.Client(timeout=httpx.Timeout(settings.timeout), follow_redirects=True,
                        headers={"user-agent": "diffmem-fetch-references/0.1"})


def iter_fetch(pending: list[Wanted], out: Path, settings: FetchSettings) -> Iterator[Outcome]:
    """Fetch `pending` with `settings.workers` parallel downloads, yielding each outcome as it completes."""
    with _client(settings) as client, ThreadPoolExecutor(settings.workers) as pool:
        futures = [pool.submit(fetch_one, client, w, out, settings) for w in pending]
        for future in as_completed(futures):
            yield future.result()


def fetch_references(prompts: str | Path, out: str | Path, settings: FetchSettings | None = None,
                     on_outcome: Callable[[Outcome], None] | None = None) -> FetchReport:
    """Fetch every URL of `prompts` not yet in OUT/manifest.jsonl; returns (and writes to OUT/report.json) what
    happened. `on_outcome` sees each outcome as it completes (for a progress bar)."""
    from diffmem.io.results import ResultWriter

    settings = settings or FetchSettings()
    settings.check()
    wanted = read_wanted(prompts)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file; give a folder for the images")
    folder.mkdir(parents=True, exist_ok=True)
    report = FetchReport(total=len(wanted))
    with ResultWriter(folder / MANIFEST, key=lambda row: row["url"]) as manifest:
        pending = manifest.pending(wanted, key=lambda w: w.url)
        report.already = len(wanted) - len(pending)
        for outcome in iter_fetch(pending, folder, settings):
            if outcome.file is not None:
                manifest.write({k: v for k, v in asdict(outcome).items() if k != "error"})
                report.fetched += 1
            else:
                report.failed.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
    report.failed.sort(key=lambda o: o.url)
    replace_file(folder / REPORT, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def reference_files(folder: str | Path, prompts: str | Path | None = None) -> dict[str, list[Path]]:
    """Caption -> the reference image files fetched for it, from OUT/manifest.jsonl (a missing folder or manifest
    is one InputError line). With `prompts`, each prompt gets the files of the URLs its row names, whichever
    caption they were fetched for (one image may belong to several prompts)."""
    if prompts is not None:
        from diffmem.io.prompts import read_prompts

        by_url = {row["url"]: path for path, row in _fetched(folder)}
        return {r["prompt"]: [by_url[u] for u in record_urls(r) if u in by_url]
                for r in read_prompts(prompts).records}
    files: dict[str, list[Path]] = {}
    for path, row in _fetched(folder):
        files.setdefault(row["caption"], []).append(path)
    return files


def _fetched(folder: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(file, manifest row) of every image OUT/manifest.jsonl records that is on disk."""
    from diffmem.io.results import read_results

    root = Path(folder)
    if not (root / MANIFEST).is_file():
        raise InputError(f"{root} holds no {MANIFEST}: fetch the reference images first with "
                         "`diffmem fetch-references --prompts FILE --out " + str(root) + "`")
    for row in read_results(root / MANIFEST, allow_partial=True):
        path = root / row["file"]
        if path.is_file():
            yield path, row
