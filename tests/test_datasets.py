"""`diffmem datasets` offline: a local HTTP server (127.0.0.1, ephemeral port, stops by itself) serves small files
shaped like the published ones (MemBench's CSV, COCO's captions zip, Webster's Parquet ground truth and templates,
Ren's text lists); fetch, resume, checksums, mirrors and one-line errors; MemBench's metrics, Webster's masks and
the aesthetic predictor against hand computation; `reproduce --dataset` on the tiny pipeline."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.errors import InputError
from diffmem.io.datasets import DATASETS, prepare

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")
pytest.importorskip("httpx")

WEBSTER = "groundtruth_parquets/sdv1_bb_edge_groundtruth.parquet"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def parquet(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def published(root: Path) -> dict[str, bytes]:
    """Small files at the paths and in the formats of the published ones."""
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:16] = 255  # the template's fixed top half
    mask_buf = io.BytesIO()
    Image.fromarray(mask, "L").save(mask_buf, "PNG")
    webster = parquet([
        {"caption": "Mothers influence on her young hippo", "url": "http://img/mv.jpg", "overfit_type": "MV",
         "gen_seeds": [], "retrieved_urls": [], "mse_real_gen": 12.5, "template_indices": []},
        {"caption": "Shaw Floors Spice It Up Tyler Taupe 00103_E9013", "url": "http://img/tv.jpg",
         "overfit_type": "TV", "gen_seeds": [0, 1], "retrieved_urls": ["http://img/t0.jpg", "http://img/t1.jpg"],
         "mse_real_gen": 4e3, "template_indices": [[0, 1]]},
        {"caption": "Rambo 5 und Rocky Spin-Off", "url": "http://img/rv.jpg", "overfit_type": "RV",
         "gen_seeds": [2], "retrieved_urls": ["http://img/r0.jpg"], "mse_real_gen": 5e3, "template_indices": []},
        {"caption": "a plain wooden chair", "url": "http://img/n.jpg", "overfit_type": "N", "gen_seeds": [],
         "retrieved_urls": [], "mse_real_gen": 9e3, "template_indices": []},
        {"caption": "a bowl of soup", "url": "http://img/n2.jpg", "overfit_type": "N", "gen_seeds": [],
         "retrieved_urls": [], "mse_real_gen": 9e3, "template_indices": []},
    ])
    templates = parquet([{"url": f"http://img/t{i}.jpg", "img_file": f"templates/imgs/{i}.png",
                          "mask_file": f"templates/masks/{i}.png"} for i in range(2)])
    coco = io.BytesIO()
    with zipfile.ZipFile(coco, "w") as zf:
        zf.writestr("annotations/captions_val2017.json", json.dumps({"info": {}, "images": [], "annotations": [
            {"image_id": 1, "id": 10, "caption": "A man riding a wave on a surfboard."},
            {"image_id": 1, "id": 11, "caption": "A surfer on a big wave."},
            {"image_id": 2, "id": 12, "caption": "A kitchen with a white stove."}]}))
    files = {
        WEBSTER: webster,
        "templates/metadata.parquet": templates,
        "templates/imgs/0.png": png(1), "templates/imgs/1.png": png(2),
        "templates/masks/0.png": mask_buf.getvalue(), "templates/masks/1.png": mask_buf.getvalue(),
        "SD1_final.csv": (b",prompt,urls\n0,fire us army garden flag single,['http://img/a.jpg']\n"
                          b"1,gold colorful transit rug,\"['http://img/b.jpg', 'http://img/a.jpg']\"\n"),
        "annotations_trainval2017.zip": coco.getvalue(),
        "prompt/sd1_mem345.txt": b"The No Limits Business Woman Podcast\nMothers influence on her young hippo\n",
        "prompt/group_nomem500.txt": b"A serene beach at sunrise\nSnow-covered rooftops in a small town",
    }
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return files


class Server:
    """A bounded local HTTP server over a folder, answering Range requests; records each request."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests = root, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = outer.root / unquote(self.path.lstrip("/"))
                outer.requests.append((self.path.lstrip("/"), self.headers.get("range")))
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(self.headers["range"].split("=")[1].split("-")[0]) if self.headers.get("range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("content-range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("content-type", "application/octet-stream")
                self.send_header("content-length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.timer = threading.Timer(300, self.httpd.shutdown)  # stops by itself, whatever the test does
        self.timer.daemon = True

    def __enter__(self) -> Server:
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, dict[str, bytes]]]:
    (tmp_path / "www").mkdir()
    files = published(tmp_path / "www")
    with Server(tmp_path / "www") as server:
        yield server, files


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "Traceback" not in result.output, result.stderr
    return lines[-1]


