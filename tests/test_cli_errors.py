"""Bad input on the command line: one line on stderr naming the file/key (and the fix), a non-zero exit, no traceback.

Each case must fail before any training starts, so the whole table runs in seconds. `--debug` (or
VOCO_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from voco_lib import cli
from voco_lib.data import phantom

REPO = Path(__file__).resolve().parents[1]


def _volume(path: Path) -> Path:
    """A small valid CT-like volume (air around a body), so only the case's own defect is wrong."""
    v = np.full((16, 16, 12), -1000, np.int16)
    v[4:-4, 4:-4, 2:-2] = 40
    nib.save(nib.Nifti1Image(v, np.diag([1.5, 1.5, 1.5, 1.0])), str(path))
    return path


def _datalist(tmp: Path, doc: object, name: str = "dataset.json") -> Path:
    p = tmp / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def _pretrain(data: Path | str, tmp: Path, *extra: str) -> list[str]:
    return ["pretrain", "--profile", "smoke", "--data", str(data), "--out", str(tmp / "run"), *extra]


def _finetune_seg(datalist: Path, tmp: Path) -> list[str]:
    return ["finetune", "btcv", "--profile", "smoke", "--out", str(tmp / "ft"), f"datalist={datalist}"]


def _corrupt_volume(tmp: Path) -> Path:
    raw = _volume(tmp / "ok.nii.gz").read_bytes()
    (tmp / "broken.nii.gz").write_bytes(raw[:12] + bytes(b ^ 0x5A for b in raw[12:300]) + raw[300:])
    return tmp / "broken.nii.gz"


# id -> (tmp_path -> argv, fragments the one error line must contain)
Case = Callable[[Path], tuple[list[str], list[str]]]
CASES: dict[str, Case] = {
    "missing datalist": lambda t: (_pretrain(t / "nope.json", t), ["nope.json", "datalist"]),
    "image is null": lambda t: (
        _pretrain(_datalist(t, {"training": [{"image": str(_volume(t / "a.nii.gz"))}, {"image": None}]}), t),
        ["dataset.json", "'training' entry 1", "'image' is null", "write the path"]),
    "image is not a string": lambda t: (
        _pretrain(_datalist(t, {"training": [{"image": 7}]}), t), ["dataset.json", "entry 0", "'image' is 7"]),
    "entry is not an object": lambda t: (
        _pretrain(_datalist(t, {"training": ["a.nii.gz"]}), t), ["dataset.json", "entry 0", "not an object"]),
    "segmentation entry without label": lambda t: (
        _finetune_seg(_datalist(t, {"training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}, {"image": "b.nii.gz"}],
                                    "validation": [{"image": "c.nii.gz", "label": "c_seg.nii.gz"}]}), t),
        ["dataset.json", "'training' entry 1", "no 'label' field"]),
    "folder as --data": lambda t: (_pretrain(t, t), [str(t), "folder", "phantom | samples"]),
    "folder as datalist=": lambda t: (_finetune_seg(t, t), [str(t), "folder", "phantom | samples"]),
    "malformed JSON": lambda t: (_pretrain(_datalist(t, '{"training": [', "bad.json"), t), ["bad.json", "not valid JSON"]),
    "datalist is an array": lambda t: (_pretrain(_datalist(t, [{"image": "a.nii.gz"}]), t),
                                       ["dataset.json", "top level is an array", '"training"']),
    "datalist without training": lambda t: (_pretrain(_datalist(t, {"validation": []}), t),
                                            ["dataset.json", "no 'training' list"]),
    "scan as --data": lambda t: (_pretrain(_volume(t / "ct.nii.gz"), t), ["ct.nii.gz", "not a text file"]),
    "listed file missing": lambda t: (
        _pretrain(_datalist(t, {"training": [{"image": str(_volume(t / "a.nii.gz"))}, {"image": "gone.nii.gz"}]}), t),
        ["dataset.json", "entry 1 'image'", "gone.nii.gz", "VOCO_DATA_DIR"]),
    "corrupt volume": lambda t: (_pretrain(_datalist(t, {"training": [{"image": str(_corrupt_volume(t))}]}), t),
                                 ["broken.nii.gz", "gzip"]),
    "unknown override key": lambda t: (_pretrain("phantom", t, "nosuch.key=1"), ["nosuch.key"]),
    "nonsense config value": lambda t: (_pretrain("phantom", t, "train.accum=0"), ["train.accum", "0"]),
    "unknown task": lambda t: (["finetune", "no-such-task", "--profile", "smoke", "--out", str(t / "ft")],
                               ["no-such-task", "voco tasks list"]),
    "unknown profile": lambda t: (["pretrain", "--profile", "nope", "--out", str(t / "run")], ["nope", "smoke"]),
    "missing --init file": lambda t: (["finetune", "phantom-seg", "--profile", "smoke", "--init", str(t / "none.pt"),
                                       "--out", str(t / "ft")], ["none.pt"]),
}


