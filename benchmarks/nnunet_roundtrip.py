"""Check `voco_lib.tasks.nnunet` against nnU-Net v2 itself (needs `pip install "voco[nnunet]"`; not run in CI).

Writes a small synthetic 2-channel (CT, PET) datalist, exports it for the `autopet` task, then lets nnU-Net
run `verify_dataset_integrity`, extract the fingerprint and plan (nnUNetv2_plan_and_preprocess without the
preprocessing), and compares our checkpoint check with nnU-Net's own `load_pretrained_weights` on two
checkpoints built from the planned network: 21 output classes (accepted by both) and 1 input channel
(refused by both).

    python benchmarks/nnunet_roundtrip.py --out /tmp/nnunet_check
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch


def write_datalist(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    doc: dict[str, list] = {"training": [], "validation": []}
    for split, n in (("training", n_train), ("validation", n_val)):
        for i in range(n):
            files = []
            for name, x in (("ct", rng.normal(-500, 100, (40, 40, 32))), ("suv", rng.gamma(2, 1, (40, 40, 32)))):
                nib.save(nib.Nifti1Image(x.astype(np.float32), affine), str(root / f"{split}{i}_{name}.nii.gz"))
                files.append(f"{split}{i}_{name}.nii.gz")
            lab = np.zeros((40, 40, 32), np.uint8)
            lab[10:20, 10:20, 8:16] = 1
            nib.save(nib.Nifti1Image(lab, affine), str(root / f"{split}{i}_seg.nii.gz"))
            doc[split].append({"image": files, "label": f"{split}{i}_seg.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(doc))
    return root / "dataset.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="an empty working folder")
    p.add_argument("--id", type=int, default=501)
    args = p.parse_args()
    out = Path(args.out).absolute()
    (out / "data").mkdir(parents=True, exist_ok=True)
    raw, pre = out / "nnUNet_raw", out / "nnUNet_preprocessed"
    os.environ.update(nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(out / "nnUNet_results"))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from voco_lib.tasks import nnunet

    folder = nnunet.export_dataset("autopet", write_datalist(out / "data"), raw, dataset_id=args.id, overwrite=True)
    extract_fingerprints([args.id], num_processes=1, check_dataset_integrity=True)  # raises on an invalid dataset
    plan_experiments([args.id])
    plans = pre / folder.name / "nnUNetPlans.json"
    ds = json.loads((folder / "dataset.json").read_text())
    pm = PlansManager(str(plans))
    cm = pm.get_configuration("3d_fullres")
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 2, 2, deep_supervision=True)
    results = {}
    for name, change in (("21_classes", {"labels": {("background" if i == 0 else f"c{i}"): i for i in range(21)}}),
                         ("1_channel", {"channel_names": {"0": "CT"}})):
        shapes = nnunet.network_shapes(plans, {**ds, **change})
        ckpt = out / f"{name}.pt"
        torch.save({"network_weights": {k: torch.zeros(s) for k, s in shapes.items()}}, ckpt)
        report = nnunet.check_checkpoint(ckpt, plans, folder / "dataset.json")
        try:
            load_pretrained_weights(net, str(ckpt))
            theirs = True
        except AssertionError:
            theirs = False
        results[name] = {"ours": nnunet.accepted_by_nnunet(report), "nnunet": theirs, "summary": report.summary()}
    print(json.dumps(results, indent=1))
    assert all(r["ours"] == r["nnunet"] for r in results.values()), "our check disagrees with nnU-Net"


if __name__ == "__main__":
    main()
