"""VoCo's methods: `voco` (TPAMI), `voco-cvpr` (CVPR 2024) and the `voco-single` ablation (no teacher).

The step (Wu, Zhuang, Chen, "Large-Scale 3D Medical Image Pre-training with Geometric Context Priors",
TPAMI; Luffy03/Large-Scale-Medical Self-supervised/models/voco_head.py:L211-294, commit 1ad538b):
1. EMA teacher: θ_t ← m·θ_t + (1 − m)·θ_s (m = 0.9), once per optimizer step, before the teacher is used.
   The teacher gets no gradient (stop-gradient): it is a slowly moving target that keeps the student's
   similarities from collapsing to a constant.
2. One encoder call over all crops of the batch (S random + K base crops per volume), pooled multi-scale.
3. Student head on the embeddings after dropout (the "feature augmentation"), teacher head on clean ones.
4. `voco_loss`: intra (position of each random crop among its volume's bases), inter (the next volume's
   bases, student vs teacher similarities) and the base-crop regulariser.

`voco-single` asks whether the teacher is needed: one network embeds random and base crops, the base
embeddings are the (detached) targets of the intra term, and the regulariser keeps the bases apart; there
is no inter term (it compares student with teacher). This is how the nnssl port trains VoCo
(MIC-DKFZ/nnssl, its VoCo loss: bases detached, no teacher).
"""

from __future__ import annotations

import torch
from torch import nn

from voco_lib.backbone import build_backbone
from voco_lib.config import LossConfig, Profile
from voco_lib.crops import Views, collate_views
from voco_lib.heads import EMATeacher, EmbeddingDropout, ProjectionHead
from voco_lib.losses import position_loss, regularizer, similarity, voco_loss

Terms = tuple[torch.Tensor, dict[str, torch.Tensor]]


