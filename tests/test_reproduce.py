"""`voco reproduce`: grid expansion, skip-if-done by resolved-config key, table rendering against hand-made
results, "not run" cells, the paper tables agreeing with the task manifests, and a killed grid completing."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from voco_lib.data.manifests import ManifestError, list_manifests
from voco_lib.reproduce import plan, render
from voco_lib.reproduce.execute import Outcome, cell_dir
from voco_lib.reproduce.grid import Cell, Table, cell_key, expand, load_table
from voco_lib.tasks.registry import load_task

REPO = Path(__file__).resolve().parents[1]


def _table(tmp_path: Path, **changes) -> Path:
    doc = {"name": "tiny", "title": "tiny", "source": "ours", "metric": "dice", "columns": "n_labeled",
           "tasks": ["phantom-seg"], "n_labeled": [1], "protocols": ["full"], "seeds": [0, 1], "curves": True,
           "rows": [{"name": "scratch", "init": "scratch"},
                    {"name": "voco", "init": "pretrain", "pretrain": {"method": "voco"}}],
           "paper": None, "budget": {"smoke": {"full": ["finetune.steps=2"], "pretrain": ["steps=2"]}}}
    doc.update(changes)
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def test_phantom_tables_expand_to_every_row_budget_protocol_and_seed():
    t = load_table("phantom")
    cells = expand(t, "cpu")
    assert len(cells) == 2 * 3 * 2 * 3  # scratch and voco x budgets 1/2/4 x full/frozen x seeds 0/1/2
    assert len(set(cells)) == len(cells)
    assert len(expand(t, "smoke")) == len(cells) // 3  # smoke: one seed (CI)
    assert {c.column for c in cells if c.row == "voco"} == {"n=1", "n=2", "n=4"}
    assert {c.init for c in cells} == {"scratch", "pretrain:voco"}
    frozen = [c for c in cells if c.protocol == "frozen"]
    assert len(frozen) == 18
    assert all("finetune.protocol=frozen" in c.overrides and "finetune.steps=60" in c.overrides for c in frozen)
    assert len(expand(t, "cpu", seeds=[5])) == len(cells) // 3
    methods = expand(load_table("phantom-methods"), "cpu")
    assert len(methods) == 5 * 2 * 2 * 3 and {c.n_labeled for c in methods} == {1, 4}


def test_cell_key_follows_the_resolved_config():
    c = expand(load_table("phantom"), "smoke")[0]
    k = cell_key(c, "smoke", None, None)
    assert k == cell_key(c, "smoke", None, None)
    assert k != cell_key(c, "cpu", None, None)  # another profile resolves differently
    assert k != cell_key(c, "smoke", "abc", None)  # another pre-training run
    other = Cell(**{**c.__dict__, "overrides": c.overrides + ("finetune.lr=1e-3",)})
    assert k != cell_key(other, "smoke", None, None)
    # an override that restates the profile's own value resolves to the same config but is a different cell spec
    assert cell_key(c, "smoke", None, "a.json") != k


def test_plan_skips_a_cell_only_when_its_key_matches(tmp_path):
    t = load_table(_table(tmp_path))
    first = [p for p in plan(t, "smoke", tmp_path / "out") if p.cell.row == "scratch"][0]
    assert first.state == "todo"
    d = cell_dir(tmp_path / "out", first.cell, first.key)
    d.mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"status": "ok", "key": first.key, "value": 0.5}))
    again = [p for p in plan(t, "smoke", tmp_path / "out") if p.cell == first.cell][0]
    assert again.state == "done"
    changed = load_table(_table(tmp_path, budget={"smoke": {"full": ["finetune.steps=3"], "pretrain": ["steps=2"]}}))
    moved = [p for p in plan(changed, "smoke", tmp_path / "out") if p.cell.row == "scratch" and p.cell.seed == 0][0]
    assert moved.state == "todo" and moved.key != first.key  # a config change reruns the cell


def test_missing_dataset_and_missing_weights_are_not_run_with_the_fix(tmp_path):
    cells = plan(load_table("segmentation"), "smoke", tmp_path / "out", seeds=[0], data_root=tmp_path / "data")
    btcv = [p for p in cells if p.cell.task == "btcv" and p.cell.row == "scratch"][0]
    assert btcv.state == "not_run"
    assert btcv.reason == (f"not run: btcv not found at {tmp_path / 'data' / 'btcv' / 'dataset.json'}; see "
                           "data_manifests/datasets/btcv.yaml (pass --data-root DIR holding DIR/<dataset>/dataset.json)")
    suprem = [p for p in cells if p.cell.row == "suprem"][0]
    assert suprem.state == "not_run" and "no weights for SuPreM" in suprem.reason
    (tmp_path / "data" / "btcv").mkdir(parents=True)
    (tmp_path / "data" / "btcv" / "dataset.json").write_text("{}")
    again = plan(load_table("segmentation"), "smoke", tmp_path / "out", seeds=[0], data_root=tmp_path / "data")
    ready = [p for p in again if p.cell.task == "btcv" and p.cell.row == "voco_b"][0]
    assert ready.state == "todo" and ready.datalist.endswith("btcv/dataset.json")


def _outcome(row: str, seed: int, value: float | None, column_n: int = 1, status: str = "ok", reason: str = "") -> Outcome:
    cell = Cell(row, "phantom-seg", "segmentation", "full", column_n, seed, (), "scratch")
    result = None if value is None else {"value": value, "metric": "dice",
                                         "curve": [{"step": 0, "dice": 0.0}, {"step": 10, "dice": value}]}
    return Outcome(cell, status, reason, result)


def test_table_rendering_matches_a_hand_computation(tmp_path):
    t = load_table(_table(tmp_path))
    outcomes = [_outcome("scratch", s, v) for s, v in enumerate([0.1, 0.2, 0.3])]
    outcomes += [_outcome("voco", s, v) for s, v in enumerate([0.3, 0.5, 0.4])]
    outcomes += [_outcome("voco", 3, None, status="failed", reason="failed: boom")]
    entries = {e.row: e for e in render.summarize(t, outcomes)}
    assert math.isclose(entries["voco"].mean, 0.4) and math.isclose(entries["voco"].sd, 0.1)
    # paired by seed: 0.2, 0.3, 0.1 (seed 3 has no score and no partner)
    assert math.isclose(entries["voco"].diff_mean, 0.2) and math.isclose(entries["voco"].diff_sd, 0.1)
    assert entries["scratch"].diff == {}
    md = render.markdown(t, list(entries.values()), "smoke", {"seeds": [0, 1, 2]})
    assert "| voco | 0.400 ± 0.100 (n=3); 1 seed(s) missing: failed: boom | +0.200 ± 0.100 |" in md
    assert "| scratch | 0.200 ± 0.100 (n=3) | — |" in md
    rows = list(__import__("csv").DictReader(render.csv_text(t, list(entries.values())).splitlines()))
    assert rows[1]["values"] == "s0=0.3;s1=0.5;s2=0.4" and rows[1]["not_run"] == "failed: boom"
    fig = render.figure(t, list(entries.values()), outcomes)
    assert len(fig.axes) == 2 and fig.axes[1].lines  # the convergence panel has the mean curves
    page = render.html_page("tiny", md, b"png")
    assert "<table>" in page and "http" not in page


def test_paper_column_is_in_percent_and_not_run_cells_say_why(tmp_path):
    t = load_table("segmentation")
    o = [_outcome("voco_b", s, 0.8 + s / 100) for s in range(3)]
    o = [Outcome(Cell("voco_b", "btcv", "segmentation", "full", None, x.cell.seed, (), "voco-b"), "ok", "", x.result)
         for x in o]
    o.append(Outcome(Cell("suprem", "btcv", "segmentation", "full", None, 0, (), None), "not_run", "not run: no weights"))
    entries = render.summarize(t, o)
    md = render.markdown(t, entries, "gpu", {"seeds": [0, 1, 2]})
    assert "| VoCo-B | 81.00 ± 1.00 (n=3) | — | 86.64 |" in md
    assert "| SuPreM | not run: no weights | — | 85.32 |" in md


def test_paper_tables_agree_with_the_task_manifests():
    """One source of truth: every paper number in a table equals its task manifest's, and every task-manifest
    number of a row a table has appears in it (BTCV's VoCo row is named `voco`: its size is unstated)."""
    seen = set()
    for name in list_manifests("paper"):
        t = load_table(name)
        if t.raw["paper"] is None:
            continue
        for row, cols in t.raw["paper"]["values"].items():
            for task, value in cols.items():
                numbers = load_task(task).paper_numbers["values"]
                assert numbers.get(row, numbers.get(row.split("_")[0])) == value, (name, row, task)
                seen.add((task, row))
    for task in {c for n in list_manifests("paper") for c in load_table(n).raw["tasks"]}:
        pn = load_task(task).paper_numbers
        for key in (pn or {}).get("values", {}):
            assert (task, key) in seen or (task, key + "_b") in seen, (task, key)


def test_bad_tables_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ManifestError, match="unknown table 'nope'"):
        load_table("nope")
    with pytest.raises(ManifestError, match="unknown field"):
        load_table(_table(tmp_path, colour="red"))
    bad = _table(tmp_path, rows=[{"name": "a", "init": "pretrain"}])
    with pytest.raises(ManifestError, match="init: pretrain and a pretrain section go together"):
        load_table(bad)
    code = subprocess.run([sys.executable, "-m", "voco_lib.cli", "reproduce", "phantom", "--workers", "0"],
                          capture_output=True, text=True, cwd=REPO)
    assert code.returncode == 2 and "--workers must be ≥ 1" in code.stderr and "Traceback" not in code.stderr


