"""`voco estimate`: the predicted cache bytes equal what the cache writes; headers give the chain's grid; huge
datalists are sampled; the step model scales with the batch. No timing assertions (see benchmarks/estimate.py)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from voco_lib.config import resolve
from voco_lib.data.cache import load_preprocessed
from voco_lib.data.loader import datalist_images
from voco_lib.data.phantom import write_phantoms
from voco_lib.data.preprocess import preprocess
from voco_lib.estimate import (cli_estimate, datalist_cost, entry_geometry, estimate, gridded_shape, header_geometry,
                               modelled_step, npy_bytes)
from voco_lib.methods import get_method


def _datalist(folder: Path, images: list[str]) -> Path:
    path = folder / "dataset.json"
    path.write_text(json.dumps({"training": [{"image": p} for p in images]}))
    return path


def _cache_files_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in cache.iterdir() if f.suffix in (".npy", ".json"))


@pytest.mark.parametrize("shape,dtype", [((1, 64, 64, 48), "uint16"), ((1, 3, 5, 7), "uint8"), ((2, 9, 9, 9), "float16")])
def test_npy_bytes_is_the_size_np_save_writes(shape, dtype):
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype))
    assert npy_bytes(shape, dtype) == buf.tell()


def test_cache_bytes_equal_what_the_cache_writes_for_phantoms(tmp_path):
    datalist = write_phantoms(tmp_path / "ph", 3, seed=5, shape=(40, 40, 32), spacing=3.0)
    cfg = resolve("smoke")
    cost = datalist_cost(str(datalist), cfg, sample=64, seed=0, exact=True)
    cache = tmp_path / "cache"
    for e in json.loads(datalist.read_text())["training"]:
        load_preprocessed(Path(datalist.parent / e["image"]), cfg.data.chain, cache)
    assert len(list(cache.glob("*.npy"))) == 3
    assert cost.cache_bytes == _cache_files_bytes(cache)
    assert cost.shapes_from == "data" and cost.n_volumes == 3
    # from the headers alone: an upper bound (air around the body would be cropped away by the foreground crop)
    header = datalist_cost(str(datalist), cfg, sample=64, seed=0, exact=False)
    assert header.cache_bytes >= cost.cache_bytes
    for h, d in zip(header.shapes, cost.shapes):
        assert all(hx >= dx for hx, dx in zip(h, d))


@pytest.mark.filterwarnings("ignore::voco_lib.data.volumes.HURangeWarning")  # a volume without air, on purpose
def test_header_grid_equals_the_chain_when_every_voxel_is_foreground(tmp_path):
    """Oblique, LPS-ordered, anisotropic voxels: the lazy grid from the header is the chain's real output grid."""
    rng = np.random.default_rng(0)
    affine = np.array([[-0.8, 0.05, 0.0, 10.0], [0.0, 0.0, -2.5, 5.0], [0.0, 0.9, 0.0, -3.0], [0, 0, 0, 1]])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(rng.uniform(0, 200, (37, 23, 41)).astype(np.int16), affine), path)  # HU > -175
    for chain in ("abdomen", "chest", "cvpr"):
        real = preprocess(path, chain)["image"]
        shape, aff = entry_geometry(path, chain, exact=False)
        assert shape == tuple(real.shape), chain
        np.testing.assert_allclose(aff, real.affine.numpy(), atol=1e-6)
    # air around the body: the chain crops it, the header cannot know it (an upper bound)
    air = np.full((100, 90, 41), -1000, np.int16)
    air[10:47, 10:33, :] = rng.uniform(0, 200, (37, 23, 41))
    nib.save(nib.Nifti1Image(air, np.diag([1.5, 1.5, 1.5, 1.0])), path)
    assert entry_geometry(path, "abdomen", exact=False)[0] == (1, 100, 90, 64)
    assert entry_geometry(path, "abdomen", exact=True)[0] == (1, 64, 64, 64)
    # the pad: a volume smaller than the chain's minimum size is padded to 64³
    assert gridded_shape((10, 10, 10), np.eye(4), "abdomen")[0] == (1, 64, 64, 64)