class _Embedder(nn.Module):
    """Backbone + projection head as one network: what the CVPR teacher is an EMA copy of."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.embed(x))


def _backbone_and_head(model: nn.Module, cfg: Profile) -> None:
    model.backbone = build_backbone(cfg.feature_size, cfg.views.out_size or cfg.views.crop_size,
                                    grad_checkpoint=cfg.train.grad_checkpoint)
    h = cfg.heads
    model.student = ProjectionHead(model.backbone.embed_dim, h.hidden_dim, h.out_dim)
    model.dropout = EmbeddingDropout(h.dropout_p, h.dropout_mode)


def _all_crops(random: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """(B, S, C, ...), (B, K, C, ...) -> (B·S + B·K, C, ...): random crops first, as upstream."""
    return torch.cat([random.flatten(0, 1), bases.flatten(0, 1)])


class VoCoModel(nn.Module):
    """Encoder + student head + EMA teacher. `forward(random, bases)` returns the four embeddings.

    ema_scope "head" (TPAMI): one shared backbone; the teacher is an EMA copy of the student head.
    ema_scope "full" (CVPR, Luffy03/VoCo models/voco_head.py): the teacher copies backbone + head.
    """

    def __init__(self, cfg: Profile):
        super().__init__()
        self.ema_scope = cfg.train.ema_scope
        self.loss_cfg = cfg.loss
        _backbone_and_head(self, cfg)
        online = self.student if self.ema_scope == "head" else _Embedder(self.backbone, self.student)
        self.teacher = EMATeacher(online, cfg.heads.ema_momentum, cfg.heads.teacher_init)
        self._online = [online]  # not a submodule: its parameters are already registered above

    @property
    def encoder(self) -> nn.Module:
        """The student backbone: what gets exported."""
        return self.backbone

    @property
    def online(self) -> nn.Module:
        """What the teacher is an EMA of: the student head (TPAMI) or backbone + head (CVPR)."""
        return self._online[0]

    @torch.no_grad()
    def ema_update(self) -> None:
        self.teacher.update(self.online)

    def forward(self, random: torch.Tensor, bases: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """random (B, S, C, ...), bases (B, K, C, ...) -> student/teacher embeddings of both, (B, S|K, D)."""
        b, s, k = random.shape[0], random.shape[1], bases.shape[1]
        x = _all_crops(random, bases)
        e = self.backbone.embed(x)  # one encoder call for every crop
        zs = self.student(self.dropout(e)).float()
        zt = self.teacher(e if self.ema_scope == "head" else x).float()  # TPAMI: teacher head on clean e
        return (zs[: b * s].unflatten(0, (b, s)), zs[b * s:].unflatten(0, (b, k)),
                zt[: b * s].unflatten(0, (b, s)), zt[b * s:].unflatten(0, (b, k)))

    def positions(self, random: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
        """P = ReLU(cos(student(random), teacher(bases))), (B, S, K)."""
        zs_r, _, _, zt_b = self(random, bases)
        return similarity(zs_r, zt_b)


class VoCoSingleModel(nn.Module):
    """Encoder + one projection head, no teacher: `forward(random, bases)` -> (random, base) embeddings."""

    def __init__(self, cfg: Profile):
        super().__init__()
        self.loss_cfg = cfg.loss
        _backbone_and_head(self, cfg)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def forward(self, random: torch.Tensor, bases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, k = random.shape[0], random.shape[1], bases.shape[1]
        z = self.student(self.dropout(self.backbone.embed(_all_crops(random, bases)))).float()
        return z[: b * s].unflatten(0, (b, s)), z[b * s:].unflatten(0, (b, k))

    def positions(self, random: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
        """P = ReLU(cos(z(random), z(bases))), (B, S, K)."""
        return similarity(*self(random, bases))


# ------------------------------------------------------------------------------------------------ steps
def training_step(net: nn.Module, model: VoCoModel, views: Views, loss_cfg: LossConfig,
                  first_micro: bool) -> dict[str, torch.Tensor]:
    """One VoCo step on a batch of views; `net` is `model` as trained (DDP-wrapped under torchrun)."""
    if first_micro:
        model.ema_update()  # once per optimizer step, before the teacher is used
    zs_rand, zs_base, zt_rand, zt_base = net(views.random, views.bases)
    with torch.autocast(views.random.device.type, enabled=False):  # similarities and logs in float32
        return voco_loss(zs_rand, zs_base, zt_rand, zt_base, views.labels, loss_cfg)


def voco_step(net: nn.Module, model: VoCoModel, views: Views, first_micro: bool) -> Terms:
    terms = training_step(net, model, views, model.loss_cfg, first_micro)
    return terms.pop("loss"), terms


def single_loss(z_rand: torch.Tensor, z_base: torch.Tensor, labels: torch.Tensor,
                cfg: LossConfig) -> dict[str, torch.Tensor]:
    """w_intra · position loss of sim(z_rand, sg z_base) + w_reg · regulariser of z_base (VoCo's forms)."""
    neg = "square" if cfg.variant == "cvpr" else "log"
    intra = position_loss(similarity(z_rand, z_base.detach()), labels, neg=neg, form=cfg.form)
    reg = regularizer(z_base, cfg.form)
    return {"loss": cfg.w_intra * intra + cfg.w_reg * reg, "intra": intra, "reg": reg}


def single_step(net: nn.Module, model: VoCoSingleModel, views: Views, first_micro: bool) -> Terms:
    z_rand, z_base = net(views.random, views.bases)
    with torch.autocast(views.random.device.type, enabled=False):
        terms = single_loss(z_rand, z_base, views.labels, model.loss_cfg)
    return terms.pop("loss"), terms


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict_positions(model: nn.Module, views: Views | list[Views]) -> torch.Tensor:
    """Predicted position matrix (`model.positions`): (S, K), or (B, S, K) for a list.

    The heads' BatchNorm always uses the statistics of the crops passed together, so predictions depend
    (a little) on which volumes are predicted together; predict a list to use batch statistics over all.
    """
    single = isinstance(views, Views)
    batch = collate_views([views] if single else list(views))
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    p = model.positions(batch.random.to(dev), batch.bases.to(dev)).cpu()
    model.train(was)
    return p[0] if single else p


def position_metrics(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy (predicted base = most-overlapped base) and mean |label − prediction|."""
    top1 = (pred.argmax(-1) == labels.argmax(-1)).float().mean().item()
    return {"top1": top1, "mae": (labels - pred).abs().mean().item(), "chance": 1.0 / labels.shape[-1]}


def evaluate(model: nn.Module, views: list[Views], batch_size: int) -> dict[str, float]:
    """Position prediction on the fixed held-out views, in fixed batches of `batch_size` volumes."""
    preds = [predict_positions(model, views[i:i + batch_size]) for i in range(0, len(views), batch_size)]
    labels = torch.stack([v.labels for v in views])
    return position_metrics(torch.cat(preds), labels)
