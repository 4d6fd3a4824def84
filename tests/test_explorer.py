"""Position explorer: encoder-only files (the released VoCo layout) and runs of ours behind one API."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR

from voco_lib import demo, explorer
from voco_lib.checkpoints import CheckpointError
from voco_lib.config import ViewConfig, resolve, to_dict
from voco_lib.pretrain import VoCoModel
from voco_lib.pretrain import predict_positions as predict_with_heads

FS = 12
# 64³ crops (what the released models take) in a small region: 2x2 grid, so 4 bases
VIEWS_64 = ViewConfig(region=(128, 128, 64), grid=(2, 2, 1), augment=False)


@pytest.fixture(scope="module")
def monai_encoder() -> SwinUNETR:
    torch.manual_seed(0)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=FS, use_v2=True).eval()


@pytest.fixture(scope="module")
def released_file(tmp_path_factory, monai_encoder):
    """A file in the released `VoCo_*_SSL_head.pt` layout: a plain state dict of the 145 encoder tensors."""
    state = {k: v for k, v in monai_encoder.state_dict().items() if not k.startswith(("decoder", "out."))}
    assert len(state) == 145
    path = tmp_path_factory.mktemp("released") / "VoCo_test_SSL_head.pt"
    torch.save(state, path)
    return path


def _monai_embedding(net: SwinUNETR, x: torch.Tensor) -> torch.Tensor:
    """VoCo's pooled embedding computed with MONAI's own modules (Luffy03/Large-Scale-Medical
    Self-supervised/models/voco_head.py:L180-205): the reference."""
    with torch.no_grad():
        h = net.swinViT(x, net.normalize)
        maps = [net.encoder1(x), net.encoder2(h[0]), net.encoder3(h[1]), net.encoder4(h[2]), net.encoder10(h[4])]
    return torch.cat([m.mean(dim=(2, 3, 4)) for m in maps], 1)


@pytest.mark.slow
def test_released_file_predicts_raw_feature_cosines(released_file, monai_encoder):
    model, cfg = explorer.load_explorer_model(released_file, "smoke", encoder_views=VIEWS_64)
    assert explorer.is_encoder_only(model) and model.feature_size == FS
    assert model.report.coverage == 1.0 and len(model.report.loaded) == 145 and not model.report.unexpected
    assert cfg.views == VIEWS_64 and cfg.feature_size == FS
    subject = demo.phantom_subject(500_123, cfg)
    assert tuple(subject.region.shape) == VIEWS_64.region
    views = demo.fixed_views(subject.region, cfg, explorer.explorer_starts(model, (40, 16, 0)))
    pred = explorer.predict_positions(model, views)
    assert pred.shape == views.labels.shape == (1, 4)
    assert ((pred >= 0) & (pred <= 1)).all()
    # hand-computed: ReLU(cos) of the pooled MONAI embeddings of the random crop and each base crop
    e_r = _monai_embedding(monai_encoder, views.random)
    e_b = _monai_embedding(monai_encoder, views.bases)
    expected = F.cosine_similarity(e_r[:, None], e_b[None], dim=-1).clamp_min(0)
    torch.testing.assert_close(pred, expected, atol=2e-4, rtol=0)
    # a crop equal to base 3 is identical to it: similarity exactly 1 there; bases are embedded once per volume
    cached = model._bases[1]
    again = explorer.predict_positions(model, demo.fixed_views(subject.region, cfg, [[64, 64, 0]]))
    assert model._bases[1] is cached
    assert again[0, 3].item() == pytest.approx(1.0, abs=1e-5)


def test_feature_size_and_views_follow_the_file_and_profile(released_file):
    model, cfg = explorer.load_explorer_model(released_file, "smoke")
    assert cfg.name == "smoke" and cfg.views == resolve("smoke").views and cfg.feature_size == FS
    assert model.encoder.small_crop == "bypass"  # 32³ crops: the deepest map is 1³
    tpami = explorer.encoder_config("cpu", 48, "tpami")
    assert tpami.views.crop_size == (64, 64, 64) and tpami.views.grid == (3, 3, 1) and tpami.feature_size == 48
    assert tpami.data.chain == "abdomen" and tpami.data.phantom_spacing == 1.5
    with pytest.raises(ValueError, match="encoder_views must be one of"):
        explorer.encoder_config("smoke", FS, "big")


def test_files_that_are_not_voco_encoders_are_named(tmp_path, released_file):
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 1, 3, 3, 3), "fc.weight": torch.zeros(2, 8)}, other)
    with pytest.raises(CheckpointError, match=r"resnet\.pt: not a VoCo / SwinUNETR encoder: no 5-D tensor "
                                              r"swinViT\.patch_embed\.proj\.weight \(first keys: conv1\.weight"):
        explorer.load_explorer_model(other, "smoke")
    # a SwinUNETR without the v2 blocks: fewer encoder tensors than promised, so the load must fail
    v1 = tmp_path / "v1.pt"
    state = torch.load(released_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("swinViT.layers1c")}, v1)
    with pytest.raises(CheckpointError, match=r"v1\.pt: encoder: loaded 143/145 .*Missing: swinViT\.layers1c"):
        explorer.load_explorer_model(v1, "smoke")
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(CheckpointError, match=r"list\.pt: a checkpoint must be a dict of tensors"):
        explorer.load_explorer_model(not_a_dict, "smoke")
    with pytest.raises(FileNotFoundError, match="not a pre-training run"):
        explorer.load_explorer_model(tmp_path, "smoke")


def test_a_run_checkpoint_keeps_its_heads(tmp_path):
    """A full-state file of ours is recognised by content and predicts with VoCo's heads."""
    cfg = resolve("smoke")
    torch.manual_seed(1)
    trained = VoCoModel(cfg).eval()
    path = tmp_path / "checkpoints" / "step_00000004.pt"
    path.parent.mkdir()
    torch.save({"step": 4, "model": trained.state_dict(),
                "config": {"kind": "pretrain", "data": "phantom", "profile": to_dict(cfg)}}, path)
    model, got_cfg = explorer.load_explorer_model(path, "smoke")
    assert isinstance(model, VoCoModel) and not explorer.is_encoder_only(model) and got_cfg == cfg
    region = demo.phantom_subject(3, cfg).region
    views = demo.fixed_views(region, cfg, explorer.explorer_starts(model, (8, 8, 0)))
    assert len(views.random) == 2  # a second, fixed crop keeps the heads' batch statistics stable
    torch.testing.assert_close(explorer.predict_positions(model, views), predict_with_heads(trained, views))


