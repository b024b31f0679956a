"""Screenshots of a report's index and first case page for the README (headless Chromium).

    .venv/bin/python bench/report_screenshots.py runs/demo/report   # writes docs/report_index.png, docs/report_case.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from playwright.sync_api import sync_playwright

    report = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "runs" / "demo" / "report").resolve()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs Debian's chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 860})
        page.goto((report / "index.html").as_uri())
        page.screenshot(path=str(ROOT / "docs" / "report_index.png"))
        page.locator("#body tr a").first.click()
        page.wait_for_load_state("load")
        page.screenshot(path=str(ROOT / "docs" / "report_case.png"))
        browser.close()
    for name in ("report_index.png", "report_case.png"):  # small files: 900 px wide, 8-bit palette
        im = Image.open(ROOT / "docs" / name).convert("RGB")
        im.thumbnail((900, 900))
        im.quantize(colors=128).save(ROOT / "docs" / name, optimize=True)
        print(ROOT / "docs" / name)


if __name__ == "__main__":
    main()
