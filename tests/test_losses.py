"""VoCo losses against values computed by hand and against straightforward loop references."""

import math

import pytest
import torch

from voco_lib.config import LossConfig
from voco_lib.losses import EPS, inter_loss, position_loss, regularizer, similarity, voco_loss


def test_similarity_is_relu_cosine():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(similarity(a, b), torch.tensor([[1.0, 0.0, 0.0, 1 / math.sqrt(2)]]))


def test_position_loss_by_hand():
    labels = torch.tensor([[0.75, 0.25, 0.0]])
    sim = torch.tensor([[0.5, 0.25, 0.5]])
    pos = -(0.75 * math.log(1 - 0.25 + EPS) + 0.25 * math.log(1 - 0.0 + EPS)) / (1 + EPS)
    neg_log = -math.log(1 - 0.5 + EPS) / (1 + EPS)
    assert position_loss(sim, labels).item() == pytest.approx(pos + neg_log, rel=1e-6)
    assert position_loss(sim, labels, neg="square").item() == pytest.approx(pos + 0.25 / (1 + EPS), rel=1e-6)
    paper = -(math.log(0.75 + EPS) + math.log(1 + EPS) + math.log(0.5 + EPS)) / 3
    assert position_loss(sim, labels, form="paper").item() == pytest.approx(paper, rel=1e-6)


def test_position_loss_zero_when_perfect_and_positive_otherwise():
    labels = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.25, 0.0, 0.75]]])
    assert abs(position_loss(labels.clone(), labels).item()) < 1e-5
    worse = labels.flip(-1)
    assert position_loss(worse, labels).item() > 0.5


def test_position_loss_normalises_per_volume_then_averages():
    g = torch.Generator().manual_seed(0)
    sim, labels = torch.rand(3, 2, 9, generator=g), torch.rand(3, 2, 9, generator=g)
    labels[labels < 0.5] = 0
    per = torch.stack([position_loss(sim[b], labels[b]) for b in range(3)])
    assert torch.allclose(position_loss(sim, labels), per.mean())


def test_regularizer_by_hand_and_stop_gradient_direction():
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    reg = regularizer(emb)
    assert reg.item() == pytest.approx((0.5 + 0.0 + 0.5) / 3, rel=1e-6)
    reg.backward()
    assert emb.grad[2].abs().sum() == 0  # the last crop is never the first element of a pair
    assert emb.grad[0].abs().sum() > 0 and emb.grad[1].abs().sum() > 0
    paper = regularizer(torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]]), form="paper")
    assert paper.item() == pytest.approx((1 / math.sqrt(2) + 0 + 1 / math.sqrt(2)) / 3, rel=1e-6)


def test_regularizer_matches_pair_loop():
    emb = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    ref = []
    for b in range(2):
        pairs = [torch.relu(torch.cosine_similarity(emb[b, k], emb[b, l], dim=0)) ** 2
                 for k in range(9) for l in range(k + 1, 9)]
        ref.append(torch.stack(pairs).mean())
    assert torch.allclose(regularizer(emb), torch.stack(ref).mean(), atol=1e-6)


def test_inter_pairs_each_volume_with_the_next():
    g = torch.Generator().manual_seed(2)
    zs_r, zs_b, zt_r, zt_b = (torch.randn(3, n, 8, generator=g) for n in (2, 4, 2, 4))
    ref = torch.stack([
        position_loss(similarity(zs_r[b], zs_b[(b + 1) % 3]), similarity(zt_r[b], zt_b[(b + 1) % 3]))
        for b in range(3)
    ]).mean()
    assert torch.allclose(inter_loss(zs_r, zs_b, zt_r, zt_b), ref)


def test_voco_loss_terms_weights_and_variants():
    g = torch.Generator().manual_seed(3)
    zs_r, zs_b, zt_r, zt_b = (torch.randn(2, n, 8, generator=g) for n in (2, 9, 2, 9))
    labels = torch.rand(2, 2, 9, generator=g)
    out = voco_loss(zs_r, zs_b, zt_r, zt_b, labels, LossConfig(w_intra=1.0, w_inter=0.5, w_reg=2.0))
    intra = position_loss(similarity(zs_r, zt_b), labels)
    assert torch.allclose(out["intra"], intra)
    assert torch.allclose(out["loss"], out["intra"] + 0.5 * out["inter"] + 2.0 * out["reg"])
    cvpr = voco_loss(zs_r, zs_b, zt_r, zt_b, labels, LossConfig(variant="cvpr"))
    sym = 0.5 * (similarity(zs_r, zt_b) + similarity(zt_r, zs_b))
    assert torch.allclose(cvpr["intra"], position_loss(sym, labels, neg="square"))
    assert cvpr["inter"].item() == 0 and torch.allclose(cvpr["loss"], cvpr["intra"] + cvpr["reg"])
    with pytest.raises(ValueError, match="variant"):
        voco_loss(zs_r, zs_b, zt_r, zt_b, labels, LossConfig(variant="x"))


def test_intra_gradient_does_not_reach_teacher_embeddings():
    g = torch.Generator().manual_seed(4)
    zs_r, zs_b, zt_r, zt_b = (torch.randn(2, n, 8, generator=g, requires_grad=True) for n in (2, 4, 2, 4))
    labels = torch.rand(2, 2, 4, generator=g)
    voco_loss(zs_r, zs_b, zt_r, zt_b, labels)["loss"].backward()
    assert zs_r.grad.abs().sum() > 0 and zs_b.grad.abs().sum() > 0
    assert zt_r.grad is None and zt_b.grad is None
