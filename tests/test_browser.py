"""The report in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright for
Python, pointed at that executable — no browser is downloaded. Skips with its reason where either is
missing (.ci/run installs both). Screenshots go to the test's tmp folder for a person to look at."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium executable (apt-get install chromium; .ci/run does)")]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright; it is in the dev extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def built(trained_run, phantoms, tmp_path_factory):
    """A report on the labelled phantom manifest plus two unreadable files."""
    from medres.report import report

    bad = tmp_path_factory.mktemp("bad")
    (bad / "broken.dcm").write_bytes(b"\0" * 10)
    (bad / "empty.png").write_bytes(b"")
    out = tmp_path_factory.mktemp("browser_report")
    summary = report(trained_run / "model.safetensors", [phantoms, bad], out, layer="layer3", workers=0)
    return out, summary


class Page:
    """A page plus everything it logged and requested."""

    def __init__(self, browser, root: Path):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.outside: list[str] = []
        prefix = root.resolve().as_uri()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: None if r.url.startswith(prefix) else self.outside.append(r.url))

    def rows(self) -> list[str]:
        return self.page.locator("#body tr").evaluate_all("rs => rs.map(r => r.dataset.name)")

    def column(self, key: str) -> list[str]:
        idx = self.page.locator("#head th").evaluate_all(f"ths => ths.findIndex(t => t.dataset.key === {json.dumps(key)})")
        return self.page.locator("#body tr").evaluate_all(f"rs => rs.map(r => r.cells[{idx}] ? (r.cells[{idx}].dataset.v ?? r.cells[{idx}].textContent) : null)")


def _data(out: Path) -> dict:
    html = (out / "index.html").read_text()
    start = html.index('<script type="application/json" id=data>') + len('<script type="application/json" id=data>')
    return json.loads(html[start : html.index("</script>", start)])


def test_pages_load_offline_without_errors(browser, built, tmp_path):
    out, summary = built
    p = Page(browser, out)
    p.page.goto((out / "index.html").as_uri())
    assert p.page.locator("#count").text_content() == f"{summary['cases']} of {summary['cases']} cases shown"
    p.page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
    first = p.page.locator("#body tr a").first
    first.click()
    p.page.wait_for_load_state("load")
    p.page.screenshot(path=str(tmp_path / "case.png"), full_page=True)
    assert p.page.locator("#heat").evaluate("e => e.complete && e.naturalWidth > 0")  # the heat layer loaded
    assert p.errors == [] and p.outside == [], (p.errors, p.outside)
    assert (tmp_path / "index.png").stat().st_size > 0 and (tmp_path / "case.png").stat().st_size > 0


def test_sorting_and_filtering_change_the_visible_rows(browser, built):
    out, summary = built
    data = _data(out)
    p = Page(browser, out)
    p.page.goto((out / "index.html").as_uri())
    p.page.click("th[data-key=p1]")  # p(opacity), high first
    vals = [float(v) for v in p.column("p1") if v not in (None, "")]
    assert vals == sorted(vals, reverse=True) and len(vals) == summary["ok"]
    p.page.click("th[data-key=p1]")
    vals = [float(v) for v in p.column("p1") if v not in (None, "")]
    assert vals == sorted(vals)
    # predicted class
    p.page.select_option("#f-pred", "1")
    expected = {r["name"] for r in data["rows"] if r["status"] == "ok" and 1 in r["pred"]}
    assert set(p.rows()) == expected and all(v == "opacity" for v in p.column("pred"))
    p.page.select_option("#f-pred", "")
    # status: the two unreadable files, each with its code and message
    p.page.select_option("#f-status", "error")
    assert len(p.rows()) == summary["failed"] == 2
    texts = p.page.locator("#body tr td:last-child").all_text_contents()  # "CODE: [CODE] file: message"
    assert all(t.split(":")[0] in ("NOT_AN_IMAGE", "FILE_NOT_FOUND", "DECODE_FAILED", "INGEST_ERROR") and "[" in t for t in texts), texts
    p.page.select_option("#f-status", "")
    # false positives / negatives per class at the stored operating points
    for k, c in enumerate(data["classes"]):
        for kind in ("fp", "fn"):
            p.page.click(f"button[data-review='{kind}:{k}']")
            if kind == "fp":
                want = {r["name"] for r in data["rows"] if r["status"] == "ok" and r["pos"][k] == 1 and k not in r["truth"]}
            else:
                want = {r["name"] for r in data["rows"] if r["status"] == "ok" and r["pos"][k] == 0 and k in r["truth"]}
            assert set(p.rows()) == want, (c, kind)
            p.page.click(f"button[data-review='{kind}:{k}']")  # toggles off
    assert len(p.rows()) == summary["cases"]
    assert p.errors == [] and p.outside == []


def test_case_page_slider_maps_and_keyboard_follow_the_index_order(browser, built, tmp_path):
    out, _ = built
    p = Page(browser, out)
    p.page.goto((out / "index.html").as_uri())
    p.page.click("th[data-key=p0]")  # p(normal), high first: an order unlike the input order
    order = [n for n in p.rows()]
    ok = [n for n in order if (out / "cases" / f"{n}.html").exists()]
    p.page.locator(f"#body tr[data-name='{ok[0]}'] a").click()
    p.page.wait_for_url(f"**/{ok[0]}.html")
    assert p.page.locator("#heat").evaluate("e => getComputedStyle(e).opacity") == "0.7"
    p.page.locator("#opacity").fill("0.25")
    assert p.page.locator("#heat").evaluate("e => getComputedStyle(e).opacity") == "0.25"
    p.page.locator("#contrast").fill("2")
    assert "contrast(2)" in p.page.locator("#base").evaluate("e => e.style.filter")
    buttons = p.page.locator(".mapbar button")
    assert buttons.count() == 3  # one map per class, the explained one first
    buttons.nth(1).click()
    k = buttons.nth(1).get_attribute("data-k")
    assert p.page.locator("#heat").get_attribute("src").endswith(f"_heat_{k}.png")
    assert p.page.locator("#heat").evaluate("e => e.complete && e.naturalWidth > 0")
    p.page.screenshot(path=str(tmp_path / "case_controls.png"))
    p.page.evaluate("document.activeElement.blur()")  # arrows in a focused slider move the slider, not the page
    p.page.keyboard.press("ArrowRight")
    p.page.wait_for_url(f"**/{ok[1]}.html")
    p.page.keyboard.press("ArrowLeft")
    p.page.wait_for_url(f"**/{ok[0]}.html")
    p.page.keyboard.press("Escape")
    p.page.wait_for_url("**/index.html")
    assert p.rows()[:3] == order[:3]  # the index comes back with its sort
    assert p.errors == [] and p.outside == []


def test_print_stylesheet_hides_the_controls(browser, built):
    out, _ = built
    p = Page(browser, out)
    page = next((out / "cases").glob("case-*.html"))
    p.page.goto(page.as_uri())
    p.page.emulate_media(media="print")
    assert p.page.locator(".controls").evaluate("e => getComputedStyle(e).display") == "none"
    assert p.page.locator(".case").evaluate("e => getComputedStyle(e).breakAfter") == "page"
    pdf = p.page.pdf()
    assert pdf[:4] == b"%PDF"


def test_a_5000_case_index_stays_paged(browser, tmp_path):
    """5,000 cases: the page holds one page of rows (100), so it renders in about the same time as a
    small report; the time is printed (and written to render.json), not asserted."""
    from medres.model import ModelMeta
    from medres.report import Case, _index_html

    meta = ModelMeta(classes=["normal", "pneumonia", "covid"], task="multiclass", preprocess={}, mean=[0.5], std=[0.25])
    cases = []
    for i in range(5000):
        c = Case(i, f"study_{i:05d}.dcm", "", truth=[i % 3])
        if i % 97 == 0:
            c.status, c.error = "error", f"[NOT_AN_IMAGE] study_{i:05d}.dcm: not an image"
        else:
            p = [((i * 7) % 10) / 10, ((i * 3) % 10) / 10, 0.05]
            c.probs = [v / sum(p) for v in p]
            c.positive = [int(v >= 0.4) for v in c.probs]
            c.predicted = [max(range(3), key=lambda k: c.probs[k])]
        cases.append(c)
    (tmp_path / "index.html").write_text(_index_html(cases, meta, [0.4, 0.4, 0.4], "gradcam", "layer4", "shared", {}, False))
    (tmp_path / "cases").mkdir()
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buf, format="PNG")
    for c in cases:  # the thumbnails the rows point at
        (tmp_path / "cases" / f"{c.name}_thumb.png").write_bytes(buf.getvalue())
    p = Page(browser, tmp_path)
    t0 = time.perf_counter()
    p.page.goto((tmp_path / "index.html").as_uri())
    p.page.wait_for_selector("#body tr")
    seconds = time.perf_counter() - t0
    p.page.click("th[data-key=p2]")
    sort_seconds = time.perf_counter() - t0 - seconds
    (tmp_path / "render.json").write_text(json.dumps({"cases": 5000, "first_render_s": seconds, "sort_s": sort_seconds}))
    print(f"5,000-case index: first render {seconds:.2f} s, sort {sort_seconds:.2f} s")
    assert p.page.locator("#body tr").count() == 100
    assert p.page.locator("#count").text_content() == "5000 of 5000 cases shown"
    p.page.locator("#pager-top button").nth(1).click()
    assert p.page.locator("#body tr").count() == 100 and "page 2 of 50" in p.page.locator("#pager-top").text_content()
    p.page.select_option("#f-status", "error")
    assert p.page.locator("#body tr").count() == len(range(0, 5000, 97))
    assert p.errors == []
