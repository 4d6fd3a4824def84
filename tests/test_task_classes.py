"""Class names in the task registry: every task lists them or says why not; the transcribed maps hold their facts."""

from __future__ import annotations

import pytest

from voco_lib.tasks.registry import list_tasks, load_task, task_from_dict


@pytest.mark.parametrize("name", list_tasks())
def test_every_task_has_class_names_or_a_note(name):
    t = load_task(name)
    if t.type == "vision_language":  # no label classes: findings vocabulary / reports instead
        return
    if t.classes is None:
        assert len(t.raw.get("classes_note", "")) > 40, f"{name}: classes null needs a classes_note saying why"
    else:
        assert len(t.classes) == (t.num_classes or len(t.classes)) and len(set(t.classes)) == len(t.classes)


def test_schema_rule_requires_names_or_a_note(tmp_path):
    raw = dict(load_task("pengwin").raw)
    raw.pop("classes_note")
    with pytest.raises(ValueError, match=r"pengwin\.yaml: no class names and no classes_note"):
        task_from_dict(raw, tmp_path / "pengwin.yaml")
    raw_reg = {k: v for k, v in load_task("oasis").raw.items() if k != "classes_note"}
    with pytest.raises(ValueError, match="classes_note"):
        task_from_dict(raw_reg, tmp_path / "oasis.yaml")


def test_transcribed_class_maps():
    # VerSe: label value = index; 1-7 C, 8-19 T, 20-25 L1-L6, 26 sacrum, 27 coccyx, 28 T13 (anjany/verse README)
    v = load_task("verse20").classes
    assert v[1] == "C1" and v[7] == "C7" and v[8] == "T1" and v[19] == "T12" and v[20] == "L1" and v[25] == "L6"
    assert v[26:] == ("sacrum", "coccyx", "T13") and len(v) == 29
    # TotalSegmentator v1 map: spot values as in map_to_binary.py class_map["total_v1"] (and the authors' datalist)
    ts = load_task("totalsegmentator").classes
    assert len(ts) == 105 and ts[1] == "spleen" and ts[18] == "vertebrae_L5" and ts[41] == "vertebrae_C1"
    assert ts[58] == "rib_left_1" and ts[92] == "sacrum" and ts[104] == "urinary_bladder"
    # BraTS 2021: raw 1, 2, 4 -> classes 1, 2, 3 (the authors' Convert_brats_Classesd)
    b = load_task("brats21")
    assert b.raw["label_remap"] == {"4": 3} and b.classes[3] == "enhancing_tumour"


def test_nnunet_engine_tasks_have_their_export_settings(tmp_path):
    for name in ("verse20", "autopet"):
        t = load_task(name)
        assert t.engine == "nnunet" and len(t.raw["nnunet"]["channel_names"]) == t.in_channels
    assert load_task("btcv").engine == "monai"
    raw = dict(load_task("autopet").raw)
    with pytest.raises(ValueError, match="channel_names lists 2 channels but in_channels is 1"):
        task_from_dict({**raw, "in_channels": 1}, tmp_path / "autopet.yaml")
    with pytest.raises(ValueError, match="needs an 'nnunet' section"):
        task_from_dict({k: v for k, v in raw.items() if k != "nnunet"}, tmp_path / "autopet.yaml")
