"""A grid's outcomes as a table: mean ± sd over seeds, the paired difference to the baseline row, the paper's
number beside ours, cells that did not run and why; written as Markdown, CSV, a self-contained HTML page and
a figure (score against the column axis; the validation curves over fine-tuning steps where the table asks).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from voco_lib.reproduce.execute import Outcome
from voco_lib.reproduce.grid import Table


@dataclass
class Entry:
    """One table entry: a row under a protocol in a column, over its seeds."""

    row: str
    protocol: str
    column: str
    values: dict[int, float] = field(default_factory=dict)  # seed -> score
    reasons: list[str] = field(default_factory=list)  # why some seeds have no score
    diff: dict[int, float] = field(default_factory=dict)  # seed -> score - baseline's score (same seed)
    paper: float | None = None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else None

    @property
    def diff_mean(self) -> float | None:
        return statistics.fmean(self.diff.values()) if self.diff else None

    @property
    def diff_sd(self) -> float | None:
        return statistics.stdev(self.diff.values()) if len(self.diff) > 1 else None


def scale(table: Table) -> float:
    """Ours are fractions; a table whose paper numbers are percentages shows ours ×100 too."""
    paper = table.raw.get("paper") or {}
    return 100.0 if str(paper.get("metric", "")).endswith("percent") else 1.0


def summarize(table: Table, outcomes: Sequence[Outcome]) -> list[Entry]:
    """Entries in table order; paired differences only over seeds both the row and the baseline have."""
    entries: dict[tuple[str, str, str], Entry] = {}
    k = scale(table)
    for o in outcomes:
        c = o.cell
        e = entries.setdefault((c.row, c.protocol, c.column),
                               Entry(c.row, c.protocol, c.column, paper=table.paper_value(c.row, c.column)))
        value = None if o.result is None else o.result.get("value")
        if o.status == "ok" and value is not None and not math.isnan(value):
            e.values[c.seed] = value * k
        else:
            e.reasons.append(o.reason or "no score (NaN)")
    for (row, protocol, column), e in entries.items():
        base = entries.get((table.baseline, protocol, column))
        if base is not None and row != table.baseline:
            e.diff = {s: v - base.values[s] for s, v in e.values.items() if s in base.values}
    return list(entries.values())


def _pm(mean: float | None, sd: float | None, digits: int, signed: bool = False) -> str:
    if mean is None:
        return "—"
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return m if sd is None else f"{m} ± {sd:.{digits}f}"


def cell_text(e: Entry, digits: int) -> str:
    """'0.512 ± 0.020 (n=3)', or why it did not run (the first distinct reason)."""
    if not e.values:
        return e.reasons[0] if e.reasons else "—"
    text = f"{_pm(e.mean, e.sd, digits)} (n={len(e.values)})"
    return text + (f"; {len(e.reasons)} seed(s) missing: {e.reasons[0]}" if e.reasons else "")


def markdown(table: Table, entries: Sequence[Entry], profile: str, provenance: dict[str, Any]) -> str:
    """One Markdown table per protocol: ours (mean ± sd), Δ to the baseline (paired, mean ± sd), the paper's number."""
    digits = 2 if scale(table) == 100 else 3
    labels = {r.name: r.label for r in table.rows}
    columns = list(dict.fromkeys(e.column for e in entries))
    has_paper = table.raw.get("paper") is not None
    out = [f"# {table.title}", "", f"Profile **{profile}**, metric `{table.raw['metric']}`"
           + (" (×100)" if scale(table) == 100 else "") + f", seeds {provenance.get('seeds')}, "
           f"Δ = row − {labels.get(table.baseline, table.baseline)} on the same seed (mean ± sd over seeds).", ""]
    for protocol in dict.fromkeys(e.protocol for e in entries):
        out += [f"## Protocol: {protocol}", "",
                "| row | " + " | ".join(f"{c} ours | {c} Δ" + (f" | {c} paper" if has_paper else "") for c in columns) + " |",
                "|---" * (1 + len(columns) * (3 if has_paper else 2)) + "|"]
        for row in dict.fromkeys(e.row for e in entries if e.protocol == protocol):
            by_col = {e.column: e for e in entries if e.protocol == protocol and e.row == row}
            parts = []
            for c in columns:
                e = by_col.get(c)
                if e is None:
                    parts += ["·", "·"] + (["·"] if has_paper else [])
                    continue
                parts += [cell_text(e, digits), _pm(e.diff_mean, e.diff_sd, digits, signed=True)]
                if has_paper:
                    parts.append("—" if e.paper is None else f"{e.paper:g}")
            out.append(f"| {labels.get(row, row)} | " + " | ".join(parts) + " |")
        out.append("")
    note = table.raw.get("paper_note") or (table.raw.get("paper") or {}).get("note")
    if note:
        out += [f"Paper: {note}", ""]
    out += [f"Source: {table.raw['source']}. Commit {provenance.get('commit')}, device {provenance.get('device')}, "
            f"{provenance.get('cells_run', 0)} cell(s) run now, {provenance.get('cells_reused', 0)} reused, "
            f"wall time {provenance.get('wall_s', 0):.0f} s. Per-cell configs, checkpoints (sha256) and times: "
            "provenance.json.", ""]
    return "\n".join(out)


