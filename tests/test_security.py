"""Security defaults: safetensors only (pickles refused unless trusted, and never run), pickle-free training
checkpoints, `serve` on loopback unless a token guards it (every route and the page, constant-time compare,
never logged), and output paths that come only from --out."""

from __future__ import annotations

import hmac
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from diffmem.errors import InputError, ModelLoadError
from diffmem.models.loading import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src" / "diffmem"
TOKEN = "t0k3n-For-The-Tests_0123456789"
UNET = Path("unet") / "diffusion_pytorch_model.safetensors"


class Payload:
    """An object whose unpickling touches a marker file: proof of code run by a loader."""

    marker: Path = Path("/nonexistent")

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _pickled_copy(model: Path, dest: Path, payload: Path | None = None) -> Path:
    """A copy of `model` whose UNet weights are pickled (`torch.save`); with `payload`, the pickle also holds an
    object that would create that file when unpickled."""
    shutil.copytree(model, dest)
    weights = dest / UNET
    state: dict = load_file(str(weights))
    if payload is not None:
        Payload.marker = payload
        state["evil"] = Payload()
    torch.save(state, weights.with_suffix(".bin"))
    weights.unlink()
    return dest


# --------------------------------------------------------------------------------------------- weights

def test_pickled_weights_are_refused_unless_trusted(sd1_dir: Path, sd1_pipe, tmp_path: Path) -> None:
    from diffmem.detectors.magnitude import MagnitudeDetector

    folder = _pickled_copy(sd1_dir, tmp_path / "m")
    with pytest.raises(ModelLoadError, match="pickled weights .*--allow-pickle .*allow_pickle=True") as info:
        load_pipeline(folder, device="cpu")
    assert "\n" not in str(info.value)
    trusted = load_pipeline(folder, device="cpu", allow_pickle=True)  # the same weights, read from the pickle
    ref = MagnitudeDetector(sd1_pipe).score(["a cat"])[0].score
    assert MagnitudeDetector(trusted).score(["a cat"])[0].score == pytest.approx(ref, rel=1e-6)


def test_a_malicious_pickle_never_runs(sd1_dir: Path, tmp_path: Path, cli) -> None:
    marker = tmp_path / "pwned"
    folder = _pickled_copy(sd1_dir, tmp_path / "m", payload=marker)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    refused = cli("detect", "--model", folder, "--prompts", prompts, "--out", tmp_path / "s.jsonl")
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr
    # even when trusted, the loaders unpickle with weights_only=True: the payload is rejected, not run
    trusted = cli("detect", "--model", folder, "--prompts", prompts, "--out", tmp_path / "s.jsonl", "--allow-pickle")
    assert trusted.exit_code == 2 and "Traceback" not in trusted.output
    assert not marker.exists()


def test_safetensors_beside_a_pickle_are_read_without_the_flag(sd1_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(sd1_dir, folder)
    Payload.marker = tmp_path / "pwned"
    torch.save({"evil": Payload()}, folder / UNET.with_suffix(".bin"))  # a stray pickle beside the safetensors
    load_pipeline(folder, device="cpu")
    assert not Payload.marker.exists()


def test_every_torch_load_in_diffmem_is_weights_only() -> None:
    calls = [(p, m.group(0)) for p in SRC.rglob("*.py") for m in re.finditer(r"torch\.load\([^)]*\)", p.read_text())]
    assert all("weights_only=True" in call for _, call in calls), calls


# ----------------------------------------------------------------------------------------- checkpoints

class Crash(Exception):
    """Stands for a kill: raised after a step ran, before its checkpoint."""


def _crash_at(step: int):
    def progress(done: int, record: dict) -> None:
        if done == step:
            raise Crash

    return progress


def _train(out: Path, steps: int = 3, crash_at: int | None = None) -> torch.nn.Module:
    """The tiny UNet trained for `steps` in `out`, resuming from its checkpoint (saved every step); with
    `crash_at`, stopped after that step ran, before its checkpoint."""
    from diffmem.testbed.tiny import tiny_pipeline
    from diffmem.training.loop import TrainConfig, train

    pipe = tiny_pipeline("sd1", seed=3)
    data = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def batch(step: int) -> tuple[torch.Tensor, list[str]]:
        idx = [(step * 2 + i) % 8 for i in range(2)]
        return data[idx], [f"caption {i}" for i in idx]

    cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=1, log_every=1)
    if crash_at is None:
        train(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batch, cfg, out)
    else:
        with pytest.raises(Crash):
            train(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, batch, cfg, out,
                  progress=_crash_at(crash_at))
    return pipe.unet


def test_checkpoints_hold_no_pickle_and_old_ones_still_resume(tmp_path: Path) -> None:
    from diffmem.training.loop import read_state

    straight = _train(tmp_path / "straight")
    _train(tmp_path / "new", crash_at=3)  # its checkpoint is at step 2
    ckpt = tmp_path / "new" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state.json", "state.safetensors", "unet.safetensors"]
    json.loads((ckpt / "state.json").read_text())  # plain JSON (the tensors are in state.safetensors)
    # an older checkpoint keeps its optimizer and schedule in a torch pickle: read with weights_only=True
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    old = tmp_path / "old" / "checkpoint"
    torch.save(read_state(old), old / "state.pt")
    (old / "state.json").unlink()
    (old / "state.safetensors").unlink()
    for resumed in (_train(tmp_path / "new"), _train(tmp_path / "old")):
        for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
            assert torch.equal(a, b)  # bit-identical


