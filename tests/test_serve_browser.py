"""The web page in headless Chromium (Debian's `chromium`, driven by Playwright): upload an
image, click a shape and see its mask overlaid, describe it and see the caption, segment
everything and see every region labelled."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from serve_support import png_bytes, scene

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--headless", "--no-sandbox"]
        )
        yield browser
        browser.close()


def pixel(page, x: int, y: int) -> list[int]:
    return page.evaluate(
        "([x, y]) => Array.from(document.getElementById('canvas').getContext('2d')"
        ".getImageData(x, y, 1, 1).data)",
        [x, y],
    )


def test_upload_click_overlay_describe_and_segment_everything(serve_app, browser, tmp_path):
    s = scene(seed=5)
    path = tmp_path / "scene.png"
    path.write_bytes(png_bytes(s.image))
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(serve_app.url + "/")
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('everything').disabled === false")
    canvas = page.locator("#canvas")
    scale = page.evaluate("document.getElementById('canvas').width") / s.image.shape[1]

    # Click the middle of the first shape: one mask comes back and tints it.
    ys, xs = np.nonzero(s.masks[0])
    k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    x, y = (xs[k] + 0.5) * scale, (ys[k] + 0.5) * scale
    before = pixel(page, int(x), int(y))
    box = canvas.bounding_box()
    shown = box["width"] / page.evaluate("document.getElementById('canvas').width")
    page.mouse.click(box["x"] + x * shown, box["y"] + y * shown)
    page.wait_for_function("document.getElementById('canvas').dataset.masks === '1'")
    after = pixel(page, int(x), int(y))
    assert after != before, "the mask overlay tints the clicked shape"
    assert "mask(s) from a point" in page.inner_text("#status")

    # Describe it: the caption streams in, partial text before the final answer.
    record = """(id) => { window.__seen = []; new MutationObserver(() => window.__seen.push(
        document.getElementById(id).textContent)).observe(document.getElementById(id),
        {childList: true, subtree: true, characterData: true}); }"""
    page.evaluate(record, "caption")
    page.click("#describe")
    page.wait_for_function("document.getElementById('caption').dataset.done === '1'")
    caption = page.inner_text("#caption")
    assert "Region 1" in caption and "category:" in caption and "caption:" in caption
    final = page.evaluate("document.getElementById('caption').textContent")
    head = final[: final.index("caption: ") + len("caption: ")]
    growing = [
        t for t in page.evaluate("window.__seen")
        if t not in (head, final) and t.startswith(head) and final.startswith(t)
    ]  # fmt: skip
    assert final != head and growing, "caption text arrives in pieces before the whole answer"

    # Chat about it: the answer streams in too.
    page.evaluate(record, "chat")
    page.fill("#question", "What is <region1>?")
    page.click("#ask")
    page.wait_for_function("document.querySelector('#chat div') && "
                           "document.querySelector('#chat div').dataset.done === '1'")  # fmt: skip
    answer = page.evaluate("document.querySelector('#chat .answer').textContent")
    seen = [t for t in page.evaluate("window.__seen") if "You: What is <region1>?" in t]
    pieces = {t.split("\n", 1)[1] for t in seen if "\n" in t} - {"", answer}
    assert answer and any(answer.startswith(p) for p in pieces), (answer, pieces)

    # Segment everything: all masks, each listed with its label.
    page.click("#everything")
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('labelled')", timeout=120_000
    )
    count = int(page.evaluate("document.getElementById('canvas').dataset.masks"))
    assert count >= 2
    items = page.locator("#regions li")
    assert items.count() == count
    assert not errors, errors
    page.close()
