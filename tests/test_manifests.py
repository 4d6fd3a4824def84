"""Datalists (round trip, `images` alias, data root, missing files) and schema-validated manifests."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from voco_lib.data import manifests as M
from voco_lib.data.manifests import ManifestError, load_manifest, list_manifests, read_datalist, write_datalist


def _files(root, names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return [str(root / n) for n in names]


def test_datalist_round_trip_gives_same_absolute_paths(tmp_path):
    imgs = _files(tmp_path / "data", ["a/img1.nii.gz", "b/img2.nii.gz"])
    labs = _files(tmp_path / "data", ["a/lab1.nii.gz", "b/lab2.nii.gz"])
    val = _files(tmp_path / "other", ["v.nii.gz"])
    train = [{"image": i, "label": l, "patient": f"P{k}"} for k, (i, l) in enumerate(zip(imgs, labs))]
    path = write_datalist(tmp_path / "lists" / "dl.json", train, [{"image": val[0]}], name="t", numTraining=2)
    doc = json.loads(path.read_text())
    assert doc["name"] == "t" and doc["numTraining"] == 2
    assert doc["training"][0]["image"] == "../data/a/img1.nii.gz"  # stored relative to the JSON's folder
    assert doc["validation"][0]["image"] == "../other/v.nii.gz"
    got = read_datalist(path)
    assert [e["image"] for e in got] == imgs and [e["label"] for e in got] == labs
    assert [e["patient"] for e in got] == ["P0", "P1"]  # extra fields survive
    assert [e["image"] for e in read_datalist(path, "validation")] == val
    # moving the whole tree keeps it valid: paths are relative
    shutil.move(str(tmp_path), str(tmp_path.parent / (tmp_path.name + "_moved")))
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    assert read_datalist(moved / "lists" / "dl.json")[1]["image"] == str(moved / "data" / "b" / "img2.nii.gz")
    assert not list((moved / "lists").glob(".*"))  # no temp file left by the atomic write


def test_images_alias_and_data_root(tmp_path):
    _files(tmp_path / "root", ["x/ct.nii.gz", "x/seg.nii.gz"])
    dl = tmp_path / "lists" / "flare.json"
    dl.parent.mkdir()
    dl.write_text(json.dumps({"training": [{"images": "x/ct.nii.gz", "label": "x/seg.nii.gz"}]}))
    (e,) = read_datalist(dl, data_root=tmp_path / "root")
    assert e == {"image": str(tmp_path / "root/x/ct.nii.gz"), "label": str(tmp_path / "root/x/seg.nii.gz")}
    with pytest.raises(KeyError, match="validation"):
        read_datalist(dl, "validation", data_root=tmp_path / "root")


def test_voco_data_dir_is_the_fallback_root(tmp_path, monkeypatch):
    _files(tmp_path / "store", ["ct.nii.gz"])
    dl = tmp_path / "lists" / "d.json"
    dl.parent.mkdir()
    dl.write_text(json.dumps({"training": [{"image": "ct.nii.gz"}]}))
    monkeypatch.setenv("VOCO_DATA_DIR", str(tmp_path / "store"))
    assert M.data_dir() == tmp_path / "store"
    assert read_datalist(dl)[0]["image"] == str(tmp_path / "store" / "ct.nii.gz")
    monkeypatch.delenv("VOCO_DATA_DIR")
    assert M.data_dir().name == "voco" and M.data_dir().parent.name == ".cache"


def test_missing_listed_file_names_file_and_datalist(tmp_path):
    _files(tmp_path, ["here.nii.gz"])
    dl = write_datalist(tmp_path / "d.json", [{"image": str(tmp_path / "here.nii.gz")}, {"image": "gone.nii.gz"}])
    with pytest.raises(ValueError) as e:
        read_datalist(dl)
    assert "gone.nii.gz" in str(e.value) and str(dl) in str(e.value) and "here.nii.gz" not in str(e.value)


def test_bad_datalists_get_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_datalist(bad)
    bad.write_text(json.dumps({"training": [{"label": "x"}]}))
    with pytest.raises(ValueError, match="no 'image' field"):
        read_datalist(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_datalist(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------- manifests
def _kinds():
    return sorted(p.stem for p in (M.manifests_dir() / "schemas").glob("*.json"))


def test_every_manifest_with_a_schema_validates():
    checked = 0
    for kind in _kinds():
        for name in list_manifests(kind):
            doc = load_manifest(kind, name if (M.manifests_dir() / kind).is_dir() else None)
            assert doc["name"] == name
            checked += 1
    assert {"datasets", "samples", "collections"} <= set(_kinds()) and checked >= 60


def _numbers_without_source(node, path="", parent=None):
    """Every integer (not a boolean) must sit beside a `source` or a `<field>_source` key."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, int) and not isinstance(v, bool) and "source" not in node and f"{k}_source" not in node:
                out.append(f"{path}/{k}")
            out += _numbers_without_source(v, f"{path}/{k}", node)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _numbers_without_source(v, f"{path}/{i}", parent)
    return out