def test_a_malicious_old_checkpoint_is_refused_not_run(tmp_path: Path) -> None:
    from diffmem.training.loop import checkpoint_step

    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    Payload.marker = tmp_path / "pwned"
    torch.save({"step": 1, "evil": Payload()}, ckpt / "state.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint_step(tmp_path / "run")
    assert not Payload.marker.exists()


# --------------------------------------------------------------------------------------------- serve

def test_loopback_is_free_any_other_address_needs_a_token() -> None:
    from diffmem.app.auth import check_access, is_loopback

    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_access(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(InputError, match="needs an access token"):
            check_access(host, None)
        check_access(host, TOKEN)
    for bad in ("short", "has space in it 0123", "semi;colon-0123456789"):
        with pytest.raises(InputError):
            check_access("0.0.0.0", bad)


def test_the_token_comes_from_the_environment(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFMEM_TOKEN", "abc")  # too short: proves the variable is read, before anything loads
    result = cli("serve", "--host", "0.0.0.0", "--threshold", "1")
    assert result.exit_code == 2 and "at least 16 characters" in result.stderr


@pytest.fixture(scope="module")
def guarded(sd1_pipe, sd1_dir: Path) -> Iterator[str]:
    """The whole app (page and API) on the tiny model, guarded by TOKEN, on a free 127.0.0.1 port."""
    from diffmem.app.server import BackgroundServer, create_app
    from diffmem.app.service import Service, Settings, Threshold

    service = Service(sd1_pipe, str(sd1_dir), Threshold(1.0, "a test"), Settings(generate_steps=2, mitigate_iters=1))
    with BackgroundServer(create_app(service, token=TOKEN)) as server:
        yield server.url


ROUTES = [("GET", "/"), ("GET", "/config"), ("GET", "/openapi.json"), ("GET", "/api/info"),
          ("POST", "/api/detect"), ("POST", "/api/explain"), ("POST", "/api/generate"), ("GET", "/api/nope")]


@pytest.mark.parametrize("presented", [None, "Bearer wrong-token-of-the-same-len", "Basic " + TOKEN, "Bearer x"])
def test_every_route_and_the_page_need_the_token(guarded: str, presented: str | None) -> None:
    headers = {} if presented is None else {"Authorization": presented}
    with httpx.Client(base_url=guarded, headers=headers, timeout=60) as client:
        for method, path in ROUTES:
            response = client.request(method, path, json={"prompts": ["a cat"]} if method == "POST" else None)
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "token" in response.json()["error"] and TOKEN not in response.text


def test_the_token_opens_the_api_and_the_page(guarded: str, caplog: pytest.LogCaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr("diffmem.app.auth.hmac.compare_digest", spy)
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=guarded, timeout=60) as client:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        info = client.get("/api/info", headers=bearer)
        assert info.status_code == 200 and TOKEN not in info.text
        scored = client.post("/api/detect", json={"prompts": ["a cat"]}, headers=bearer)
        assert scored.status_code == 200 and scored.json()["results"][0]["prompt"] == "a cat"
        opened = client.get(f"/?token={TOKEN}&lang=en")  # a browser: redirected, the token moves to a cookie
        assert opened.status_code == 303 and opened.headers["location"] == "/?lang=en"
        assert "HttpOnly" in opened.headers["set-cookie"] and "SameSite=Strict" in opened.headers["set-cookie"]
        page = client.get("/")  # the cookie from the redirect
        assert page.status_code == 200 and "<html" in page.text.lower() and TOKEN not in page.text
        assert client.get("/config").status_code == 200
    assert compared and all(c == TOKEN.encode() for c in compared)  # every check went through compare_digest
    server_side = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert not any(TOKEN in line for line in server_side)  # (the test's own client logs the URL it asked for)


# ------------------------------------------------------------------------------------------ output paths

HOSTILE = ["../../escape", "/tmp/absolute.png", "images/../../x", "..\\..\\win", "a/b/c", "results.jsonl", "~/home"]


def test_output_paths_come_only_from_out(tmp_path: Path, sd1_dir: Path, cli, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "in" / "p.txt"
    prompts.parent.mkdir()
    prompts.write_text("\n".join(HOSTILE) + "\n")
    out = tmp_path / "deep" / "out"
    generated = cli("generate", "--model", sd1_dir, "--prompts", prompts, "--num-inference-steps", 2, "--out", out)
    assert generated.exit_code == 0
    assert cli("detect", "--model", sd1_dir, "--prompts", prompts, "--out", out / "s.jsonl").exit_code == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    images = [f"deep/out/images/{i}_0.png" for i in range(len(HOSTILE))]
    assert written == sorted(["in/p.txt", "deep/out/results.jsonl", "deep/out/s.jsonl", *images])


def test_request_bodies_name_no_file(guarded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=guarded, headers=bearer, timeout=120) as client:
        extra = client.post("/api/generate", json={"prompt": "a cat", "out": str(tmp_path / "x.png")})
        assert extra.status_code == 422 and "out" in extra.json()["error"]  # unknown fields are refused
        for prompt in HOSTILE[:3]:
            made = client.post("/api/generate", json={"prompt": prompt})
            assert made.status_code == 200 and made.json()["prompt"] == prompt
    assert list(tmp_path.iterdir()) == []  # images travel in the response, never to a file
