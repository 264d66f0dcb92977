"""The accuracy study's printed table and its one plot: perplexity against fetched fraction (log x).

The plot draws InfiniGen's alpha settings and fixed budgets, the oracle, H2O over budgets and INT4 (at
its K/V bytes ratio: it reads every row at ~0.28 of the bytes) for the first skew mode / rank rule /
partial ratio of the table, full KV as a horizontal line and +6 % of it dashed. matplotlib's Agg
backend: no display needed.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend)
from matplotlib.ticker import NullFormatter, PercentFormatter  # noqa: E402

from infinigen_sim.spec.io import write_bytes_atomic  # noqa: E402

LIMIT_PCT = 6.0  # the "within 6 % of full KV" line
TICKS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)


def format_table(rows: list[dict]) -> str:
    """One line per setting: fetched share, K/V bytes, perplexity and its increase, top-1, per-chunk ppl."""
    width = max(len(r["setting"]) for r in rows) + 2
    lines = [f"{'setting':<{width}}{'fetched':>9}{'kv bytes':>10}{'ppl':>9}{'+%':>8}{'top1':>8}   "
             f"{'ppl per chunk':<28}{'s':>7}"]
    for r in rows:
        chunks = " ".join(f"{c:.1f}" for c in r["chunk_perplexity"])
        lines.append(f"{r['setting']:<{width}}{r['fetched_fraction']:>9.4f}{r['kv_bytes_ratio']:>10.4f}"
                     f"{r['perplexity']:>9.3f}{r['ppl_increase_pct']:>8.2f}{r['top1_agreement']:>8.4f}   "
                     f"{chunks:<28}{r['seconds']:>7.1f}")
    return "\n".join(lines)


def _series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(x, ppl) points per drawn series, sorted by x; the first skew/rank/ratio of the InfiniGen rows only."""
    first = next((r for r in rows if r["policy"] == "infinigen"), None)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        policy = r["policy"]
        if policy == "infinigen" and first is not None and any(
                r[k] != first[k] for k in ("skew", "rank", "partial_ratio")):
            continue
        if policy in ("infinigen", "oracle"):
            kind = "fixed budget" if r["budget"] is not None else "alpha"
            name = f"{'InfiniGen' if policy == 'infinigen' else 'oracle (true top rows)'}, {kind}"
        elif policy == "h2o":
            name = "H2O, budget"
        elif policy == "int4":
            name = "INT4 (x = K/V bytes ratio)"
        else:
            continue
        x = r["kv_bytes_ratio"] if policy == "int4" else r["fetched_fraction"]
        series.setdefault(name, []).append((x, r["perplexity"]))
    return {k: sorted(v) for k, v in series.items()}


STYLE = {"InfiniGen, alpha": ("tab:blue", "o-"), "InfiniGen, fixed budget": ("tab:blue", "s--"),
         "oracle (true top rows), alpha": ("tab:green", "o-"), "oracle (true top rows), fixed budget":
         ("tab:green", "s--"), "H2O, budget": ("tab:red", "^-"), "INT4 (x = K/V bytes ratio)": ("tab:purple", "D")}


def plot_accuracy(rows: list[dict], path: str | Path) -> None:
    """Perplexity vs fetched fraction, log x, every policy; saved as PNG."""
    ideal = next(r for r in rows if r["policy"] == "ideal")
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name, points in _series(rows).items():
        color, style = STYLE.get(name, ("black", "x-"))
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, style, color=color, label=name, markersize=5)
    ref = ideal["perplexity"]
    ax.axhline(ref, color="black", linewidth=1, label=f"full KV ({ref:.2f})")
    ax.axhline(ref * (1 + LIMIT_PCT / 100), color="gray", linestyle=":", linewidth=1, label=f"full KV +{LIMIT_PCT:g} %")
    ax.set_xscale("log")
    xs = [x for points in _series(rows).values() for x, _ in points]
    ticks = [t for t in TICKS if min(xs) / 1.5 <= t <= max(xs) * 1.5]
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("fetched fraction (rows read / cached rows, layers >= 2; INT4: K/V bytes read)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{ideal['model']} on {ideal['text']}: prompt {ideal['prompt_len']}, "
                 f"{ideal['eval_tokens']} positions evaluated", fontsize=10)
    top = max(r["perplexity"] for r in rows)
    ax.set_ylim(ref * 0.97, min(top * 1.03, ref * 1.6))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    write_bytes_atomic(Path(path), png.getvalue())  # never half a PNG
