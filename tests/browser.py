"""Render a local HTML file in headless Debian Chromium through Playwright (no browser download)."""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def render(html_path: Path, screenshot: Path | None = None, sections: tuple[str, ...] = ()) -> dict:
    """Open the page; return console errors, page errors, every <img>'s natural and displayed size,
    the page's text, the text of each CSS selector in ``sections`` (None when absent), and how
    many pixels the page is wider than the window (0: no horizontal scrolling)."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(Path(html_path).resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => { const r = e.getBoundingClientRect(); return {alt: e.alt, "
                   "w: e.naturalWidth, h: e.naturalHeight, shown_w: r.width, shown_h: r.height, "
                   "visible: r.width > 0}; })")
        text = page.inner_text("body")
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        found = {sel: (page.inner_text(sel) if page.query_selector(sel) else None) for sel in sections}
        if screenshot:
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {"errors": errors, "images": images, "text": text, "sections": found, "h_overflow_px": overflow}


if __name__ == "__main__":  # python tests/browser.py runs/demo/report.html docs/demo_report.png
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python tests/browser.py REPORT.html SCREENSHOT.png")
    result = render(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{sys.argv[2]}: {len(result['images'])} images, errors: {result['errors'] or 'none'}")
    sys.exit(1 if result["errors"] else 0)
