"""`diffmem reproduce`: end to end on the testbed with tiny settings (a complete report, consistent numbers, resume),
on a tiny SD pipeline with SSCD, CLIP and fetched reference images, and one-line errors."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmem.io.results import read_results

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
]

METHODS = ["none", "embedding", "rta", "rna", "cwr", "gni"]
TINY = ["--num-inference-steps", 3, "--mitigation-generations", 2, "--iters", 1, "--batch-size", 4,
        "--device", "cpu"]


@pytest.fixture(scope="module")
def testbed_prompts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three planted (memorized) testbed captions and three held-out ones."""
    from diffmem.runs.reproduce import testbed_splits

    splits = testbed_splits()
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "mem.jsonl").write_text("".join(json.dumps({"prompt": i.caption}) + "\n" for i in splits.planted[:3]))
    (folder / "normal.txt").write_text("".join(i.caption + "\n" for i in splits.heldout[:3]))
    return folder / "mem.jsonl", folder / "normal.txt"


def ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def test_testbed_end_to_end_then_resume(testbed_prompts: tuple[Path, Path], tmp_path: Path, cli: Callable) -> None:
    mem, normal = testbed_prompts
    out = tmp_path / "report"
    args = ["reproduce", "--model", "testbed", "--memorized", mem, "--normal", normal, "--out", out,
            "--generations", "1,2", "--steps", "first,2,all", *TINY]
    first = cli(*args)
    ok(first)
    report = json.loads((out / "report.json").read_text())
    assert [(r["generations"], r["steps"]) for r in report["detection"]] == [
        (n, s) for n in (1, 2) for s in ("first", "2", "all")]
    for row in report["detection"]:
        assert 0 <= row["auc"] <= 1 and 0 <= row["tpr_at_1fpr"] <= row["tpr_at_3fpr"] <= 1
        assert (row["n_pos"], row["n_neg"]) == (3, 3) and row["seconds_per_prompt"] > 0
        assert Path(row["plot"]).is_file()
    assert [r["method"] for r in report["mitigation"]] == METHODS
    for row in report["mitigation"]:
        assert (row["prompts"], row["measured"]) == (3, 3)
        assert 0 <= row["memorization_rate"] <= row["any_copy_rate"] <= 1 and -1 <= row["mean_similarity"] <= 1
        assert row["seconds_per_prompt"] > 0
    for method in METHODS:
        names = sorted(p.name for p in (out / "mitigation" / method / "images").iterdir())
        assert names == [f"{i}_{g}.png" for i in range(3) for g in range(2)]
    # the embedding target is the median first-step score (n=2) of the non-memorized prompts
    normal_first = [r["score"] for r in read_results(out / "detection" / "n2_steps-first_normal.jsonl")]
    embedding = report["mitigation"][1]
    assert embedding["target_loss"] == pytest.approx(statistics.median(normal_first), rel=1e-12)
    # the plain generations' first-step scores, read off the pipeline's own CFG batch, are the detector's
    detected = {r["prompt"]: r["score"] for r in read_results(out / "detection" / "n2_steps-first_memorized.jsonl")}
    for row in read_results(out / "mitigation" / "none" / "results.jsonl"):
        assert row["score"] == pytest.approx(detected[row["prompt"]], rel=1e-4)
    text = (out / "report.md").read_text()
    assert "| 2 | all |" in text and "| embedding (target loss" in text and "testbed copy similarity" in text
    assert "roc_n1_steps-first.png" in text

    # interrupted runs: one detection row and one generated prompt missing
    for path in (out / "detection" / "n1_steps-all_normal.jsonl", out / "mitigation" / "rta" / "results.jsonl"):
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:-1]))
    again = cli(*args)
    ok(again)
    assert "n=1, steps all: scored 1 prompts, 5 were already scored" in again.stderr
    assert "n=2, steps all: scored 0 prompts" in again.stderr and "resuming" in again.stderr
    resumed = json.loads((out / "report.json").read_text())
    key = ("auc", "tpr_at_1fpr", "tpr_at_3fpr", "threshold")
    assert [[r[k] for k in key] for r in resumed["detection"]] == [[r[k] for k in key] for r in report["detection"]]
    assert [r["memorization_rate"] for r in resumed["mitigation"]] == [
        r["memorization_rate"] for r in report["mitigation"]]
    done = cli(*args)  # nothing left: the model is not even loaded
    ok(done)
    assert "loading testbed" not in done.stderr


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--steps", "first,9"], "--steps 9 must be between 1 and num_inference_steps (3)"),
    (["--methods", "none,paraphrase"], "--methods: unknown paraphrase"),
    (["--generations", "1,x"], "--generations takes comma-separated whole numbers"),
    (["--sscd-preprocessing", "imagenet"], "SSCD preprocessing must be one of sscd, wen"),
])
def test_bad_settings_are_one_line_errors(extra: list[str], fragment: str, testbed_prompts: tuple[Path, Path],
                                          tmp_path: Path, cli: Callable) -> None:
    mem, normal = testbed_prompts
    result = cli("reproduce", "--model", "testbed", "--memorized", mem, "--normal", normal, "--out", tmp_path / "r",
                 *TINY, "--steps", "first", *extra)  # the last --steps counts
    assert result.exit_code == 2 and "Traceback" not in result.output
    last = result.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error:") and fragment in last[0], result.stderr


