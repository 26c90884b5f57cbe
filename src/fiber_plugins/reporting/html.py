"""A small static HTML page builder: sections of text, tables and images stored next to it."""

from __future__ import annotations

import html
from pathlib import Path

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}
.note{color:#555;font-size:.9em}
.warn{color:#b45309;font-weight:600}
"""


class Page:
    """Collect sections, then :meth:`write` an ``index``-style HTML file with relative image links."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> Page:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str, cls: str | None = None) -> Page:
        c = f' class="{cls}"' if cls else ""
        self.parts.append(f"<p{c}>{html.escape(text)}</p>")
        return self

    def image(self, src: str, alt: str, width: int | None = None) -> Page:
        w = f' width="{width}"' if width else ""
        self.parts.append(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}"{w}>')
        return self

    def table(self, header: list[str], rows: list[list]) -> Page:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
            for row in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")
        return self

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}"
            f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
            + "\n".join(self.parts)
            + "</body></html>"
        )
        path.write_text(doc)
        return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
