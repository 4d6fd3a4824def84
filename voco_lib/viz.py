"""Figures for the notebooks: planes with the crop grid, label heatmaps, training curves, predictions; a 3-D viewer.

Conventions, so every figure reads like a radiology screen:
- Arrays are (X, Y, Z) in RAS+ array axes (what `voco_lib.data.preprocess` produces): +x towards the
  patient's Right, +y Anterior, +z Superior. Boxes are per-axis half-open voxel intervals (..., 3, 2).
- Axial and coronal views show the patient's right on the viewer's left (radiological convention); anterior
  is up in axial views, superior up in coronal and sagittal views, anterior on the left in sagittal views.
  Axes are in mm from the region's corner and name the patient directions at both ends.
- Figures are `matplotlib.figure.Figure` objects made without pyplot: no global figure state, nothing to
  close in a training script, and a notebook shows them after `%matplotlib inline`.

`view3d` is the interactive viewer: ipyniivue (NiiVue as an anywidget, JavaScript bundled, works offline in
JupyterLab 4 and never blocks papermill/nbval) by default; itkwidgets only when asked for and never in
headless runs (it hangs papermill and hides failing cells from nbval; seen with itkwidgets under papermill); a
static figure when
there is no Jupyter kernel or no widget package.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from voco_lib.files import atomic_write

Spacing = Sequence[float]

# (horizontal array axis, vertical array axis, patient direction at the low/high end of each) per view.
# Horizontal axes are inverted where the high end is drawn on the left (R in axial/coronal, A in sagittal).
_PLANES = {
    "axial": dict(axes=(0, 1), cut=2, ends=(("L", "R"), ("P", "A")), flip_x=True),
    "coronal": dict(axes=(0, 2), cut=1, ends=(("L", "R"), ("I", "S")), flip_x=True),
    "sagittal": dict(axes=(1, 2), cut=0, ends=(("P", "A"), ("I", "S")), flip_x=True),
}
GRID_COLOR, CROP_COLOR = "#ffd21f", "#ff3b30"


def _label_colours() -> list[tuple[float, float, float]]:
    """Distinct colours for label ids 1, 2, ... (tab20 without its greys, then tab20b): greys read as tissue."""
    from matplotlib import colormaps

    tab20 = [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (14, 15)]
    return tab20 + list(colormaps["tab20b"].colors)


def _rgb255(label_id: int) -> tuple[int, int, int]:
    """The 0-255 RGB colour of label id >= 1: one source for the figures, the NiiVue colour table and legends."""
    colours = _label_colours()
    return tuple(int(255 * c) for c in colours[(label_id - 1) % len(colours)])


def _show_labels(ax, lab2d: np.ndarray, extent) -> None:
    from matplotlib.colors import ListedColormap

    colours = _label_colours()
    idx = np.where(lab2d > 0, (lab2d - 1) % len(colours), 0)
    ax.imshow(np.ma.masked_where(lab2d == 0, idx), cmap=ListedColormap(colours), vmin=-0.5,
              vmax=len(colours) - 0.5, alpha=0.45, origin="lower", extent=extent, interpolation="nearest")


# ------------------------------------------------------------------------------------------------ helpers
def to_numpy(x: Any) -> np.ndarray:
    """A volume, box or vector as numpy; a leading channel axis of size 1 is dropped ((1, X, Y, Z) -> (X, Y, Z))."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    elif hasattr(x, "as_tensor"):
        x = x.as_tensor().numpy()
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    return a


def _boxes(boxes: Any) -> np.ndarray:
    if boxes is None:
        return np.zeros((0, 3, 2), np.int64)
    b = to_numpy(boxes).astype(np.int64)
    b = b.reshape(-1, 3, 2)
    return b


