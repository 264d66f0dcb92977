"""The capacity-planning report: sections of text, tables and figures, rendered to report.html and report.md.

  build.py     results in (a sweep folder, or a compact sweep), the chosen point, the Doc out
  sections.py  one function per section
  figures.py   one matplotlib Figure per plot
  doc.py       the Doc: blocks rendered to Markdown (images/*.png) and self-contained HTML
"""

from infinigen_sim.analysis.report.build import (
    COMPACT_GRID,
    POINT_KEYS,
    ReportError,
    build_report,
    compact_results,
    load_results,
    parse_point,
    write_report,
)
from infinigen_sim.analysis.report.sections import SECTIONS

__all__ = ["COMPACT_GRID", "POINT_KEYS", "SECTIONS", "ReportError", "build_report", "compact_results", "load_results",
           "parse_point", "write_report"]