def test_list_names_every_data_set_with_licence_and_source(cli: Callable) -> None:
    result = cli("datasets", "list")
    assert result.exit_code == 0, result.output
    for name in ("wen-sdv1-500", "membench-sd1", "webster-sdv1", "webster-sdv2", "webster-realistic-vision",
                 "webster-deepfloyd-if", "ren-sd1", "ren-sd2"):
        assert f"{name}: " in result.stdout
    assert "licence: MIT" in result.stdout and "github.com/chunsanHong/MemBench_code" in result.stdout
    assert "fraisdufour/templates-verbs/resolve/main/groundtruth_parquets/sdv2_bb_edge_groundtruth.parquet" \
        in result.stdout
    assert "sha256 recorded on first fetch" in result.stdout


def test_registry_pins_only_hashes_of_commit_pinned_urls() -> None:
    for d in DATASETS.values():
        for f in d.files:
            assert f.sha256 is None or ("raw.githubusercontent.com" in f.url and len(f.url.split("/")[5]) == 40)


def test_webster_fetch_records_checksums_lists_templates_and_splits(served, tmp_path: Path, cli: Callable) -> None:
    server, files = served
    out = tmp_path / "data"
    result = cli("datasets", "fetch", "webster-sdv1", "--out", out, "--base-url", server.url)
    assert result.exit_code == 0, result.output
    root = out / "webster-sdv1"
    for path in (WEBSTER, "templates/imgs/1.png", "templates/masks/0.png"):
        assert (root / path).read_bytes() == files[path]
    manifest = json.loads((root / "manifest.json").read_text())["files"]
    assert manifest[WEBSTER]["sha256"] == sha(files[WEBSTER]) and not manifest[WEBSTER]["pinned"]
    assert "recorded the sha256 of 6 files" in result.stdout
    assert not list(root.rglob("*.part"))
    mem = [json.loads(line) for line in (root / "prompts" / "memorized.jsonl").read_text().splitlines()]
    assert [(r["label"], r["urls"]) for r in mem] == [
        ("MV", ["http://img/mv.jpg"]), ("TV", ["http://img/tv.jpg", "http://img/t0.jpg", "http://img/t1.jpg"]),
        ("RV", ["http://img/rv.jpg", "http://img/r0.jpg"])]
    normal = (root / "prompts" / "normal.jsonl").read_text()
    assert "a plain wooden chair" in normal and "hippo" not in normal
    prepared = prepare("webster-sdv1", out)
    assert prepared.templates == {"Shaw Floors Spice It Up Tyler Taupe 00103_E9013": [
        (root / "templates/imgs/0.png", root / "templates/masks/0.png"),
        (root / "templates/imgs/1.png", root / "templates/masks/1.png")]}
    before = len(server.requests)
    again = cli("datasets", "fetch", "webster-sdv1", "--out", out, "--base-url", server.url)
    assert again.exit_code == 0 and "fetched 0 files, 6 were already there" in again.stdout
    assert len(server.requests) == before  # nothing downloaded twice

    # the upstream file changes: the recorded checksum refuses it and keeps the verified copy
    (server.root / WEBSTER).write_bytes(files[WEBSTER] + b"x")
    (root / WEBSTER).unlink()
    line = error_line(cli("datasets", "fetch", "webster-sdv1", "--out", out, "--base-url", server.url))
    assert "checksum mismatch for " + WEBSTER in line and sha(files[WEBSTER]) in line
    assert not (root / WEBSTER).exists() and not (root / (WEBSTER + ".part")).exists()


