"""The downstream task registry: every manifest validates, covers Luffy03/Large-Scale-Medical Downstream/README.md,
and bad manifests fail clearly."""

from __future__ import annotations

import pytest
import yaml

from voco_lib.tasks.registry import TYPES, PhantomSpec, Task, list_tasks, load_task, task_from_dict

# Every row of Luffy03/Large-Scale-Medical Downstream/README.md (commit 1ad538b; rows holding several tasks
# expanded), plus the 5 phantom analogs.
SPEC_ROWS = {
    "btcv", "amos", "word", "flare22", "flare23", "abdomen1k", "abdomenatlas", "totalsegmentator", "mmwhs", "asoca",
    "aorta", "chaos", "sliver07", "ircadb", "kits", "kipa", "tcia-panc", "panorama", "segthor", "bhsd", "structseg19",
    "pengwin", "covid19", "fumpe", "parse22", "aiib23", "lndb", "msd03-liver", "msd07-pancreas", "msd09-spleen",
    "msd06-lung", "msd08-hepaticvessel", "msd10-colon", "amos-mri", "mmwhs-mri", "acdc", "atlas-mri",
    "msd01-braintumour", "brats21", "msd02-heart", "msd04-hippocampus", "msd05-prostate", "cc-ccii", "luna16",
    "oasis", "ixi", "ctrg-chest", "ct-rate", "verse20", "autopet",
}
PHANTOM = {"phantom-seg", "phantom-cls", "phantom-reg", "phantom-vl", "phantom-rg"}


def test_registry_covers_the_spec_table_and_the_phantom_analogs():
    assert set(list_tasks()) == SPEC_ROWS | PHANTOM
    assert len(SPEC_ROWS) == 50  # the Downstream README's 50 rows (commit 1ad538b)


@pytest.mark.parametrize("name", sorted(SPEC_ROWS | PHANTOM))
def test_every_task_validates_and_is_consistent(name):
    t = load_task(name)
    assert t.name == name and t.type in TYPES
    assert len(t.roi) == 3 and all(r > 0 for r in t.roi)
    if t.classes is not None:
        assert len(t.classes) == t.num_classes
    if t.type == "segmentation":
        assert t.metric == "dice" and t.num_classes >= 2
    if t.paper_numbers:
        assert "Large-Scale-Medical" in t.paper_numbers["source"] and t.paper_numbers["values"]
    assert t.raw["source"]


def test_known_facts_from_the_spec():
    btcv = load_task("btcv")
    assert btcv.num_classes == 14 and btcv.roi == (96, 96, 96) and btcv.spacing == (1.5, 1.5, 1.5)
    assert btcv.intensity == {"kind": "hu_window", "range": [-175, 250]}
    assert (btcv.epochs, btcv.warmup_epochs, btcv.lr) == (1000, 20, 3e-4)
    assert btcv.paper_numbers["values"]["scratch"] == 82.79 and btcv.paper_numbers["values"]["voco"] == 86.64
    assert load_task("totalsegmentator").paper_numbers["values"]["voco_h"] == 86.18
    assert load_task("msd01-braintumour").in_channels == 4 and load_task("msd05-prostate").in_channels == 2
    assert load_task("abdomenatlas").lr == 1e-3 and load_task("abdomenatlas").spacing == (1.5, 1.5, 2.0)
    assert (load_task("ct-rate").epochs, load_task("ct-rate").lr) == (10, 1e-5)
    assert load_task("mmwhs").intensity["range"] == [0, 1700] and load_task("mmwhs").roi == (64, 64, 64)
    # counted by type: 44 segmentation rows, 2 classification, 2 registration, 2 vision-language (+ phantoms)
    counts = {ty: len(set(list_tasks(ty)) - PHANTOM) for ty in TYPES}
    assert counts == {"segmentation": 44, "classification": 2, "registration": 2, "vision_language": 2}


