"""`voco` command line: demo | pretrain | finetune | reproduce | estimate | nnunet | phantom | datalist | fetch | weights | tasks.

Each subcommand parses its arguments here and hands them to one function in the module that owns the
concept (imported lazily, so `voco --help` stays fast). `main` turns every failure into one line on stderr,
`voco CMD: error: WHAT — FIX`, because a traceback buries the file name and the fix a user needs; `--debug`
(or VOCO_DEBUG=1) prints the traceback as well. Exit status: 2 for bad input or a failed download (errors
the code anticipates), 1 for anything else (a bug: please report it), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Any, Callable

# Failures caused by the input or the environment, whose message names the file/key and the fix. Any other
# exception is a bug. (json.JSONDecodeError is a ValueError; yaml.YAMLError is matched by name in `_describe`
# so that importing the CLI does not import yaml.)
ANTICIPATED = (ValueError, RuntimeError, OSError, KeyError)
EXIT_BAD_INPUT, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130
# The fix for an OSError raised by the standard library (it names the file but not what to do).
OS_FIXES = {
    FileNotFoundError: "check the path",
    IsADirectoryError: "pass a file, not a folder",
    NotADirectoryError: "a part of the path is a file, not a folder; check the path",
    PermissionError: "check the file's permissions, or write somewhere you may (e.g. another --out)",
    FileExistsError: "choose another path, or move the existing one aside",
}


def _handler(target: str) -> Callable[[argparse.Namespace], int | None]:
    module, func = target.split(":")

    def run(args: argparse.Namespace) -> int | None:
        return getattr(importlib.import_module(module), func)(args)

    return run


EXAMPLES = {
    "demo": "voco demo --out runs/demo --profile cpu",
    "strip-outputs": "voco strip-outputs notebooks/03_position_explorer.ipynb",
    "pretrain": "voco pretrain --profile cpu --data phantom --out runs/pretrain-cpu steps=50",
    "finetune": "voco finetune phantom-seg --init runs/pretrain-cpu --profile cpu --n-labeled 2 --seed 1",
    "reproduce": "voco reproduce phantom --profile cpu --workers 2   (voco reproduce list: the tables)",
    "estimate": "voco estimate --data phantom --profile cpu   |   voco estimate --data prect.json --profile paper",
    "phantom": "voco phantom --n 8 --out data/phantoms",
    "datalist": "voco datalist scans/ --label-pattern '*_seg.nii.gz' --out scans/datalist.json",
    "fetch": "voco fetch samples",
    "weights": "voco weights export runs/pretrain-cpu --format safetensors",
    "nnunet": "voco nnunet export verse20 datalist.json nnunet_raw --id 501",
    "tasks": "voco tasks list",
}
OVERWRITE_HELP = "move a used --out aside (to OUT.old-N) and start a new run there"
DEBUG_HELP = "on an error, print the Python traceback too (also: VOCO_DEBUG=1)"


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, unless it is unset (None/False) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voco", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    _add_run_commands(sub)
    _add_data_commands(sub)
    for name, s in sub.choices.items():  # `voco CMD ... --debug` too; SUPPRESS keeps `voco --debug CMD` from being reset
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        s.formatter_class = _DefaultsHelp
        s.epilog = f"example: {EXAMPLES[name]}"
    return p


def _add_run_commands(sub: Any) -> None:
    """demo, strip-outputs, pretrain, finetune: the commands that run notebooks or training."""
    s = sub.add_parser("demo", help="run the demo notebooks (cpu profile) into a run directory and report")
    s.add_argument("--out", default="runs/demo", help="folder for the executed notebooks and report.html")
    s.add_argument("--profile", default=None, help="smoke | cpu | gpu | paper (not given: $VOCO_PROFILE, else cpu)")
    s.set_defaults(func=_handler("voco_lib.demo:cli_demo"))

    s = sub.add_parser("strip-outputs", help="clear the outputs a JupyterLab save left in the repository's notebooks "
                                             "(keeps the # NBVAL_CHECK_OUTPUT cells); e.g. voco strip-outputs")
    s.add_argument("notebooks", nargs="*", help="notebook files (default: notebooks/[0-9][0-9]_*.ipynb)")
    s.set_defaults(func=_handler("voco_lib.demo:cli_strip_outputs"))

    s = sub.add_parser("pretrain", help="VoCo pre-training (one process or under torchrun)")
    s.add_argument("--profile", default=None, help="smoke | cpu | gpu | paper (not given: $VOCO_PROFILE, else cpu)")
    s.add_argument("--data", default="phantom", help="phantom | samples | an MSD-style datalist JSON | a folder of scans")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.add_argument("--labelled", default=None, help="method=omni (VoComni): labelled set, a datalist with labels "
                                                     "or phantom")
    s.add_argument("--unlabelled", default=None, help="method=omni: unlabelled set, a datalist or phantom "
                                                       "(default: --data)")
    s.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. steps=100 views.n_random=4); "
                                                "method=voco|voco-cvpr|voco-single|mae|swin-ssl|omni")
    s.set_defaults(func=_handler("voco_lib.pretrain:cli_pretrain"))

    s = sub.add_parser("finetune", help="fine-tune on a downstream task from the registry")
    s.add_argument("task", help="a registered task (voco tasks list) or the path of a task YAML")
    s.add_argument("--init", default="scratch", help="scratch | voco-b | voco-l | voco-h | RUN_DIR | PATH")
    s.add_argument("--profile", default=None, help="smoke | cpu | gpu | paper (not given: $VOCO_PROFILE, else cpu)")
    s.add_argument("--out", default=None, help="run directory (default: runs/finetune/TASK/INIT-nN-sSEED)")
    s.add_argument("--n-labeled", type=int, default=None, help="keep the first K labelled training volumes (default: all)")
    s.add_argument("--seed", type=int, default=0, help="weights, crops and which volumes are labelled")
    s.add_argument("--resume", action="store_true", help="continue the run in --out (its config must match)")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.add_argument("overrides", nargs="*", help="datalist=PATH for a real task, and config overrides key=value "
                                                "(e.g. finetune.steps=50 finetune.lr=1e-3)")
    s.set_defaults(func=_handler("voco_lib.tasks:cli_finetune"))

    s = sub.add_parser("reproduce", help="run a table of the paper (or the phantom table) as a resumable grid of "
                                         "notebook runs and render it")
    s.add_argument("table", help="list | a table of data_manifests/paper/ (phantom, segmentation, model-size, "
                                 "label-efficiency, convergence) | a table YAML file")
    s.add_argument("--profile", default=None, help="smoke | cpu | gpu | paper (not given: $VOCO_PROFILE, else cpu)")
    s.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of every cell (default: the table's, 0 1 2)")
    s.add_argument("--workers", type=int, default=1, help="cells run at once (CPU: the cores split among them; "
                                                         "GPUs: one cell per GPU)")
    s.add_argument("--out", default=None, help="grid folder (default: runs/reproduce/TABLE/PROFILE); rerun to resume")
    s.add_argument("--data-root", default=None, help="folder holding DATASET/dataset.json for the real tasks "
                                                     "(default: ./data)")
    s.add_argument("--dry-run", action="store_true", help="list the cells, their state and what each needs; run nothing")
    s.set_defaults(func=_handler("voco_lib.reproduce:cli_reproduce"))

    s = sub.add_parser("estimate", help="before a pre-training run: cache disk, loader RAM, memory and time per step, "
                                        "wall time per GPU count (headers only; a sample of a large datalist)")
    s.add_argument("--data", default="phantom", help="phantom | an MSD-style datalist JSON")
    s.add_argument("--profile", default=None, help="smoke | cpu | gpu | paper (not given: $VOCO_PROFILE, else cpu)")
    s.add_argument("--sample", type=int, default=64, help="volumes whose headers are read for the shapes (the rest "
                                                         "extrapolated; N ≥ the datalist's size reads every header)")
    s.add_argument("--exact", action="store_true", help="run the preprocessing chain on the sampled volumes: the "
                   "cache's exact bytes (reads voxels, slower); default: headers only, an upper bound")
    s.add_argument("--no-measure", dest="measure", action="store_const", const=False, default=None,
                   help="do not time real steps (FLOPs and memory are still modelled)")
    s.add_argument("--json", default=None, help="also write the estimate as JSON to this file")
    s.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. feature_size=96 steps=100000)")
    s.set_defaults(func=_handler("voco_lib.estimate:cli_estimate"))


def _add_data_commands(sub: Any) -> None:
    """phantom, datalist, fetch, weights, nnunet, tasks: data, checkpoints and the task registry."""
    s = sub.add_parser("phantom", help="write procedural torso phantoms and an MSD-style datalist")
    s.add_argument("--n", type=int, default=32, help="number of phantom patients")
    s.add_argument("--out", required=True, help="folder for the NIfTI files and dataset.json")
    s.add_argument("--seed", type=int, default=0, help="first patient's seed")
    s.set_defaults(func=_handler("voco_lib.data.phantom:cli_phantom"))

    s = sub.add_parser("datalist", help="list a folder of scans (NIfTI, NRRD/MHA, DICOM series) as an MSD-style datalist")
    s.add_argument("folder", help="the folder of scans (searched recursively)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--labels", default=None, help="folder of label maps, paired with the images by file name")
    g.add_argument("--label-pattern", default=None, help="file names that are labels, e.g. '*_seg.nii.gz' (pairs case1_seg with case1)")
    s.add_argument("--validation", type=float, default=0.2, help="fraction of the scans held out for validation")
    s.add_argument("--seed", type=int, default=0, help="seed of the split")
    s.add_argument("--group-by", default=None, help="regex on the relative path: its first group names the patient "
                   "(files of one patient stay on one side of the split; default: DICOM PatientID)")
    s.add_argument("--out", required=True, help="the datalist JSON to write (paths are stored relative to it)")
    s.set_defaults(func=_handler("voco_lib.data.datalist:cli_datalist"))

    s = sub.add_parser("fetch", help="download a dataset or the real sample CTs (checksummed)")
    s.add_argument("what", help="samples | a dataset manifest name")
    s.add_argument("--out", default=None, help="data root (default: $VOCO_DATA_DIR or ~/.cache/voco)")
    s.set_defaults(func=_handler("voco_lib.data.fetch:cli_fetch"))

    s = sub.add_parser("weights", help="checkpoints: list | fetch NAME | inspect PATH | export RUN_DIR|PATH | add NAME PATH")
    s.add_argument("action", choices=["list", "fetch", "inspect", "export", "add"], help="what to do (see above)")
    s.add_argument("target", nargs="?", help="fetch/add: NAME; inspect: PATH; export: RUN_DIR or PATH")
    s.add_argument("path", nargs="?", help="add: the downloaded checkpoint file to register under NAME")
    s.add_argument("--out", default=None, help="fetch: folder; export: file or bundle folder (default: beside the source)")
    s.add_argument("--format", choices=["safetensors", "monai-bundle", "pt"], help="export: the output format")
    s.add_argument("--out-channels", type=int, default=None,
                   help="export --format monai-bundle of an encoder: output classes of the bundle's SwinUNETR")
    s.set_defaults(func=_handler("voco_lib.checkpoints:cli_weights"))

    s = sub.add_parser("nnunet", help="nnU-Net v2 path (VerSe20, AutoPET): export a task's datalist, check weights")
    s.add_argument("action", choices=["export", "check"], help="export a task's datalist, or check a checkpoint")
    s.add_argument("args", nargs="+", metavar="ARG",
                   help="export: TASK DATALIST OUT; check: CHECKPOINT PLANS DATASET_JSON")
    s.add_argument("--id", type=int, default=None, help="export: nnU-Net dataset id (1..999)")
    s.add_argument("--copy", action="store_true", help="export: copy the files instead of symlinking them")
    s.add_argument("--overwrite", action="store_true", help="export: replace an existing DatasetXXX_Name folder")
    s.add_argument("--fold", default="0", help="export: the fold the printed train command trains (0 = our split)")
    s.add_argument("--pretrained", default=None, help="export: checkpoint for nnUNetv2_train -pretrained_weights")
    s.add_argument("--run", action="store_true", help="export: also run the commands (needs nnunetv2 installed)")
    s.add_argument("--configuration", default="3d_fullres", help="check: the plans configuration")
    s.set_defaults(func=_handler("voco_lib.tasks.nnunet:cli_nnunet"))

    s = sub.add_parser("tasks", help="the downstream task registry")
    s.add_argument("action", choices=["list"], help="list the registered tasks")
    s.set_defaults(func=_handler("voco_lib.tasks.registry:cli_tasks"))


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _describe(e: BaseException, debug: bool) -> tuple[str, int]:
    """The error line after `voco CMD: error: ` and the exit status for exception `e` (`debug`: the traceback
    is already printed, so the line does not ask for it)."""
    if isinstance(e, OSError) and e.filename is not None:  # raised by open(), mkdir(), ... : name the file, add the fix
        fix = next((f for t, f in OS_FIXES.items() if isinstance(e, t)), "check the path and the disk")
        return f"{e.filename}: {e.strerror or type(e).__name__} — {fix}", EXIT_BAD_INPUT
    if isinstance(e, KeyError):
        key = e.args[0] if len(e.args) == 1 else e.args
        if isinstance(key, str) and " " in key:  # our own KeyError, with a sentence naming the file
            return _one_line(key), EXIT_BAD_INPUT
        return (f"missing key {key!r} in the input (KeyError) — check the datalist / manifest / config entry that "
                "should have it" + ("" if debug else "; rerun with --debug to see where it was read")), EXIT_BAD_INPUT
    msg = _one_line(str(e)) or type(e).__name__
    if isinstance(e, ANTICIPATED):
        return msg, EXIT_BAD_INPUT
    if type(e).__module__.split(".")[0] == "yaml":  # yaml.YAMLError: the message names the line
        return f"not valid YAML ({msg}) — fix the file's syntax", EXIT_BAD_INPUT
    ask = ("please report it, with the traceback above" if debug
           else "rerun with --debug for the traceback (and please report it)")
    return f"{type(e).__name__}: {msg} — {ask}", EXIT_BUG


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse stops collecting `key=value` overrides at the first option that follows them
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    debug = args.debug or os.environ.get("VOCO_DEBUG", "0") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        again = "; --resume continues from the newest checkpoint" if getattr(args, "resume", None) is not None else ""
        print(f"voco {args.command}: interrupted{again}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place that turns every failure into a line (see the docstring)
        if debug:
            traceback.print_exc()
        if isinstance(getattr(e, "exit_code", None), int):  # loop.Interrupted: checkpointed, then stopped by a signal
            print(f"voco {args.command}: {e}", file=sys.stderr)
            return e.exit_code
        line, status = _describe(e, debug)
        print(f"voco {args.command}: error: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
