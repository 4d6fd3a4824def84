"""Projection heads, the embedding dropout ("feature augmentation") and the EMA teacher.

After Luffy03/Large-Scale-Medical Self-supervised/models/voco_head.py:L25-55 (heads) and L223-250 (teacher),
commit 1ad538b.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Sequential):
    """Linear → BN → ReLU → Linear → BN → ReLU → Linear. BN without affine or running statistics, so it
    always normalises with the statistics of the current batch of crops, in train and eval mode alike."""

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 1024):
        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(i, o), nn.BatchNorm1d(o, affine=False, track_running_stats=False), nn.ReLU(inplace=True)
            )

        super().__init__()
        self.layer1 = block(in_dim, hidden_dim)
        self.layer2 = block(hidden_dim, hidden_dim)
        self.layer3 = nn.Linear(hidden_dim, out_dim)


class EmbeddingDropout(nn.Module):
    """Dropout on (N, D) embeddings before the student head.

    mode "sample" reproduces upstream: `nn.Dropout1d` on a 2-D tensor treats it as (channels=N, length=D)
    and so zeroes whole samples (rows), rescaling the rest by 1/(1-p). mode "feature" zeroes single features.
    Unlike upstream (a module built inside forward, always active) it follows train()/eval().
    """

    def __init__(self, p: float = 0.2, mode: str = "sample"):
        super().__init__()
        if mode not in {"sample", "feature"}:
            raise ValueError(f"dropout mode must be 'sample' or 'feature', got {mode!r}")
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.mode == "feature":
            return F.dropout(x, self.p, training=True)
        keep = F.dropout(x.new_ones(x.shape[0], 1), self.p, training=True)
        return x * keep


class EMATeacher(nn.Module):
    """A copy of a module updated only by θ_t ← m·θ_t + (1 − m)·θ_s; it never receives gradients.

    Its parameters have requires_grad=False, so DDP needs no `find_unused_parameters` (upstream does).
    `init="random"` re-initialises the copy (upstream builds the teacher head independently).
    """

    def __init__(self, student: nn.Module, momentum: float = 0.9, init: str = "random"):
        super().__init__()
        if init not in {"random", "copy"}:
            raise ValueError(f"teacher init must be 'random' or 'copy', got {init!r}")
        self.momentum = momentum
        self.module = copy.deepcopy(student)
        if init == "random":
            for m in self.module.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        for t, s in zip(self.module.parameters(), student.parameters()):
            t.lerp_(s.detach(), 1.0 - self.momentum)
        for t, s in zip(self.module.buffers(), student.buffers()):
            t.copy_(s)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)