def test_every_dataset_number_cites_a_source():
    missing = {n: m for n in list_manifests("datasets") if (m := _numbers_without_source(load_manifest("datasets", n)))}
    assert not missing
    assert _numbers_without_source({"a": {"volumes": 3}}) == ["/a/volumes"]  # the checker itself bites


def test_prect160k_counts_sum_to_the_documented_figures():
    datasets = {n: load_manifest("datasets", n) for n in list_manifests("datasets")}
    members = {n: d["pretraining"] for n, d in datasets.items() if "pretraining" in d}
    (c160,) = [c for c in load_manifest("collections")["collections"] if c["name"] == "PreCT-160K"]
    (c10,) = [c for c in load_manifest("collections")["collections"] if c["name"] == "PreCT-10K"]
    assert sorted(c160["members"]) == sorted(members) and len(members) == c160["rows"] == 23
    total = sum(p["volumes"] for p in members.values())
    assert total == c160["rows_sum"] == 161_757
    assert c160["printed_total"] == 160_167 and total - c160["printed_total"] == 1_590  # [T1]'s own inconsistency
    assert sorted(c10["members"]) == sorted(n for n, p in members.items() if p["in_10k"])
    assert sum(members[n]["volumes"] for n in c10["members"]) == c10["rows_sum"] == 10_881
    tumour = members["tumor-datasets"]
    assert sum(c["volumes"] for c in tumour["components"]) == tumour["volumes"] == 1334
    assert {p["group"] for p in members.values()} == {"abdomen", "headneck", "chest", "not_loaded"}


def test_downstream_datasets_of_spec_7_1_are_present():
    names = set(list_manifests("datasets"))
    for n in ["btcv", "amos22", "amos22-mri", "word", "flare22", "flare23", "abdomenct-1k", "abdomenatlas1.0", "totalsegmentator",
              "mm-whs", "mm-whs-mri", "asoca", "avt", "chaos", "sliver07", "3d-ircadb", "kits", "kipa22", "tcia-pancreas",
              "panorama", "segthor", "bhsd", "structseg19", "pengwin", "covid-19-20", "fumpe", "parse22", "aiib23", "lndb",
              "acdc", "atlas-mri", "brats21", "cc-ccii", "luna16", "ixi", "oasis", "ctrg-chest", "ct-rate", "verse20",
              "autopet-ii"] + [f"msd-task{i:02d}-{t}" for i, t in enumerate(
                  ["braintumour", "heart", "liver", "hippocampus", "prostate", "lung", "pancreas", "hepaticvessel", "spleen",
                   "colon"], start=1)]:
        assert n in names, n
        assert load_manifest("datasets", n).get("downstream"), n
    assert load_manifest("datasets", "btcv")["downstream"][0]["out_channels"] == 14


@pytest.fixture
def scratch_manifests(tmp_path, monkeypatch):
    """A copy of data_manifests/ that a test may break, with manifests_dir() pointing at it."""
    root = tmp_path / "data_manifests"
    shutil.copytree(M.manifests_dir(), root)
    monkeypatch.setattr(M, "manifests_dir", lambda: root)
    return root


def test_unknown_field_fails_naming_file_and_field(scratch_manifests):
    f = scratch_manifests / "datasets" / "btcv.yaml"
    doc = yaml.safe_load(f.read_text())
    doc["licence"]["licnese_url"] = "typo"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError) as e:
        load_manifest("datasets", "btcv")
    msg = str(e.value)
    assert str(f) in msg and "licnese_url" in msg and "licence" in msg and "unknown field" in msg


def test_schema_violations_are_reported(scratch_manifests):
    f = scratch_manifests / "samples.yaml"
    doc = yaml.safe_load(f.read_text())
    doc["packages"][0]["sha256"] = "abc"
    doc["volumes"][0]["image"]["member"] = "../../etc/passwd"  # path traversal in a manifest is rejected too
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError) as e:
        load_manifest("samples")
    assert "packages/0/sha256" in str(e.value) and "volumes/0/image/member" in str(e.value)
    f2 = scratch_manifests / "datasets" / "word.yaml"
    f2.write_text(f2.read_text().replace("name: word", "name: words"))
    with pytest.raises(ManifestError, match="make them equal"):
        load_manifest("datasets", "word")
    with pytest.raises(FileNotFoundError, match="no manifest 'nonexistent'"):
        load_manifest("datasets", "nonexistent")