PROGRESS_BAR = re.compile(r"\d+/\d+ \[\d+:\d+<")  # tqdm's "3/10 [00:01<00:02, ...]": progress, not an error


def one_error_line(err: str, command: str) -> str:
    """The single line `voco COMMAND: error: ...` that stderr must consist of (besides progress bars)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not PROGRESS_BAR.search(ln)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"voco {command}: error: "), err
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_without_traceback(name, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VOCO_DEBUG", raising=False)
    argv, fragments = CASES[name](tmp_path)
    code = cli.main(argv)
    line = one_error_line(capsys.readouterr().err, argv[0])
    assert code == cli.EXIT_BAD_INPUT, line
    for f in fragments:
        assert f in line, f"{f!r} missing from: {line}"


@pytest.mark.parametrize("name", ["image is null", "segmentation entry without label", "listed file missing"])
def test_bad_input_leaves_out_unused(name, tmp_path, capsys, monkeypatch):
    """Input is checked before the run directory is claimed: the same command, rerun, reports the same problem
    (not "OUT holds a run"), so fixing the input is all a user has to do."""
    monkeypatch.delenv("VOCO_DEBUG", raising=False)
    argv, _ = CASES[name](tmp_path)
    first = (cli.main(argv), capsys.readouterr().err)
    assert (cli.main(argv), capsys.readouterr().err) == first


def _raise(e: BaseException) -> Callable[..., None]:
    def handler(args) -> None:
        raise e
    return handler


@pytest.mark.parametrize("exc, code, fragments", [
    (PermissionError(13, "Permission denied", "/data/out/x.json"), 2, ["/data/out/x.json: Permission denied", "permissions"]),
    (IsADirectoryError(21, "Is a directory", "/data/scans"), 2, ["/data/scans", "not a folder"]),
    (KeyError("label"), 2, ["missing key 'label'", "--debug"]),
    (ValueError("first line\n  second line"), 2, ["first line; second line"]),
    (ZeroDivisionError("division by zero"), 1, ["ZeroDivisionError: division by zero", "--debug", "report"]),
])
def test_exception_kinds(exc, code, fragments, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("VOCO_DEBUG", raising=False)
    monkeypatch.setattr(phantom, "cli_phantom", _raise(exc))
    assert cli.main(["phantom", "--out", str(tmp_path)]) == code
    line = one_error_line(capsys.readouterr().err, "phantom")
    for f in fragments:
        assert f in line, line


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("VOCO_DEBUG", raising=False)
    monkeypatch.setattr(phantom, "cli_phantom", _raise(KeyboardInterrupt()))
    assert cli.main(["phantom", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "voco phantom: interrupted", err


@pytest.mark.parametrize("argv", [["--debug", "phantom"], ["phantom", "--debug"]])
def test_debug_before_or_after_the_command_adds_the_traceback(argv, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("VOCO_DEBUG", raising=False)
    monkeypatch.setattr(phantom, "cli_phantom", _raise(ValueError("x.json: broken — fix it")))
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: x.json: broken" in err
    assert err.strip().splitlines()[-1] == "voco phantom: error: x.json: broken — fix it"


def test_overwrite_flag_is_parsed():
    p = cli.build_parser()
    assert p.parse_args(["pretrain", "--out", "r", "--overwrite"]).overwrite is True
    assert p.parse_args(["finetune", "phantom-seg"]).overwrite is False


def _voco(*argv: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "VOCO_DEBUG": "1" if debug else "0"}
    return subprocess.run([sys.executable, "-m", "voco_lib.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_as_a_process_and_with_voco_debug():
    """The real entry point (a cheap command, no torch import): exit status 2 and one line; VOCO_DEBUG=1 shows
    where it failed, then the same line."""
    plain = _voco("fetch", "no-such-dataset")
    assert plain.returncode == 2, plain.stderr
    assert "'no-such-dataset'" in one_error_line(plain.stderr, "fetch")
    debug = _voco("fetch", "no-such-dataset", debug=True)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert "fetch.py" in debug.stderr and debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_every_option_has_help_a_default_and_each_command_an_example():
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert parser.epilog and parser.epilog.startswith(f"example: voco {name}"), name
        for action in parser._actions:
            assert action.help, f"voco {name}: {action.dest} has no help text"
        text = parser.format_help()
        for action in parser._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert f"default: {action.default}" in " ".join(text.split()), (name, action.dest)
