"""Scientific check: does VoCo pre-training help phantom-seg most when labels are fewest?

cpu-profile VoCo pre-training on phantoms (or a given run), then phantom-seg fine-tuning with 1, 2 and 4
labelled volumes from the VoCo encoder and from scratch, same budget and seeds. Prints Dice mean ± sd per
setting and the VoCo − scratch difference, writes summary.json and a validation-curve figure.

    OMP_NUM_THREADS=1 python benchmarks/label_efficiency.py --out runs/label_efficiency [--pretrain RUN_DIR]
        [--labels 1 2 4] [--seeds 0 1 2] [--shard 0/2] [-- overrides ...]

(`--` ends the option lists, so `--labels 1 4 -- finetune.steps=100` does not read the overrides as labels.)

`--shard i/n` runs every n-th fine-tuning (start i) so that n processes can share the grid; run once more
without --shard (finished runs are read back, not redone) to print the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/label_efficiency")
    p.add_argument("--pretrain", default=None, help="a finished pre-training run dir (default: run one, cpu profile)")
    p.add_argument("--labels", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--profile", default="cpu")
    p.add_argument("--shard", default="0/1")
    p.add_argument("overrides", nargs="*", help="fine-tuning overrides, e.g. finetune.steps=60")
    a = p.parse_args()
    out = Path(a.out)
    from voco_lib.tasks import finetune

    pre = Path(a.pretrain) if a.pretrain else out / "pretrain"
    if not (pre / "encoder.pt").is_file():
        from voco_lib.pretrain import run_pretraining

        run_pretraining(a.profile, "phantom", pre, resume=(pre / "checkpoints").is_dir())
    i, n = (int(v) for v in a.shard.split("/"))
    grid = [(k, s, init) for k in a.labels for s in a.seeds for init in ("scratch", "voco")]
    results = {}
    for j, (k, s, init) in enumerate(grid):
        run_dir = out / f"{init}-n{k}-s{s}"
        if (run_dir / "results.json").is_file():
            results[(k, s, init)] = json.loads((run_dir / "results.json").read_text())
            continue
        if j % n != i:
            continue
        results[(k, s, init)] = finetune("phantom-seg", init="scratch" if init == "scratch" else pre, profile=a.profile,
                                         n_labeled=k, seed=s, out=run_dir, overrides=a.overrides, show_progress=False,
                                         resume=(run_dir / "checkpoints").is_dir())
        r = results[(k, s, init)]
        print(f"{init:7s} n={k} seed={s}: dice {r['value']:.4f} (best {r['best']['dice']:.4f} at step "
              f"{r['best']['step']}), {r['wall_s']:.0f} s", flush=True)
    if len(results) < len(grid):
        return 0
    rows, summary = [], {}
    for k in a.labels:
        cell = {}
        for init in ("scratch", "voco"):
            d = [results[(k, s, init)]["value"] for s in a.seeds]
            cell[init] = {"mean": statistics.mean(d), "sd": statistics.stdev(d) if len(d) > 1 else 0.0, "runs": d}
        diff = [results[(k, s, "voco")]["value"] - results[(k, s, "scratch")]["value"] for s in a.seeds]
        cell["voco_minus_scratch"] = {"mean": statistics.mean(diff), "sd": statistics.stdev(diff) if len(diff) > 1 else 0.0}
        summary[k] = cell
        rows.append(f"| {k} | {cell['scratch']['mean']:.3f} ± {cell['scratch']['sd']:.3f} | {cell['voco']['mean']:.3f} ± "
                    f"{cell['voco']['sd']:.3f} | {cell['voco_minus_scratch']['mean']:+.3f} ± {cell['voco_minus_scratch']['sd']:.3f} |")
    print("| labelled volumes | scratch Dice | VoCo Dice | VoCo − scratch (paired by seed) |\n|---|---|---|---|")
    print("\n".join(rows))
    (out / "summary.json").write_text(json.dumps({"pretrain": str(pre), "seeds": a.seeds, "overrides": a.overrides,
                                                  "summary": summary}, indent=1))
    _figure(results, a.labels, a.seeds, out)
    return 0


def _figure(results, labels, seeds, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.2), sharey=True)
    for ax, k in zip(axes, labels):
        for init, color in (("scratch", "tab:gray"), ("voco", "tab:red")):
            for s in seeds:
                c = results[(k, s, init)]["curve"]
                ax.plot([p["step"] for p in c], [p["dice"] for p in c], color=color, alpha=0.7,
                        label=init if s == seeds[0] else None)
        ax.set_title(f"{k} labelled volume(s)")
        ax.set_xlabel("fine-tuning step")
    axes[0].set_ylabel("validation Dice (7 organs)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"figure: {out / 'curves.png'}")


if __name__ == "__main__":
    sys.exit(main())
