"""The README's screenshot of `pocketdiff serve`'s page: a live server with a shipped model, driven by Playwright
on Debian's chromium (prompts typed and generated as a user would). Writes docs/serve.png.

    python benchmarks/serve_screenshot.py [--model shapes-teacher]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a large blue heart in the center on a white background",
           "a small yellow circle at the top right on a black background",
           "a large red triangle at the bottom on a green background"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-teacher")
    ap.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from pocketdiff.models.registry import resolve_model
    from pocketdiff.pipeline import Pipeline
    from pocketdiff.serve.app import create_app
    from pocketdiff.serve.engine import Engine
    from pocketdiff.testing import LiveServer

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    app = create_app(Engine(Pipeline.from_folder(resolve_model(args.model)), args.model))
    with LiveServer(app) as live, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(live.url)
        page.wait_for_function(f"document.querySelector('#model').textContent.includes('{args.model}')")
        for i, prompt in enumerate(PROMPTS):
            page.fill("#prompt", prompt)
            page.fill("#n", "2")
            page.fill("#seed", str(10 * i))
            page.click("#go")
            page.wait_for_function(f"document.querySelectorAll('#gallery figure').length >= {2 * (i + 1)}",
                                   timeout=120_000)
        page.screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
