"""`voco` command line: demo | pretrain | finetune | nnunet | phantom | fetch | weights | tasks.

Each subcommand parses its arguments here and hands them to one function in the module that owns the
concept (imported lazily, so `voco --help` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable


def _handler(target: str) -> Callable[[argparse.Namespace], int | None]:
    module, func = target.split(":")

    def run(args: argparse.Namespace) -> int | None:
        return getattr(importlib.import_module(module), func)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voco", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="run the demo notebooks (cpu profile) into a run directory and report")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--profile", default=None)
    s.set_defaults(func=_handler("voco_lib.demo:cli_demo"))

    s = sub.add_parser("pretrain", help="VoCo pre-training (one process or under torchrun)")
    s.add_argument("--profile", default=None)
    s.add_argument("--data", default="phantom", help="phantom | samples | path to an MSD-style datalist JSON")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    s.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. steps=100 views.n_random=4)")
    s.set_defaults(func=_handler("voco_lib.pretrain:cli_pretrain"))

    s = sub.add_parser("finetune", help="fine-tune on a downstream task from the registry")
    s.add_argument("task")
    s.add_argument("--init", default="scratch", help="scratch | voco-b | voco-l | voco-h | RUN_DIR | PATH")
    s.add_argument("--profile", default=None)
    s.add_argument("--out", default=None)
    s.add_argument("--n-labeled", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=_handler("voco_lib.tasks:cli_finetune"))

    s = sub.add_parser("phantom", help="write procedural torso phantoms and an MSD-style datalist")
    s.add_argument("--n", type=int, default=32)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_handler("voco_lib.data.phantom:cli_phantom"))

    s = sub.add_parser("fetch", help="download a dataset or the real sample CTs (checksummed)")
    s.add_argument("what", help="samples | a dataset manifest name")
    s.add_argument("--out", default=None, help="data root (default: $VOCO_DATA_DIR or ~/.cache/voco)")
    s.set_defaults(func=_handler("voco_lib.data.fetch:cli_fetch"))

    s = sub.add_parser("weights", help="released VoCo checkpoints: list | fetch NAME | inspect PATH")
    s.add_argument("action", choices=["list", "fetch", "inspect"])
    s.add_argument("target", nargs="?")
    s.add_argument("--out", default=None)
    s.set_defaults(func=_handler("voco_lib.checkpoints:cli_weights"))

    s = sub.add_parser("nnunet", help="nnU-Net v2 path (VerSe20, AutoPET): export a task's datalist, check weights")
    s.add_argument("action", choices=["export", "check"])
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
    s.add_argument("action", choices=["list"])
    s.set_defaults(func=_handler("voco_lib.tasks.registry:cli_tasks"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse stops collecting `key=value` overrides at the first option that follows them
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"voco {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
