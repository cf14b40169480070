"""Make docs/status-page.png: the sample status page (the tests' sweeps, some nodes down) in headless Chromium.

    sudo .venv/bin/python docs/status_page_screenshot.py [docs/status-page.png] [--width 1100]
    make status-page

As root, Chromium runs in a throwaway network namespace that has only loopback, so the
screenshot also shows that the page needs no network. The page is written as of now
(so it is not shown stale), and the screenshot is cropped below the page's end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.html_preview import sample_page, screenshot  # noqa: E402

WINDOW_HEIGHT = 2400
BOTTOM_MARGIN = 16


def crop_to_content(png: Path) -> tuple[int, int]:
    """Cut the white below the page's last non-white row; return the new size."""
    with Image.open(png) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    data = rgb.tobytes()
    row_bytes = width * 3
    last = max((y for y in range(height) if data[y * row_bytes:(y + 1) * row_bytes].strip(b"\xff")),
               default=height - 1)
    bottom = min(height, last + 1 + BOTTOM_MARGIN)
    rgb.crop((0, 0, width, bottom)).save(png, optimize=True)
    return width, bottom


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default=str(Path(__file__).with_name("status-page.png")))
    parser.add_argument("--width", type=int, default=1100, help="window width in CSS pixels (390 = phone)")
    args = parser.parse_args()
    output = Path(args.output).resolve()
    netns = None
    if os.geteuid() == 0:
        netns = f"kokoa-shot-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    else:
        print("not root: Chromium runs without a namespace of its own (background networking off)",
              file=sys.stderr)
    try:
        if netns:
            subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True, timeout=30)
        with tempfile.TemporaryDirectory(prefix="kokoa-status-page-") as directory:
            page = Path(directory) / "status.html"
            page.write_text(sample_page(end=datetime.now(timezone.utc).replace(microsecond=0)))
            run = screenshot(page, output, netns=netns, window=(args.width, WINDOW_HEIGHT))
        if run.requested_urls:
            print(f"the page requested {run.requested_urls}", file=sys.stderr)
            return 1
    finally:
        if netns:
            pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                                  timeout=30).stdout.split()
            for pid in pids:   # only processes inside the namespace made above
                subprocess.run(["kill", "-9", pid], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", netns], check=False, timeout=30)
    width, height = crop_to_content(output)
    print(f"{output} ({width}x{height})", file=sys.stderr)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
