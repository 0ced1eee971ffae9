"""`diffmem serve`'s page in a real browser: Debian's Chromium driven by Playwright against the testbed app.

CI installs Chromium (`.ci/run`); without /usr/bin/chromium these tests are skipped, saying so. The page is
checked as a person uses it: type a prompt, press Screen or Generate, click a suggested edit. The last test
asserts that the page made no request outside this machine. A screenshot is saved to out/app.png.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "out" / "app.png"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's Chromium is not installed at /usr/bin/chromium (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def splits():
    """The testbed's ground truth (planted = memorized, heldout = never trained on)."""
    from diffmem.testbed.recipe import shipped_recipe

    return shipped_recipe().splits()


@pytest.fixture(scope="module")
def browser(app_server: str):
    """One Chromium page on the app at laptop size, recording every request that leaves 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    outside: list[str] = []
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = chromium.new_page(viewport={"width": 1366, "height": 768})
        page.set_default_timeout(30_000)
        local = (app_server, "data:", "blob:")
        page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
        page.goto(app_server)
        page.wait_for_selector("#prompt textarea")
        yield page, outside
        chromium.close()


def _screen(page, prompt: str) -> str:
    """Type `prompt`, press Screen, wait for its verdict; return the verdict (flagged, clear or error)."""
    page.fill("#prompt textarea", prompt)
    page.click("#screen-button")
    page.wait_for_function("p => document.querySelector('#verdict-box')?.dataset.prompt === p", arg=prompt)
    return page.get_attribute("#verdict-box", "data-verdict")


def test_page_says_where_the_threshold_comes_from(browser) -> None:
    page, _ = browser
    assert "calibrated at startup on 512 held-out testbed prompts at 1% FPR" in page.inner_text("#threshold-source")


def test_memorized_prompt_is_flagged_with_highlighted_words(browser, splits, memorized_prompt: str) -> None:
    page, _ = browser
    prompt = memorized_prompt
    verdict = _screen(page, prompt)
    words = page.locator("#words-box .diffmem-word")
    assert words.all_inner_texts() == prompt.split()
    styles = [words.nth(i).get_attribute("style") for i in range(words.count())]
    assert any("0.90)" in s for s in styles)  # the most significant word at full highlight
    assert page.locator("#curve-svg path").count() >= 1
    assert verdict == "flagged", page.inner_text("#verdict-box")


def test_heldout_prompt_is_not_flagged(browser, splits) -> None:
    page, _ = browser
    assert _screen(page, splits.heldout[0].caption) == "clear", page.inner_text("#verdict-box")
    assert "no edit is needed" in page.inner_text("#suggestions-note")
    assert not page.locator("#suggestion-0").is_visible()


def test_clicking_a_suggestion_updates_the_verdict(browser, splits, memorized_prompt: str) -> None:
    page, _ = browser
    prompt = memorized_prompt
    assert _screen(page, prompt) == "flagged", page.inner_text("#verdict-box")
    page.locator("#suggestion-0").click()
    page.wait_for_function("p => { const v = document.querySelector('#verdict-box')?.dataset.prompt;"
                           " return v && v !== p; }", arg=prompt)
    edited = page.get_attribute("#verdict-box", "data-prompt")
    assert page.input_value("#prompt textarea") == edited
    assert page.get_attribute("#verdict-box", "data-verdict") == "clear"


def test_generate_shows_two_images(browser, splits, memorized_prompt: str) -> None:
    page, _ = browser
    prompt = memorized_prompt
    page.fill("#prompt textarea", prompt)
    page.click("#generate-button")
    page.wait_for_function("p => document.querySelector('#images-box')?.dataset.prompt === p", arg=prompt)
    shown = page.locator("#images-box figure[data-image] img")
    names = [shown.nth(i).evaluate("e => e.closest('figure').dataset.image") for i in range(shown.count())]
    assert names[:2] == ["plain", "mitigated"]
    for i in range(2):
        assert shown.nth(i).evaluate("e => e.complete && e.naturalWidth") == 32
    assert names[2:] == ["training"]  # a planted caption on the testbed: its training image too
    assert page.inner_text("#images-box").count("copy similarity") == 2
    assert page.get_attribute("#verdict-box", "data-prompt") == prompt  # Generate screens the prompt too
    page.wait_for_timeout(500)  # let Gradio's loading fade end before the screenshot
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_errors_are_shown_on_the_page(browser) -> None:
    page, _ = browser
    page.fill("#prompt textarea", "   ")
    page.click("#screen-button")
    page.wait_for_selector("#verdict [data-verdict=error]")
    assert "the prompt is empty" in page.inner_text("#verdict")
    assert "Traceback" not in page.content()


def test_page_makes_no_outside_requests(browser) -> None:
    _, outside = browser
    assert outside == []
