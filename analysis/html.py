"""``report.html``: one self-contained page per grid (no server, no network: images are embedded).

It holds what the report wrote, in this order: the results table (``table.md``: mean ± std, the
paired ΔAP [95% CI], the convergence mark, and the failed and incomplete runs), the error analysis
(``errors.md``), and every plot of the grid directory as an embedded PNG. The Markdown files are
the project's own, so a small converter for their subset (headings, pipe tables, paragraphs, lists,
``**bold**`` and ``code``) is enough. On load, a script counts the images the browser decoded into
``body[data-images-decoded]`` (beside ``data-images-total``), which the browser test reads.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

REPORT_FILE = "report.html"
SECTIONS = (("table.md", "results"), ("errors.md", "errors"))
PLOT_ORDER = ("ap.png", "ap_curve.png", "positives.png", "errors.png", "detections.png", "assignments.png")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; }
td { text-align: right; } td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""
SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.imagesDecoded = images.filter((image) => image.complete && image.naturalWidth > 0).length;
});
"""


def _inline(text: str) -> str:
    """Escape, then ``**bold**`` and ``code``."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def markdown_to_html(text: str, table_class: str) -> str:
    """HTML of the report's Markdown: headings, pipe tables (class ``table_class``), lists, paragraphs."""
    out: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("|") and index + 1 < len(lines) and set(lines[index + 1].replace("|", "").strip()) <= set(":- "):
            header = _cells(line)
            index += 2
            rows = []
            while index < len(lines) and lines[index].startswith("|"):
                rows.append(_cells(lines[index]))
                index += 1
            out.append(f'<table class="{table_class}"><thead><tr>'
                       + "".join(f"<th>{_inline(cell)}</th>" for cell in header) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>" for row in rows)
                       + "</tbody></table>")
            continue
        elif line.startswith(("- ", "* ")):
            items = []
            while index < len(lines) and lines[index].startswith(("- ", "* ")):
                items.append(f"<li>{_inline(lines[index][2:])}</li>")
                index += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        index += 1
    return "\n".join(out)


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'
            f"<figcaption>{html.escape(path.name)}</figcaption></figure>")


def write_html(grid_dir: Path) -> Path:
    """Write ``report.html`` from the report files in ``grid_dir``; returns its path."""
    grid_dir = Path(grid_dir)
    # table.md's own heading is the page's title; without it, one is made.
    body = [] if (grid_dir / "table.md").is_file() else [f"<h1>assignbench grid <code>{html.escape(grid_dir.name)}</code></h1>"]
    for name, table_class in SECTIONS:
        path = grid_dir / name
        if path.is_file():
            body.append(f'<section id="{table_class}">{markdown_to_html(path.read_text(encoding="utf-8"), table_class)}'
                        "</section>")
    plots = [grid_dir / name for name in PLOT_ORDER if (grid_dir / name).is_file()]
    plots += sorted(p for p in grid_dir.glob("*.png") if p.name not in PLOT_ORDER)
    body.append('<section id="plots"><h2>Plots</h2>' + "".join(_image(p) for p in plots) + "</section>")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>assignbench {html.escape(grid_dir.name)}'
            f"</title><style>{STYLE}</style></head>\n"
            f'<body data-images-total="{len(plots)}" data-images-decoded="0">\n' + "\n".join(body)
            + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
    path = grid_dir / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


__all__ = ["REPORT_FILE", "markdown_to_html", "write_html"]