def test_memorized_prompts_must_be_planted_on_the_testbed(testbed_prompts: tuple[Path, Path], tmp_path: Path,
                                                          cli: Callable) -> None:
    _, normal = testbed_prompts
    other = tmp_path / "mem.txt"
    other.write_text("a purple elephant playing chess\n")
    result = cli("reproduce", "--model", "testbed", "--memorized", other, "--normal", normal, "--out",
                 tmp_path / "r", "--steps", "first", *TINY)
    assert result.exit_code == 2 and "not planted testbed captions" in result.stderr.strip().splitlines()[-1]


def test_real_model_path_with_sscd_clip_and_references(sd1_dir: Path, sd1_pipe, tmp_path: Path,
                                                      cli: Callable) -> None:
    from diffmem.measures.images import clip_score, load_clip, load_sscd, sscd_similarity
    from diffmem.testbed.tiny import save_tiny_clip, save_tiny_sscd

    prompts = ["a red cube on a wooden table", "portrait of a smiling old man, oil painting"]
    (tmp_path / "mem.jsonl").write_text("".join(json.dumps({"caption": p, "url": f"http://x/{i}.png"}) + "\n"
                                                for i, p in enumerate(prompts)))
    (tmp_path / "normal.txt").write_text("a blue ball\na bowl of soup\n")
    refs = tmp_path / "refs"  # what `diffmem fetch-references` leaves: images and manifest.jsonl
    refs.mkdir()
    rng = np.random.default_rng(0)
    manifest = []
    for i, p in enumerate(prompts[:1]):  # the second prompt's download "failed"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(refs / f"{i}.png")
        manifest.append(json.dumps({"url": f"http://x/{i}.png", "caption": p, "file": f"{i}.png"}) + "\n")
    (refs / "manifest.jsonl").write_text("".join(manifest))
    save_tiny_sscd(tmp_path / "sscd.torchscript.pt")
    save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "report"
    result = cli("reproduce", "--model", sd1_dir, "--memorized", tmp_path / "mem.jsonl", "--normal",
                 tmp_path / "normal.txt", "--out", out, "--generations", 1, "--steps", "first",
                 "--methods", "none,embedding", "--references", refs, "--sscd", tmp_path / "sscd.torchscript.pt",
                 "--clip", tmp_path / "clip", "--target-loss", 0, *TINY)
    ok(result)
    report = json.loads((out / "report.json").read_text())
    none = report["mitigation"][0]
    assert (none["prompts"], none["measured"]) == (2, 1)  # no reference image: no copy measure
    assert any("1 of 2 memorized prompts have no reference image" in n for n in report["notes"])
    sscd, clip = load_sscd(tmp_path / "sscd.torchscript.pt", "cpu"), load_clip(tmp_path / "clip", "cpu")
    rows = read_results(out / "mitigation" / "none" / "results.jsonl")
    images = {r["prompt"]: [out / "mitigation" / "none" / name for name in r["images"]] for r in rows}
    sims = sscd_similarity(sscd, images[prompts[0]], [refs / "0.png"])
    assert none["mean_similarity"] == pytest.approx(float(sims.mean()), abs=1e-5)
    scores = [float(clip_score(clip, images[p], [p] * 2).mean()) for p in prompts]
    assert none["alignment"] == pytest.approx(float(np.mean(scores)), abs=1e-5)
    assert report["mitigation"][1]["target_loss"] == 0.0
    text = (out / "report.md").read_text()
    assert "mean SSCD similarity (sscd preprocessing)" in text and "CLIP score" in text


def test_a_bad_sscd_file_fails_before_any_work(sd1_dir: Path, tmp_path: Path, cli: Callable) -> None:
    (tmp_path / "p.txt").write_text("a cat\n")
    result = cli("reproduce", "--model", sd1_dir, "--memorized", tmp_path / "p.txt", "--normal", tmp_path / "p.txt",
                 "--out", tmp_path / "r", "--sscd", tmp_path / "nope.pt", "--steps", "first", *TINY)
    assert result.exit_code == 2 and "SSCD model file not found" in result.stderr
    assert not (tmp_path / "r" / "detection").exists()
