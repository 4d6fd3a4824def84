"""Figures and the 3-D viewer facade: geometry drawn where it belongs, files written whole, no hanging backends."""

from __future__ import annotations

import re
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from voco_lib import demo, viz
from voco_lib.config import resolve
from voco_lib.crops import grid_boxes, overlap_labels


def _rects(ax, color):
    from matplotlib.colors import to_rgba

    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor() == to_rgba(color)]


def test_outline_volume_draws_only_the_twelve_edges():
    out = viz.outline_volume((10, 10, 10), torch.tensor([[[2, 6], [2, 6], [2, 6]]]))
    # a 4x4x4 box: 12 edges of 4 voxels, each of the 8 corners counted by 3 edges -> 48 - 16 = 32 voxels
    assert (out > 0).sum() == 32
    assert out[2, 2, 2] == 1 and out[5, 5, 5] == 1 and out[3, 3, 3] == 0 and out[2, 3, 3] == 0
    two = viz.outline_volume((10, 10, 10), [[[0, 10], [0, 10], [0, 10]], [[2, 6], [2, 6], [2, 6]]], values=[7, 9])
    assert set(np.unique(two)) == {0, 7, 9}
    assert two[9, 9, 0] == 7  # a box reaching the border is clipped, not dropped


def test_nifti_bytes_round_trip_keeps_data_and_spacing():
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = nib.Nifti1Image.from_bytes(viz.nifti_bytes(arr, (1.5, 2.0, 3.0)))
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr)
    np.testing.assert_allclose(img.header.get_zooms(), (1.5, 2.0, 3.0))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")


def test_plane_views_draw_boxes_in_mm_with_radiological_axes():
    img = np.random.default_rng(0).random((64, 64, 32)).astype(np.float32)
    grid = grid_boxes((64, 64, 32), (2, 2, 1))
    crop = torch.tensor([[[8, 40], [8, 40], [0, 32]]])
    fig = viz.plane_views(img, (3.0, 2.0, 4.0), grid, crop)
    axial, coronal, sagittal = fig.axes[:3]
    # the patient's right (high x) on the viewer's left; anterior up; mm extents
    assert axial.get_xlim() == (64 * 3.0, 0) and axial.get_ylim() == (0, 64 * 2.0)
    assert coronal.get_ylim() == (0, 32 * 4.0)
    assert axial.get_xlabel().startswith("R") and axial.get_ylabel().startswith("P")
    assert sagittal.get_xlabel().startswith("A") and sagittal.get_ylabel().startswith("I")
    (r,) = _rects(axial, viz.CROP_COLOR)
    assert (r.get_x(), r.get_y(), r.get_width(), r.get_height()) == (24.0, 16.0, 96.0, 64.0)
    (r,) = _rects(sagittal, viz.CROP_COLOR)  # horizontal y (2 mm), vertical z (4 mm)
    assert (r.get_x(), r.get_y(), r.get_width(), r.get_height()) == (16.0, 0.0, 64.0, 128.0)
    assert len(_rects(axial, viz.GRID_COLOR)) == 4
    # default slice: the crop's centre (x = 24 voxels -> 72 mm)
    assert "72 mm" in sagittal.get_title()


def test_plane_views_rejects_non_3d_input():
    with pytest.raises(ValueError, match="3-D"):
        viz.plane_views(np.zeros((4, 4)))


def test_label_heatmap_puts_each_value_in_its_grid_cell():
    grid = (2, 2, 1)
    crop = torch.tensor([[[8, 40], [8, 40], [0, 32]]])
    labels = overlap_labels(crop, grid_boxes((64, 64, 32), grid))[0]  # [0.5625, 0.1875, 0.1875, 0.0625]
    fig = viz.label_heatmap(labels, grid, (64.0, 64.0))
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in fig.axes[0].texts
             if t.get_text()[:1].isdigit()}
    # cell (i, j) is centred at ((i + .5) * 32, (j + .5) * 32) mm; k = 2i + j
    assert texts[(16, 16)] == "0.56" and texts[(16, 48)] == "0.19" and texts[(48, 16)] == "0.19"
    assert texts[(48, 48)] == "0.06"
    with pytest.raises(ValueError, match="does not fit"):
        viz.label_heatmap(torch.ones(5), grid)


def test_plot_prediction_reports_the_mean_error():
    fig = viz.plot_prediction([0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], (2, 2, 1), (10.0, 10.0))
    assert "mean 0.250" in fig.axes[2].get_title()


