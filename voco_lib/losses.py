"""VoCo losses: position prediction from similarities, intra-/inter-volume terms, base-crop regulariser.

The default ("code") form reproduces the authors' released TPAMI code (Luffy03/Large-Scale-Medical
Self-supervised/models/voco_head.py:L259-336, commit 1ad538b): an overlap-weighted −log(1 − |y − p|) on
positives plus −log(1 − p) on non-overlapping bases, and squared ReLU-cosine between base crops. "paper" is
the TPAMI paper's equations; "cvpr" the CVPR 2024 loss (Luffy03/VoCo models/voco_head.py, commit ba7b7bd).
Everything is vectorised over the batch (upstream loops over samples and pairs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from voco_lib.config import LossConfig

EPS = 1e-6


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ReLU(cosine) between rows: (..., N, D) × (..., M, D) → (..., N, M) in [0, 1]. No temperature."""
    return F.relu(F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2))


def position_loss(sim: torch.Tensor, labels: torch.Tensor, neg: str = "log", form: str = "code") -> torch.Tensor:
    """Loss of predicted similarities `sim` against targets `labels`, both (..., S, K); mean over leading dims.

    code: −Σ y·log(1 − |y − p| + ε)/(Σ y + ε) plus, over entries with y = 0, −log(1 − p + ε) ("log") or
    p² ("square", the CVPR variant), each normalised per volume (per (S, K) matrix).
    paper: −mean log(1 − |y − p| + ε) over all entries.
    """
    labels = labels.to(sim.dtype)
    dims = (-2, -1)
    if form == "paper":
        per_volume = -torch.log(1 - (labels - sim).abs() + EPS).mean(dims)
        return per_volume.mean()
    if form != "code":
        raise ValueError(f"unknown loss form {form!r}; use 'code' or 'paper'")
    pos = -(labels * torch.log(1 - (labels - sim).abs() + EPS)).sum(dims) / (labels.sum(dims) + EPS)
    negatives = (labels == 0).to(sim.dtype)
    if neg == "log":
        neg_term = -torch.log(1 - sim + EPS)
    elif neg == "square":
        neg_term = sim**2
    else:
        raise ValueError(f"unknown negative term {neg!r}; use 'log' or 'square'")
    neg_loss = (negatives * neg_term).sum(dims) / (negatives.sum(dims) + EPS)
    return (pos + neg_loss).mean()


def regularizer(base_emb: torch.Tensor, form: str = "code") -> torch.Tensor:
    """Push a volume's base crops apart: mean over pairs k < l of ReLU(cos(z_k, sg z_l))², (..., K, D) → scalar.

    The stop-gradient on the second element (as upstream) lets the gradient flow through the lower-index
    crop of each pair only. paper form: mean |cos(z_k, z_l)| with no stop-gradient.
    """
    z = F.normalize(base_emb, dim=-1)
    k = z.shape[-2]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=z.device), diagonal=1)
    if form == "code":
        pair = F.relu(z @ z.detach().transpose(-1, -2)) ** 2
    elif form == "paper":
        pair = (z @ z.transpose(-1, -2)).abs()
    else:
        raise ValueError(f"unknown loss form {form!r}; use 'code' or 'paper'")
    return pair[..., upper].mean(-1).mean()


def intra_loss(student_rand, teacher_base, labels, form: str = "code") -> torch.Tensor:
    """Student random crops vs the teacher's bases of the same volume, against the overlap labels."""
    return position_loss(similarity(student_rand, teacher_base.detach()), labels, form=form)


def inter_loss(student_rand, student_base, teacher_rand, teacher_base, form: str = "code") -> torch.Tensor:
    """Volume b's crops vs the bases of volume (b+1) mod B: student similarities learn the teacher's."""
    target = similarity(teacher_rand, teacher_base.roll(-1, dims=0)).detach()
    pred = similarity(student_rand, student_base.roll(-1, dims=0))
    return position_loss(pred, target, form=form)


def voco_loss(
    student_rand: torch.Tensor,
    student_base: torch.Tensor,
    teacher_rand: torch.Tensor,
    teacher_base: torch.Tensor,
    labels: torch.Tensor,
    cfg: LossConfig = LossConfig(),
) -> dict[str, torch.Tensor]:
    """Total VoCo loss and its terms. Embeddings: random (B, S, D), bases (B, K, D); labels (B, S, K).

    tpami: w_intra·intra + w_inter·inter + w_reg·reg. cvpr: symmetrised intra with squared negatives + reg.
    """
    if cfg.variant == "tpami":
        intra = intra_loss(student_rand, teacher_base, labels, cfg.form)
        inter = inter_loss(student_rand, student_base, teacher_rand, teacher_base, cfg.form)
    elif cfg.variant == "cvpr":
        sym = 0.5 * (similarity(student_rand, teacher_base.detach()) + similarity(teacher_rand.detach(), student_base))
        intra = position_loss(sym, labels, neg="square", form=cfg.form)
        inter = torch.zeros((), device=labels.device)
    else:
        raise ValueError(f"unknown loss variant {cfg.variant!r}; use 'tpami' or 'cvpr'")
    reg = regularizer(student_base, cfg.form)
    total = cfg.w_intra * intra + cfg.w_inter * inter + cfg.w_reg * reg
    return {"loss": total, "intra": intra, "inter": inter, "reg": reg}