def test_bad_manifests_fail_with_the_file_and_the_fix(tmp_path):
    good = dict(load_task("btcv").raw)
    with pytest.raises(ValueError, match=r"btcv\.yaml.*unknown field.*colour"):
        task_from_dict({**good, "colour": "red"}, tmp_path / "btcv.yaml")
    with pytest.raises(ValueError, match="3 class names but num_classes=14"):
        task_from_dict({**good, "classes": good["classes"][:3]}, tmp_path / "btcv.yaml")
    with pytest.raises(ValueError, match="differs from the file name"):
        task_from_dict(good, tmp_path / "other.yaml")
    with pytest.raises(ValueError, match="start with 'background'"):
        task_from_dict({**good, "classes": list(reversed(good["classes"]))}, tmp_path / "btcv.yaml")
    bad = tmp_path / "mytask.yaml"
    bad.write_text(yaml.safe_dump({**good, "name": "mytask", "roi": [96, 96]}))
    with pytest.raises(ValueError, match="mytask.yaml.*roi"):
        load_task(bad)
    with pytest.raises(ValueError, match="unknown task 'no-such-task'"):
        load_task("no-such-task")


def test_cli_lists_every_task(capsys):
    from voco_lib.cli import main

    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert "55 tasks (50 real, 5 phantom analogs)" in out
    assert all(f"\n{n} " in out for n in ("btcv", "phantom-seg", "oasis", "ct-rate"))


def test_every_task_names_an_existing_dataset_manifest():
    from voco_lib.data.manifests import list_manifests

    datasets = set(list_manifests("datasets"))
    missing = {n: load_task(n).dataset for n in list_tasks() if load_task(n).dataset not in datasets}
    assert not missing, f"tasks naming datasets without a manifest in data_manifests/datasets/: {missing}"


def test_recipe_fields_are_typed_on_task_with_the_defaults_resolved_once(tmp_path):
    """A manifest's null / missing recipe values take Task's documented defaults (lr 3e-4, 100 epochs, no
    warmup), so no runner or engine needs its own `or` fallback."""
    good = dict(load_task("btcv").raw)
    t = task_from_dict({**good, "recipe": {"epochs": None, "lr": None}}, tmp_path / "btcv.yaml")
    assert (t.lr, t.epochs, t.warmup_epochs) == (Task.lr, Task.epochs, Task.warmup_epochs) == (3e-4, 100, 0)
    assert isinstance(t.lr, float) and isinstance(t.epochs, int) and t.engine == "monai" and t.label_remap == {}
    assert load_task("brats21").label_remap == {4: 3} and load_task("verse20").engine == "nnunet"
    # registration similarity: the manifest's, else by modality
    assert load_task("oasis").similarity == "lncc" and t.similarity == "mse" and t.smoothness_weight == 1.0


def test_phantom_section_is_typed_with_its_defaults():
    seg, cls = load_task("phantom-seg"), load_task("phantom-cls")
    assert isinstance(seg.phantom, PhantomSpec) and seg.phantom.shape == (80, 80, 64) and seg.phantom.spacing == 3.0
    assert seg.phantom.organs[0] == "spleen" and seg.phantom.seed_offset == 100_000
    assert cls.phantom.organs == () and cls.phantom.target == "lesion_present" and cls.phantom.pairs == "inter"
    assert load_task("btcv").phantom is None


def test_a_phantom_section_without_shape_names_the_file(tmp_path):
    raw = dict(load_task("phantom-seg").raw)
    with pytest.raises(ValueError, match=r"phantom-seg\.yaml.*\['shape'\]"):
        task_from_dict({**raw, "phantom": {"spacing": 3.0}}, tmp_path / "phantom-seg.yaml")


def test_n_labeled_below_one_is_refused_naming_the_flag():
    from types import SimpleNamespace

    from voco_lib.tasks.data import labelled_count

    assert labelled_count(SimpleNamespace(n_labeled=None), 8) == 8 and labelled_count(SimpleNamespace(n_labeled=3), 8) == 3
    for k in (0, -2):
        with pytest.raises(ValueError, match=f"--n-labeled must be ≥ 1, got {k}"):
            labelled_count(SimpleNamespace(n_labeled=k), 8)


def test_negative_label_values_are_refused_naming_the_file():
    import torch

    from voco_lib.data.volumes import VolumeError
    from voco_lib.tasks.data import remap_labels

    btcv, brats = load_task("btcv"), load_task("brats21")
    assert remap_labels(btcv, torch.tensor([0, 13]), "lab.nii.gz").tolist() == [0, 13]
    for task in (btcv, brats):  # with and without a label_remap (whose table would wrap -1 to its last entry)
        with pytest.raises(VolumeError, match=r"lab\.nii\.gz: holds negative label value\(s\) \[-1\]"):
            remap_labels(task, torch.tensor([[0, 1], [-1, 2]]), "lab.nii.gz")