@pytest.mark.slow
def test_a_killed_grid_reruns_only_the_missing_cells(tmp_path):
    """End to end on the smoke profile: kill the driver after its first finished cell, rerun, and every cell is
    done exactly once (the finished one untouched, the interrupted one resumed, none trained twice)."""
    table, out = _table(tmp_path), tmp_path / "grid"
    cmd = [sys.executable, "-m", "voco_lib.cli", "reproduce", str(table), "--profile", "smoke", "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 1800  # generous: a loaded 2-core machine takes minutes per cell
    while not list(out.glob("cells/*/*/cell.json")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.5)
    assert p.poll() is None, f"the driver ended before its first cell: {p.stdout.read().decode()[-2000:]}"
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(120)
    first = list(out.glob("cells/*/*/cell.json"))
    assert len(first) == 1, "the grid should have been stopped after its first cell"
    stamp = first[0].stat().st_mtime_ns
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    cells = sorted(out.glob("cells/*/*/cell.json"))
    assert len(cells) == 4 and first[0].stat().st_mtime_ns == stamp
    for f in cells:
        rec = json.loads(f.read_text())
        steps = [json.loads(x)["step"] for x in (Path(rec["run_dir"]) / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x).get("kind") == "train"]
        assert steps == sorted(set(steps)), f"{f}: a step was trained twice"
        assert Path(rec["notebook"]).is_file()
    for name in ("table.md", "table.csv", "table.html", "table.png", "provenance.json"):
        assert (out / name).is_file()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["cells_reused"] == 1 and prov["cells_run"] == 3
    assert all(c["status"] == "ok" and c["key"] for c in prov["cells"])
    assert not list(out.rglob("*.partial.ipynb"))


def test_scaling_points_axes_and_fit_from_a_hand_made_grid(tmp_path):
    """Pre-training runs with known held-out errors along both axes: the points carry them, each axis passes
    through the shared point, and the pretext fit along the data axis recovers the exponent we put in."""
    from types import SimpleNamespace

    from voco_lib.reproduce import scaling
    from voco_lib.reproduce.execute import pretrain_plan

    t = load_table("scaling")
    law = lambda x: 2.0 * x ** -0.5 + 0.1  # noqa: E731  (the truth the fit must find)
    for row in (r for r in t.rows if r.init == "pretrain"):
        overrides, key = pretrain_plan(row, t, "smoke")
        volumes = int([o for o in overrides if o.startswith("n_volumes=")][0].split("=")[1])
        run = tmp_path / "pretrain" / f"{row.name}-{key}"
        run.mkdir(parents=True)
        lines = [{"kind": "train", "step": 5, "loss": 1.0, "perf": {"step_s": 0.5, "cpu_maxrss_gb": 1.0}},
                 {"kind": "train", "step": 10, "loss": 1.0, "perf": {"step_s": 1.0, "cpu_maxrss_gb": 2.0}},
                 {"kind": "eval", "step": 10, "top1": 0.5, "mae": law(volumes), "chance": 0.25}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    entries = [render.Entry(r.name, "frozen", "n=1", values={0: 0.4, 1: 0.6}) for r in t.rows]
    rep = SimpleNamespace(table=t, profile="smoke", store=tmp_path, entries=entries)
    pts = {p.row: p for p in scaling.points(rep, flops=False)}
    assert set(pts) == {r.name for r in t.rows if r.init == "pretrain"}
    assert pts["f24-v16"].feature_size == 24 and pts["f24-v16"].volumes == 16
    assert pts["f24-v16"].params > pts["f12-v16"].params
    assert pts["f12-v4"].train_s == 5 * 0.5 + 5 * 1.0 and pts["f12-v4"].peak_gb == 2.0
    assert math.isclose(pts["f12-v4"].dice, 0.5) and math.isclose(pts["f12-v4"].pretext_error, law(4))
    params_axis = scaling.axis(list(pts.values()), "params")
    assert [p.feature_size for p in params_axis] == [12, 24, 36, 48] and {p.volumes for p in params_axis} == {16}
    data_axis = scaling.axis(list(pts.values()), "volumes")
    assert [p.volumes for p in data_axis] == [4, 8, 16, 32]
    f = scaling.fit(data_axis, "volumes", "pretext_error")
    assert math.isclose(f.alpha, 0.5, rel_tol=1e-3) and math.isclose(f.c, 0.1, abs_tol=1e-3)
    assert "no fit" in scaling.fit(data_axis[:3], "volumes", "pretext_error")  # three points: refused, said why