def save_figure(fig: Figure, run_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Write `fig` as `run_dir/figures/name.png` (temp file, then rename: never a partial PNG); return the path."""
    return write_png(fig, Path(run_dir) / "figures" / (name if name.endswith(".png") else name + ".png"), dpi)


def show_figure(fig: Figure, run_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """`save_figure`, then display the PNG in the notebook, once: a Figure built without pyplot is never shown
    by the inline backend on its own, and a cell may make several."""
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    path = save_figure(fig, run_dir, name, dpi)
    display(Image(filename=str(path)))
    plt.close(fig)  # a pyplot figure would otherwise be shown a second time at the end of the cell
    return path


def write_png(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Atomic PNG write of `fig` to `path` (folders created)."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _setup_axes(ax, plane: str, extent_mm: tuple[float, float], title: str | None = None, unit: str = "mm") -> None:
    p = _PLANES[plane]
    (xl, xh), (yl, yh) = p["ends"]
    ax.set_xlim(extent_mm[0], 0) if p["flip_x"] else ax.set_xlim(0, extent_mm[0])
    ax.set_ylim(0, extent_mm[1])
    # the left end of the horizontal axis is the high end (flip_x): name it first
    left, right = (xh, xl) if p["flip_x"] else (xl, xh)
    ax.set_xlabel(f"{left}  ←  {unit}  →  {right}")
    ax.set_ylabel(f"{yl}  ←  {unit}  →  {yh}")
    for txt, xy, ha, va in ((left, (0.02, 0.5), "left", "center"), (right, (0.98, 0.5), "right", "center"),
                            (yh, (0.5, 0.98), "center", "top"), (yl, (0.5, 0.02), "center", "bottom")):
        ax.text(*xy, txt, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=9, fontweight="bold")
    if title:
        ax.set_title(title, fontsize=10)


def _rect(ax, box: np.ndarray, plane: str, spacing: np.ndarray, color: str, lw: float, inside: bool, label=None):
    h, v = _PLANES[plane]["axes"]
    x0, x1 = box[h] * spacing[h]
    y0, y1 = box[v] * spacing[v]
    from matplotlib import patheffects

    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, lw=lw,
                           linestyle="-" if inside else "--", label=label,
                           path_effects=[patheffects.withStroke(linewidth=lw + 1.6, foreground="black")]))


# ------------------------------------------------------------------------------------------------ planes
def plane_views(
    image: Any,
    spacing: Spacing = (1.0, 1.0, 1.0),
    grid_boxes: Any = None,
    crop_boxes: Any = None,
    label: Any = None,
    point: Sequence[int] | None = None,
    title: str | None = None,
    window: tuple[float, float] | None = None,
    fig: Figure | None = None,
    label_names: dict[int, str] | None = None,
) -> Figure:
    """Axial, coronal and sagittal slices through `point` (voxel index; default: the first crop's centre).

    Base crops (`grid_boxes`) are drawn in yellow with their index k, random crops (`crop_boxes`) in red;
    a box the slice does not pass through is drawn dashed (its projection). `label` (an integer map) is
    overlaid in colour, with a legend of the `label_names` shown in the slices. `window` is the display
    range (default: the 1st-99th percentile).
    """
    img = to_numpy(image).astype(np.float32)
    if img.ndim != 3:
        raise ValueError(f"plane_views needs a 3-D (X, Y, Z) volume, got shape {img.shape}")
    sp = np.asarray(spacing, np.float64)
    grid, crops = _boxes(grid_boxes), _boxes(crop_boxes)
    if point is None:
        point = (crops[0].mean(-1) if len(crops) else np.asarray(img.shape) / 2).astype(int)
    point = [int(np.clip(c, 0, n - 1)) for c, n in zip(point, img.shape)]
    lo, hi = window if window is not None else np.percentile(img, [1, 99])
    lab = to_numpy(label).astype(np.int64) if label is not None else None

    fig = fig or Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, plane in zip(axes, ("axial", "coronal", "sagittal")):
        p = _PLANES[plane]
        h, v = p["axes"]
        cut = p["cut"]
        sl = [slice(None)] * 3
        sl[cut] = point[cut]
        extent = (img.shape[h] * sp[h], img.shape[v] * sp[v])
        ax.imshow(img[tuple(sl)].T, cmap="gray", vmin=lo, vmax=hi, origin="lower",
                  extent=(0, extent[0], 0, extent[1]), interpolation="nearest")
        if lab is not None:
            _show_labels(ax, lab[tuple(sl)].T, (0, extent[0], 0, extent[1]))
        for k, b in enumerate(grid):
            inside = b[cut, 0] <= point[cut] < b[cut, 1]
            _rect(ax, b, plane, sp, GRID_COLOR, 1.2, inside)
            cx, cy = b[h].mean() * sp[h], b[v].mean() * sp[v]
            if plane == "axial":
                ax.text(cx, cy, f"k={k}", color=GRID_COLOR, ha="center", va="center", fontsize=11,
                        fontweight="bold", bbox=dict(boxstyle="round,pad=0.2", facecolor="black", alpha=0.6, lw=0))
        for b in crops:
            inside = b[cut, 0] <= point[cut] < b[cut, 1]
            _rect(ax, b, plane, sp, CROP_COLOR, 2.0, inside)
        where = f"{'xyz'[cut]} = {point[cut] * sp[cut]:.0f} mm"
        _setup_axes(ax, plane, extent, f"{plane} ({where})")
    if lab is not None and label_names:
        _label_legend(fig, _ids_in_slices(lab, point, range(3)), label_names)
    if title:
        fig.suptitle(title)
    return fig


def _ids_in_slices(lab: np.ndarray, point: Sequence[int], cuts: Iterable[int]) -> set[int]:
    """Label ids in the slices through `point` perpendicular to the axes `cuts`: what the figure shows."""
    shown: set[int] = set()
    for cut in cuts:
        sl = [slice(None)] * 3
        sl[cut] = int(point[cut])
        shown |= set(np.unique(lab[tuple(sl)]).tolist())
    return shown


def label_legend(ids: Iterable[int], names: dict[int, str] | None) -> list[tuple[int, str, str]]:
    """(id, name, "#rrggbb") of the classes `ids` (background 0 left out), in the colours every label overlay
    uses (the figures' colour list and the NiiVue colour table `_label_lut`); unnamed ids show their number."""
    out = []
    for i in sorted({int(i) for i in ids if int(i) > 0}):
        r, g, b = _rgb255(i)
        out.append((i, (names or {}).get(i, str(i)), f"#{r:02x}{g:02x}{b:02x}"))
    return out


def _label_legend(fig: Figure, ids: Iterable[int], names: dict[int, str]) -> None:
    """A figure legend of the named classes among `ids`, in the overlay's colours."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=colour, alpha=0.6, label=name)
               for i, name, colour in label_legend(ids, names) if i in names]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)


def legend_html(ids: Iterable[int], names: dict[int, str] | None) -> str:
    """The `label_legend` as HTML swatches, shown under the 3-D viewer (NiiVue draws no legend itself)."""
    from html import escape

    items = "".join(
        f'<span style="display:inline-block;margin:0 12px 2px 0;white-space:nowrap">'
        f'<span style="display:inline-block;width:12px;height:12px;background:{colour};'
        f'vertical-align:middle;margin-right:4px;border:1px solid #444"></span>{escape(name)}</span>'
        for _, name, colour in label_legend(ids, names))
    return f'<div class="voco-label-legend" style="font-size:12px;line-height:1.6">{items}</div>'


# ------------------------------------------------------------------------------------------------ grid maps
def _grid_panel(ax, values: np.ndarray, grid: Sequence[int], region_mm: Sequence[float] | None, title: str,
                cmap: str = "viridis", vmax: float = 1.0, fmt: str = "{:.2f}", layer: int | None = None) -> Any:
    """One depth layer of a grid-shaped vector (K,) drawn over the axial plane of the region (mm, or cells),
    each cell marked with its index k in the vector (`layer` l of a deeper grid: k = i·gy·gz + j·gz + l)."""
    gx, gy = int(grid[0]), int(grid[1])
    unit = "mm" if region_mm is not None else "grid cells"
    region_mm = region_mm if region_mm is not None else (gx, gy)
    m = values.reshape(gx, gy)
    im = ax.imshow(m.T, cmap=cmap, vmin=0, vmax=vmax, origin="lower",
                   extent=(0, region_mm[0], 0, region_mm[1]), interpolation="nearest")
    cw, ch = region_mm[0] / gx, region_mm[1] / gy
    for i in range(gx):
        for j in range(gy):
            val, ink = m[i, j], "white" if m[i, j] < 0.6 * vmax else "black"
            ax.text((i + 0.5) * cw, (j + 0.5) * ch, fmt.format(val), ha="center", va="center", fontsize=10,
                    color=ink)
            if layer is not None:
                k = (i * gy + j) * int((tuple(grid) + (1,))[2]) + layer
                ax.text((i + 0.5) * cw, (j + 0.85) * ch, f"k={k}", ha="center", va="center", fontsize=8,
                        color=ink, alpha=0.8)
    _setup_axes(ax, "axial", (region_mm[0], region_mm[1]), title, unit)
    return im


def _layers(vec: Any, grid: Sequence[int]) -> np.ndarray:
    v = to_numpy(vec).astype(np.float64).reshape(-1)
    gx, gy, gz = (tuple(grid) + (1,))[:3]
    if v.size != gx * gy * gz:
        raise ValueError(f"a vector of {v.size} values does not fit a {gx}x{gy}x{gz} grid")
    return v.reshape(gx, gy, gz)  # k = i·gy·gz + j·gz + l (voco_lib.crops.grid_boxes)


def label_heatmap(labels: Any, grid: Sequence[int], region_mm: Sequence[float] | None = None,
                  title: str = "position label (overlap fraction)", fig: Figure | None = None) -> Figure:
    """The label vector (K,) of one random crop as a heatmap on the base-crop grid, as seen in the axial view."""
    layers = _layers(labels, grid)
    fig = fig or Figure(figsize=(4.6 * layers.shape[2], 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, layers.shape[2]))
    for l, ax in enumerate(axes):
        im = _grid_panel(ax, layers[:, :, l].reshape(-1), grid, region_mm,
                         title if layers.shape[2] == 1 else f"{title}, layer {l}", layer=l)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    return fig


def plot_prediction(pred: Any, labels: Any, grid: Sequence[int], region_mm: Sequence[float] | None = None,
                    title: str | None = None, fig: Figure | None = None,
                    pred_name: str = "predicted similarity") -> Figure:
    """Predicted similarities vs true overlap labels of one random crop on the grid, and |error|."""
    p, t = _layers(pred, grid), _layers(labels, grid)
    if p.shape[2] != 1:
        p, t = p.mean(2, keepdims=True), t.mean(2, keepdims=True)
    fig = fig or Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    err = np.abs(p - t)
    for ax, vals, name, cmap in ((axes[0], p, pred_name, "viridis"),
                                 (axes[1], t, "true overlap label", "viridis"),
                                 (axes[2], err, f"|error| (mean {err.mean():.3f})", "magma")):
        im = _grid_panel(ax, vals.reshape(-1), grid, region_mm, name, cmap=cmap,
                         layer=0 if (tuple(grid) + (1,))[2] == 1 else None)  # averaged over depth: no single k
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------------------------ prior
def box_class_fractions(label: Any, box: Any, names: dict[int, str] | None = None, min_fraction: float = 0.01) -> dict[str, float]:
    """Fraction of the crop's voxels per label class (background excluded), largest first: what the crop 'sees'."""
    lab = to_numpy(label).astype(np.int64)
    b = _boxes(box)[0]
    sub = lab[b[0, 0]:b[0, 1], b[1, 0]:b[1, 1], b[2, 0]:b[2, 1]]
    ids, counts = np.unique(sub, return_counts=True)
    out = {}
    for i, c in sorted(zip(ids.tolist(), counts.tolist()), key=lambda ic: -ic[1]):
        frac = c / max(sub.size, 1)
        if i != 0 and frac >= min_fraction:
            out[(names or {}).get(i, str(i))] = round(frac, 3)
    return out


def crop_across_subjects(images: Sequence[Any], box: Any, spacing: Spacing | Sequence[Spacing] = (1.0, 1.0, 1.0),
                         labels: Sequence[Any] | None = None, names: Sequence[str] | None = None,
                         grid_boxes: Any = None, fig: Figure | None = None,
                         label_names: dict[int, str] | None = None) -> Figure:
    """The same crop box on the axial and coronal slices of several subjects: VoCo's prior made visible.

    Because anatomy is laid out consistently, a fixed position in the region tends to hold the same organs
    in every subject (the overlaid label colours), which is what makes position predictable from content.
    With `label_names` a legend names the classes shown in the slices.
    """
    n = len(images)
    b = _boxes(box)[0]
    point = b.mean(-1).astype(int)
    sps = np.broadcast_to(np.asarray(spacing, np.float64).reshape(-1, 3), (n, 3))  # one spacing, or one per subject
    fig = fig or Figure(figsize=(3.3 * n, 6.4), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    shown: set[int] = set()
    for c in range(n):
        img = to_numpy(images[c]).astype(np.float32)
        lab = to_numpy(labels[c]).astype(np.int64) if labels is not None else None
        lo, hi = np.percentile(img, [1, 99])
        sp = sps[c]
        if lab is not None:
            shown |= _ids_in_slices(lab, point, (_PLANES["axial"]["cut"], _PLANES["coronal"]["cut"]))
        for r, plane in enumerate(("axial", "coronal")):
            ax = axes[r, c]
            p = _PLANES[plane]
            h, v = p["axes"]
            sl = [slice(None)] * 3
            sl[p["cut"]] = int(point[p["cut"]])
            extent = (img.shape[h] * sp[h], img.shape[v] * sp[v])
            ax.imshow(img[tuple(sl)].T, cmap="gray", vmin=lo, vmax=hi, origin="lower",
                      extent=(0, extent[0], 0, extent[1]), interpolation="nearest")
            if lab is not None:
                _show_labels(ax, lab[tuple(sl)].T, (0, extent[0], 0, extent[1]))
            for g in _boxes(grid_boxes):
                _rect(ax, g, plane, sp, GRID_COLOR, 0.8, True)
            _rect(ax, b, plane, sp, CROP_COLOR, 2.0, True)
            _setup_axes(ax, plane, extent, (names[c] if names else f"subject {c}") if r == 0 else None)
    if label_names:
        _label_legend(fig, shown, label_names)
    return fig


# ------------------------------------------------------------------------------------------------ training
def read_metrics(metrics: str | Path | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of a `metrics.jsonl` (path to the file or to its run directory), or the records themselves."""
    if isinstance(metrics, (str, Path)):
        from voco_lib.runs import read_metrics as read_run_metrics

        path = Path(metrics) / "metrics.jsonl" if Path(metrics).is_dir() else Path(metrics)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no metrics file; run a pre-training into this directory first")
        return read_run_metrics(path)
    return list(metrics)


def smoothed(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): s_t = w·s_{t−1} + (1 − w)·v_t, divided by
    1 − w^t so the first points are not pulled towards 0. weight 0 returns the values."""
    out, acc = [], 0.0
    for t, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**t) if weight else v)
    return out


def plot_metrics(metrics: str | Path | Iterable[dict[str, Any]], figures_dir: str | Path | None = None,
                 fig: Figure | None = None, smooth: float = 0.8) -> Figure:
    """Loss terms, learning rate and held-out position accuracy against the step, from metrics.jsonl.

    Loss terms are noisy step to step (each step sees new random crops): the raw values are drawn faint and
    a `smooth`-weighted moving average (`smoothed`) over them, once there are 10 points or more. With
    `figures_dir` the figure is also written there as `metrics.png` (the pre-training loop does this at the end).
    """
    recs = read_metrics(metrics)
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    fig = fig or Figure(figsize=(13, 3.8), layout="constrained")
    ax_loss, ax_lr, ax_acc = fig.subplots(1, 3)
    steps = [r["step"] for r in train]
    w = smooth if len(steps) >= 10 else 0.0
    for key, style in (("loss", "-"), ("intra", "--"), ("inter", "--"), ("reg", ":")):
        if train and key in train[0]:
            raw = [r[key] for r in train]
            line, = ax_loss.plot(steps, smoothed(raw, w), style, label=key, marker="." if len(steps) < 30 else None)
            if w:
                ax_loss.plot(steps, raw, style, color=line.get_color(), alpha=0.25, linewidth=0.8)
    ax_loss.set(xlabel="step", ylabel="loss", title=f"loss terms (smoothed, w={w:g}; raw faint)" if w else "loss terms")
    if train:
        ax_loss.legend(fontsize=8)
        ax_lr.plot(steps, [r.get("lr", math.nan) for r in train], color="tab:purple")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate (warmup + cosine)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    es = [r["step"] for r in evals]
    if evals and "top1" in evals[0]:  # the VoCo family's position prediction
        ax_acc.plot(es, [r["top1"] for r in evals], "o-", label="top-1 position accuracy")
        ax_acc.plot(es, [r["mae"] for r in evals], "s-", label="mean |label − prediction|")
        ax_acc.axhline(evals[0].get("chance", math.nan), color="gray", linestyle="--", label="chance (1/K)")
        ax_acc.set_ylim(0, 1)
        ax_acc.set(xlabel="step", title="held-out position prediction")
    elif evals:  # another method: its own held-out pretext metrics
        for key in (k for k, v in evals[0].items() if k not in ("kind", "step") and isinstance(v, (int, float))):
            ax_acc.plot(es, [r.get(key, math.nan) for r in evals], "o-", label=key)
        ax_acc.set(xlabel="step", title="held-out pretext metrics")
    if evals:
        ax_acc.legend(fontsize=8)
    if figures_dir is not None:
        write_png(fig, Path(figures_dir) / "metrics.png")
    return fig


# ------------------------------------------------------------------------------------------------ 3-D viewer
def outline_volume(shape: Sequence[int], boxes: Any, values: Sequence[int] | None = None, thickness: int = 1) -> np.ndarray:
    """A uint8 volume holding only the 12 edges of each box (value `values[i]`, default i + 1): crop boxes
    a volume viewer can draw as a label overlay."""
    out = np.zeros(tuple(int(s) for s in shape), np.uint8)
    t = max(int(thickness), 1)
    for i, b in enumerate(_boxes(boxes)):
        val = int(values[i]) if values is not None else i + 1
        lo = np.clip(b[:, 0], 0, np.asarray(shape) - 1)
        hi = np.clip(b[:, 1] - 1, 0, np.asarray(shape) - 1)
        for axis in range(3):  # edges parallel to `axis`: the other two coordinates sit at a low or high face
            a, c = [d for d in range(3) if d != axis]
            for ea in (lo[a], hi[a]):
                for ec in (lo[c], hi[c]):
                    sl = [slice(None)] * 3
                    sl[axis] = slice(lo[axis], hi[axis] + 1)
                    sl[a] = slice(max(ea - t // 2, 0), ea + t - t // 2)
                    sl[c] = slice(max(ec - t // 2, 0), ec + t - t // 2)
                    out[tuple(sl)] = val
    return out


def shell_volume(shape: Sequence[int], box: Any, value: int) -> np.ndarray:
    """A uint8 volume holding the six faces of `box` (value `value`): every slice through the box cuts it as a
    rectangle, where the 12 edges of `outline_volume` show only as dots."""
    out = np.zeros(tuple(int(s) for s in shape), np.uint8)
    b = _boxes(box)[0]
    lo = np.clip(b[:, 0], 0, np.asarray(shape) - 1)
    hi = np.clip(b[:, 1] - 1, 0, np.asarray(shape) - 1)
    inner = tuple(slice(l, h + 1) for l, h in zip(lo, hi))
    for axis in range(3):
        for face in (lo[axis], hi[axis]):
            sl = list(inner)
            sl[axis] = slice(face, face + 1)
            out[tuple(sl)] = value
    return out


def nifti_bytes(array: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0), affine: np.ndarray | None = None) -> bytes:
    """An in-memory NIfTI-1 file of `array` (RAS affine from `spacing` unless given): what NiiVue loads."""
    import nibabel as nib

    aff = np.diag([*map(float, spacing), 1.0]) if affine is None else np.asarray(affine, np.float64)
    return nib.Nifti1Image(np.ascontiguousarray(array), aff).to_bytes()


def in_kernel() -> bool:
    """True inside a Jupyter kernel (a widget can be displayed); False in scripts and plain IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and hasattr(ip, "kernel")


def headless() -> bool:
    """A CI or batch run (VOCO_PROFILE=smoke, or VOCO_HEADLESS=1 as `voco demo` sets): no blocking viewers."""
    return os.environ.get("VOCO_PROFILE") == "smoke" or os.environ.get("VOCO_HEADLESS", "") not in ("", "0")


def _label_lut(n: int, names: dict[int, str] | None = None) -> dict[str, Any]:
    """NiiVue label colour table with the same colours as the matplotlib figures."""
    ids = list(range(n + 1))
    rgb = [(0, 0, 0)] + [_rgb255(i) for i in ids[1:]]
    return {"R": [c[0] for c in rgb], "G": [c[1] for c in rgb], "B": [c[2] for c in rgb],
            "A": [0] + [255] * n, "I": ids, "labels": [(names or {}).get(i, str(i)) for i in ids]}


def view3d(image: Any, label: Any = None, boxes: Any = None, backend: str = "niivue",
           spacing: Spacing = (1.0, 1.0, 1.0), height: int = 420, max_size: int = 128,
           label_names: dict[int, str] | None = None) -> Any:
    """Interactive multiplanar + 3-D view of `image` with an optional `label` map and crop `boxes` (outlined).

    backend "niivue" (default): an ipyniivue widget, volumes passed as in-memory NIfTI bytes; "itk": itkwidgets
    (optional extra; refused in headless runs, where it hangs); "static": the `plane_views` figure. Without a
    Jupyter kernel or without ipyniivue the static figure is returned. Volumes larger than `max_size` voxels
    per axis are subsampled for the viewer (software WebGL renders big volumes slowly). With a label map the
    NiiVue widget comes in an `ipywidgets.VBox` with a legend (`legend_html`) of the classes it shows; the
    static figure has the same legend (`label_names`).
    """
    img = to_numpy(image).astype(np.float32)
    lab = None if label is None else to_numpy(label).astype(np.uint8)
    bxs = _boxes(boxes)
    if backend not in ("niivue", "itk", "static"):
        raise ValueError(f"view3d backend must be 'niivue', 'itk' or 'static', got {backend!r}")
    if backend == "itk" and headless():
        warnings.warn("view3d: itkwidgets is not used in headless runs (it blocks papermill); showing NiiVue",
                      stacklevel=2)
        backend = "niivue"
    if backend != "static" and not in_kernel():
        backend = "static"
    if backend == "niivue":
        try:
            import ipyniivue  # noqa: F401
        except ImportError:
            warnings.warn("view3d: ipyniivue is not installed (pip install -e '.[notebooks]'); static figure",
                          stacklevel=2)
            backend = "static"
    if backend == "static":
        return plane_views(img, spacing, crop_boxes=bxs, label=lab, title="static view (no widget frontend)",
                           label_names=label_names)

    step = max(1, math.ceil(max(img.shape) / max_size))
    sp = np.asarray(spacing, np.float64) * step
    img_s = img[::step, ::step, ::step]
    lab_s = None if lab is None else lab[::step, ::step, ::step]
    box_s = np.stack([bxs[..., 0] // step, -(-bxs[..., 1] // step)], -1) if len(bxs) else bxs
    if backend == "itk":
        return _view_itk(img_s, lab_s, box_s, sp)
    nv = _view_niivue(img_s, lab_s, box_s, sp, height, label_names)
    if lab_s is None or not lab_s.any():
        return nv
    import ipywidgets as W

    return W.VBox([nv, W.HTML(legend_html(np.unique(lab_s).tolist(), label_names))])


def _view_niivue(img, lab, boxes, sp, height, label_names):
    from ipyniivue import NiiVue, ShowRender, SliceType

    nv = NiiVue(height=height, slice_type=SliceType.MULTIPLANAR, multiplanar_show_render=ShowRender.ALWAYS,
                is_radiological_convention=True, is_colorbar=False, show_3d_crosshair=True,
                sagittal_nose_left=True, is_orient_cube=True,  # as the static figure: anterior on the left
                crosshair_color=(0.0, 0.8, 1.0, 1.0))  # cyan: red is the random crop
    lo, hi = (float(v) for v in np.percentile(img, [1, 99]))
    vols = [{"data": nifti_bytes(img, sp), "name": "image.nii", "colormap": "gray", "cal_min": lo, "cal_max": hi}]
    luts = [None]
    if lab is not None and lab.any():
        vols.append({"data": nifti_bytes(lab, sp), "name": "label.nii", "opacity": 0.45})
        luts.append(_label_lut(int(lab.max()), label_names))
    if len(boxes):
        # grid boxes first (value 1), the last box is the random crop (value 2): yellow grid, red crop
        values = [1] * (len(boxes) - 1) + [2]
        drawn = np.maximum(outline_volume(img.shape, boxes, values), shell_volume(img.shape, boxes[-1:], 2))
        vols.append({"data": nifti_bytes(drawn, sp), "name": "boxes.nii"})
        luts.append({"R": [0, 255, 255], "G": [0, 210, 59], "B": [0, 31, 48], "A": [0, 255, 255], "I": [0, 1, 2],
                     "labels": ["", "base crop", "random crop"]})
    nv.load_volumes(vols)
    for vol, lut in zip(nv.volumes, luts):
        if lut is not None:
            vol.set_colormap_label(lut)
    return nv


def _view_itk(img, lab, boxes, sp):  # pragma: no cover - optional extra, never used in CI
    try:
        import itkwidgets
    except ImportError as e:
        raise ImportError("view3d(backend='itk') needs the optional extra: pip install -e '.[itk]' "
                          "(itkwidgets works only in some Jupyter setups; the default backend is 'niivue')") from e
    overlay = lab.astype(np.uint8) if lab is not None else np.zeros(img.shape, np.uint8)
    if len(boxes):
        edges = outline_volume(img.shape, boxes, [250] * (len(boxes) - 1) + [251])
        overlay = np.where(edges > 0, edges, overlay)
    # itkwidgets takes arrays in (Z, Y, X) order
    return itkwidgets.view(image=img.transpose(2, 1, 0), label_image=overlay.transpose(2, 1, 0))
