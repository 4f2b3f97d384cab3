"""report.html: the converter on hand-written Markdown, and the page of a grid in a real browser."""

import re
import shutil
import subprocess

import pytest

from analysis.html import markdown_to_html
from analysis.report import write_report

from .test_report import RUNS, build_grid


def test_markdown_tables_lists_and_escaping():
    text = "# t\n\n| a | b |\n|:--|--:|\n| x<y | **1.0** |\n| `z` | 2 |\n\n- one\n- two\n\nend & done\n"
    page = markdown_to_html(text, "results")
    assert page.startswith("<h1>t</h1>")
    assert ('<table class="results"><thead><tr><th>a</th><th>b</th></tr></thead><tbody>'
            "<tr><td>x&lt;y</td><td><strong>1.0</strong></td></tr><tr><td><code>z</code></td><td>2</td></tr>"
            "</tbody></table>") in page
    assert "<ul><li>one</li><li>two</li></ul>" in page and "<p>end &amp; done</p>" in page


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("no Chromium on PATH: `make test` installs Debian's chromium package (apt-get) before the tests")


@pytest.mark.slow
def test_the_report_page_loads_in_a_browser_with_every_image_decoded(tmp_path):
    grid = build_grid(tmp_path)
    written = write_report(grid)
    page = written["report.html"]
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    dom = proc.stdout
    assert "<body" in dom, proc.stderr[-2000:]
    total = int(re.search(r'data-images-total="(\d+)"', dom).group(1))
    decoded = int(re.search(r'data-images-decoded="(\d+)"', dom).group(1))
    plots = sorted(name for name in written if name.endswith(".png"))
    assert total == len(plots) >= 4 and decoded == total, (total, decoded, plots)
    # The results table: one row per variant, in the grid's order, read from the DOM.
    table = re.search(r'<table class="results">(.*?)</table>', dom, re.S).group(1)
    rows = re.findall(r"<tr><td>([^<]*)</td>", table.split("<tbody>", 1)[1])
    assert sorted(rows) == sorted(RUNS)
    # The failed and incomplete runs are listed.
    assert "paa+iou-s3" in dom and "atss+iou-s3" in dom
