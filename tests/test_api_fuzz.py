"""Fuzzing the JSON HTTP API of `diffmem serve` (hypothesis): whatever the body, headers or method, the answer is
never a 500, and every 4xx is JSON with one `error` line. `make test` runs the default profile's fixed budget
(tests/conftest.py); `make fuzz` the long one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffmem.app.service import Limits, Service, Settings, Threshold

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTES = ["/api/detect", "/api/explain", "/api/generate"]


@pytest.fixture(scope="module")
def client(sd1_pipe, sd1_dir) -> Iterator[Any]:
    """The API on the tiny pipeline behind the same gate as `diffmem serve` (Host `testserver` allowed), small
    limits so that valid requests stay cheap; server exceptions come back as responses, as a client sees them."""
    from fastapi.testclient import TestClient

    from diffmem.app.gate import allowed_hosts, guard
    from diffmem.app.server import create_api_app

    service = Service(sd1_pipe, str(sd1_dir), Threshold(1.0, "a test"), Settings(generate_steps=1, mitigate_iters=1),
                      Limits(max_prompt_chars=40, max_batch=3))
    app = create_api_app(service)
    guard(app, allowed_hosts(names=["testserver"]), max_upload=4096)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def check(response: Any) -> None:
    """Never a 500; a 4xx (or 503) is JSON with a one-line `error`; a 200 is JSON."""
    assert response.status_code < 500 or response.status_code == 503, (response.status_code, response.text[:300])
    body = response.json()
    if response.status_code >= 400:
        assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"]
        assert "Traceback" not in response.text


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=60))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                            st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                           max_leaves=20)
prompts = st.text(max_size=60)  # any code point, lone surrogates included
near_valid = st.one_of(
    st.fixed_dictionaries({"prompts": st.one_of(st.lists(prompts, max_size=5), json_values)},
                          optional={"curve": json_values, "extra": json_values}),
    st.fixed_dictionaries({"prompt": st.one_of(prompts, json_values)}, optional={"suggest": json_values}),
)


@given(route=st.sampled_from(ROUTES), body=st.one_of(json_values, near_valid))
def test_random_json_bodies(client: Any, route: str, body: Any) -> None:
    check(client.post(route, content=json.dumps(body), headers={"content-type": "application/json"}))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@given(route=st.sampled_from(ROUTES), raw=st.one_of(
    st.binary(max_size=200),  # invalid UTF-8 and anything else
    st.integers(min_value=1, max_value=100_000).map(_nested),  # deep nesting (past the recursion limit)
    st.integers(min_value=300, max_value=5000).map(lambda n: f'{{"prompt": {"9" * n}}}'),  # huge numbers
    st.sampled_from(['{"prompts": [NaN]}', '{"prompt": "\\ud800"}', '{"prompts": ["a"], "curve": Infinity}',
                     '{"prompt": "a", "prompt": 1}', "\ufeff{}", "null", '"' + "x" * 5000 + '"']),
))
def test_raw_bodies(client: Any, route: str, raw: str | bytes) -> None:
    check(client.post(route, content=raw, headers={"content-type": "application/json"}))


header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


@given(route=st.sampled_from([*ROUTES, "/api/info", "/api/nope", "/openapi.json"]),
       method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]),
       headers=st.dictionaries(st.sampled_from(["content-type", "origin", "referer", "host", "content-length",
                                                "sec-fetch-site", "transfer-encoding", "authorization", "x-odd"]),
                               header_values, max_size=4))
def test_odd_methods_and_headers(client: Any, route: str, method: str, headers: dict[str, str]) -> None:
    response = client.request(method, route, content=json.dumps({"prompts": ["a cat"]}), headers=headers)
    if method == "HEAD":
        assert response.status_code < 500
        return
    if route == "/openapi.json" and response.status_code == 200:
        return
    check(response)
