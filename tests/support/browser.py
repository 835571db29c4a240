"""Headless Chromium for the report tests: the browser's own --dump-dom and --screenshot, and playwright.

Debian's ``chromium`` (installed by .ci/run) is the browser; playwright only drives it
(``executable_path``), it never downloads one.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(*args: str, timeout: float = 60) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(path: Path) -> str:
    """The DOM of a local page after its scripts ran, serialized by the browser."""
    return run_chromium("--dump-dom", path.resolve().as_uri())


def screenshot(path: Path, output: Path, width: int = 1280, height: int = 900) -> None:
    run_chromium(f"--window-size={width},{height}", f"--screenshot={output}", path.resolve().as_uri())


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "a" and href and href.startswith("queries/"):
            self.links.append(href)


def check_report_pages(report_dir: Path, query_ids: list[str]) -> dict[str, str]:
    """Every query is linked from the index, and its page renders with its own section.

    Returns {query id: the page's DOM}. Fails (AssertionError) on a missing link, page or section.
    """
    index = dump_dom(report_dir / "index.html")
    parser = _Links()
    parser.feed(index)
    assert len(parser.links) == len(query_ids), f"the index links {len(parser.links)} query pages, expected {len(query_ids)}"
    doms = {}
    for link in parser.links:
        page = report_dir / link
        assert page.exists(), f"query page {link} is missing"
        dom = dump_dom(page)
        found = re.search(r'<section id="query" data-query-id="([^"]*)"', dom)
        assert found, f"{link}: no query section in the rendered page"
        doms[html.unescape(found.group(1))] = dom
    assert sorted(doms) == sorted(query_ids), f"pages for {sorted(doms)}, expected {sorted(query_ids)}"
    return doms
