"""The scaling grid read back: per pre-training row its size (encoder parameters, volumes), its held-out pretext
error, its downstream score and its compute; saturating power laws fitted along each axis (`voco_lib.scaling`).

Pretext error is the mean |predicted − true overlap| of the position prediction on the fixed held-out views at
the end of pre-training (lower is better); the downstream loss is 1 − Dice of the frozen-encoder probe.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from voco_lib.reproduce.execute import pretrain_plan
from voco_lib.reproduce.render import Entry
from voco_lib.runs import read_metrics
from voco_lib.scaling import PowerLawFit, fit_power_law, power_law


@dataclass(frozen=True)
class Point:
    """One pre-training of the grid and what it bought."""

    row: str
    feature_size: int
    volumes: int
    params: int  # encoder (swinViT) parameters
    pretext_error: float | None
    top1: float | None
    dice: float | None  # mean over seeds of the downstream score
    dice_sd: float | None
    train_s: float | None  # sum of the logged step times (a lower bound of the wall time)
    peak_gb: float | None  # CPU max RSS or GPU peak memory logged during pre-training
    flops_per_step: float | None


def encoder_params(feature_size: int, crop: Sequence[int]) -> int:
    from voco_lib.backbone import build_backbone

    net = build_backbone(feature_size, tuple(crop), 1)
    return sum(p.numel() for n, p in net.named_parameters() if n.startswith("swinViT."))


def points(report: Any, flops: bool = True) -> list[Point]:
    """A Point per pre-training row of `report` (a `voco_lib.reproduce.Report` of a scaling table)."""
    from voco_lib.config import resolve
    from voco_lib.estimate import modelled_step

    entries: dict[str, Entry] = {e.row: e for e in report.entries}
    dirs, out = run_dirs(report), []
    for row in (r for r in report.table.rows if r.init == "pretrain"):
        cfg = resolve(report.profile, pretrain_plan(row, report.table, report.profile)[0])
        run = dirs[row.name]
        evals = read_metrics(run, "eval") if (run / "metrics.jsonl").is_file() else []
        trains = read_metrics(run, "train") if evals else []
        perf = [t.get("perf") or {} for t in trains]
        e = entries.get(row.name)
        out.append(Point(row.name, cfg.feature_size, cfg.n_volumes, encoder_params(cfg.feature_size, cfg.views.crop_size),
                         evals[-1].get("mae") if evals else None, evals[-1].get("top1") if evals else None,
                         None if e is None else e.mean, None if e is None else e.sd, _step_seconds(trains, perf),
                         max((p.get("cuda_max_gb") or p.get("cpu_maxrss_gb") or 0 for p in perf), default=None) or None,
                         modelled_step(cfg)[0] if flops else None))
    return out


def _step_seconds(trains: list[dict[str, Any]], perf: list[dict[str, Any]]) -> float | None:
    """Logged step times are per log line (every `log_every` steps): scale each by the steps it stands for."""
    if not perf:
        return None
    steps = [t["step"] for t in trains]
    gaps = [b - a for a, b in zip([0] + steps[:-1], steps)]
    return sum(g * p.get("step_s", 0.0) for g, p in zip(gaps, perf))


def axis(pts: Sequence[Point], vary: str) -> list[Point]:
    """The points along one axis through the shared point: `params` (volumes fixed at the most common value)
    or `volumes` (width fixed at the smallest), sorted by the varying size."""
    if vary == "params":
        fixed = statistics.mode(p.volumes for p in pts)
        line = [p for p in pts if p.volumes == fixed]
    elif vary == "volumes":
        fixed = min(p.feature_size for p in pts)
        line = [p for p in pts if p.feature_size == fixed]
    else:
        raise ValueError(f"axis vary={vary!r}: choose params or volumes")
    return sorted(line, key=lambda p: getattr(p, vary))


def fit(line: Sequence[Point], vary: str, target: str) -> PowerLawFit | str:
    """The power law of `target` (pretext_error | downstream, i.e. 1 − Dice) along `vary`, or why it cannot be fitted."""
    xs, ys = [], []
    for p in line:
        y = p.pretext_error if target == "pretext_error" else (None if p.dice is None else 1.0 - p.dice)
        if y is not None:
            xs.append(float(getattr(p, vary)))
            ys.append(y)
    try:
        return fit_power_law(xs, ys)
    except (ValueError, RuntimeError) as e:
        return f"no fit: {e}"


def describe(f: PowerLawFit | str, what: str) -> str:
    if isinstance(f, str):
        return f"{what}: {f}"
    return (f"{what}: L(x) = {f.a:.3g}·x^(−{f.alpha:.3f} ± {f.alpha_sd:.3f}) + {f.c:.3g} ± {f.c_sd:.2g}")


def figure(pts: Sequence[Point], fits: dict[tuple[str, str], PowerLawFit | str]) -> Any:
    """2×2: pretext error and downstream loss against encoder parameters and against volumes, fitted curves."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    for i, target in enumerate(("pretext_error", "downstream")):
        for j, vary in enumerate(("params", "volumes")):
            ax, line = axes[i][j], axis(pts, vary)
            xs = [getattr(p, vary) for p in line]
            ys = [p.pretext_error if target == "pretext_error" else (None if p.dice is None else 1 - p.dice)
                  for p in line]
            keep = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if keep:
                ax.plot(*zip(*keep), "o", label="measured")
            f = fits.get((target, vary))
            if isinstance(f, PowerLawFit) and keep:
                grid = np.geomspace(min(xs), max(xs), 50)
                ax.plot(grid, power_law(grid, f.a, f.alpha, f.c), "-",
                        label=f"fit α = {f.alpha:.2f} ± {f.alpha_sd:.2f}")
            ax.set_xscale("log")
            ax.set_xlabel("encoder parameters" if vary == "params" else "pre-training volumes")
            ax.set_ylabel("held-out position error" if target == "pretext_error" else "1 − Dice (frozen probe)")
            ax.set_title(f"{'pretext' if target == 'pretext_error' else 'downstream'} vs "
                         f"{'model size' if vary == 'params' else 'data size'}"
                         + ("" if isinstance(f, PowerLawFit) else " (no fit)"))
            ax.legend(fontsize=7)
    return fig


def fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def compute_table(pts: Sequence[Point]) -> str:
    """Markdown: per pre-training its size, compute and results."""
    head = ("| row | feature | volumes | encoder params | FLOPs/step | train s | peak GB | pretext error | top-1 | Dice |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {p.row} | {p.feature_size} | {p.volumes} | {p.params:,} | {fmt(p.flops_per_step, '.3g')} | "
             f"{fmt(p.train_s, '.0f')} | {fmt(p.peak_gb, '.2f')} | {fmt(p.pretext_error, '.4f')} | "
             f"{fmt(p.top1, '.2f')} | {fmt(p.dice, '.3f')}" + ("" if p.dice_sd is None else f" ± {p.dice_sd:.3f}") + " |"
             for p in pts]
    return "\n".join([head, *lines])


def run_dirs(report: Any) -> dict[str, Path]:
    """Pre-training run directory per row (for a closer look at a curve)."""
    return {r.name: report.store / "pretrain" / f"{r.name}-{pretrain_plan(r, report.table, report.profile)[1]}"
            for r in report.table.rows if r.init == "pretrain"}


def size_guide(fit_: PowerLawFit | str, line: Sequence[Point], vary: str, what: str) -> str:
    """Markdown: the smallest measured size whose fitted loss is within 20 / 10 / 5 % of the fitted floor c
    (above the floor, the loss a size buys; no extrapolation past the grid)."""
    from voco_lib.scaling import size_for_target

    if isinstance(fit_, str):
        return f"{what}: {fit_}"
    sizes = [float(getattr(p, vary)) for p in line]
    rows = ["| target (fitted loss) | smallest measured size reaching it |", "|---|---|"]
    for margin in (0.20, 0.10, 0.05):
        target = fit_.c * (1 + margin) if fit_.c > 0 else fit_.c + margin * abs(fit_.a)
        s = size_for_target(fit_, target, sizes)
        rows.append(f"| ≤ {target:.4g} (floor + {margin:.0%}) | {'none in the grid' if s is None else f'{s:,.0f}'} |")
    return f"{what}\n\n" + "\n".join(rows)
