"""benchmarks/gpu_check.py stays runnable without a GPU: its dry run imports and configures every section."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SECTIONS = ["environment", "backbone", "pretrain", "finetune-scratch", "finetune-voco", "fp16", "resume", "ddp",
            "backbone-compile"]


@pytest.fixture
def mod(monkeypatch):
    """benchmarks/gpu_check.py as a module (registered, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_the_plan_and_builds_every_section(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    plan = p.stdout.split("-> ")[0]
    assert [ln.split()[0] for ln in plan.splitlines()[1:]] == SECTIONS
    summary = p.stdout.splitlines()[-len(SECTIONS):]
    assert [ln.split()[:2] for ln in summary] == [[s, "ok"] for s in SECTIONS]
    figures = {ln.split()[0]: json.loads(ln.split(None, 2)[2]) for ln in summary}
    assert figures["pretrain"] == {"steps": 200, "feature_size": 48, "amp": "bf16"}
    assert figures["finetune-scratch"]["roi"] == [96, 96, 96] and figures["fp16"]["amp"] == "fp16"
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_plan_fits_the_budget(mod):
    assert [s.name for s in mod.SECTIONS] == SECTIONS
    assert sum(s.budget_s for s in mod.SECTIONS) <= mod.TOTAL_BUDGET_S <= 8 * 60


def test_a_renamed_config_key_breaks_the_plan(mod):
    with pytest.raises(ValueError, match=r"unknown config key 'train\.workers'"):  # moved to data.workers
        mod.build_config("gpu", [*mod.PRETRAIN, "train.workers=4"])
    with pytest.raises(ValueError, match="nope"):
        mod.build_config("gpu", ["finetune.nope=1"])


def test_a_broken_section_is_recorded_and_the_rest_run(mod, monkeypatch, capsys):
    monkeypatch.setattr(mod, "PRETRAIN", (*mod.PRETRAIN, "data.workerz=2"))
    monkeypatch.setattr(mod, "SECTIONS", tuple(s for s in mod.SECTIONS if s.name in ("pretrain", "fp16")))
    assert mod.main(["--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "pretrain          error" in out and "unknown config key 'data.workerz'" in out
    assert "fp16              ok" in out


def test_without_cuda_the_real_run_refuses_with_the_fix(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "use --dry-run" in p.stderr


def test_a_section_past_its_time_is_stopped_keeping_its_partial_figures(mod, monkeypatch, tmp_path):
    import time

    monkeypatch.setattr(mod, "fresh_gpu", lambda: None)  # no GPU memory to release here

    def slow(ctx):
        ctx.partial["first part"] = 1.0
        time.sleep(30)
        return mod.outcome({})

    ctx = mod.Ctx(tmp_path, dry=False, results={}, deadline=time.monotonic() + 100)
    r = mod.run_section(mod.Section("slow", 1, "sleeps", slow), ctx)  # limit: 2 × budget
    assert r["status"] == "error" and "SectionTimeout" in r["error"] and r["figures"] == {"first part": 1.0}
    assert 1.5 < r["seconds"] < 10
    late = mod.Ctx(tmp_path, dry=False, results={}, deadline=time.monotonic() + 5)
    assert mod.run_section(mod.Section("late", 60, "too late", slow), late)["status"] == "skipped"