def csv_text(table: Table, entries: Sequence[Entry]) -> str:
    """Long format, one line per entry, plain numbers (the seeds' values too) for further analysis."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "row", "protocol", "column", "n", "mean", "sd", "diff_mean", "diff_sd", "paper", "values",
                "not_run"])
    for e in entries:
        w.writerow([table.name, e.row, e.protocol, e.column, len(e.values), e.mean, e.sd, e.diff_mean, e.diff_sd,
                    e.paper, ";".join(f"s{s}={v:.6g}" for s, v in sorted(e.values.items())), " | ".join(e.reasons)])
    return buf.getvalue()


def figure(table: Table, entries: Sequence[Entry], outcomes: Sequence[Outcome]) -> Any:
    """Left: score per column, one line per row × protocol (error bars: sd over seeds). Right (tables with
    curves): the mean validation curve over fine-tuning steps per row × protocol, at the first column."""
    from matplotlib.figure import Figure

    curves = bool(table.raw.get("curves"))
    fig = Figure(figsize=(11 if curves else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if curves else 1, squeeze=False)[0]
    columns = list(dict.fromkeys(e.column for e in entries))
    labels = {r.name: r.label for r in table.rows}
    for (row, protocol) in dict.fromkeys((e.row, e.protocol) for e in entries):
        es = [e for e in entries if e.row == row and e.protocol == protocol and e.values]
        if es:
            xs = [columns.index(e.column) for e in es]
            axes[0].errorbar(xs, [e.mean for e in es], yerr=[e.sd or 0 for e in es], marker="o", capsize=3,
                             linestyle="-" if protocol == "full" else "--", label=f"{labels.get(row, row)} ({protocol})")
    axes[0].set_xticks(range(len(columns)), columns)
    axes[0].set_ylabel(table.raw["metric"] + (" ×100" if scale(table) == 100 else ""))
    axes[0].set_title("final score (mean ± sd over seeds)")
    axes[0].legend(fontsize=7)
    if curves:
        _curves(axes[1], table, outcomes, columns[0] if columns else None, labels)
    return fig


def _curves(ax: Any, table: Table, outcomes: Sequence[Outcome], column: str | None, labels: dict[str, str]) -> None:
    k, metric = scale(table), table.raw["metric"]
    groups: dict[tuple[str, str], list[dict[int, float]]] = {}
    for o in outcomes:
        if o.result and o.cell.column == column and o.result.get("curve"):
            pts = {p["step"]: p[metric] * k for p in o.result["curve"] if p.get(metric) is not None}
            groups.setdefault((o.cell.row, o.cell.protocol), []).append(pts)
    for (row, protocol), runs in groups.items():
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        ax.plot(steps, [statistics.fmean(r[s] for r in runs) for s in steps], marker=".",
                linestyle="-" if protocol == "full" else "--", label=f"{labels.get(row, row)} ({protocol}, n={len(runs)})")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"convergence at {column} (mean over seeds)")
    if groups:
        ax.legend(fontsize=7)


def verdicts(table: Table, entries: Sequence[Entry]) -> list[str]:
    """Per row, protocol and column: is the paired difference to the baseline larger than the seeds' spread?"""
    lines = []
    for e in entries:
        if e.row == table.baseline or e.diff_mean is None:
            continue
        sd = e.diff_sd
        verdict = ("one seed: no spread to judge" if sd is None else "ahead beyond the seeds' spread"
                   if e.diff_mean > sd else "behind beyond the seeds' spread" if -e.diff_mean > sd
                   else "within the seeds' spread: no evidence either way")
        lines.append(f"{e.row:12s} {e.protocol:6s} {e.column:16s} Δ = {e.diff_mean:+.3f}"
                     + ("" if sd is None else f" ± {sd:.3f}") + f" over {len(e.diff)} seed(s): {verdict}")
    return lines


def html_page(title: str, md: str, png: bytes | None) -> str:
    """A self-contained page: the Markdown tables as HTML (no CDN, no scripts) and the figure embedded."""
    import markdown as md_lib

    body = md_lib.markdown(md, extensions=["tables"])
    img = "" if png is None else f'<img style="max-width:100%" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    style = "table{border-collapse:collapse}td,th{border:1px solid #aaa;padding:2px 6px;font-size:90%}"
    return (f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
            f"<body>{body}{img}</body></html>")
