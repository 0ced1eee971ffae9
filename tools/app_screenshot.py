"""Screenshot of `diffmem serve`'s page on the testbed at laptop width, for the README (docs/app.png).

Starts the app on a free 127.0.0.1 port, screens and generates a planted (memorized) testbed caption in
Debian's Chromium, and saves the full page. Rerun after retraining the testbed:
`python tools/app_screenshot.py docs/app.png`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    """Serve, drive the page, save the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/app.png"))
    parser.add_argument("--width", type=int, default=1366)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--first-screen", action="store_true", help="Only the first screen, not the whole page.")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from diffmem.app.server import BackgroundServer, build_service, create_app

    service = build_service("testbed", device="cpu")
    prompt = service.testbed_examples()[0]
    with BackgroundServer(create_app(service)) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.set_default_timeout(60_000)
        page.goto(server.url)
        page.fill("#prompt textarea", prompt)
        page.click("#generate-button")
        page.wait_for_function("p => document.querySelector('#images-box')?.dataset.prompt === p", arg=prompt)
        page.wait_for_timeout(1500)  # let Gradio's loading fade end
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=not args.first_screen)
        browser.close()
    print(f"wrote {args.out} (threshold {service.threshold.value:.4g} from {service.threshold.source})")


if __name__ == "__main__":
    main()
