"""The status page in a real browser: headless Chromium, in a namespace with only loopback,
renders it and fetches nothing."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from tests.support.html_preview import chromium_binary, dump_dom, parse_html, run_chromium, sample_page, screenshot

# The page's colours (kokoa_infra/health/html.py STYLE): serving, unhealthy, drained.
GREEN, RED, GREY = (0x1A, 0x7F, 0x37), (0xC6, 0x28, 0x28), (0x57, 0x60, 0x6A)


@pytest.fixture
def browser_netns(make_netns) -> str:
    """A namespace with only loopback: whatever the browser tries to reach, nothing leaves."""
    if chromium_binary() is None:
        pytest.skip("needs chromium (Debian package; `make setup` installs it)")
    return make_netns()


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def near(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


def test_chromium_renders_the_page_at_phone_width_and_requests_nothing(browser_netns, tmp_path):
    from PIL import Image

    page = tmp_path / "status.html"
    page.write_text(sample_page(end=now()))
    run = screenshot(page, tmp_path / "phone.png", netns=browser_netns, window=(390, 1600))
    assert run.requested_urls == []
    assert "Refused to" not in run.log   # no CSP violation: the hashes admit the style and script
    with Image.open(tmp_path / "phone.png") as image:
        assert image.size == (390, 1600)
        data = image.convert("RGB").tobytes()
    pixels = [tuple(data[i:i + 3]) for i in range(0, len(data), 3)]
    non_white = sum(pixel != (255, 255, 255) for pixel in pixels)
    assert non_white > len(pixels) * 0.05
    assert len(set(pixels)) > 200   # text, badges, strips: not a blank or one-colour page
    # The state colours are painted, so the inline style was applied.
    for colour in (GREEN, RED, GREY):
        assert sum(near(pixel, colour) for pixel in pixels) > 300, colour
    # Readable at phone width: nothing runs into the right margin (cut off or scrolled).
    margin = [pixels[y * 390 + x] for y in range(1600) for x in range(384, 390)]
    assert set(margin) == {(255, 255, 255)}


def test_the_request_check_sees_a_page_that_loads_something(browser_netns, tmp_path):
    """The control: a page with an external image and stylesheet is caught by the same check."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html lang="en"><head><title>x</title>'
                    '<link rel="stylesheet" href="http://10.255.0.1/a.css"></head>'
                    '<body><img src="http://10.255.0.1/b.png" alt=""></body></html>')
    run = run_chromium(page, "--dump-dom", netns=browser_netns)
    assert set(run.requested_urls) >= {"http://10.255.0.1/a.css", "http://10.255.0.1/b.png"}


def test_the_script_marks_an_old_page_stale_and_a_fresh_one_not(browser_netns, tmp_path):
    fresh, old = tmp_path / "fresh.html", tmp_path / "old.html"
    fresh.write_text(sample_page(end=now()))
    old.write_text(sample_page(end=now() - timedelta(minutes=10)))   # 3 intervals = 90 s
    for path, stale in ((fresh, False), (old, True)):
        run = dump_dom(path, netns=browser_netns)
        assert run.returncode == 0 and run.requested_urls == []
        document, _ = parse_html(re.sub(r"<!DOCTYPE html>", "", run.stdout, flags=re.I))
        body = document.first("body")
        assert ("stale" in body.classes()) is stale
        age = next(e for e in document.iter("span") if e.attrs.get("id") == "age").text()
        if stale:
            assert age.startswith("STALE: this page was written 10 min ago")
        else:
            assert age.startswith("Written ") and "ago by your clock" in age
