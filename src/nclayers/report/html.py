"""A self-contained HTML report: sections of text, key/value lists, tables and figures.

`render_html(title, sections)` returns one HTML page with every figure inlined as a
base64 data URI, so the file can be mailed or archived alone. Every value that comes
from data (run names, configs, table cells, file names) passes through `html.escape`.
The page carries a small script that marks `<body data-figures="loaded N/N">` once every
figure has decoded (the browser test reads it back; a reader sees nothing of it).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nclayers.errors import NCLayersError
from nclayers.table import Table

MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


@dataclass
class Figure:
    """An image to inline: a file (PNG, SVG, JPEG) or raw bytes with their MIME type."""

    source: str | Path | bytes
    caption: str = ""
    mime: str = "image/png"

    def data_uri(self) -> str:
        if isinstance(self.source, bytes):
            data, mime = self.source, self.mime
        else:
            path = Path(self.source)
            mime = MIME.get(path.suffix.lower())
            if mime is None:
                raise NCLayersError(
                    f"figure {str(path)!r}: cannot inline a {path.suffix or 'suffix-less'} "
                    f"file; use one of {sorted(MIME)}"
                )
            data = path.read_bytes()
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass
class Section:
    """One part of the report. Every field is optional; they render in this order."""

    title: str
    text: str = ""  # a paragraph (plain text, escaped)
    items: Mapping[str, Any] = field(default_factory=dict)  # key/value list
    figures: Sequence[Figure] = ()
    table: Table | None = None
    columns: Sequence[str] | None = None  # table columns (default: all)
    code: str = ""  # preformatted text, e.g. a YAML config
    collapsed: bool = False  # inside <details>, closed until clicked
    subsections: Sequence[Section] = ()


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}
h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em}table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:right}th{background:#f3f3f3}
td.s,th.s{text-align:left}dl{display:grid;grid-template-columns:max-content auto;gap:.15em 1em}
dt{font-weight:600}dd{margin:0}figure{margin:1em 0}img{max-width:100%;height:auto}
figcaption{font-size:.85em;color:#555}pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
.scroll{overflow:auto;max-height:32em}summary{cursor:pointer;font-weight:600}
"""

# Marks the body once every <img> has decoded: data-figures="loaded N/N" (or "broken").
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-figures',
    (ok === imgs.length ? 'loaded ' : 'broken ') + ok + '/' + imgs.length);
});
"""


def esc(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, ".4g")
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def render_table(table: Iterable[Mapping], columns: Sequence[str] | None = None) -> str:
    rows = list(table)
    cols = list(columns or (table.columns if isinstance(table, Table) else Table(rows).columns))
    textual = {c for c in cols if any(isinstance(r.get(c), str) for r in rows)}
    head = "".join(f'<th class="{"s" if c in textual else ""}">{esc(c)}</th>' for c in cols)
    body = "\n".join(
        "<tr>"
        + "".join(f'<td class="{"s" if c in textual else ""}">{esc(r.get(c))}</td>' for c in cols)
        + "</tr>"
        for r in rows
    )
    table_html = f"<table><thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table_html}</div>'


def render_section(section: Section, level: int = 2) -> str:
    parts = [f"<h{level}>{esc(section.title)}</h{level}>"]
    if section.text:
        parts.append(f"<p>{esc(section.text)}</p>")
    if section.items:
        parts.append(
            "<dl>"
            + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in section.items.items())
            + "</dl>"
        )
    for fig in section.figures:
        alt = fig.caption or (Path(fig.source).name if not isinstance(fig.source, bytes) else "")
        parts.append(
            f'<figure><img src="{fig.data_uri()}" alt="{esc(alt)}">'
            + (f"<figcaption>{esc(fig.caption)}</figcaption>" if fig.caption else "")
            + "</figure>"
        )
    if section.table is not None:
        parts.append(render_table(section.table, section.columns))
    if section.code:
        parts.append(f"<pre>{esc(section.code)}</pre>")
    parts += [render_section(s, min(level + 1, 4)) for s in section.subsections]
    inner = "\n".join(parts)
    if section.collapsed:
        body = "\n".join(parts[1:])
        return f"<details><summary>{esc(section.title)}</summary>\n{body}\n</details>"
    return inner


def render_html(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """The whole page as one string."""
    body = "\n".join(render_section(s) for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style>"
        f"<script>{CHECK_SCRIPT}</script></head>\n<body>\n<h1>{esc(title)}</h1>\n"
        + (f"<p>{esc(subtitle)}</p>\n" if subtitle else "")
        + body
        + "\n</body></html>\n"
    )