def test_plot_metrics_from_jsonl_and_figure_written(tmp_path):
    recs = [{"kind": "eval", "step": 0, "top1": 0.25, "mae": 0.3, "chance": 0.25}]
    recs += [{"kind": "train", "step": s, "loss": 1.0 / s, "intra": 0.5 / s, "inter": 0.1, "reg": 0.2, "lr": 1e-4 * s}
             for s in range(1, 5)]
    recs += [{"kind": "eval", "step": 4, "top1": 0.75, "mae": 0.1, "chance": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    fig = viz.plot_metrics(tmp_path, tmp_path / "figures")
    loss_ax, lr_ax, acc_ax = fig.axes[:3]
    assert [ln.get_label() for ln in loss_ax.lines] == ["loss", "intra", "inter", "reg"]
    np.testing.assert_allclose(loss_ax.lines[0].get_ydata(), [1.0, 0.5, 1 / 3, 0.25])
    np.testing.assert_allclose(lr_ax.lines[0].get_ydata(), [1e-4, 2e-4, 3e-4, 4e-4])
    np.testing.assert_allclose(acc_ax.lines[0].get_ydata(), [0.25, 0.75])
    png = tmp_path / "figures" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["metrics.png"]  # no temp file left
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        viz.plot_metrics(tmp_path / "nothing_here")


def test_save_figure_writes_into_the_run_dir_figures(tmp_path):
    fig = Figure()
    fig.subplots().plot([0, 1])
    path = viz.save_figure(fig, tmp_path, "curve")
    assert path == tmp_path / "figures" / "curve.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_box_class_fractions():
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[:2, :2, :2] = 3  # 8 of the 16 voxels in the box below
    lab[2, 0, 0] = 5  # outside the box
    fr = viz.box_class_fractions(lab, [[[0, 2], [0, 4], [0, 2]]], {3: "liver"})
    assert fr == {"liver": 0.5}


def test_view3d_without_a_kernel_returns_the_static_figure():
    fig = viz.view3d(np.zeros((8, 8, 8), np.float32), boxes=[[[0, 4], [0, 4], [0, 4]]])
    assert isinstance(fig, Figure)
    with pytest.raises(ValueError, match="backend"):
        viz.view3d(np.zeros((8, 8, 8)), backend="vtk")


def test_view3d_niivue_widget_carries_volume_labels_and_boxes(monkeypatch):
    pytest.importorskip("ipyniivue")
    monkeypatch.setattr(viz, "in_kernel", lambda: True)
    img = np.random.default_rng(1).random((20, 16, 12)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[5:10, 5:10, 5:10] = 2
    boxes = [[[0, 10], [0, 8], [0, 12]], [[4, 14], [2, 10], [0, 12]]]
    shown = viz.view3d(img, lab, boxes, spacing=(2.0, 2.0, 3.0), label_names={2: "liver"})
    nv = shown.children[0]  # with a label, the viewer comes with its legend
    assert [v.name for v in nv.volumes] == ["image.nii", "label.nii", "boxes.nii"]
    back = nib.Nifti1Image.from_bytes(nv.volumes[0].data)
    np.testing.assert_array_equal(np.asarray(back.dataobj), img)
    np.testing.assert_allclose(back.header.get_zooms(), (2.0, 2.0, 3.0))
    edges = np.asarray(nib.Nifti1Image.from_bytes(nv.volumes[2].data).dataobj)
    np.testing.assert_array_equal(edges, np.maximum(viz.outline_volume(img.shape, boxes, [1, 2]),
                                                    viz.shell_volume(img.shape, boxes[1:], 2)))
    assert (edges[9] == 2).sum() == 2 * 8 + 2 * 10  # an x-slice through the random crop cuts its rectangle
    assert nv.volumes[1].colormap_label.labels[2] == "liver"
    # big volumes are subsampled for software WebGL
    big = viz.view3d(np.zeros((300, 10, 10), np.float32), max_size=100)
    assert nib.Nifti1Image.from_bytes(big.volumes[0].data).shape == (100, 4, 4)


def test_itk_backend_is_refused_in_headless_runs(monkeypatch):
    pytest.importorskip("ipyniivue")
    monkeypatch.setattr(viz, "in_kernel", lambda: True)
    monkeypatch.setenv("VOCO_PROFILE", "smoke")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nv = viz.view3d(np.zeros((8, 8, 8), np.float32), backend="itk")
    assert type(nv).__name__ == "NiiVue"
    assert any("headless" in str(w.message) for w in caught)


def test_fixed_views_labels_by_hand():
    cfg = resolve("smoke")  # region 64x64x32, grid 2x2x1, 32³ crops
    region = torch.arange(64 * 64 * 32, dtype=torch.float32).reshape(64, 64, 32)
    v = demo.fixed_views(region, cfg, [[8, 8, 0], [32, 0, 0]])
    torch.testing.assert_close(v.labels, torch.tensor([[0.5625, 0.1875, 0.1875, 0.0625], [0.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(v.random[0, 0], region[8:40, 8:40, 0:32])
    torch.testing.assert_close(v.bases[3, 0], region[32:, 32:, :])
    with pytest.raises(ValueError, match="leave the region"):
        demo.fixed_views(region, cfg, [[40, 0, 0]])


def test_pretrain_or_reuse_never_deletes_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a voco run directory"):
        demo.pretrain_or_reuse(tmp_path, "smoke", fresh=True)
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_voco_demo_trains_into_the_run_every_notebook_finds(tmp_path, monkeypatch):
    """`make demo`'s pre-training is the notebooks' shared run, so 03 opened in JupyterLab afterwards reuses it."""
    import shutil

    import papermill

    seen: dict[str, dict] = {}

    def execute(src, dst, parameters, **kw):
        assert kw["extra_arguments"] == demo.KERNEL_QUIET  # no per-notebook TCP warning from the kernels
        seen[Path(src).stem] = parameters
        shutil.copy(src, dst)
        viz.write_png(Figure(figsize=(1, 1)), Path(parameters["run_dir"]) / "figures" / "a.png")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    report = demo.run_demo(tmp_path, "smoke", notebooks=("00_quickstart", "02_pretraining", "03_position_explorer"))
    shared = str(demo.shared_pretrain_dir("smoke"))
    assert seen["00_quickstart"]["pretrain_dir"] == seen["02_pretraining"]["pretrain_dir"] == shared
    assert seen["03_position_explorer"]["checkpoint"] == shared
    assert "fresh" not in seen["00_quickstart"]  # a finished identical run is reused, never moved aside
    text = report.read_text()  # self-contained: figures embedded, nothing loaded from elsewhere
    assert text.count("data:image/png;base64,") == 3 and "02_pretraining" in text
    import re

    for page in [report, *tmp_path.glob("*.html")]:  # nothing the page loads from a network (links are fine)
        loads = re.findall(r'<(?:script|link|img)[^>]*(?:src|href)="(?:https?:)?//[^"]*"', page.read_text())
        assert not loads and '<script src="">' not in page.read_text(), (page, loads)


@pytest.mark.parametrize("given", [(0, 32, 0), [0, 32, 0], "(0, 32, 0)", "0,32,0", "0x32x0", "[0, 32, 0]"])
def test_crop_starts_from_papermill_strings(given):
    """`papermill -p crop_start "(0, 32, 0)"` passes a string: it means the same crop as the tuple."""
    cfg = resolve("smoke")
    region = torch.arange(64 * 64 * 32, dtype=torch.float32).reshape(1, 64, 64, 32)
    v = demo.fixed_views(region, cfg, [given])
    assert v.random_boxes[0, :, 0].tolist() == [0, 32, 0]


def test_a_crop_start_that_is_not_three_numbers_is_one_clear_error():
    with pytest.raises(ValueError, match="not three voxel indices"):
        demo.voxel_triple("(0, 32)")
    with pytest.raises(ValueError, match="not three voxel indices"):
        demo.voxel_triple("left")


def test_smoothing_is_the_debiased_moving_average():
    # w = 0.5: s1 = 0.5·4 / (1 − 0.5) = 4; s2 = (0.5·2 + 0.5·0) / 0.75 = 4/3
    assert viz.smoothed([4.0, 0.0], 0.5) == pytest.approx([4.0, 4 / 3])
    assert viz.smoothed([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert viz.smoothed([5.0] * 20, 0.9) == pytest.approx([5.0] * 20)  # a constant stays constant (no bias to 0)


def test_without_the_samples_the_stand_in_says_how_to_get_a_real_ct(monkeypatch):
    monkeypatch.setattr(demo, "samples_datalist", lambda: None)
    s = demo.sample_subject("smoke")
    assert s.name.startswith("phantom") and "fetch_samples = True" in s.note and "voco fetch samples" in s.note


def test_grid_maps_mark_each_cell_with_its_index_in_the_vector():
    """The printed label vector maps to the heatmap: cell (i, j) of a 2x2x1 grid is k = 2i + j (grid_boxes)."""
    labels = torch.tensor([0.1, 0.2, 0.3, 0.4])
    fig = viz.label_heatmap(labels, (2, 2, 1), (100.0, 100.0))
    texts = {t.get_text(): t.get_position() for t in fig.axes[0].texts}
    for k, value in enumerate(labels.tolist()):
        assert texts[f"k={k}"][0] == pytest.approx(texts[f"{value:.2f}"][0])  # same cell column
    deep = viz.label_heatmap(torch.arange(8.0) / 8, (2, 2, 2), (100.0, 100.0))
    assert {t.get_text() for t in deep.axes[1].texts} >= {"k=1", "k=3", "k=5", "k=7"}  # layer 1: k = 2(2i + j) + 1


def test_plane_views_legend_names_the_organs_in_the_slices():
    subject = demo.phantom_subject(0, "smoke")
    fig = viz.plane_views(subject.region, subject.spacing, label=subject.label, label_names=subject.label_names)
    names = {t.get_text() for leg in fig.legends for t in leg.get_texts()}
    assert names and names <= set(subject.label_names.values()) - {"background"}
    assert not viz.plane_views(subject.region, subject.spacing, label=subject.label).legends  # no names, no legend


def test_shell_volume_is_the_six_faces():
    out = viz.shell_volume((10, 10, 10), [[[2, 6], [2, 6], [2, 6]]], 3)
    assert out.sum() == 3 * (4**3 - 2**3)  # a 4³ box without its 2³ inside
    assert out[4, 4, 4] == 0 and out[2, 4, 4] == 3 and out[0].sum() == 0


def _lut_hex(lut, i: int) -> str:
    """Colour of label id `i` in the widget's colour table (a flat RGBA list from id `lut.min`)."""
    r, g, b = lut.lut[4 * (i - int(lut.min or 0)):][:3]
    return f"#{r:02x}{g:02x}{b:02x}"


def test_niivue_legend_lists_the_classes_shown_in_the_viewers_colours(monkeypatch):
    pytest.importorskip("ipyniivue")
    monkeypatch.setattr(viz, "in_kernel", lambda: True)
    img = np.zeros((12, 12, 12), np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[1:4, 1:4, 1:4], lab[6:9, 6:9, 6:9] = 2, 5
    names = {0: "background", 2: "liver", 5: "kidney & <left>", 7: "heart"}  # heart is not in the label
    shown = viz.view3d(img, lab, label_names=names)
    nv, legend = shown.children
    lut = nv.volumes[1].colormap_label
    swatches = re.findall(r"background:(#[0-9a-f]{6});[^>]*></span>([^<]*)</span>", legend.value)
    assert swatches == [(_lut_hex(lut, 2), "liver"), (_lut_hex(lut, 5), "kidney &amp; &lt;left&gt;")]
    assert _lut_hex(lut, 2) != _lut_hex(lut, 5)
    assert type(viz.view3d(img)).__name__ == "NiiVue"  # no label, no legend


def test_static_legends_use_the_viewers_colours():
    subject = demo.phantom_subject(0, "smoke")
    lut = viz._label_lut(int(subject.label.max()), subject.label_names)
    fig = viz.view3d(subject.region, subject.label, label_names=subject.label_names)  # no kernel: static figure
    (leg,) = fig.legends
    by_name = {n: i for i, n in subject.label_names.items()}
    for handle, text in zip(leg.legend_handles, leg.get_texts()):
        i = by_name[text.get_text()]
        rgb = tuple(round(255 * c) for c in handle.get_facecolor()[:3])
        assert rgb == (lut["R"][i], lut["G"][i], lut["B"][i]), text.get_text()


def test_crop_across_subjects_legend_names_the_classes_in_its_slices():
    lab = np.zeros((16, 16, 8), np.int64)
    lab[6:10, 6:10, 4] = 3  # on the axial slice z = 4 through the box centre
    lab[0:2, 0:2, 0:2] = 9  # on neither slice through the centre (8, 8, 4)
    box = [[[4, 12], [4, 12], [0, 8]]]
    img = np.random.default_rng(0).random(lab.shape)
    fig = viz.crop_across_subjects([img, img], box, labels=[lab, lab], label_names={3: "liver", 9: "spleen"})
    assert [t.get_text() for leg in fig.legends for t in leg.get_texts()] == ["liver"]
    assert not viz.crop_across_subjects([img], box, labels=[lab]).legends
