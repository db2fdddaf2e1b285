"""The web page in a real browser: Playwright driving Debian's chromium types a prompt, clicks Generate and sees
the image appear; the test writes a screenshot (to $POCKETDIFF_SCREENSHOT when set, else the test's tmp folder)."""

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (.ci/run installs Debian's)")
def test_the_page_generates_an_image_in_a_browser(serve, tmp_path):
    from playwright.sync_api import sync_playwright

    live = serve()
    shot = Path(os.environ.get("POCKETDIFF_SCREENSHOT") or tmp_path / "serve-page.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 900, "height": 600})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(live.url)
        page.wait_for_function("document.querySelector('#model').textContent.includes('tiny')")
        page.fill("#prompt", "a small red star at the top left on a blue background")
        page.fill("#steps", "2")
        page.fill("#seed", "4")
        page.click("#go")
        page.wait_for_selector("#gallery figure img", timeout=30_000)
        width = page.eval_on_selector("#gallery figure img", "img => img.naturalWidth")
        caption = page.inner_text("#gallery figcaption")
        page.screenshot(path=str(shot))
        browser.close()
    assert width == 16 and "seed 4" in caption and "2 steps" in caption
    assert all(u.startswith(live.url) for u in requests)  # everything served locally: no CDN
    assert shot.stat().st_size > 1000
