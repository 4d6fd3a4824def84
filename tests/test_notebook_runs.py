"""Notebooks executed by papermill on inputs that `make test`'s nbval run does not use: a released-layout VoCo
file in 03_position_explorer, and the real sample CT branch of 01_geometric_context."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def _run(name: str, out: Path, parameters: dict, monkeypatch) -> nbformat.NotebookNode:
    import papermill as pm

    monkeypatch.setenv("VOCO_PROFILE", "smoke")
    monkeypatch.setenv("VOCO_HEADLESS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pm.execute_notebook(str(NB_DIR / f"{name}.ipynb"), str(out), parameters=parameters, cwd=str(NB_DIR),
                        kernel_name="python3", progress_bar=False)
    return nbformat.read(out, as_version=4)


def _stdout(nb: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                     if o.output_type == "stream")


@pytest.mark.slow
def test_position_explorer_runs_on_a_released_file(tmp_path, monkeypatch):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, use_v2=True)
    ckpt = tmp_path / "VoCo_test_SSL_head.pt"
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith(("decoder", "out."))}, ckpt)
    run = tmp_path / "run"
    nb = _run("03_position_explorer", tmp_path / "03.ipynb",
              {"checkpoint": str(ckpt), "run_dir": str(run), "probe_crops": 6}, monkeypatch)
    text = _stdout(nb)
    assert "VoCo_test_SSL_head.pt: a backbone without VoCo's position heads (feature_size 12; encoder: loaded " \
           "145/145 (100.0%)" in text and "(no trained head)" in text
    assert "'n_crops': 6, 'top1_loo'" in text  # the probe ran
    for fig in ("crop_views", "prediction", "prediction_probe"):
        assert (run / "figures" / f"{fig}.png").stat().st_size > 10_000, fig


@pytest.mark.network
@pytest.mark.slow
def test_geometric_context_uses_the_real_sample_ct(samples_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("VOCO_DATA_DIR", str(samples_data_dir))
    run = tmp_path / "run"
    nb = _run("01_geometric_context", tmp_path / "01.ipynb", {"run_dir": str(run), "show_3d": False}, monkeypatch)
    text = _stdout(nb)
    datalist = samples_data_dir / "samples" / "dataset.json"
    assert f"sample CT ts_p1_example_ct from {datalist}" in text, text[:2000]
    assert "not on this machine" not in text  # the phantom fallback did not run
    figures = {p.name: p.read_bytes() for p in (run / "figures").glob("*.png")}
    assert {"sample_views.png", "phantom_views.png", "label_heatmap.png", "prior_across_subjects.png"} <= set(figures)
    assert len(figures["sample_views.png"]) > 10_000 and figures["sample_views.png"] != figures["phantom_views.png"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["10_segmentation", "12_registration"])
def test_task_notebooks_display_every_figure_they_save(name, tmp_path, monkeypatch):
    """Each cell that writes a figure (`viz.show_figure`) also shows it, once per figure."""
    nb = _run(name, tmp_path / f"{name}.ipynb", {"run_dir": str(tmp_path / "run")}, monkeypatch)
    cells = [c for c in nb.cells if c.cell_type == "code" and "viz.show_figure(" in c.source]
    assert cells
    for c in cells:
        images = [o for o in c.outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
        assert len(images) == c.source.count("viz.show_figure("), c.source


@pytest.mark.slow
def test_position_explorer_runs_on_your_own_folder_of_scans(tmp_path, monkeypatch):
    """`-p data DIR -p volume N`: 03 lists the folder and explores volume N of it."""
    import nibabel as nib
    import numpy as np

    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(2):
        hu = np.random.default_rng(i).normal(-300, 400, (40, 40, 30)).clip(-1000, 1500).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 2.0, 1.0])), scans / f"case{i}.nii.gz")
    nb = _run("03_position_explorer", tmp_path / "03.ipynb",
              {"data": str(scans), "volume": 1, "run_dir": str(tmp_path / "run"), "hit_rate_crops": 0}, monkeypatch)
    assert f"volume 1 of 2 in {scans}: {scans / 'case1.nii.gz'}" in _stdout(nb)
    assert (tmp_path / "run" / "figures" / "crop_views.png").stat().st_size > 10_000
