"""Downstream metrics: Dice and HD95 (MONAI), retrieval recall@k, folding of a displacement field, accuracy/AUC.

Conventions: label maps are integer tensors of shape (X, Y, Z) or (N, 1, X, Y, Z); per-class results are
over foreground classes 1..K-1 (upstream validates with `DiceMetric(include_background=False)`, spec
§7.1), NaN where the class is absent from the reference (MONAI's `ignore_empty`), and means skip NaNs.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_roc_auc
from monai.networks.utils import one_hot


def _batched(label: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
    if t.ndim == 3:
        t = t[None, None]
    if t.ndim != 5 or t.shape[1] != 1:
        raise ValueError(f"expected a label map (X, Y, Z) or (N, 1, X, Y, Z), got shape {tuple(t.shape)}")
    return t.long()


def dice_per_class(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """Dice of each foreground class 1..K-1, averaged over the batch; NaN where the reference lacks the class."""
    p, t = _batched(pred), _batched(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and reference {tuple(t.shape)} differ in shape")
    d = compute_dice(one_hot(p, num_classes), one_hot(t, num_classes), include_background=False, ignore_empty=True)
    return _nanmean_rows(d.numpy())


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over the batch axis skipping NaNs; NaN (silently) for a column that is all NaN."""
    n = (~np.isnan(x)).sum(0)
    return np.where(n > 0, np.nansum(x, 0) / np.maximum(n, 1), np.nan)


def hd95_per_class(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, num_classes: int,
                   spacing: Sequence[float] | float | None = None) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance per foreground class (mm if `spacing` is given, else voxels).

    NaN where the reference lacks the class; `inf` where the reference has it and the prediction does not.
    """
    p, t = _batched(pred), _batched(target)
    ph, th = one_hot(p, num_classes), one_hot(t, num_classes)
    with warnings.catch_warnings():  # MONAI warns about empty masks; handled explicitly below
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(ph, th, include_background=False, percentile=95, spacing=spacing).numpy()
    present_t = th[:, 1:].flatten(2).any(-1).numpy()
    present_p = ph[:, 1:].flatten(2).any(-1).numpy()
    hd = np.where(present_t & ~present_p, np.inf, hd)
    return _nanmean_rows(np.where(~present_t, np.nan, hd))


def recall_at_k(similarity: torch.Tensor | np.ndarray, k: int) -> float:
    """Fraction of queries (rows) whose match (the same index, the diagonal) is among the k most similar columns.

    Ties are counted against the match (a column scoring equal to the diagonal ranks ahead of it), so a
    constant similarity matrix gets recall k/N at best, never 1.
    """
    s = torch.as_tensor(np.asarray(similarity) if not isinstance(similarity, torch.Tensor) else similarity).float()
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"expected a square similarity matrix (queries x candidates), got {tuple(s.shape)}")
    diag = s.diagonal()[:, None]
    rank = (s >= diag).sum(1) - 1  # candidates scoring at least the match, other than the match itself
    return float((rank < k).float().mean())


def jacobian_determinant(disp: torch.Tensor | np.ndarray) -> np.ndarray:
    """det(∇(x + u)) of a displacement field u in voxel units, shape (3, X, Y, Z) or (N, 3, X, Y, Z).

    Central differences inside, one-sided at the borders (`numpy.gradient`).
    """
    u = np.asarray(disp.detach().cpu() if isinstance(disp, torch.Tensor) else disp, np.float64)
    if u.ndim == 4:
        u = u[None]
    if u.ndim != 5 or u.shape[1] != 3:
        raise ValueError(f"expected a displacement field (3, X, Y, Z) or (N, 3, X, Y, Z), got {u.shape}")
    out = []
    for field in u:
        J = np.empty(field.shape[1:] + (3, 3))
        for i in range(3):
            grads = np.gradient(field[i], axis=(0, 1, 2))
            for j in range(3):
                J[..., i, j] = grads[j] + (1.0 if i == j else 0.0)
        out.append(np.linalg.det(J))
    return np.stack(out)


def folding_fraction(disp: torch.Tensor | np.ndarray) -> float:
    """Fraction of voxels where the deformation folds (Jacobian determinant ≤ 0)."""
    return float((jacobian_determinant(disp) <= 0).mean())


def accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Top-1 accuracy of (N, C) scores against integer labels."""
    z, y = torch.as_tensor(np.asarray(logits)), torch.as_tensor(np.asarray(labels)).long()
    return float((z.argmax(1) == y).float().mean())


def auc(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """ROC AUC (MONAI): binary from the positive class's softmax, else the macro average one-vs-rest.

    NaN when only one class is present (AUC is undefined).
    """
    z, y = torch.as_tensor(np.asarray(logits)).float(), torch.as_tensor(np.asarray(labels)).long()
    if y.unique().numel() < 2:
        return float("nan")
    p = torch.softmax(z, 1)
    if z.shape[1] == 2:
        return float(compute_roc_auc(p[:, 1], y))
    return float(compute_roc_auc(p, one_hot(y[:, None], z.shape[1]), average="macro"))
