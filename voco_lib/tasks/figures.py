"""Figures for the downstream notebooks: curves, segmentation overlays, warped grids, retrieval examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from voco_lib.tasks.engine import read_metrics


def curves(run_dir: str | Path, metric: str | None = None) -> Figure:
    """Training loss and the validation metric (default: the task's) against the fine-tuning step."""
    import json

    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metric = metric or json.loads((run_dir / "results.json").read_text())["metric"]
    tr, va = read_metrics(run_dir, "train"), read_metrics(run_dir, "val")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([r["step"] for r in tr], [r["loss"] for r in tr], marker=".")
    a.set(xlabel="step", ylabel="training loss", title="loss")
    b.plot([r["step"] for r in va], [r.get(metric) for r in va], marker="o", color="tab:red")
    b.set(xlabel="step", ylabel=metric, title=f"validation {metric}")
    fig.tight_layout()
    return fig


def compare_curves(run_dirs: dict[str, str | Path], metric: str) -> Figure:
    """Validation curves of several runs (e.g. scratch vs VoCo init) on one axis."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, d in run_dirs.items():
        va = read_metrics(d, "val")
        ax.plot([r["step"] for r in va], [r.get(metric) for r in va], marker="o", label=name)
    ax.set(xlabel="fine-tuning step", ylabel=f"validation {metric}")
    ax.legend()
    fig.tight_layout()
    return fig


def deformed_grid(ddf: torch.Tensor, z: int | None = None, step: int = 4, image: torch.Tensor | None = None,
                  title: str = "displacement (axial)") -> Figure:
    """Grid lines of the axial plane `z` moved by the in-plane displacement (voxels), over `image` if given."""
    import matplotlib.pyplot as plt

    u = ddf.detach().cpu().numpy()
    z = u.shape[-1] // 2 if z is None else z
    ux, uy = u[0, :, :, z], u[1, :, :, z]
    X, Y = np.meshgrid(np.arange(u.shape[1]), np.arange(u.shape[2]), indexing="ij")
    fig, ax = plt.subplots(figsize=(4, 4))
    if image is not None:
        ax.imshow(image[0, :, :, z].T.cpu().numpy(), cmap="gray", origin="lower")
    for i in range(0, u.shape[1], step):
        ax.plot(X[i] + ux[i], Y[i] + uy[i], color="tab:orange", lw=0.8)
    for j in range(0, u.shape[2], step):
        ax.plot(X[:, j] + ux[:, j], Y[:, j] + uy[:, j], color="tab:orange", lw=0.8)
    ax.set(title=title, xlabel="x (voxel)", ylabel="y (voxel)")
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def registration_panel(moving: torch.Tensor, fixed: torch.Tensor, warped: torch.Tensor, z: int | None = None) -> Figure:
    """Axial slices: moving, fixed, warped moving, and |fixed − moving| before/after."""
    import matplotlib.pyplot as plt

    z = moving.shape[-1] // 2 if z is None else z
    sl = lambda t: t[0, :, :, z].T.cpu().numpy()  # noqa: E731
    panels = [("moving", sl(moving)), ("fixed", sl(fixed)), ("warped moving", sl(warped)),
              ("|fixed − moving|", np.abs(sl(fixed) - sl(moving))), ("|fixed − warped|", np.abs(sl(fixed) - sl(warped)))]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3))
    for ax, (name, im) in zip(axes, panels):
        ax.imshow(im, cmap="gray", origin="lower")
        ax.set_title(name)
        ax.axis("off")
    fig.tight_layout()
    return fig


def retrieval_examples(similarity: torch.Tensor, reports: Sequence[str], k: int = 3, n: int = 4) -> str:
    """For the first `n` volumes: the true report and the top-k retrieved reports with their similarity."""
    lines = []
    for i in range(min(n, len(reports))):
        order = torch.argsort(similarity[i], descending=True)[:k].tolist()
        lines.append(f"volume {i}: true report: {reports[i]}")
        for r, j in enumerate(order, 1):
            mark = "✓" if j == i else " "
            lines.append(f"   {r}. {mark} ({float(similarity[i, j]):+.2f}) {reports[j]}")
    return "\n".join(lines)


def class_names(task: Any) -> dict[int, str]:
    return {i: n for i, n in enumerate(task.classes or [])}


def vocabulary_table(metrics: dict[str, Any]) -> str:
    """Per-finding AUC and F1 of a vocabulary evaluation (results' metrics), with the means; n/a = undefined."""
    fmt = lambda v: "  n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:5.2f}"  # noqa: E731
    names = list(metrics["vocab_auc"])
    w = max(len(n) for n in names + ["finding"])
    lines = [f"{'finding'.ljust(w)}    AUC     F1"]
    lines += [f"{n.ljust(w)}  {fmt(metrics['vocab_auc'][n])}  {fmt(metrics['vocab_f1'][n])}" for n in names]
    lines.append(f"{'mean'.ljust(w)}  {fmt(metrics['vocab_auc_mean'])}  {fmt(metrics['vocab_f1_macro'])}"
                 f"   (accuracy at 0.5: {fmt(metrics['vocab_accuracy']).strip()})")
    return "\n".join(lines)


def vocabulary_figure(probs: torch.Tensor | np.ndarray, labels: Sequence[Sequence[int]], names: Sequence[str],
                      volumes: Sequence[str] | None = None) -> Figure:
    """Probability of each finding (columns) in each volume (rows), true findings ringed; per-finding AUC bars."""
    import matplotlib.pyplot as plt

    from voco_lib.tasks.metrics import binary_auc

    p, y = np.asarray(probs, float), np.asarray(labels, int)
    aucs = [binary_auc(p[:, j], y[:, j]) for j in range(len(names))]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 0.35 * len(p) + 3), gridspec_kw={"width_ratios": [3, 2]})
    im = a.imshow(p, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    rows, cols = np.nonzero(y)
    a.scatter(cols, rows, s=90, facecolors="none", edgecolors="white", linewidths=1.5, label="finding present")
    a.set_xticks(range(len(names)), names, rotation=60, ha="right")
    a.set_yticks(range(len(p)), volumes or [str(i) for i in range(len(p))])
    a.set_title("P(finding) from the prompt pair")
    fig.colorbar(im, ax=a, fraction=0.04)
    b.barh(range(len(names)), [0 if np.isnan(v) else v for v in aucs], color="tab:blue")
    for j, v in enumerate(aucs):
        b.text(0.02 if np.isnan(v) else v + 0.02, j, "n/a (one class)" if np.isnan(v) else f"{v:.2f}", va="center")
    b.axvline(0.5, color="grey", ls="--", lw=1)
    b.set_yticks(range(len(names)), names)
    b.invert_yaxis()
    b.set(xlim=(0, 1.2), xlabel="AUC", title="per-finding AUC (0.5 = chance)")
    fig.tight_layout()
    return fig


def report_examples(examples: Sequence[dict[str, str]], n: int = 4) -> str:
    """Generated reports against their references, with each pair's ROUGE-L."""
    from voco_lib.tasks.metrics import rouge_l
    from voco_lib.tasks.report_generation import split_words

    lines = []
    for e in examples[:n]:
        r = rouge_l([e["generated"]], [e["reference"]], tokenize=split_words)
        lines += [f"{e['name']}  (ROUGE-L {r:.2f})", f"   generated: {e['generated']}", f"   reference: {e['reference']}"]
    return "\n".join(lines)
