#!/usr/bin/env python
"""Screenshot one scalar chart of a running TensorBoard with headless Chromium (Playwright).

Used by experiments/tensorboard_screenshot.sh, which starts TensorBoard on a run's
`tensorboard/` folder and calls this helper; it can also be pointed at any TensorBoard URL:

    python experiments/tensorboard_screenshot.py --url http://127.0.0.1:6006 \
        --out docs/images/tensorboard_scalars.png --tag '^val/brain_to_image_top1$'

Opens the Time Series dashboard, types --tag into the tag filter, waits until the matching
scalar chart has drawn its curve and saves a PNG of the viewport. Needs Playwright for
Python (`pip install playwright`, best in a separate venv) and a system Chromium
(`apt-get install chromium`); `playwright install` (a browser download) is not needed.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from typing import NoReturn

# Chromium flags for a headless, offline, root-run browser. With --disable-gpu Chromium
# still gives the page WebGL through SwiftShader (software), which the Time Series charts use.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:6006", help="TensorBoard base URL")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--tag", default="^val/brain_to_image_top1$",
                   help="tag filter (regex) typed into the Time Series filter box; the first "
                        "chart whose tag matches it is enlarged")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    p.add_argument("--smoothing", type=float, default=0.0,
                   help="scalar smoothing set in the settings pane (TensorBoard's default is 0.6)")
    p.add_argument("--chart-height", type=int, default=440, help="chart height in pixels")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--timeout", type=float, default=90.0,
                   help="seconds to wait for TensorBoard and for the chart")
    p.add_argument("--extra-arg", action="append", default=[], metavar="FLAG",
                   help="additional Chromium flag (repeatable)")
    return p.parse_args(argv)


def fail(msg: str) -> NoReturn:
    print(f"tensorboard_screenshot: {msg}", file=sys.stderr)
    sys.exit(2)


def wait_for_server(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/data/runs", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as e:  # not up yet
            last = e
        time.sleep(0.5)
    fail(f"TensorBoard at {url} did not answer within {timeout:.0f}s ({last})")


class ChartNotFound(Exception):
    pass


def find_card(page, tag: str, timeout_ms: float):
    """The first scalar card whose tag (its title attribute) matches the regex `tag`."""
    pattern = re.compile(tag)
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        # title of each card's tag, None for cards that are not laid out (hidden)
        titles = page.locator("scalar-card").evaluate_all(
            "cards => cards.map(c => c.getClientRects().length ? "
            "c.querySelector('tb-truncated-path.tag')?.getAttribute('title') ?? null : null)")
        for i, title in enumerate(titles):
            if title and pattern.search(title):
                return page.locator("scalar-card").nth(i)
        if time.monotonic() > deadline:
            raise ChartNotFound(f"no scalar chart with a tag matching {tag!r} (visible: {[t for t in titles if t]})")
        page.wait_for_timeout(250)


def adjust_settings(page, card, smoothing: float, timeout_ms: float) -> None:
    """In the settings side pane (open by default): set the smoothing, turn off "Ignore
    outliers in chart scaling" (it would cut the first epochs off the y axis), close the pane."""
    pane = page.locator("metrics-dashboard-settings")
    if not pane.is_visible():
        page.get_by_role("button", name="Toggle settings side pane").click()
    pane.get_by_label("Ignore outliers in chart scaling").uncheck()
    field = pane.locator(".slider-row input.slider-input").first  # the first one is Smoothing
    field.wait_for(state="visible", timeout=timeout_ms)
    # typed like a person: Playwright's fill() is not picked up by this Angular field
    field.click(click_count=3)
    page.keyboard.type(f"{smoothing:g}")
    page.keyboard.press("Tab")
    if smoothing == 0:  # the data table drops its "Smoothed" column when smoothing is off
        card.locator("scalar-card-data-table").get_by_text("Smoothed", exact=True).wait_for(
            state="hidden", timeout=timeout_ms)
    else:
        page.wait_for_timeout(1000)  # the field is debounced; closing the pane at once drops it
    page.get_by_role("button", name="Close side pane").click()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (os.path.isfile(args.chromium) and os.access(args.chromium, os.X_OK)):
        fail(f"Chromium not found at {args.chromium}; install it with `apt-get install chromium` "
             "(Debian) or pass --chromium /path/to/chromium")
    try:
        from playwright.sync_api import TimeoutError as PWTimeout
        from playwright.sync_api import sync_playwright
    except ImportError:
        fail("Playwright for Python is not installed; install it with `pip install playwright` "
             "(e.g. in a separate venv: python -m venv /tmp/shotvenv && /tmp/shotvenv/bin/pip install "
             "playwright). Do not run `playwright install`: the system Chromium is used.")

    wait_for_server(args.url, args.timeout)
    timeout_ms = args.timeout * 1000
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tb-shot-profile-") as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,
            executable_path=args.chromium,
            headless=True,
            args=CHROMIUM_ARGS + list(args.extra_arg),
            viewport={"width": args.width, "height": args.height},
            device_scale_factor=1,
        )
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(timeout_ms)
            page.goto(args.url.rstrip("/") + "/#timeseries", wait_until="domcontentloaded",
                      timeout=timeout_ms)
            # The tag filter of the main view (the left column has a separate run filter).
            box = page.locator("metrics-tag-filter input").first
            box.wait_for(state="visible", timeout=timeout_ms)
            box.fill(args.tag)
            box.press("Enter")
            box.blur()
            card = find_card(page, args.tag, timeout_ms)
            # Data arrived once the card's data table has a row for the run.
            card.locator("scalar-card-data-table tb-data-table-content-row").first.wait_for(
                state="visible", timeout=timeout_ms)
            adjust_settings(page, card, args.smoothing, timeout_ms)
            card.get_by_role("button", name="Toggle full size mode").click()
            # the chart area is user-resizable (CSS resize); make it taller than the default
            card.locator(".chart-container").first.evaluate(
                "(el, h) => { el.style.height = h + 'px'; }", args.chart_height)
            page.wait_for_timeout(500)
            fit = card.get_by_role("button", name="Fit line chart domains to data")
            if fit.is_enabled():  # disabled while the axes already fit the data
                fit.click()
            page.mouse.move(0, 0)
            page.wait_for_timeout(2000)  # let the WebGL (SwiftShader) chart draw
        except (PWTimeout, ChartNotFound) as e:
            partial = os.path.splitext(args.out)[0] + ".failed.png"  # never overwrite --out
            page.screenshot(path=partial)
            ctx.close()
            fail(f"the chart did not show up ({e}); screenshot of the page in {partial}")
        page.screenshot(path=args.out)
        ctx.close()
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
