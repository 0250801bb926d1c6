"""The report as one self-contained HTML page, for the MLflow UI: it renders ``.html`` artifacts (in a sandboxed
frame) but shows ``.md`` as plain text, and a frame cannot fetch sibling artifacts, so the plots are inlined as data
URIs. The page is rendered from the report's own Markdown, which uses only what :mod:`distributed_me.report` writes:
headings, paragraphs, pipe tables, images, ``code`` and ``**bold**``."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1em}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}
img{width:48%;min-width:420px;margin:4px;border:1px solid #eee}code{background:#f3f3f3;padding:0 3px}"""

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def markdown_to_html(md: str, images: dict[str, Path]) -> str:
    """The body of the page; ``images`` maps an image's link (its file name) to the PNG to inline."""
    parts: list[str] = []
    table: list[str] = []

    def flush_table() -> None:
        if table:
            head, rows = _cells(table[0]), [_cells(r) for r in table[2:]]
            parts.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                         + "</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if not line.strip():
            continue
        if m := re.match(r"^(#{1,4}) (.*)$", line):
            level = len(m.group(1))
            parts.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif m := _IMAGE.match(line.strip()):
            png = images.get(Path(m.group(2)).name)
            if png is not None and png.is_file():
                data = base64.b64encode(png.read_bytes()).decode()
                parts.append(f'<img alt="{html.escape(m.group(1))}" title="{html.escape(png.name)}" '
                             f'src="data:image/png;base64,{data}">')
            else:
                parts.append(f"<p>[{_inline(m.group(1))}: {_inline(m.group(2))}]</p>")
        else:
            parts.append(f"<p>{_inline(line)}</p>")
    flush_table()
    return "\n".join(parts)


def report_html(sweep: str, md: str, plots: list[Path], description: str | None) -> str:
    """The whole page: the sweep's description (its first paragraph, as the spec wrote it) above the report."""
    intro = ""
    if description:
        first = description.split("\n\n", 1)[0].strip()
        intro = f"<p><i>{_inline(first)}</i></p>"
    body = markdown_to_html(md, {p.name: p for p in plots})
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {html.escape(sweep)}</title>"
            f"<style>{_STYLE}</style></head><body>{intro}\n{body}</body></html>")
