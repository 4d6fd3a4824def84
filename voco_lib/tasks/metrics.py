"""Downstream metrics: Dice and HD95 (MONAI), retrieval recall@k, folding of a displacement field, accuracy/AUC,
multi-label (vocabulary) AUC/accuracy/F1, and the report-generation scores BLEU-1..4 and ROUGE-L.

Conventions: label maps are integer tensors of shape (X, Y, Z) or (N, 1, X, Y, Z); per-class results are
over foreground classes 1..K-1 (upstream validates with `DiceMetric(include_background=False)`, spec
§7.1), NaN where the class is absent from the reference (MONAI's `ignore_empty`), and means skip NaNs.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Callable, Sequence

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
        return binary_auc(p[:, 1], y)
    return float(compute_roc_auc(p, one_hot(y[:, None], z.shape[1]), average="macro"))


def binary_auc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """ROC AUC (MONAI) of scores against 0/1 labels; NaN when only one class is present."""
    s, y = torch.as_tensor(np.asarray(scores)).float().flatten(), torch.as_tensor(np.asarray(labels)).long().flatten()
    if y.unique().numel() < 2:
        return float("nan")
    return float(compute_roc_auc(s, y))


def multilabel_metrics(probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, names: Sequence[str],
                       threshold: float = 0.5) -> dict[str, object]:
    """Per-finding AUC and F1 of (N, F) probabilities against (N, F) 0/1 labels, their means, accuracy at `threshold`.

    The CT-RATE vocabulary evaluation (per-pathology AUC, Luffy03/Large-Scale-Medical Downstream/monai/CT_CLIP).
    AUC is NaN for a finding whose
    labels are all equal, F1 NaN for one with no positive label and no positive prediction; means skip NaNs
    (NaN if all are). `accuracy` and `f1_micro` pool all (volume, finding) decisions.
    """
    p, y = np.asarray(probs, np.float64), np.asarray(labels).astype(np.int64)
    if p.shape != y.shape or p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(f"expected probabilities and labels of shape (N, {len(names)}), got {p.shape} and {y.shape}")
    pred = p >= threshold
    aucs, f1s = {}, {}
    for j, n in enumerate(names):
        aucs[n] = binary_auc(p[:, j], y[:, j])
        f1s[n] = _f1(pred[:, j], y[:, j] == 1)
    return {"auc_per_finding": aucs, "auc_mean": _nanmean(list(aucs.values())),
            "f1_per_finding": f1s, "f1_macro": _nanmean(list(f1s.values())), "f1_micro": _f1(pred, y == 1),
            "accuracy": float((pred == (y == 1)).mean()) if y.size else float("nan")}


def _f1(pred: np.ndarray, true: np.ndarray) -> float:
    tp, fp, fn = int((pred & true).sum()), int((pred & ~true).sum()), int((~pred & true).sum())
    return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return float(sum(v) / len(v)) if v else float("nan")


# ------------------------------------------------------------------------------------------------ text generation
def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4,
         tokenize: Callable[[str], list[str]] | None = None) -> dict[str, float]:
    """Corpus BLEU-1..max_n (Papineni et al. 2002), one reference per hypothesis, no smoothing.

    p_n = Σ clipped n-gram matches / Σ hypothesis n-grams over the corpus; BLEU-N = BP · exp(mean_{n≤N} log p_n),
    0 if any p_n is 0; brevity penalty BP = exp(1 − r/c) when the total hypothesis length c is below the total
    reference length r, else 1. Tokens: `tokenize` (default: lower-cased whitespace split).
    """
    tok = tokenize or (lambda t: t.lower().split())
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    match, total = [0] * max_n, [0] * max_n
    c = r = 0
    for h, ref in zip(hypotheses, references):
        ht, rt = tok(h), tok(ref)
        c, r = c + len(ht), r + len(rt)
        for n in range(1, max_n + 1):
            hn, rn = _ngrams(ht, n), _ngrams(rt, n)
            match[n - 1] += sum(min(k, rn[g]) for g, k in hn.items())
            total[n - 1] += max(len(ht) - n + 1, 0)
    bp = 1.0 if c > r else (math.exp(1 - r / c) if c else 0.0)
    out, logs = {}, []
    for n in range(1, max_n + 1):
        logs.append(math.log(match[n - 1] / total[n - 1]) if match[n - 1] else -math.inf)
        out[f"bleu_{n}"] = bp * math.exp(sum(logs) / n) if all(math.isfinite(x) for x in logs) else 0.0
    return out


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a)·len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypotheses: Sequence[str], references: Sequence[str], beta: float = 1.2,
            tokenize: Callable[[str], list[str]] | None = None) -> float:
    """ROUGE-L (Lin 2004): per pair F_β = (1+β²)·P·R / (R + β²·P) with P = LCS/|hyp|, R = LCS/|ref|, averaged.

    β = 1.2 as in the COCO caption evaluation that report-generation papers (R2Gen, M2KT) use.
    """
    tok = tokenize or (lambda t: t.lower().split())
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scores = []
    for h, ref in zip(hypotheses, references):
        ht, rt = tok(h), tok(ref)
        lcs = lcs_length(ht, rt)
        if lcs == 0:
            scores.append(0.0)
            continue
        p, r = lcs / len(ht), lcs / len(rt)
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p))
    return float(np.mean(scores)) if scores else float("nan")