def test_resume_after_a_partial_file(served, tmp_path: Path, cli: Callable) -> None:
    server, files = served
    data = files["SD1_final.csv"]
    root = tmp_path / "data" / "membench-sd1"
    root.mkdir(parents=True)
    (root / "SD1_final.csv.part").write_bytes(data[:40])
    result = cli("datasets", "fetch", "membench-sd1", "--out", tmp_path / "data", "--base-url", server.url,
                 "--sha256", f"SD1_final.csv={sha(data)}")
    assert result.exit_code == 0, result.output
    assert ("SD1_final.csv", "bytes=40-") in server.requests
    assert (root / "SD1_final.csv").read_bytes() == data and not (root / "SD1_final.csv.part").exists()
    assert json.loads((root / "annotations/captions_val2017.json").read_text())["annotations"][0]["image_id"] == 1
    mem = [json.loads(line) for line in (root / "prompts" / "memorized.jsonl").read_text().splitlines()]
    assert mem[1] == {"prompt": "gold colorful transit rug", "urls": ["http://img/b.jpg", "http://img/a.jpg"],
                      "label": None}
    normal = [json.loads(line)["prompt"] for line in (root / "prompts" / "normal.jsonl").read_text().splitlines()]
    assert normal == ["A man riding a wave on a surfboard.", "A kitchen with a white stove."]  # one per image


def test_a_wrong_checksum_is_one_line_and_loses_nothing(served, tmp_path: Path, cli: Callable) -> None:
    server, files = served
    out, data = tmp_path / "data", files["SD1_final.csv"]
    ok = cli("datasets", "fetch", "membench-sd1", "--out", out, "--base-url", server.url,
             "--sha256", f"SD1_final.csv={sha(data)}")
    assert ok.exit_code == 0, ok.output
    manifest = (out / "membench-sd1" / "manifest.json").read_text()
    line = error_line(cli("datasets", "fetch", "membench-sd1", "--out", out, "--base-url", server.url,
                          "--sha256", "SD1_final.csv=" + "0" * 64))
    assert "checksum mismatch for SD1_final.csv" in line and "the copy already there is kept" in line
    assert (out / "membench-sd1" / "SD1_final.csv").read_bytes() == data
    assert (out / "membench-sd1" / "manifest.json").read_text() == manifest
    # without a pin, the published sha256 (of the real file) refuses this stand-in
    line = error_line(cli("datasets", "fetch", "membench-sd1", "--out", tmp_path / "other", "--base-url", server.url))
    assert "expected sha256 " + DATASETS["membench-sd1"].files[0].sha256 in line  # type: ignore[operator]


def test_unreachable_source_is_one_line(tmp_path: Path, cli: Callable) -> None:
    with Server(tmp_path) as server:
        url = server.url
    line = error_line(cli("datasets", "fetch", "ren-sd1", "--out", tmp_path / "d", "--base-url", url,
                          "--retries", 0, "--timeout", 2))
    assert "cannot fetch prompt/sd1_mem345.txt" in line and "cannot reach 127.0.0.1" in line and "--base-url" in line


def test_missing_file_answers_http_error(served, tmp_path: Path, cli: Callable) -> None:
    server, _ = served
    line = error_line(cli("datasets", "fetch", "ren-sd2", "--out", tmp_path / "d", "--base-url", server.url))
    assert "HTTP 404" in line


def test_local_mirror_folder_and_pins(served, tmp_path: Path, cli: Callable) -> None:
    _, files = served
    pins = [f"prompt/{n}={sha(files['prompt/' + n])}" for n in ("sd1_mem345.txt", "group_nomem500.txt")]
    result = cli("datasets", "fetch", "ren-sd1", "--out", tmp_path / "d", "--base-url", tmp_path / "www",
                 "--sha256", pins[0], "--sha256", pins[1])
    assert result.exit_code == 0, result.output
    prepared = prepare("ren-sd1", tmp_path / "d")
    assert prepared.memorized.read_text().count("\n") == 2 and prepared.templates == {}
    assert "Snow-covered rooftops in a small town" in prepared.normal.read_text()  # type: ignore[union-attr]
    assert "--sha256 takes PATH=HEX" in error_line(cli("datasets", "fetch", "ren-sd1", "--sha256", "x=1"))
    assert "unknown data set 'laion'" in error_line(cli("datasets", "fetch", "laion", "--out", tmp_path))


