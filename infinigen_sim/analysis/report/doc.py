"""A report as a list of blocks (headings, paragraphs, tables, figures), rendered twice: Markdown with
PNGs under images/ by relative path, and one self-contained HTML file with the same PNGs inlined
as base64. No Markdown library: both renderings are written directly (a Doc holds headings, paragraphs,
tables and PNGs only, which need no more than escaping). Nothing is written until `write`, so a report
that fails half-way leaves no files behind."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from infinigen_sim.spec.io import write_text_atomic

IMAGES = "images"  # sub-folder of the output folder holding the PNGs
_CSS = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}"
        "th,td{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555}")


@dataclass
class Doc:
    """Blocks in order; figures are rendered to PNG bytes at once and written with the text by `write`."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # images/<name>.png -> PNG bytes

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def figure(self, fig: Figure, name: str, caption: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        fig.clf()
        path = f"{IMAGES}/{name}.png"
        self.images[path] = buffer.getvalue()
        self.blocks.append(("figure", (path, caption)))

    def write(self, out_dir: Path) -> Path:
        """images/*.png, report.md and report.html (last) into `out_dir`; returns the path of report.html."""
        out_dir = Path(out_dir)
        for path, data in self.images.items():
            (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / path).write_bytes(data)
        write_text_atomic(out_dir / "report.md", self.markdown())
        write_text_atomic(out_dir / "report.html", self.html())
        return out_dir / "report.html"

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                out += [f"{'#' * value[0]} {value[1]}", ""]
            elif kind == "paragraph":
                out += [value, ""]
            elif kind == "table":
                out += [_md_table(value), ""]
            else:
                out += [f"![{value[1]}]({value[0]})", ""]
        return "\n".join(out)

    def html(self) -> str:
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                out.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "paragraph":
                out.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                out.append(_html_table(value))
            else:
                data = base64.b64encode(self.images[value[0]]).decode("ascii")
                out.append(f"<figure><img alt='{html.escape(value[1])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{html.escape(value[1])}</figcaption></figure>")
        return "\n".join([*out, "</body></html>", ""])


def _cell(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and value != value) else str(value)


def _md_table(frame: pd.DataFrame) -> str:
    def row(cells: list[Any]) -> str:
        return "| " + " | ".join(_cell(c).replace("|", "\\|") for c in cells) + " |"

    lines = [row(list(frame.columns)), "|" + "|".join(" --- " for _ in frame.columns) + "|"]
    return "\n".join(lines + [row(list(r)) for r in frame.itertuples(index=False)])


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(_cell(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>"
                   for r in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