def test_a_large_datalist_is_sampled_from_headers(tmp_path):
    """1,000 tiny NIfTIs of two sizes: 64 headers are read, the mean entry is extrapolated to all of them."""
    images = []
    for i in range(1000):
        name = f"v{i:04d}.nii"
        side = 96 if i % 2 else 48  # 1.5 mm: 96 stays 96, 48 is padded to 64
        nib.save(nib.Nifti1Image(np.zeros((side, side, 2), np.int16), np.diag([1.5, 1.5, 1.5, 1.0])), tmp_path / name)
        images.append(name)
    datalist = _datalist(tmp_path, images)
    cfg = resolve("smoke", ["data.n_eval=0"])
    cost = datalist_cost(str(datalist), cfg, sample=64, seed=3, exact=False)
    assert cost.n_volumes == 1000 and len(cost.shapes) == 64 and cost.shapes_from == "header"
    assert {s[1:] for s in cost.shapes} == {(96, 96, 64), (64, 64, 64)}
    entry = {s: npy_bytes(s, "uint16") for s in set(cost.shapes)}
    mean_npy = np.mean([entry[s] for s in cost.shapes])
    # sidecars (~1 KB, their path and affine digits vary) are the only part not fixed by the shapes
    assert 0 < cost.cache_bytes - 1000 * mean_npy < 1000 * 2048
    assert datalist_cost(str(datalist), cfg, sample=64, seed=3, exact=False).shapes == cost.shapes  # seeded
    assert any("extrapolated from 64 of 1000" in n for n in cost.notes)


def test_header_errors_name_the_file(tmp_path):
    path = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), path)
    with pytest.raises(ValueError, match="3-D"):
        gridded_shape(*header_geometry(path), "abdomen")
    bad = tmp_path / "x.mha"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="x.mha"):
        header_geometry(bad)
    with pytest.raises(ValueError, match="sample"):
        estimate("phantom", "smoke", sample=0)


def test_step_model_scales_with_the_batch():
    """FLOPs and saved activations are per crop: twice the volumes per step, twice the FLOPs; weights do not grow."""
    f1, m1 = modelled_step(resolve("smoke", ["batch_size=1"]))
    f2, m2 = modelled_step(resolve("smoke", ["batch_size=2"]))
    assert f1 > 1e9 and f2 == pytest.approx(2 * f1, rel=0.02)
    assert m1 < m2 < 2 * m1
    # amsgrad keeps a third float32 AdamW state per trainable parameter; activations are unchanged
    _, m_plain = modelled_step(resolve("smoke", ["batch_size=1", "train.amsgrad=false"]))
    with torch.device("meta"):
        model = get_method("voco").build_model(resolve("smoke"))
    assert m1 - m_plain == 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_phantom_estimate_and_cli_json(tmp_path, capsys):
    out = tmp_path / "est.json"
    args = argparse.Namespace(data="phantom", profile="smoke", overrides=["n_volumes=2"], sample=64, exact=False,
                              json=str(out), measure=False)
    assert cli_estimate(args) == 0
    table = capsys.readouterr().out
    assert "loader RAM" in table and "not measured" in table
    e = json.loads(out.read_text())
    cfg = resolve("smoke")
    assert e["n_volumes"] == 2 + cfg.data.n_eval and e["cache_bytes"] == 0 and e["step_seconds"] is None
    resident = sum(2 * int(np.prod(s)) for s in e["sampled_shapes"])  # uint16 phantoms
    v = cfg.views
    per_sample = 4 * (max(int(np.prod(s)) for s in e["sampled_shapes"]) + int(np.prod(v.region))
                      + (v.n_random + v.n_bases) * int(np.prod(v.crop_size)))
    assert e["loader_ram_bytes"] == resident + cfg.batch_size * per_sample  # workers=0: one batch in flight
    assert e["step_memory_how"] == "modelled" and e["wall_seconds"] == {"1": None, "8": None}


@pytest.mark.slow
def test_cache_bytes_equal_what_the_cache_writes_for_the_sample_cts(samples_data_dir, tmp_path):
    """Real CTs (the fetched samples): the chain-based estimate is the cache's bytes; the header one bounds them."""
    datalist = samples_data_dir / "samples" / "dataset.json"
    cfg = resolve("smoke", ["data.n_eval=0"])
    images = [str(p) for p in datalist_images(datalist, "training")][:2]
    sub = _datalist(tmp_path, images)
    exact = datalist_cost(str(sub), cfg, sample=64, seed=0, exact=True)
    header = datalist_cost(str(sub), cfg, sample=64, seed=0, exact=False)
    cache = tmp_path / "cache"
    for p in images:
        load_preprocessed(p, cfg.data.chain, cache)
    assert exact.cache_bytes == _cache_files_bytes(cache)
    assert header.cache_bytes >= exact.cache_bytes