def test_full_disk_is_one_line_and_keeps_no_half_file(served, tmp_path: Path, cli: Callable,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    import diffmem.io.datasets as datasets

    usage, real_usage = namedtuple("usage", "total used free"), datasets.shutil.disk_usage
    monkeypatch.setattr(datasets.shutil, "disk_usage", lambda _p: usage(100, 90, 10))
    line = error_line(cli("datasets", "fetch", "webster-sdv1", "--out", tmp_path / "d", "--base-url",
                          served[0].url))
    assert "not enough disk space" in line and not (tmp_path / "d" / "webster-sdv1" / WEBSTER).exists()
    monkeypatch.setattr(datasets.shutil, "disk_usage", real_usage)

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets.shutil, "copyfile", full)
    line = error_line(cli("datasets", "fetch", "webster-sdv1", "--out", tmp_path / "d", "--base-url",
                          tmp_path / "www"))
    assert line.startswith("error: disk full while writing")
    assert not (tmp_path / "d" / "webster-sdv1" / WEBSTER).exists()


def test_reproduce_without_a_fetched_data_set_says_how(tmp_path: Path, cli: Callable) -> None:
    line = error_line(cli("reproduce", "--dataset", "ren-sd1", "--data", tmp_path, "--out", tmp_path / "r"))
    assert "run `diffmem datasets fetch ren-sd1" in line
    assert "give --memorized and --normal" in error_line(cli("reproduce", "--out", tmp_path / "r"))


@pytest.mark.parametrize("command", ["reproduce", "compare"])
def test_a_data_set_or_prompt_files_are_needed(command: str, tmp_path: Path, cli: Callable) -> None:
    line = error_line(cli(command, "--dataset", "ren-sd1", "--data", tmp_path, "--out", tmp_path / "r"))
    assert "run `diffmem datasets fetch ren-sd1" in line
    assert "give --memorized and --normal" in error_line(cli(command, "--out", tmp_path / "r"))
    assert not (tmp_path / "r").exists()


