"""A report as a list of blocks (headings, paragraphs, tables, figures), rendered twice: Markdown with
PNGs under images/ by relative path, and one self-contained HTML file with the same PNGs inlined
as base64. No Markdown library: both renderings are written directly."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

IMAGES = "images"  # sub-folder of the output folder holding the PNGs
_CSS = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}"
        "th,td{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555}")


@dataclass
class Doc:
    """Blocks in order; `figure` writes its PNG at once so the Markdown can point at it."""

    title: str
    out_dir: Path
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def figure(self, fig: Figure, name: str, caption: str) -> None:
        path = self.out_dir / IMAGES / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        fig.clf()
        self.blocks.append(("figure", (f"{IMAGES}/{name}.png", caption)))

    @property
    def headings(self) -> list[str]:
        return [text for kind, value in self.blocks if kind == "heading" for level, text in [value] if level == 2]

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
                data = base64.b64encode((self.out_dir / value[0]).read_bytes()).decode("ascii")
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
