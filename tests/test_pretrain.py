"""Pre-training engine: schedule, data order, EMA scopes, determinism, learning, export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from voco_lib.config import resolve
from voco_lib.crops import make_views
from voco_lib.data.loader import InfiniteOrder, PhantomVolumes, ViewsDataset, make_loader, sample_seed
from voco_lib.loop import PERF_KEY, warmup_cosine
from voco_lib.pretrain import VoCoModel, load_run, position_metrics, predict_positions, read_metrics, run_pretraining

TINY = ["data.n_eval=2", "n_volumes=4"]


def test_warmup_cosine_hand_values():
    # W = 4, T = 12: linear 0, 1/4, ..; at W the cosine starts at 1; halfway (t = 8) 1/2; at T 0, after it 0
    assert [warmup_cosine(t, 4, 12) for t in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(8, 4, 12) == pytest.approx(0.5)
    assert warmup_cosine(6, 4, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(12, 4, 12) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(20, 4, 12) == 0.0


def test_order_accumulation_equals_data_parallel():
    """accum=2 on one process reads exactly the micro-batches two ranks read with accum=1."""
    single = InfiniteOrder(7, batch_size=2, seed=3, world=1, rank=0, accum=2)
    ranks = [InfiniteOrder(7, batch_size=2, seed=3, world=2, rank=r, accum=1) for r in range(2)]
    for step in range(6):
        for a in range(2):
            assert single.micro_batch(step, a) == ranks[a].micro_batch(step, 0)


def test_order_epochs_are_fresh_permutations_and_resumable():
    n = 6
    order = InfiniteOrder(n, batch_size=3, seed=0)
    it = iter(order)
    first = [next(it) for _ in range(8)]  # 24 samples = 4 epochs
    flat = [k for b in first for k in b]
    epochs = [[i for e, i in flat if e == ep] for ep in range(4)]
    for ep in epochs:
        assert sorted(ep) == list(range(n))  # each epoch visits every volume once
    assert len({tuple(e) for e in epochs}) > 1  # set_epoch: the permutation changes between epochs
    resumed = InfiniteOrder(n, batch_size=3, seed=0)
    resumed.load_state_dict({**order.state_dict(), "next_step": 5})
    assert [next(iter(resumed)) for _ in range(1)][0] == first[5]
    with pytest.raises(ValueError, match="batch_size"):
        InfiniteOrder(n, batch_size=2, seed=0).load_state_dict(order.state_dict())


def test_sample_views_do_not_depend_on_workers():
    cfg = resolve("smoke")
    vols = PhantomVolumes([0, 1, 2], cfg.data.phantom_shape, spacing=cfg.data.phantom_spacing)
    ds = ViewsDataset(vols, cfg.views, "resize", seed=0)
    a = next(iter(make_loader(ds, InfiniteOrder(3, 2, 0), workers=0)))
    b = next(iter(make_loader(ds, InfiniteOrder(3, 2, 0), workers=2)))
    assert torch.equal(a.random, b.random) and torch.equal(a.labels, b.labels)
    assert sample_seed(0, 0, 1) != sample_seed(0, 1, 0) != sample_seed(1, 0, 0)


def test_position_metrics_hand_computed():
    labels = torch.tensor([[[0.6, 0.4, 0.0], [0.0, 0.0, 1.0]]])
    pred = torch.tensor([[[0.5, 0.6, 0.0], [0.0, 0.2, 0.9]]])
    m = position_metrics(pred, labels)
    assert m["top1"] == 0.5 and m["chance"] == pytest.approx(1 / 3)
    assert m["mae"] == pytest.approx((0.1 + 0.2 + 0 + 0 + 0.2 + 0.1) / 6)


@pytest.mark.parametrize("scope", ["head", "full"])
def test_ema_update_once_per_step_over_the_right_scope(scope):
    cfg = resolve("smoke", [f"train.ema_scope={scope}"])
    torch.manual_seed(0)
    model = VoCoModel(cfg)
    student, teacher = model.online, model.teacher.module
    assert (student is model.student) == (scope == "head")
    before = [t.clone() for t in teacher.parameters()]
    model.ema_update()
    m = cfg.heads.ema_momentum
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, m * b + (1 - m) * s, rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in teacher.parameters())
    if scope == "full":  # the CVPR teacher holds its own backbone
        assert any(n.startswith("module.backbone.") for n, _ in model.teacher.named_parameters())


def _strip(path):
    return [{k: v for k, v in json.loads(ln).items() if k != PERF_KEY} for ln in path.read_text().splitlines()]


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path):
    """Everything in metrics.jsonl but the `perf` field (timing, throughput, memory) is reproducible."""
    runs = [run_pretraining("smoke", "phantom", tmp_path / f"r{i}", TINY + ["steps=2"], show_progress=False)
            for i in range(2)]
    a, b = (_strip(r / "metrics.jsonl") for r in runs)
    assert a == b and [(r["kind"], r["step"]) for r in a] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
    other = run_pretraining("smoke", "phantom", tmp_path / "seed1", TINY + ["steps=2", "train.seed=1"],
                            show_progress=False)
    assert _strip(other / "metrics.jsonl") != a
    with pytest.raises(ValueError, match="--resume"):
        run_pretraining("smoke", "phantom", runs[0], TINY + ["steps=2"], show_progress=False)


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    """40 steps: on the varied phantoms 24 steps reached top-1 0.34 against chance 0.25 (loss and error falling)."""
    out = tmp_path_factory.mktemp("learn") / "run"
    return run_pretraining("smoke", "phantom", out, ["steps=40", "train.eval_every=20", "train.checkpoint_every=20",
                                                      "train.warmup_steps=4", "n_volumes=8", "data.n_eval=4"],
                           show_progress=False)


@pytest.mark.slow
def test_smoke_run_learns_position(learned_run):
    train = read_metrics(learned_run, "train")
    evals = read_metrics(learned_run, "eval")
    first = sum(r["loss"] for r in train[:6]) / 6
    last = sum(r["loss"] for r in train[-6:]) / 6
    assert last < first, (first, last)
    assert evals[-1]["top1"] > evals[-1]["chance"] + 0.1, evals
    assert evals[-1]["mae"] < evals[0]["mae"], evals


@pytest.mark.slow
def test_load_run_predicts_positions(learned_run):
    model = load_run(learned_run)
    cfg = resolve("smoke")
    vols = PhantomVolumes([123], cfg.data.phantom_shape, spacing=cfg.data.phantom_spacing)
    from voco_lib.data.preprocess import sample_region

    g = torch.Generator().manual_seed(0)
    views = make_views(sample_region(vols[0], cfg.views.region, g, "resize").contiguous(), cfg.views, g)
    p = predict_positions(model, views)
    assert p.shape == (cfg.views.n_random, cfg.views.n_bases)
    assert (p >= 0).all() and (p <= 1 + 1e-6).all()
    assert torch.equal(predict_positions(model, [views])[0], p)


@pytest.mark.slow
def test_exported_encoder_loads_fully(learned_run):
    from monai.networks.nets import SwinUNETR

    from voco_lib.backbone import build_encoder
    from voco_lib.checkpoints import load_encoder

    path = learned_run / "encoder.pt"
    report = load_encoder(build_encoder(12), path)
    assert report.coverage == 1.0 and not report.missing and not report.unexpected
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, use_v2=True)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not unexpected
    assert all(k.startswith(("decoder", "out.")) for k in missing), missing
    trained = load_run(learned_run).encoder.state_dict()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained.items())
