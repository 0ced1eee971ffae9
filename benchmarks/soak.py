"""Load and soak test of `diffmem serve` on 127.0.0.1: many clients at the queue limit, slow and bad bodies.

    python benchmarks/soak.py                  # 10 minutes on a tiny random model (`make soak`)
    python benchmarks/soak.py --minutes 0.3 --json out.json

It starts `diffmem serve` as its own process (loopback, an access token from DIFFMEM_TOKEN), takes reference
answers one request at a time, then for the given time runs at once:

* `--clients` clients sending detect, explain and generate requests back to back, more than the model's queue
  holds, so the server works at its queue limit and refuses the rest with 503;
* slow clients that trickle a valid body a few bytes at a time (the server must not wait for them);
* a client sending bad requests: oversized (declared and chunked), malformed JSON, wrong types, unknown fields,
  non-UTF-8, over the prompt and batch limits, no token; each must get its documented status code;
* a prober asking /api/info twice a second: the server must keep answering it;
* a sampler reading the server's resident memory and open files.

Every answer is checked against the reference of its own prompts (nothing lost or mixed between requests).
It prints requests served and rejected, latency percentiles and memory, and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HOST = "127.0.0.1"
LIMITS = {"max_batch": 8, "max_prompt_chars": 300, "max_queue": 4}
BAD_REQUESTS: dict[str, int] = {  # name -> the status code the API documents for it
    "declared oversized body": 413,
    "chunked oversized body": 413,
    "malformed JSON": 422,
    "wrong type": 422,
    "unknown field": 422,
    "non-UTF-8 body": 422,
    "empty prompt list": 400,
    "prompt over the length limit": 413,
    "batch over the limit": 413,
    "no token": 401,
    "wrong token": 401,
    "unknown route": 404,
}


@dataclass
class Tally:
    """Everything the run observed."""

    served: Counter = field(default_factory=Counter)  # kind -> 2xx answers
    rejected: Counter = field(default_factory=Counter)  # status -> answers refusing a well-formed request
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # kind -> seconds (2xx)
    failures: list[str] = field(default_factory=list)  # lost, mixed or unexpected: each one fails the run
    bad: Counter = field(default_factory=Counter)  # bad-request name -> answered with its documented code
    info: list[float] = field(default_factory=list)  # /api/info latencies
    slow_done: int = 0
    slow_refused: int = 0
    """Slow clients' whole bodies answered 503 at the queue limit (an answer, not a hang)."""
    memory: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, RSS MiB)
    files: list[int] = field(default_factory=list)

    def fail(self, message: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(message)
        else:
            self.failures[-1] = f"... and more ({message})"


def prompts_pool(rng: random.Random, n: int) -> list[str]:
    """`n` distinct prompts in several scripts (so that a mixed-up answer shows)."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    things = ["cube", "ball", "cat", "house", "tree", "car", "猫", "кошка", "🐱 cat", "قطة"]
    pool: set[str] = set()
    while len(pool) < n:
        pool.add(f"a {rng.choice(colours)} {rng.choice(things)} number {rng.randrange(10_000)}")
    return sorted(pool)


# ------------------------------------------------------------------------------------------------ server

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tiny_model(folder: Path) -> Path:
    """The tiny random SD pipeline the tests use, saved as a diffusers folder."""
    from diffmem.models.loading import quiet_diffusers
    from diffmem.testbed.tiny import tiny_pipeline

    quiet_diffusers()
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


def start_server(model: str, port: int, token: str, log: Path) -> subprocess.Popen:
    """`diffmem serve` on 127.0.0.1:port with the soak's limits, its output into `log`."""
    args = [sys.executable, "-m", "diffmem.cli", "serve", "--model", model, "--host", HOST, "--port", str(port),
            "--max-batch", str(LIMITS["max_batch"]), "--max-prompt-chars", str(LIMITS["max_prompt_chars"]),
            "--max-queue", str(LIMITS["max_queue"]), "--generate-steps", "4", "--mitigate-iters", "2"]
    if model != "testbed":
        args += ["--threshold", "1.0"]
    env = {**os.environ, "DIFFMEM_TOKEN": token, "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc; NaN elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# ---------------------------------------------------------------------------------------------- references

def references(client: httpx.Client, pool: list[str], explained: list[str], generated: list[str]) -> dict:
    """Each prompt's answer asked alone, one request at a time: what every answer under load must equal."""
    ref: dict[str, dict] = {"detect": {}, "explain": {}, "generate": {}}
    for prompt in pool:
        row = client.post("/api/detect", json={"prompts": [prompt]}).raise_for_status().json()["results"][0]
        ref["detect"][prompt] = row["score"]
    for prompt in explained:
        ref["explain"][prompt] = client.post("/api/explain", json={"prompt": prompt, "suggest": False}) \
            .raise_for_status().json()["score"]
    for prompt in generated:
        body = client.post("/api/generate", json={"prompt": prompt}).raise_for_status().json()
        ref["generate"][prompt] = hashlib.sha256(body["plain_png"].encode()).hexdigest()
    return ref


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 1e-4 * max(abs(a), abs(b)) + 1e-6


def verify(kind: str, sent: Any, body: dict, ref: dict, tally: Tally) -> None:
    """Check one 200 answer against the references of the prompts that request sent."""
    if kind == "detect":
        got = [r["prompt"] for r in body["results"]]
        if got != sent:
            tally.fail(f"detect answered {got!r} to {sent!r}")
            return
        for row in body["results"]:
            if not close(row["score"], ref["detect"][row["prompt"]]):
                tally.fail(f"detect score {row['score']} for {row['prompt']!r}, alone {ref['detect'][row['prompt']]}")
    elif kind == "explain":
        if body["prompt"] != sent or not close(body["score"], ref["explain"][sent]):
            tally.fail(f"explain answered {body['prompt']!r} ({body['score']}) to {sent!r}")
    else:
        digest = hashlib.sha256(body["plain_png"].encode()).hexdigest()
        if body["prompt"] != sent or digest != ref["generate"][sent]:
            tally.fail(f"generate answered {body['prompt']!r} (image {digest[:8]}) to {sent!r}")


# ------------------------------------------------------------------------------------------------- clients

async def busy_client(client: httpx.AsyncClient, rng: random.Random, pool: list[str], ref: dict, tally: Tally,
                      until: float) -> None:
    """Send detect (60%), explain (20%) and generate (20%) requests back to back; a 503 waits briefly."""
    while time.monotonic() < until:
        roll = rng.random()
        if roll < 0.6:
            kind, sent = "detect", rng.sample(pool, rng.randint(1, LIMITS["max_batch"]))
            path, payload = "/api/detect", {"prompts": sent}
        elif roll < 0.8:
            kind, sent = "explain", rng.choice(list(ref["explain"]))
            path, payload = "/api/explain", {"prompt": sent, "suggest": False}
        else:
            kind, sent = "generate", rng.choice(list(ref["generate"]))
            path, payload = "/api/generate", {"prompt": sent}
        began = time.monotonic()
        try:
            response = await client.post(path, json=payload)
        except httpx.HTTPError as exc:
            tally.fail(f"{kind} lost: {type(exc).__name__}: {exc}")
            continue
        took = time.monotonic() - began
        if response.status_code == 200:
            tally.served[kind] += 1
            tally.latency[kind].append(took)
            verify(kind, sent, response.json(), ref, tally)
        elif response.status_code == 503 and "retry-after" in response.headers:
            tally.rejected[503] += 1
            await asyncio.sleep(rng.uniform(0.05, 0.3))
        else:
            tally.fail(f"{kind} got {response.status_code}: {response.text[:200]}")


async def slow_client(port: int, token: str, rng: random.Random, pool: list[str], ref: dict, tally: Tally,
                      until: float) -> None:
    """Trickle a valid detect body a few bytes at a time over its own connection, then check the answer."""
    while time.monotonic() < until:
        sent = [rng.choice(pool)]
        body = json.dumps({"prompts": sent}).encode()
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            head = (f"POST /api/detect HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {token}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode())
            for i in range(0, len(body), 4):
                writer.write(body[i : i + 4])
                await writer.drain()
                await asyncio.sleep(rng.uniform(0.05, 0.4))
            answer = await reader.read()
            writer.close()
        except OSError as exc:
            tally.fail(f"slow client lost: {exc}")
            continue
        status = int(answer.split(b" ", 2)[1])
        if status == 200:
            tally.slow_done += 1
            verify("detect", sent, json.loads(answer.split(b"\r\n\r\n", 1)[1]), ref, tally)
        elif status == 503:
            tally.rejected[503] += 1
            tally.slow_refused += 1
        else:
            tally.fail(f"slow client got {status}")


async def _chunks(n: int) -> AsyncIterator[bytes]:
    """A body sent in chunks with no declared length (Transfer-Encoding: chunked)."""
    for _ in range(n):
        yield b"x" * 65536


def bad_request(name: str, limit: int) -> tuple[str, dict[str, Any]]:
    """The path and httpx arguments of one bad request."""
    big = "a" * (LIMITS["max_prompt_chars"] + 1)
    return {
        "declared oversized body": ("/api/detect", {"content": b"x" * (limit + 1)}),
        "chunked oversized body": ("/api/detect", {"content": _chunks(limit // 65536 + 2)}),
        "malformed JSON": ("/api/detect", {"content": b'{"prompts": ["a cat"', "headers": {"content-type":
                                                                                           "application/json"}}),
        "wrong type": ("/api/detect", {"json": {"prompts": "a cat"}}),
        "unknown field": ("/api/generate", {"json": {"prompt": "a cat", "out": "/tmp/x.png"}}),
        "non-UTF-8 body": ("/api/detect", {"content": b'{"prompts": ["\xff\xfe"]}',
                                           "headers": {"content-type": "application/json"}}),
        "empty prompt list": ("/api/detect", {"json": {"prompts": []}}),
        "prompt over the length limit": ("/api/explain", {"json": {"prompt": big}}),
        "batch over the limit": ("/api/detect", {"json": {"prompts": ["a cat"] * (LIMITS["max_batch"] + 1)}}),
        "no token": ("/api/detect", {"json": {"prompts": ["a cat"]}, "headers": {"authorization": ""}}),
        "wrong token": ("/api/detect", {"json": {"prompts": ["a cat"]}, "headers": {"authorization": "Bearer nope"}}),
        "unknown route": ("/api/nothing", {"json": {}}),
    }[name]


async def bad_client(client: httpx.AsyncClient, rng: random.Random, limit: int, tally: Tally, until: float) -> None:
    """Send the bad requests in a seeded random order, each answered with its documented status code."""
    names = list(BAD_REQUESTS)
    while time.monotonic() < until:
        name = rng.choice(names)
        path, kwargs = bad_request(name, limit)
        try:
            response = await client.post(path, **kwargs)
        except httpx.HTTPError as exc:
            tally.fail(f"{name}: lost ({type(exc).__name__})")
            continue
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code == BAD_REQUESTS[name] and isinstance(body.get("error"), str):
            tally.bad[name] += 1
        else:
            tally.fail(f"{name}: {response.status_code} {response.text[:120]}")
        await asyncio.sleep(rng.uniform(0.05, 0.2))


async def prober(client: httpx.AsyncClient, tally: Tally, until: float) -> None:
    """GET /api/info twice a second: it must answer, and fast, however busy the model is."""
    while time.monotonic() < until:
        began = time.monotonic()
        try:
            response = await client.get("/api/info", timeout=10)
            if response.status_code != 200:
                tally.fail(f"/api/info got {response.status_code}")
            tally.info.append(time.monotonic() - began)
        except httpx.HTTPError as exc:
            tally.fail(f"/api/info lost: {type(exc).__name__}")
        await asyncio.sleep(0.5)


async def sampler(pid: int, tally: Tally, began: float, until: float) -> None:
    while time.monotonic() < until:
        tally.memory.append((time.monotonic() - began, rss_mib(pid)))
        tally.files.append(open_files(pid))
        await asyncio.sleep(1.0)


async def load(url: str, port: int, token: str, pid: int, seconds: float, clients: int, slow: int, seed: int,
               pool: list[str], ref: dict, limit: int) -> Tally:
    tally = Tally()
    began = time.monotonic()
    until = began + seconds
    headers = {"authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
        tasks = [busy_client(client, random.Random(seed * 1000 + i), pool, ref, tally, until) for i in range(clients)]
        tasks += [slow_client(port, token, random.Random(seed * 1000 + 500 + i), pool, ref, tally, until)
                  for i in range(slow)]
        tasks += [bad_client(client, random.Random(seed * 1000 + 900), limit, tally, until),
                  prober(client, tally, until), sampler(pid, tally, began, until + 1)]
        await asyncio.gather(*tasks)
    return tally


# ------------------------------------------------------------------------------------------------- report

def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p = np.percentile(np.array(values) * 1000, [50, 95, 99])
    return {"p50_ms": round(float(p[0]), 1), "p95_ms": round(float(p[1]), 1), "p99_ms": round(float(p[2]), 1),
            "max_ms": round(max(values) * 1000, 1)}


def summary(tally: Tally, seconds: float, server_log: str, token: str, max_growth_mib: float) -> dict[str, Any]:
    """The figures and the verdict of a run."""
    rss = [m for _, m in tally.memory]
    settle = max(1, len(rss) // 5)  # after the first fifth: thread pools and caches have grown to their size
    growth = float(max(rss[settle:]) - rss[settle]) if len(rss) > settle else 0.0
    failures = list(tally.failures)
    if "Traceback" in server_log:
        failures.append("the server log holds a traceback")
    if token in server_log:
        failures.append("the server log holds the access token")
    if growth > max_growth_mib:
        failures.append(f"memory grew {growth:.0f} MiB after settling (limit {max_growth_mib:g})")
    missing = [name for name in BAD_REQUESTS if not tally.bad[name]]
    if missing:
        failures.append(f"bad requests never answered as documented: {', '.join(missing)}")
    if not tally.rejected[503]:
        failures.append("the queue limit was never reached (no 503): more --clients")
    if not tally.slow_done + tally.slow_refused:  # on a saturated machine a whole slow body may meet a full queue
        failures.append("no slow client was answered")
    served = sum(tally.served.values()) + tally.slow_done
    return {
        "seconds": round(seconds, 1),
        "served": served,
        "served_by_kind": dict(tally.served) | {"slow detect": tally.slow_done},
        "slow_answered": tally.slow_done + tally.slow_refused,
        "rejected": {str(k): v for k, v in tally.rejected.items()},
        "bad_requests_answered_as_documented": sum(tally.bad.values()),
        "throughput_per_s": round(served / seconds, 2),
        "latency": {kind: percentiles(v) for kind, v in tally.latency.items()}
        | {"all": percentiles([x for v in tally.latency.values() for x in v])},
        "info": {"answered": len(tally.info)} | percentiles(tally.info),
        "memory_mib": {"start": round(rss[0], 1) if rss else None, "settled": round(rss[settle], 1) if rss else None,
                       "end": round(rss[-1], 1) if rss else None, "max": round(max(rss), 1) if rss else None,
                       "growth_after_settling": round(growth, 1)},
        "open_files": {"start": tally.files[0] if tally.files else None,
                       "end": tally.files[-1] if tally.files else None},
        "failures": failures,
        "ok": not failures,
    }


def print_summary(report: dict[str, Any]) -> None:
    lat, mem, info = report["latency"]["all"], report["memory_mib"], report["info"]
    print(f"soak: {report['seconds']} s, served {report['served']} ({report['served_by_kind']}), "
          f"rejected {report['rejected']}, bad requests answered as documented "
          f"{report['bad_requests_answered_as_documented']}")
    print(f"latency (served): p50 {lat.get('p50_ms')} ms, p95 {lat.get('p95_ms')} ms, p99 {lat.get('p99_ms')} ms; "
          f"/api/info answered {info['answered']} times, p99 {info.get('p99_ms')} ms, max {info.get('max_ms')} ms")
    for kind, values in report["latency"].items():
        if kind != "all":
            print(f"  {kind}: {values}")
    print(f"memory (RSS MiB): start {mem['start']}, settled {mem['settled']}, end {mem['end']}, max {mem['max']} "
          f"(growth after settling {mem['growth_after_settling']}); open files {report['open_files']}")
    print("verdict: ok" if report["ok"] else "verdict: FAILED\n  " + "\n  ".join(report["failures"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="Length of the load phase.")
    parser.add_argument("--model", default=None, help="Model folder or 'testbed' (default: a tiny random model).")
    parser.add_argument("--clients", type=int, default=12, help="Clients sending requests back to back.")
    parser.add_argument("--slow", type=int, default=3, help="Clients trickling their bodies.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every random choice of the clients.")
    parser.add_argument("--max-growth", type=float, default=64.0, help="MiB the server may grow after settling.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the report to this JSON file.")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    token = secrets.token_urlsafe(24)
    port = free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory(prefix="diffmem-soak-") as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "model"))
        log = Path(tmp) / "server.log"
        server = start_server(model, port, token, log)
        try:
            with httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=300) as client:
                deadline = time.monotonic() + 600
                while True:
                    if server.poll() is not None:
                        raise SystemExit(f"the server ended: {log.read_text()[-2000:]}")
                    try:
                        info = client.get("/api/info").raise_for_status().json()
                        break
                    except httpx.HTTPError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
                limit = 6 * info["limits"]["max_prompt_chars"] * info["limits"]["max_batch"] + 65536
                pool = prompts_pool(rng, 40)
                ref = references(client, pool, pool[:8], pool[8:12])
            seconds = args.minutes * 60
            print(f"serving {url} (pid {server.pid}); {args.clients} clients, {args.slow} slow, for {seconds:.0f} s")
            tally = asyncio.run(load(url, port, token, server.pid, seconds, args.clients, args.slow, args.seed, pool,
                                     ref, limit))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        report = summary(tally, seconds, log.read_text(errors="replace"), token, args.max_growth)
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
