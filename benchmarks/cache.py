"""Bytes per cached volume: our compact cache against MONAI PersistentDataset's float32 pickles (upstream).

Upstream caches every preprocessed volume as a pickled float32 tensor (and, for labelled sets, the
label too, which pretraining then discards): about 30 TB for PreCT-160K (Luffy03/Large-Scale-Medical README.md).
Target: <= 0.5x.
Rows: MONAI PersistentDataset as measured, an ideal float32 pickle of the cropped image (the ratio column's
reference), and our uint16 (default for CT) and uint8 stores.
One 160x160x128 phantom at 1.5 mm through the abdomen chain; the same process measures both caches.
Run: .venv/bin/python benchmarks/cache.py
"""

from __future__ import annotations

import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
from monai.data import PersistentDataset

from voco_lib.data.cache import load_preprocessed
from voco_lib.data.phantom import make_phantom_subject, save_nifti
from voco_lib.data.preprocess import build_chain


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        s = make_phantom_subject(0)
        entry = {"image": str(tmp / "img.nii.gz"), "label": str(tmp / "lab.nii.gz")}
        save_nifti(entry["image"], np.rint(s.image), s.affine, np.int16)
        save_nifti(entry["label"], s.label, s.affine, np.uint8)
        rows = []
        for name, keys in (("PersistentDataset float32 image (as MONAI writes it)", ("image",)),
                           ("PersistentDataset float32 image+label (upstream)", ("image", "label"))):
            d = tmp / name.split()[2]
            ds = PersistentDataset([{k: entry[k] for k in keys}], build_chain("abdomen", keys), cache_dir=d)
            _, t_miss = timed(lambda: ds[0])
            item, t_hit = timed(lambda: ds[0])
            rows.append((name, dir_bytes(d), t_miss, t_hit))
        shape = tuple(item["image"].shape)
        # PersistentDataset's torch.save keeps the whole pre-crop storage behind the cropped view; an ideal
        # float32 pickle of just the cropped array is the fairer floor, so report both.
        ideal = len(pickle.dumps(np.ascontiguousarray(item["image"].numpy()), protocol=pickle.HIGHEST_PROTOCOL))
        rows.insert(1, ("ideal float32 pickle of the cropped image", ideal, float("nan"), float("nan")))
        for store in ("uint16", "uint8"):
            d = tmp / f"ours-{store}"
            _, t_miss = timed(lambda: load_preprocessed(entry["image"], "abdomen", d, store=store))
            _, t_hit = timed(lambda: load_preprocessed(entry["image"], "abdomen", d, store=store))
            rows.append((f"voco cache {store} (.npy + .json)", dir_bytes(d), t_miss, t_hit))
        ref = ideal
        print(f"preprocessed volume {shape} ({np.prod(shape) / 1e6:.2f} M voxels), abdomen chain")
        print(f"{'cache':52s} {'bytes':>12s} {'x ideal':>7s} {'miss s':>7s} {'hit s':>7s}")
        for name, b, tm, th in rows:
            print(f"{name:52s} {b:12,d} {b / ref:7.3f} {tm:7.2f} {th:7.3f}")
        upstream = rows[2][1]
        print(f"vs upstream's image+label PersistentDataset: uint16 {rows[3][1] / upstream:.3f}x, "
              f"uint8 {rows[4][1] / upstream:.3f}x; the authors' ~30 TB would be "
              f"{30 * rows[3][1] / upstream:.1f} TB / {30 * rows[4][1] / upstream:.1f} TB")


if __name__ == "__main__":
    main()