def test_probe_leave_one_out_equals_refitting(released_file, monkeypatch):
    """The closed-form leave-one-out scores equal refitting the ridge without each crop."""
    model, cfg = explorer.load_explorer_model(released_file, "smoke")
    region = demo.phantom_subject(7, cfg).region
    # cheap stand-in features (a 2x2x2 average pool of the crop and its square); the algebra is what is tested
    monkeypatch.setattr(model, "embed", lambda c: torch.cat([F.adaptive_avg_pool3d(c, 2).flatten(1),
                                                             F.adaptive_avg_pool3d(c * c, 2).flatten(1)], 1))
    n, ridge = 12, 0.05
    scores = explorer.fit_probe(model, region, cfg, n_crops=n, ridge=ridge, seed=3)
    from voco_lib.crops import make_views

    views = make_views(region[None], dataclasses.replace(cfg.views, n_random=n, augment=False),
                       torch.Generator().manual_seed(3))
    e, y = model.embed(views.random).double(), views.labels.double()
    z = torch.cat([(e - e.mean(0)) / e.std(0), torch.ones(n, 1, dtype=torch.float64)], 1)
    pen = ridge * n * torch.diag(torch.cat([torch.ones(z.shape[1] - 1), torch.zeros(1)])).double()
    loo = []
    for i in range(n):
        keep = torch.arange(n) != i
        w = torch.linalg.solve(z[keep].T @ z[keep] + pen, z[keep].T @ y[keep])
        loo.append((z[i] @ w).clamp(0, 1))
    loo = torch.stack(loo)
    assert scores["mae_loo"] == pytest.approx((loo - y).abs().mean().item(), rel=1e-6)
    assert scores["top1_loo"] == pytest.approx((loo.argmax(1) == y.argmax(1)).double().mean().item())
    # after fitting, predictions are the probe's: the full-data ridge on these features, clamped to [0, 1]
    w = torch.linalg.solve(z.T @ z + pen, z.T @ y)
    pred = explorer.predict_positions(model, views)
    torch.testing.assert_close(pred, (z @ w).clamp(0, 1).float(), atol=1e-5, rtol=0)
    assert "linear probe" in explorer.prediction_title(model)


def test_the_widget_starts_at_the_static_figures_crop_and_hides_a_fixed_axis():
    """03's sliders start where the static figure's crop is (`crop_start`), clipped to the region; the z axis,
    along which a smoke-profile crop fills the region, gets no slider."""
    cfg = resolve("smoke")
    torch.manual_seed(0)
    model = VoCoModel(cfg).eval()
    subject = demo.phantom_subject(3, cfg)
    box = explorer.explorer_widget(model, subject, cfg, "(8, 40, 0)")
    sliders = box.children[0].children
    assert [(s.description, s.value, s.max) for s in sliders] == [("x start", 8, 32), ("y start", 32, 32)]


def test_hit_rate_counts_top1_over_many_held_out_crops(monkeypatch):
    """A perfect predictor scores 1, an inverted one 0, over the crops drawn; chance is 1/K."""
    cfg = resolve("smoke")
    monkeypatch.setattr(explorer, "predict_positions", lambda model, views: views.labels)
    perfect = explorer.hit_rate(object(), cfg, n_subjects=2, crops=3)
    assert (perfect.top1, perfect.n_crops, perfect.chance) == (1.0, 6, 0.25)
    assert len({tuple(v.random_boxes[0, :, 0].tolist()) for _, v, _, _ in perfect.examples}) > 1  # crops vary
    monkeypatch.setattr(explorer, "predict_positions", lambda model, views: 1 - views.labels)
    assert explorer.hit_rate(object(), cfg, n_subjects=2, crops=3).top1 == 0.0
    fig = explorer.plot_hits_and_misses(perfect, cfg)
    assert "top-1 position accuracy 1.00 over 6 random crops (chance 0.25)" in fig.get_suptitle()


def test_hit_rate_crops_default_skips_slow_encoder_only_files(released_file):
    enc, cfg = explorer.load_encoder_only(released_file, "smoke")
    assert explorer.hit_rate_crops(enc, None) == 0 and explorer.hit_rate_crops(enc, 4) == 4
    assert explorer.hit_rate_crops(VoCoModel(resolve("smoke")), None) == 16
