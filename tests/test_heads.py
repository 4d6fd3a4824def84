"""Projection heads, embedding dropout modes and EMA teacher maths."""

import pytest
import torch

from voco_lib.config import resolve
from voco_lib.crops import collate_views, make_views
from voco_lib.heads import EMATeacher, EmbeddingDropout, ProjectionHead
from voco_lib.pretrain import VoCoModel, training_step


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


def test_training_step_updates_the_teacher_once_before_use_and_gradients_reach_the_student_only():
    """`pretrain.training_step`: EMA θ_t ← mθ_t + (1−m)θ_s on the first micro-batch only, then one forward;
    the loss reaches the student head and the backbone, never the teacher (stop-gradient)."""
    cfg = resolve("smoke", ["heads.dropout_p=0", "heads.hidden_dim=32", "heads.out_dim=16"])
    torch.manual_seed(0)
    model = VoCoModel(cfg).train()
    g = torch.Generator().manual_seed(1)
    views = collate_views([make_views(torch.rand(1, 64, 64, 32, generator=g), cfg.views, g) for _ in range(2)])
    before = [p.clone() for p in model.teacher.parameters()]
    terms = training_step(model, model, views, cfg.loss, first_micro=True)
    m = cfg.heads.ema_momentum
    for b, t, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t, m * b + (1 - m) * s, rtol=0, atol=1e-6)
    after = [p.clone() for p in model.teacher.parameters()]
    training_step(model, model, views, cfg.loss, first_micro=False)  # a later micro-batch: no second update
    assert all(torch.equal(a, t) for a, t in zip(after, model.teacher.parameters()))
    assert set(terms) >= {"loss", "intra", "inter", "reg"} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.backbone.swinViT.patch_embed.proj.weight.grad.abs().sum() > 0
