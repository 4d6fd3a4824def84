"""Projection heads, embedding dropout modes and EMA teacher maths."""

import pytest
import torch

from voco_lib.config import HeadConfig
from voco_lib.heads import EMATeacher, EmbeddingDropout, ProjectionHead, VoCoHeads
from voco_lib.losses import voco_loss


def test_projection_head_uses_batch_statistics_in_eval_too():
    head = ProjectionHead(12, 16, 8).eval()
    x = torch.randn(6, 12)
    h = head.layer1[0](x)
    assert torch.allclose(head.layer1[1](h).mean(0), torch.zeros(16), atol=1e-5)
    assert head(x).shape == (6, 8)
    assert not any("running" in n for n, _ in head.named_buffers())


def test_ema_after_k_updates():
    student = torch.nn.Linear(3, 2)
    teacher = EMATeacher(student, momentum=0.9, init="random")
    t0 = [p.clone() for p in teacher.module.parameters()]
    assert not torch.equal(t0[0], student.weight)
    for _ in range(5):
        teacher.update(student)
    for t, init, s in zip(teacher.module.parameters(), t0, student.parameters()):
        expected = 0.9**5 * init + (1 - 0.9**5) * s
        assert torch.allclose(t, expected, atol=1e-6)
    copied = EMATeacher(student, init="copy")
    assert torch.equal(copied.module.weight, student.weight)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_sample_dropout_drops_whole_rows_feature_dropout_single_values():
    torch.manual_seed(0)
    x = torch.ones(2000, 10)
    rows = EmbeddingDropout(0.2, "sample").train()(x)
    per_row = rows.unique(dim=1)
    assert per_row.shape[1] == 1  # each row is all-zero or all-1/0.8
    assert set(per_row.flatten().tolist()) <= {0.0, 1 / 0.8}
    assert 0.17 < (per_row == 0).float().mean() < 0.23
    feats = EmbeddingDropout(0.2, "feature").train()(x)
    assert (feats == 0).any(dim=1).float().mean() > 0.8  # most rows lose some features, not all
    assert torch.equal(EmbeddingDropout(0.2, "sample").eval()(x), x)
    with pytest.raises(ValueError):
        EmbeddingDropout(0.2, "channel")


def test_heads_update_teacher_before_use_and_gradients_reach_student_only():
    torch.manual_seed(0)
    heads = VoCoHeads(24, HeadConfig(hidden_dim=32, out_dim=16, dropout_p=0.0)).train()
    before = [p.clone() for p in heads.teacher.parameters()]
    emb = torch.randn(2 * (2 + 4), 24, requires_grad=True)
    zs, zt = heads(emb)
    for b, t, s in zip(before, heads.teacher.parameters(), heads.student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-6)
    assert torch.allclose(zt, heads.teacher.module(emb), atol=1e-6)
    rand_s, base_s = zs[:4].view(2, 2, -1), zs[4:].view(2, 4, -1)
    rand_t, base_t = zt[:4].view(2, 2, -1), zt[4:].view(2, 4, -1)
    voco_loss(rand_s, base_s, rand_t, base_t, torch.rand(2, 2, 4))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.student.parameters())
    assert all(p.grad is None for p in heads.teacher.parameters())
    assert emb.grad.abs().sum() > 0
