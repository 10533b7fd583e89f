"""The page at ``/``: what it weighs, how fast it loads, webcam mode's frames per second, and
the README's screenshot.

    python -m benchmarks.bench_page [--screenshot docs/page.png] [--webcam-seconds 10]

Debian's headless Chromium (Playwright drives it; nothing is downloaded) against
``python -m service``: the transfer size of everything the page loads and its load time
(Navigation and Resource Timing, a cold cache, five loads), then webcam mode with Chromium's
fake camera at the page's default frame size and interval, then an example photo and the
screenshot.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks import run
from service.arguments import positive_seconds
from tests.server import REPO, running_server
from tests.test_page import CHROMIUM, CHROMIUM_ARGS

TIMING = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const resources = performance.getEntriesByType("resource");
  return {load_ms: nav.loadEventEnd - nav.startTime,
          bytes: nav.transferSize + resources.reduce((s, r) => s + r.transferSize, 0),
          files: 1 + resources.length};
}"""


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--screenshot", type=Path, default=REPO / "docs" / "page.png",
                        help="where the screenshot goes")
    parser.add_argument("--webcam-seconds", type=positive_seconds, default=10,
                        help="length of the fake-camera run")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():  # one line, before the server starts
        raise SystemExit(f"bench_page: no {CHROMIUM}: apt-get install chromium")
    with running_server(env={"EMOTION_LOG_LEVEL": "warning"}) as base, \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        loads = []
        for _ in range(5):
            context = browser.new_context()
            page = context.new_page()
            page.goto(f"{base}/")
            page.wait_for_selector("body[data-ready=true]")
            page.wait_for_load_state("load")
            loads.append(page.evaluate(TIMING))
            context.close()
        times = [load["load_ms"] for load in loads]
        print(f"page: {loads[0]['files']} files, {loads[0]['bytes'] / 1000:.1f} kB transferred "
              f"(everything, uncompressed); load {statistics.median(times):.0f} ms median of "
              f"5 cold loads (min {min(times):.0f})", flush=True)

        context = browser.new_context(viewport={"width": 1200, "height": 900})
        context.grant_permissions(["camera"], origin=base)
        page = context.new_page()
        page.goto(f"{base}/")
        page.wait_for_selector("body[data-ready=true]")
        page.click("#webcam")
        page.wait_for_selector("#status[data-fps]", timeout=20000)
        page.wait_for_timeout(args.webcam_seconds * 1000)
        fps = float(page.get_attribute("#status", "data-fps"))
        interval = page.input_value("#interval")
        print(f"webcam, fake camera: {fps:.2f} frames/s at the default 320-pixel frames and "
              f"{interval} ms interval ({page.inner_text('#status')})", flush=True)
        page.click("#webcam")
        page.set_input_files("#file", str(REPO / "examples" / "four_people.jpg"))
        page.wait_for_selector("#boxes .box")
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.screenshot), full_page=True)
        labels = page.eval_on_selector_all("#faces-list li", "e => e.map(x => x.dataset.label)")
        print(f"screenshot {args.screenshot}: examples/four_people.jpg, {len(labels)} faces "
              f"boxed: {labels}", flush=True)
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
