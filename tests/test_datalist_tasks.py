"""Image-level tasks on a real (MSD-style) datalist: labelled entries, --n-labeled, clear errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from voco_lib.tasks.data import labelled_datalist
from voco_lib.tasks.registry import load_task


def _datalist(tmp_path, entries: dict[str, list[dict]]) -> str:
    rng = np.random.default_rng(0)
    for split in entries.values():
        for e in split:
            img = (rng.normal(0, 300, (40, 40, 36)) - 200).astype(np.int16)
            nib.save(nib.Nifti1Image(img, np.diag([1.5, 1.5, 1.5, 1.0])), tmp_path / e["image"])
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(entries))
    return str(path)


def test_labelled_datalist_cuts_training_and_checks_every_entry(tmp_path):
    dl = _datalist(tmp_path, {"training": [{"image": f"t{i}.nii.gz", "target": i % 2} for i in range(3)],
                              "validation": [{"image": "v0.nii.gz", "target": 1}]})
    ctx = SimpleNamespace(task=load_task("luna16"), datalist=dl, roi=(32, 32, 32), n_labeled=2)
    train, val = labelled_datalist(ctx, ("image",), "target", lambda v: v is not None, "integer 'target'")
    assert [s["target"] for s in train] == [0, 1] and [s["target"] for s in val] == [1]
    assert tuple(train[0]["image"].shape[1:]) != () and train[0]["image"].shape[0] == 1

    bad = _datalist(tmp_path, {"training": [{"image": "t0.nii.gz", "report": 3}], "validation": []})
    ctx = SimpleNamespace(task=load_task("luna16"), datalist=bad, roi=(32, 32, 32), n_labeled=None)
    with pytest.raises(ValueError, match=r"datalist.json: entry .*t0.* has no 'report' text"):
        labelled_datalist(ctx, ("image",), "report", lambda v: isinstance(v, str), "'report' text")


def test_labelled_datalist_refuses_too_few_volumes_and_a_missing_validation_list(tmp_path):
    dl = _datalist(tmp_path, {"training": [{"image": "t0.nii.gz", "target": 0}], "validation": []})
    ctx = SimpleNamespace(task=load_task("luna16"), datalist=dl, roi=(32, 32, 32), n_labeled=2)
    with pytest.raises(ValueError, match="--n-labeled 2 but .*datalist.json lists only 1 training volumes"):
        labelled_datalist(ctx, ("image",), "target", lambda v: v is not None, "integer 'target'")
    ctx.n_labeled = None
    with pytest.raises(ValueError, match="no 'validation' list; add one"):
        labelled_datalist(ctx, ("image",), "target", lambda v: v is not None, "integer 'target'")