@pytest.mark.usefixtures("one_thread")
def test_compare_on_a_fetched_data_set(served, sd1_dir: Path, tmp_path: Path, cli: Callable) -> None:
    """`compare --dataset` reads the fetched set's memorized and non-memorized prompt files, as `reproduce` does,
    and its template-verbatim masks (a note of the report)."""
    server, _ = served
    data = tmp_path / "data"
    assert cli("datasets", "fetch", "webster-sdv1", "--out", data, "--base-url", server.url).exit_code == 0
    out = tmp_path / "cmp"
    result = cli("compare", "--dataset", "webster-sdv1", "--data", data, "--model", sd1_dir, "--out", out,
                 "--generations", 1, "--detectors", "wen", "--mitigation-prompts", 0, "--num-inference-steps", 3,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    settings = report["settings"]
    assert (settings["n_memorized"], settings["n_normal"]) == (3, 2)
    assert (settings["dataset"], settings["data"]) == ("webster-sdv1", str(data))
    assert settings["memorized"] == str(data / "webster-sdv1" / "prompts" / "memorized.jsonl")
    assert any("1 template-verbatim (TV) prompts" in note for note in report["notes"])
    (row,) = report["detection"]
    assert row["detector"] == "wen" and (row["n_memorized"], row["n_normal"]) == (3, 2)


# ------------------------------------------------------------------------------------------------- measures


def test_membench_metrics_by_hand() -> None:
    from diffmem.measures.membench import membench_metrics

    sims = [np.array([0.2, 0.9, 0.6, 0.1]), np.array([0.3, 0.4])]
    m = membench_metrics(sims, [np.array([0.3, 0.1]), np.array([0.2])], [np.array([5.0, 6.0]), np.array([4.0])])
    assert m["max_sscd"] == pytest.approx((0.9 + 0.4) / 2)
    assert m["top3_sscd"] == pytest.approx(((0.9 + 0.6 + 0.2) / 3 + (0.3 + 0.4) / 2) / 2)
    assert m["sscd_above_half"] == pytest.approx((2 / 4 + 0) / 2)
    assert m["clip_score"] == pytest.approx((0.2 + 0.2) / 2) and m["aesthetic_score"] == pytest.approx(4.75)
    assert membench_metrics([])["max_sscd"] is None


def test_webster_masks_compare_only_the_template_region() -> None:
    from diffmem.measures.membench import masked_error, template_copies

    rng = np.random.default_rng(0)
    template = rng.random((256, 256, 3)).astype(np.float32)
    mask = np.zeros((256, 256, 3), dtype=np.float32)
    mask[:128] = 1.0
    same_top = template.copy()
    same_top[128:] = rng.random((128, 256, 3))  # the varying part differs: still a template copy
    other = rng.random((256, 256, 3)).astype(np.float32)
    assert masked_error(same_top, template, mask) < 50  # 8-bit rounding only
    t8, o8 = (np.round(template * 255) / 255), (np.round(other * 255) / 255)
    expected = float((((t8 - o8) * mask) ** 2).sum() / mask.mean())
    assert masked_error(other, template, mask) == pytest.approx(expected, rel=1e-4)
    assert template_copies([same_top, other], [(template, mask)]).tolist() == [True, False]
    assert masked_error(other, template, np.zeros_like(mask)) == float("inf")


def _mlp_state(width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict shaped like sac+logos+ava1-l14-linearMSE.pth (layers 0, 2, 4, 6, 7), `width` inputs."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(0, width, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]
    state = {}
    for i, n_in, n_out in sizes:
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        state[f"layers.{i}.bias"] = torch.randn(n_out, generator=g)
    return state


def test_aesthetic_predictor_loads_weights_only_and_scores(tmp_path: Path) -> None:
    from diffmem.measures.aesthetic import aesthetic_scores, load_aesthetic, load_head
    from diffmem.testbed.tiny import save_tiny_clip

    state = _mlp_state(16)
    torch.save(state, tmp_path / "mlp.pth")
    head = load_head(tmp_path / "mlp.pth")
    x = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    manual = x
    for i in (0, 2, 4, 6, 7):  # no activations between the layers, as in the published MLP
        manual = manual @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert torch.allclose(head(x), manual, atol=1e-5)
    torch.save({"weight": torch.ones(1, 16), "bias": torch.zeros(1)}, tmp_path / "linear.pth")
    assert torch.allclose(load_head(tmp_path / "linear.pth")(x)[:, 0], x.sum(dim=1))

    save_tiny_clip(tmp_path / "clip")
    predictor = load_aesthetic(tmp_path / "mlp.pth", tmp_path / "clip", "cpu")
    images = [np.random.default_rng(i).random((32, 32, 3)) for i in range(2)]
    scores = aesthetic_scores(predictor, images)
    pixels = predictor.clip.processor(images=[Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8))
                                              for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        model = predictor.clip.model
        emb = torch.nn.functional.normalize(model.visual_projection(model.vision_model(pixel_values=pixels)
                                                                    .pooler_output), dim=-1)
        assert torch.allclose(scores, head(emb)[:, 0], atol=1e-5)

    torch.save(_mlp_state(768), tmp_path / "l14.pth")
    with pytest.raises(InputError, match="768-wide embeddings but .* makes 16-wide"):
        load_aesthetic(tmp_path / "l14.pth", tmp_path / "clip", "cpu")


class Payload:
    """A pickled object that a weights-only load must refuse."""


def test_aesthetic_predictor_refuses_pickled_code(tmp_path: Path) -> None:
    from diffmem.measures.aesthetic import load_head

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="not a weights-only state dict"):
        load_head(tmp_path / "evil.pth")
    with pytest.raises(InputError, match="not found"):
        load_head(tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------------------ reproduce


@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
def test_reproduce_on_a_fetched_webster_set_with_membench_metrics(served, sd1_dir: Path, tmp_path: Path,
                                                                   cli: Callable) -> None:
    from diffmem.io.results import read_results
    from diffmem.measures.aesthetic import aesthetic_scores, load_aesthetic
    from diffmem.testbed.tiny import save_tiny_clip, save_tiny_sscd

    server, files = served
    data = tmp_path / "data"
    assert cli("datasets", "fetch", "webster-sdv1", "--out", data, "--base-url", server.url).exit_code == 0
    refs = tmp_path / "refs"  # what `diffmem fetch-references --prompts data/webster-sdv1/prompts/memorized.jsonl`
    refs.mkdir()             # leaves: here the MV image and one template URL of the TV prompt
    rows = []
    for i, url in enumerate(("http://img/mv.jpg", "http://img/t1.jpg")):
        (refs / f"{i}.png").write_bytes(png(10 + i))
        rows.append(json.dumps({"url": url, "caption": "fetched for another caption", "file": f"{i}.png"}) + "\n")
    (refs / "manifest.jsonl").write_text("".join(rows))
    save_tiny_sscd(tmp_path / "sscd.pt")
    save_tiny_clip(tmp_path / "clip")
    torch.save(_mlp_state(16), tmp_path / "aesthetic.pth")
    out = tmp_path / "report"
    result = cli("reproduce", "--dataset", "webster-sdv1", "--data", data, "--model", sd1_dir, "--out", out,
                 "--generations", 1, "--steps", "first", "--methods", "none", "--references", refs,
                 "--sscd", tmp_path / "sscd.pt", "--clip", tmp_path / "clip", "--aesthetic", tmp_path / "aesthetic.pth",
                 "--aesthetic-clip", tmp_path / "clip", "--num-inference-steps", 3, "--mitigation-generations", 2,
                 "--batch-size", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert (report["settings"]["n_memorized"], report["settings"]["n_normal"]) == (3, 2)
    none = report["mitigation"][0]
    assert (none["prompts"], none["measured"]) == (3, 2)  # the RV prompt's images were not fetched
    mb = none["membench"]
    assert 0 <= mb["sscd_above_half"] <= 1 and mb["top3_sscd"] <= mb["max_sscd"] + 1e-9
    assert any("1 template-verbatim (TV) prompts" in n for n in report["notes"])
    predictor = load_aesthetic(tmp_path / "aesthetic.pth", tmp_path / "clip", "cpu")
    folder = out / "mitigation" / "none"
    expected = np.mean([float(aesthetic_scores(predictor, [folder / n for n in r["images"]]).mean())
                        for r in read_results(folder / "results.jsonl")])
    assert mb["aesthetic_score"] == pytest.approx(expected, abs=1e-4)
    assert "### MemBench metrics" in (out / "report.md").read_text()


def test_a_template_verbatim_counts_as_a_copy_by_its_mask(tmp_path: Path) -> None:
    from diffmem.runs.reproduce import PaperMeasures

    rng = np.random.default_rng(3)
    template = rng.random((64, 64, 3)).astype(np.float32)
    mask = np.zeros((64, 64, 3), dtype=np.float32)
    mask[:, :32] = 1.0
    Image.fromarray((template * 255).round().astype(np.uint8)).save(tmp_path / "t.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "m.png")
    varied = template.copy()
    varied[:, 32:] = rng.random((64, 32, 3))
    measures = PaperMeasures(None, None, {}, templates={"tv": [(tmp_path / "t.png", tmp_path / "m.png")]})
    low = np.array([0.1, 0.1])  # SSCD alone sees no copy
    assert measures.copied("tv", [varied, rng.random((64, 64, 3))], low).tolist() == [True, False]
    assert measures.copied("mv", [varied, varied], np.array([0.6, 0.1])).tolist() == [True, False]
