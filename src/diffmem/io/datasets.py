"""The field's standard memorization benchmarks: a registry of where each is published, a fetcher, and the
memorized / non-memorized prompt files `diffmem reproduce --dataset NAME` reads from it (docs/guides/datasets.md).

Each data set lands in DIR/NAME/ in its source's own layout (a `--base-url` mirror or local copy has the same
layout). A download goes to `PATH.part`, resumes it with an HTTP Range request, is hashed and only then renamed
to PATH, so a half file never sits under its final name. A file's sha256 is pinned where it was computed from the
public repository snapshot at the commit its URL names; otherwise the first fetch records it in
DIR/NAME/manifest.json and later fetches (mirrors included) must match it; `--sha256 PATH=HEX` pins one by hand.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import shutil
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from diffmem.errors import InputError
from diffmem.io.durable import FULL_DISK, check_writable, replace_file
from diffmem.io.files import (
    MAX_PROMPT_FILE_BYTES,
    iter_lines,
    json_problem,
    open_user_file,
    read_json_object,
    read_user_json,
)

MANIFEST = "manifest.json"
PROMPTS = "prompts"
"""Folder under DIR/NAME holding the derived memorized.jsonl and normal.jsonl."""

_HF_WEBSTER = "https://huggingface.co/datasets/fraisdufour/templates-verbs/resolve/main/"
_MEMBENCH = "https://raw.githubusercontent.com/chunsanHong/MemBench_code/f22a0fdcd24fa0f4a43bf7b9a8e42c8c78af302f/"
_MEMATTN = "https://raw.githubusercontent.com/renjie3/MemAttn/c66efd22d8ffd4b1c6b87835708fa1437a2e076b/"
_WEN = "https://raw.githubusercontent.com/YuxinWenRick/diffusion_memorization/c8fe471d80b62213bdc8a384543ff44b44c62020/"


@dataclass(frozen=True)
class RemoteFile:
    """One published file: where it lands under DIR/NAME (the source's own path), its URL, its sha256 when known,
    members to extract from it (archive member, path) and columns of it (a parquet) naming further files to fetch
    from the same root."""

    path: str
    url: str
    sha256: str | None = None
    extract: tuple[tuple[str, str], ...] = ()
    lists: tuple[str, ...] = ()

    @property
    def root(self) -> str:
        """The URL prefix that `path` is relative to (the source's root)."""
        return self.url[: -len(self.path)] if self.url.endswith(self.path) else self.url.rsplit("/", 1)[0] + "/"


@dataclass(frozen=True)
class Split:
    """How to read one split's prompts from a fetched file: its format (csv, txt, jsonl, parquet or coco, a COCO
    captions JSON), the prompt column, the column of training-image URL(s), the label column and labels kept."""

    file: str
    format: str
    prompt: str = "prompt"
    urls: str | None = None
    label: str | None = None
    keep: tuple[str, ...] = ()


@dataclass(frozen=True)
class Templates:
    """Webster's template verbatims: a parquet of templates (image file, mask file, URL) and the ground-truth
    column listing each row's template indices."""

    metadata: str = "templates/metadata.parquet"
    image: str = "img_file"
    mask: str = "mask_file"
    indices: str = "template_indices"


@dataclass(frozen=True)
class Dataset:
    """A registry entry: what it holds, for which models, its licence and source, its files and splits."""

    name: str
    title: str
    description: str
    models: tuple[str, ...]
    licence: str
    source: str
    files: tuple[RemoteFile, ...]
    memorized: Split
    normal: Split | None = None
    templates: Templates | None = None
    notes: str = ""


def _webster(name: str, model: str, parquet: str) -> Dataset:
    path = f"groundtruth_parquets/{parquet}"
    return Dataset(
        name=name, title=f"Webster 2023 ground truth, {model}",
        description="Captions labelled by Webster's one-step extraction: MV (matching verbatim), RV (retrieval "
        "verbatim), TV (template verbatim, measured with masks) or N (none, used as non-memorized). Columns "
        "caption, url, overfit_type, retrieved_urls, template_indices, gen_seeds, mse_real_gen.",
        models=(model,), licence="not stated (repository and Hugging Face data set carry no licence)",
        source="github.com/ryanwebster90/onestep-extraction (README); huggingface.co/datasets/fraisdufour/"
        "templates-verbs",
        files=(RemoteFile(path, _HF_WEBSTER + path),
               RemoteFile("templates/metadata.parquet", _HF_WEBSTER + "templates/metadata.parquet",
                          lists=("img_file", "mask_file"))),
        memorized=Split(path, "parquet", prompt="caption", urls="url+retrieved_urls", label="overfit_type",
                        keep=("MV", "RV", "TV")),
        normal=Split(path, "parquet", prompt="caption", label="overfit_type", keep=("N",)),
        templates=Templates(),
        notes="no published checksum: the first fetch records each sha256 in manifest.json",
    )


_REN_NORMAL = RemoteFile("prompt/group_nomem500.txt", _MEMATTN + "prompt/group_nomem500.txt",
                         "4e0de75ae37b4fb2f8676026d876d9f4b03267a90041af4069d74b912e588c2d")


def _ren(name: str, what: str, memorized: str, model: str, sha256: str) -> Dataset:
    """One of Ren et al.'s prompt lists: `prompt/<memorized>` against their 500 non-memorized prompts."""
    path = f"prompt/{memorized}"
    return Dataset(
        name=name, title=f"Ren et al. (ECCV 2024): {what}",
        description=f"{path} (memorized) and prompt/group_nomem500.txt (500 non-memorized), one prompt per line. "
        "No image URLs: detection only.",
        models=(model,), licence="MIT", source="github.com/renjie3/MemAttn",
        files=(RemoteFile(path, _MEMATTN + path, sha256), _REN_NORMAL),
        memorized=Split(path, "txt"), normal=Split("prompt/group_nomem500.txt", "txt"),
    )

DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset(
        name="wen-sdv1-500", title="Wen et al. (ICLR 2024): 500 memorized SD v1 prompts",
        description="The 500 memorized prompts of Webster 2023 that Wen et al. evaluate on, each with its LAION "
        "index and training-image URL (JSON lines: caption, index, url); diffmem ships the same file as "
        "data/sdv1_500_memorized.jsonl. No non-memorized split: give --normal.",
        models=("CompVis/stable-diffusion-v1-4",), licence="not stated",
        source="github.com/YuxinWenRick/diffusion_memorization (examples/sdv1_500_memorized.jsonl)",
        files=(RemoteFile("examples/sdv1_500_memorized.jsonl", _WEN + "examples/sdv1_500_memorized.jsonl",
                          "8eb16c6ff1c7195cddf26b3207bdc7c6a905a20162c6070d79fe60336a525c60"),),
        memorized=Split("examples/sdv1_500_memorized.jsonl", "jsonl", prompt="caption", urls="url"),
    ),
    Dataset(
        name="membench-sd1", title="MemBench (Hong et al., TMLR 2025): SD1 trigger prompts",
        description="3,000 trigger prompts for SD v1.4 (CSV: an unnamed index column, prompt, urls: a Python list "
        "of the training-image URLs, 151 distinct in the published file), and COCO 2017 validation captions "
        "(one per image, 5,000) as general prompts. Metrics: max and top-3 SSCD, share of images with SSCD > 0.5, "
        "CLIP score, aesthetic score.",
        models=("CompVis/stable-diffusion-v1-4",),
        licence="MemBench CSV: not stated; COCO annotations: CC BY 4.0",
        source="github.com/chunsanHong/MemBench_code (SD1_final.csv); cocodataset.org (annotations_trainval2017.zip)",
        files=(RemoteFile("SD1_final.csv", _MEMBENCH + "SD1_final.csv",
                          "8c41867a67ea184c4f7f3c9765eeb55faa3b5058d1552e014616de9198d110c7"),
               RemoteFile("annotations_trainval2017.zip",
                          "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                          extract=(("annotations/captions_val2017.json", "annotations/captions_val2017.json"),))),
        memorized=Split("SD1_final.csv", "csv", prompt="prompt", urls="urls"),
        normal=Split("annotations/captions_val2017.json", "coco", prompt="caption"),
        notes="the COCO archive (about 240 MB) has no published checksum: the first fetch records it",
    ),
    _webster("webster-sdv1", "runwayml/stable-diffusion-v1-5", "sdv1_bb_edge_groundtruth.parquet"),
    _webster("webster-sdv2", "stabilityai/stable-diffusion-2-base", "sdv2_bb_edge_groundtruth.parquet"),
    _webster("webster-realistic-vision", "Realistic Vision (SD v1 fine-tune)",
             "realistic_vision_sdv1_edge_groundtruth.parquet"),
    _webster("webster-deepfloyd-if", "DeepFloyd/IF-I-XL-v1.0", "deep_if_sdv1_wb_groundtruth.parquet"),
    _ren("ren-sd1", "345 memorized SD1 prompts", "sd1_mem345.txt", "CompVis/stable-diffusion-v1-4",
         "70f370c4728aecd18e0db95dc58e9741b0f1a278dbfddb31d7d0754f69f8d069"),
    _ren("ren-sd2", "219 memorized SD2 prompts", "sd2_mem219.txt", "stabilityai/stable-diffusion-2",
         "5776ec85cc25fde8c4843af990041a85813c3af7cb817c45dabb1a1bb9b6356f"),
)}


def get(name: str) -> Dataset:
    """The registry entry `name`, or one InputError line listing the known ones."""
    if name not in DATASETS:
        raise InputError(f"unknown data set {name!r}; known: {', '.join(DATASETS)} (see `diffmem datasets list`)")
    return DATASETS[name]


# ------------------------------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class DatasetFetchSettings:
    """Limits of one fetch: seconds per connect/read, further attempts after a retryable failure, seconds
    before the first retry (doubling)."""

    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0


@dataclass
class FetchSummary:
    """What one fetch did: files downloaded now, already there, extracted, and the sha256s recorded first now."""

    root: Path
    fetched: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    extracted: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)


def _safe_relative(path: str, where: str) -> str:
    """`path` if it stays inside the data set folder (no absolute path, no '..'); else one InputError line."""
    pure = PurePosixPath(path.replace("\\", "/"))
    if not path or pure.is_absolute() or ".." in pure.parts:
        raise InputError(f"{where} names an unsafe path {path!r}: refusing to write outside the data set folder")
    return str(pure)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict[str, Any]:
    """DIR/NAME/manifest.json (an empty one when missing; a broken one is one InputError line)."""
    path = root / MANIFEST
    data = read_json_object(path, "data set manifest", missing={"files": {}})
    if not isinstance(data.get("files"), dict):
        raise InputError(f"{path} is not a diffmem data set manifest (no 'files' object); delete it to fetch again")
    return data


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    replace_file(root / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _disk_full(path: Path) -> InputError:
    return InputError(f"disk full while writing {path}: free some space or fetch to another --out (a rerun "
                      "resumes the partial file)")


def _check_space(folder: Path, needed: int) -> None:
    if needed > 0 and shutil.disk_usage(folder).free < needed:
        raise InputError(f"not enough disk space under {folder}: {needed / 2**20:.1f} MiB needed, "
                         f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free")


def _local_root(base_url: str | None) -> Path | None:
    """The folder a `--base-url` names (a path or a file:// URL), or None for an http(s) mirror."""
    if base_url is None:
        return None
    if base_url.startswith("file://"):
        return Path(urlsplit(base_url).path)
    if base_url.lower().startswith(("http://", "https://")):
        return None
    return Path(base_url).expanduser()


class _Downloader:
    """httpx downloads with retries and resume, or copies from a local mirror folder."""

    def __init__(self, settings: DatasetFetchSettings, base_url: str | None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings, self.sleep = settings, sleep
        self.local = _local_root(base_url)
        self.base = None if base_url is None or self.local is not None else base_url.rstrip("/") + "/"
        self._client: Any = None

    def url(self, file: RemoteFile) -> str:
        if self.local is not None:
            return str(self.local / file.path)
        return self.base + file.path if self.base is not None else file.url

    def client(self) -> Any:
        if self._client is None:
            from diffmem.io.references import FetchSettings, _client

            self._client = _client(FetchSettings(timeout=self.settings.timeout), what="diffmem datasets")
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def get(self, file: RemoteFile, part: Path) -> None:
        """Bring `file` into `part` (resuming what is there), or raise one InputError line."""
        if self.local is not None:
            source = self.local / file.path
            if not source.is_file():
                raise InputError(f"the mirror {self.local} has no {file.path}")
            _check_space(part.parent, source.stat().st_size)
            check_writable(part)
            try:
                shutil.copyfile(source, part)
            except OSError as exc:
                if exc.errno in FULL_DISK:
                    raise _disk_full(part) from None
                raise
            return
        url = self.url(file)
        for attempt in range(self.settings.retries + 1):
            try:
                self._stream(url, part)
                return
            except _Retry as exc:
                if attempt == self.settings.retries:
                    raise InputError(f"cannot fetch {file.path} from {url}: {exc} (after {attempt + 1} attempts; "
                                     "check the network, or give --base-url for a mirror or a local copy; a rerun "
                                     "resumes)") from None
                self.sleep(self.settings.backoff * 2**attempt)

    def _stream(self, url: str, part: Path) -> None:
        import httpx

        from diffmem.io.references import RETRY_STATUS

        have = part.stat().st_size if part.is_file() else 0
        headers = {"range": f"bytes={have}-"} if have else {}
        try:
            with self.client().stream("GET", url, headers=headers) as response:
                if response.status_code == 416 and have:  # the part is already whole (or stale): start over
                    part.unlink()
                    raise _Retry("the partial file did not fit the server's copy; starting over")
                if response.status_code not in (200, 206):
                    if response.status_code in RETRY_STATUS:
                        raise _Retry(f"HTTP {response.status_code}")
                    raise InputError(f"cannot fetch {url}: HTTP {response.status_code}")
                append = response.status_code == 206
                declared = response.headers.get("content-length", "")
                if declared.isdigit():
                    _check_space(part.parent, int(declared))
                check_writable(part)  # appended to resume, so not through replace_file; never a device or FIFO
                try:
                    with part.open("ab" if append else "wb") as fh:
                        for chunk in response.iter_bytes():
                            fh.write(chunk)
                        fh.flush()
                        os.fsync(fh.fileno())
                except OSError as exc:
                    if exc.errno in FULL_DISK:
                        raise _disk_full(part) from None
                    raise
        except httpx.TimeoutException:
            raise _Retry(f"timed out (limit {self.settings.timeout:g} s)") from None
        except httpx.TransportError as exc:
            raise _Retry(f"cannot reach {urlsplit(url).netloc or url} ({type(exc).__name__})") from None


class _Retry(Exception):
    """A failed attempt that another attempt may cure."""


def _extract(archive: Path, member: str, target: Path) -> None:
    """Write one member of a zip or tar archive to `target` whole (`replace_file`: a temporary file renamed into
    place; a full disk keeps the earlier file)."""
    if not zipfile.is_zipfile(archive) and not tarfile.is_tarfile(archive):
        raise InputError(f"{archive} is neither a zip nor a tar archive")

    def write(tmp: Path) -> None:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            return
        with tarfile.open(archive) as tf:
            member_file = tf.extractfile(member)
            if member_file is None:
                raise KeyError(member)
            with member_file, tmp.open("wb") as dst:
                shutil.copyfileobj(member_file, dst)

    try:
        replace_file(target, write)
    except KeyError:
        raise InputError(f"{archive} has no member {member!r}") from None


def _listed(root: Path, file: RemoteFile) -> list[RemoteFile]:
    """The further files a fetched parquet names in its `lists` columns, each relative to the source's root."""
    paths: list[str] = []
    for row in read_table(root / file.path, "parquet"):
        for column in file.lists:
            value = row.get(column)
            if isinstance(value, str) and value.strip():
                paths.append(_safe_relative(value.strip(), f"{file.path} column {column}"))
    return [RemoteFile(p, file.root + p) for p in dict.fromkeys(paths)]


def fetch(name: str, out: str | Path, base_url: str | None = None, pins: dict[str, str] | None = None,
          settings: DatasetFetchSettings | None = None, log: Callable[[str], None] | None = None,
          sleep: Callable[[float], None] = time.sleep) -> FetchSummary:
    """Fetch data set `name` into OUT/NAME/ (resuming), verify every checksum known, extract archive members,
    write the derived prompt files, and return what happened. A problem is one InputError line; nothing already
    verified is replaced by an unverified file."""
    dataset = get(name)
    settings = settings or DatasetFetchSettings()
    pins = {k: v.lower() for k, v in (pins or {}).items()}
    unknown = sorted(set(pins) - {f.path for f in dataset.files} - {p for f in dataset.files for _, p in f.extract})
    if unknown and not dataset.templates:
        raise InputError(f"--sha256 names {', '.join(unknown)}, not a file of {name}")
    root = Path(out).expanduser() / name
    if root.exists() and not root.is_dir():
        raise InputError(f"{root} is a file; give --out a folder")
    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root)
    manifest["dataset"] = name
    summary = FetchSummary(root)
    downloader = _Downloader(settings, base_url, sleep)
    say = log or (lambda _m: None)
    try:
        queue = list(dataset.files)
        while queue:
            file = queue.pop(0)
            _fetch_file(file, root, manifest, pins, downloader, summary, say)
            for member, path in file.extract:
                target = root / _safe_relative(path, name)
                if not target.is_file() or path not in manifest["files"]:
                    _extract(root / file.path, member, target)
                    manifest["files"][path] = {"sha256": sha256_file(target), "bytes": target.stat().st_size,
                                               "from": f"{file.path}:{member}"}
                    _write_manifest(root, manifest)
                    summary.extracted.append(path)
            if file.lists:
                queue.extend(_listed(root, file))
    finally:
        downloader.close()
    prepare(name, root.parent)
    return summary


def _fetch_file(file: RemoteFile, root: Path, manifest: dict[str, Any], pins: dict[str, str], downloader: Any,
                summary: FetchSummary, say: Callable[[str], None]) -> None:
    """One file: skip it when already verified, else download, check and rename it into place."""
    path = _safe_relative(file.path, file.url)
    target = root / path
    recorded = manifest["files"].get(path, {}).get("sha256")
    expected = pins.get(path) or file.sha256 or recorded
    if target.is_file() and recorded and recorded == expected and \
            manifest["files"][path].get("bytes") == target.stat().st_size:
        summary.already.append(path)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    say(f"fetching {path} from {downloader.url(file)}" + (" (resuming)" if part.is_file() else ""))
    downloader.get(file, part)
    got = sha256_file(part)
    if expected is not None and got != expected:
        part.unlink()
        kept = " (the copy already there is kept)" if target.is_file() else ""
        raise InputError(f"checksum mismatch for {path} from {downloader.url(file)}: expected sha256 {expected}, "
                         f"got {got}; the download was discarded{kept}")
    check_writable(target)
    os.replace(part, target)
    if expected is None:
        summary.recorded.append(path)
    manifest["files"][path] = {"sha256": got, "bytes": target.stat().st_size, "url": downloader.url(file),
                               "pinned": bool(pins.get(path) or file.sha256)}
    _write_manifest(root, manifest)
    summary.fetched.append(path)


# ---------------------------------------------------------------------------------------- reading the splits


def read_table(path: Path, fmt: str) -> list[dict[str, Any]]:
    """The rows of a fetched file as dicts (txt: {'prompt': line}; coco: the 'annotations' list)."""
    if not os.path.lexists(path):
        raise InputError(f"{path} is missing: fetch it with `diffmem datasets fetch`")
    try:  # through the reader primitive, the line reader and the JSON rule, like every user file
        if fmt == "parquet":
            try:
                import pyarrow.parquet as pq
            except ModuleNotFoundError:
                raise InputError("reading Parquet needs pyarrow: pip install 'diffmem[paper]'") from None
            with open_user_file(path, "data set file", MAX_PROMPT_FILE_BYTES) as f:
                rows: list[dict[str, Any]] = pq.read_table(f.raw).to_pylist()
            return rows
        if fmt == "coco":
            return list(read_user_json(path, "data set file", max_bytes=MAX_PROMPT_FILE_BYTES)["annotations"])
        with open_user_file(path, "data set file", MAX_PROMPT_FILE_BYTES) as f:
            lines = [(number, line) for number, line in iter_lines(f, path) if line.strip()]
        if fmt == "txt":
            return [{"prompt": line.strip()} for _, line in lines]
        if fmt == "jsonl":
            return [_json_line(path, number, line) for number, line in lines]
        if fmt == "csv":
            return list(csv.DictReader(line for _, line in lines))
    except InputError:
        raise
    except Exception as exc:  # json, csv, pyarrow and key errors from a file that is not what it should be
        raise InputError(f"cannot read {path} as {fmt}: {type(exc).__name__}: {exc}") from None
    raise InputError(f"unknown table format {fmt!r}")


def _json_line(path: Path, number: int, line: str) -> Any:
    """One JSON Lines row by the JSON rule, or one InputError line naming the file and the line."""
    value, problem = json_problem(line)
    if problem is not None:
        raise InputError(f"{path} line {number}: {problem}")
    return value


def _urls(value: Any) -> list[str]:
    """URLs from a cell: one string, a list, or a list written as a Python/JSON literal (MemBench's CSV)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise InputError(f"cannot read the URL list {text[:60]!r}") from None
        else:
            return [text] if text else []
    return [str(v).strip() for v in value if isinstance(v, str) and v.strip()]


def split_rows(root: Path, split: Split) -> Iterator[dict[str, Any]]:
    """The rows of one split as {'prompt', 'urls', 'label', 'row'}: labels filtered, COCO one caption per image."""
    seen_images: set[Any] = set()
    for number, row in enumerate(read_table(root / split.file, split.format)):
        label = row.get(split.label) if split.label else None
        if split.keep and label not in split.keep:
            continue
        if split.format == "coco":
            if row.get("image_id") in seen_images:  # MemBench keeps one caption per image (the first)
                continue
            seen_images.add(row.get("image_id"))
        prompt = row.get(split.prompt)
        if not isinstance(prompt, str) or not prompt.strip():
            continue
        urls = [u for column in (split.urls.split("+") if split.urls else []) for u in _urls(row.get(column))]
        yield {"prompt": " ".join(prompt.split()), "urls": list(dict.fromkeys(urls)), "label": label, "row": number}


@dataclass(frozen=True)
class Prepared:
    """The prompt files `diffmem reproduce` reads for a fetched data set, and its template masks."""

    dataset: Dataset
    root: Path
    memorized: Path
    normal: Path | None
    templates: dict[str, list[tuple[Path, Path]]]


def prepare(name: str, data: str | Path) -> Prepared:
    """Write DIR/NAME/prompts/memorized.jsonl (prompt, urls, label) and normal.jsonl from the fetched files, and
    map each template-verbatim prompt to its (template, mask) files."""
    dataset = get(name)
    root = Path(data).expanduser() / name
    if not (root / MANIFEST).is_file():
        raise InputError(f"{root} holds no fetched data set: run `diffmem datasets fetch {name} --out {data}`")
    folder = root / PROMPTS
    folder.mkdir(exist_ok=True)
    mem_rows = list(split_rows(root, dataset.memorized))
    if not mem_rows:
        raise InputError(f"{root}: the memorized split of {name} is empty")
    _write_jsonl(folder / "memorized.jsonl", ({k: r[k] for k in ("prompt", "urls", "label")} for r in mem_rows))
    normal = None
    if dataset.normal is not None:
        normal = folder / "normal.jsonl"
        _write_jsonl(normal, ({"prompt": r["prompt"]} for r in split_rows(root, dataset.normal)))
    return Prepared(dataset, root, folder / "memorized.jsonl", normal, _templates(root, dataset, mem_rows))


def _write_jsonl(path: Path, rows: Iterator[dict[str, Any]] | Any) -> None:
    replace_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _flat(value: Any) -> list[int]:
    """Template indices from a cell that may nest them (Webster writes `[[i, j]]`)."""
    if value is None:
        return []
    if isinstance(value, (int, float)):
        return [int(value)]
    return [i for v in value for i in _flat(v)]


def _templates(root: Path, dataset: Dataset, rows: list[dict[str, Any]]) -> dict[str, list[tuple[Path, Path]]]:
    """Prompt -> (template image, mask) files of its TV row, for the masked copy measure."""
    spec = dataset.templates
    if spec is None:
        return {}
    table = read_table(root / spec.metadata, "parquet")
    raw = read_table(root / dataset.memorized.file, "parquet")
    out: dict[str, list[tuple[Path, Path]]] = {}
    for r in rows:
        if r["label"] != "TV":
            continue
        pairs = []
        for i in _flat(raw[r["row"]].get(spec.indices)):
            if not 0 <= i < len(table):
                raise InputError(f"{dataset.memorized.file} row {r['row']}: template index {i} is not in "
                                 f"{spec.metadata} ({len(table)} rows)")
            pairs.append((root / _safe_relative(table[i][spec.image], spec.metadata),
                          root / _safe_relative(table[i][spec.mask], spec.metadata)))
        if pairs:
            out.setdefault(r["prompt"], []).extend(pairs)
    return out
