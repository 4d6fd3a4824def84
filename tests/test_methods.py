"""The pre-training methods: registry and config, each loss by hand, where gradients go, learning, export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from voco_lib.config import METHODS, SwinSSLConfig, profile_from_dict, resolve, to_dict
from voco_lib.crops import Views
from voco_lib.methods import REGISTRY, budget, get_method
from voco_lib.methods.common import CONV_BLOCKS
from voco_lib.methods.mae import masked_l1, pixel_shuffle_3d, random_mask, upsample_mask
from voco_lib.methods.swinssl import cut_out, cutout_boxes, nt_xent, rotate, swinssl_loss
from voco_lib.methods.voco import single_loss


def _views(b: int = 2, s: int = 1, k: int = 2, side: int = 32, seed: int = 0) -> Views:
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(b, s, k, generator=g)
    labels[..., 0] = 0  # some non-overlapping bases, as in real views
    return Views(torch.rand(b, s, 1, side, side, side, generator=g), torch.rand(b, k, 1, side, side, side, generator=g),
                 labels, torch.zeros(b, s, 3, 2), torch.zeros(b, k, 3, 2))


# ------------------------------------------------------------------------------------------------ registry
def test_registry_names_the_config_methods_and_the_old_names_are_aliases():
    assert set(REGISTRY) == set(METHODS)
    assert resolve("smoke", ["method=tpami"]) == resolve("smoke") and resolve("smoke").method == "voco"
    assert resolve("smoke", ["method=cvpr"]) == resolve("smoke", ["method=voco-cvpr"])
    assert resolve("smoke", ["method=CVPR"]).method == "voco-cvpr"
    with pytest.raises(ValueError, match="unknown method='nope'"):
        get_method("nope")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_method_is_stored_in_the_profile_and_changes_the_fingerprint(name):
    cfg = resolve("smoke", [f"method={name}"])
    back = profile_from_dict(to_dict(cfg))
    assert back == cfg and back.method == name
    if name not in ("voco",):
        assert to_dict(cfg) != to_dict(resolve("smoke"))


def test_budget_line_is_steps_by_batch_by_crop_volume():
    cfg = resolve("cpu", ["method=swin-ssl"])  # 100 steps, 2 volumes x (2 random + 4 bases) of 32³
    assert budget(cfg, 2) == ("budget 100 steps × 2 volumes × 6 crops × 32x32x32 = 3.93e+07 crop voxels, "
                              "2 encoder passes per crop")
    assert 100 * 2 * 6 * 32**3 == 39_321_600


def test_method_sections_are_validated():
    with pytest.raises(ValueError, match=r"mae.mask_ratio must be in \(0, 1\)"):
        resolve("smoke", ["mae.mask_ratio=1.0"])
    with pytest.raises(ValueError, match="mae.patch must be an even size"):
        resolve("smoke", ["mae.patch=3"])
    with pytest.raises(ValueError, match="swinssl.temperature must be > 0"):
        resolve("smoke", ["swinssl.temperature=0"])
    with pytest.raises(ValueError, match="mae.patch=12 does not divide the crop"):
        get_method("mae").build_model(resolve("smoke", ["method=mae", "mae.patch=12"]))


# ------------------------------------------------------------------------------------------------ mae
def test_random_mask_masks_exactly_the_ceiling_of_the_ratio():
    m = random_mask(5, (4, 4, 2), 0.6, torch.Generator().manual_seed(0))
    assert m.shape == (5, 4, 4, 2) and m.flatten(1).sum(1).tolist() == [math.ceil(32 * 0.6)] * 5  # 20 of 32
    assert not torch.equal(m[0], m[1])  # drawn per sample
    assert torch.equal(m, random_mask(5, (4, 4, 2), 0.6, torch.Generator().manual_seed(0)))
    up = upsample_mask(m, 3)
    assert up.shape == (5, 12, 12, 6) and bool(up[2, 3:6, 6:9, 0:3].unique() == m[2, 1, 2, 0])


def test_masked_l1_counts_only_masked_voxels():
    target = torch.zeros(1, 1, 2, 2, 1)
    pred = torch.tensor([1.0, -2.0, 3.0, 100.0]).view(1, 1, 2, 2, 1)
    mask = torch.tensor([True, True, True, False]).view(1, 2, 2, 1)
    assert masked_l1(pred, target, mask).item() == pytest.approx((1 + 2 + 3) / (3 + 1e-5))
    pred[0, 0, 1, 1, 0] = -7.0  # an unmasked voxel: no effect
    assert masked_l1(pred, target, mask).item() == pytest.approx((1 + 2 + 3) / (3 + 1e-5))
    two = torch.cat([pred, 2 * pred], 1)  # two channels: the sum is divided by the channel count
    assert masked_l1(two, torch.zeros_like(two), mask).item() == pytest.approx((6 + 12) / 3 / 2, rel=1e-5)


def test_pixel_shuffle_3d_puts_each_channel_at_its_offset():
    r = 2
    x = torch.arange(2 * r**3 * 3, dtype=torch.float).view(1, 2 * r**3, 3, 1, 1)  # 2 output channels, d = 3
    y = pixel_shuffle_3d(x, r)
    assert y.shape == (1, 2, 6, 2, 2)
    for c in range(2):
        for i in range(r):
            for j in range(r):
                for k in range(r):
                    for d in range(3):
                        assert y[0, c, d * r + i, j, k] == x[0, c * r**3 + (i * r + j) * r + k, d, 0, 0]


def test_mae_encoder_path_is_swinvit_and_the_mask_token_replaces_masked_patches():
    torch.manual_seed(0)
    model = get_method("mae").build_model(resolve("smoke", ["method=mae"])).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    none = torch.zeros(2, *model.grid, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x, none), model.backbone.swinViT(x)[4])
        every = torch.ones_like(none)  # all patches masked: the input no longer matters
        torch.testing.assert_close(model.features(x, every), model.features(torch.rand_like(x), every))


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["mae", "swin-ssl"])
def test_transformer_pretexts_train_the_transformer_and_heads_only(name):
    torch.manual_seed(0)
    method = get_method(name)
    model = method.build_model(resolve("smoke", [f"method={name}"])).train()
    loss, logs = method.step(model, model, _views(), True)
    loss.backward()
    grads = _grads(model)
    for n, g in grads.items():
        frozen = n.split(".")[1] in CONV_BLOCKS if n.startswith("backbone.") else False
        if frozen:
            assert g is None and not dict(model.named_parameters())[n].requires_grad, n
        else:
            assert g is not None and g.abs().sum() > 0, n
    if name == "swin-ssl":
        assert set(logs) == {"rot", "contrast", "recon"}


# ------------------------------------------------------------------------------------------------ swin-ssl
def test_rotation_labels_are_quarter_turns_in_the_last_two_axes():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 1, 2, 2).repeat(4, 1, 1, 1, 1)
    out = rotate(x, torch.tensor([0, 1, 2, 3]))
    assert out[0, 0, 0].tolist() == [[1, 2], [3, 4]]
    assert out[1, 0, 0].tolist() == [[2, 4], [1, 3]]  # torch.rot90 k=1: counter-clockwise
    assert out[2, 0, 0].tolist() == [[4, 3], [2, 1]]
    assert out[3, 0, 0].tolist() == [[3, 1], [4, 2]]
    y = torch.rand(3, 1, 4, 8, 8)
    assert torch.equal(rotate(rotate(y, torch.tensor([1, 2, 3])), torch.tensor([3, 2, 1])), y)


def test_nt_xent_by_hand_and_against_the_upstream_formula():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # every embedding: its partner at cosine 1, the two others at 0 -> −log(e^{1/τ} / (e^{1/τ} + 2 e^0))
    t = 0.5
    assert nt_xent(a, a.clone(), t).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    z = F.normalize(torch.cat([x, y]), dim=1)
    sim = z @ z.t()
    ref = 0.0
    for i in range(6):
        p = (i + 3) % 6
        ref += -math.log(math.exp(sim[i, p] / t) / sum(math.exp(sim[i, j] / t) for j in range(6) if j != i))
    assert nt_xent(x, y, t).item() == pytest.approx(ref / 6, rel=1e-5)


def test_swinssl_loss_is_the_weighted_sum_with_full_volume_l1():
    g = torch.Generator().manual_seed(1)
    rot_logits, rot = torch.randn(4, 4, generator=g), torch.tensor([0, 3, 1, 2])
    contrast = torch.randn(4, 8, generator=g)
    recon, target = torch.rand(4, 1, 2, 2, 2, generator=g), torch.rand(4, 1, 2, 2, 2, generator=g)
    cfg = SwinSSLConfig(w_rot=0.5, w_contrast=2.0, w_recon=3.0)
    out = swinssl_loss(rot_logits, rot, contrast, recon, target, cfg)
    assert out["rot"].item() == pytest.approx(F.cross_entropy(rot_logits, rot).item())
    assert out["recon"].item() == pytest.approx((recon - target).abs().mean().item())
    assert out["contrast"].item() == pytest.approx(nt_xent(contrast[:2], contrast[2:], 0.5).item())
    assert out["loss"].item() == pytest.approx(0.5 * out["rot"].item() + 2 * out["contrast"].item()
                                               + 3 * out["recon"].item(), rel=1e-6)


def test_cutouts_stay_inside_cover_the_drawn_fraction_and_copy_from_a_partner():
    g = torch.Generator().manual_seed(0)
    boxes = cutout_boxes((32, 32, 32), 0.3, 0.25, g)
    covered = sum(math.prod(b.stop - b.start for b in box) for box in boxes)
    assert boxes and all(0 <= b.start < b.stop <= 32 and b.stop - b.start < 8 for box in boxes for b in box)
    assert covered <= 0.3 * 32**3 + 8**3  # stops at the first block past the drawn fraction
    x = torch.full((1, 1, 16, 16, 16), 5.0)  # one crop: its partner is itself, so only noise in [0, 1]
    out = cut_out(x, SwinSSLConfig(), torch.Generator().manual_seed(3))
    changed = out != 5.0
    assert changed.any() and (out[changed] >= 0).all() and (out[changed] <= 1).all()
    assert torch.equal(cut_out(x, SwinSSLConfig(max_drop=0.0)), x)
    pair = torch.stack([torch.full((1, 16, 16, 16), 5.0), torch.full((1, 16, 16, 16), -9.0)])
    seen = set()
    for seed in range(6):  # with a partner drawn, crop 0 receives the partner's -9 somewhere
        seen |= set(cut_out(pair, SwinSSLConfig(), torch.Generator().manual_seed(seed))[0].unique().tolist())
    assert -9.0 in seen


# ------------------------------------------------------------------------------------------------ voco-single
def test_voco_single_has_no_teacher_and_the_bases_are_detached_targets():
    cfg = resolve("smoke", ["method=voco-single"])
    model = get_method("voco-single").build_model(cfg)
    assert not hasattr(model, "teacher") and not any("teacher" in n for n, _ in model.named_parameters())
    g = torch.Generator().manual_seed(0)
    zr = torch.randn(2, 2, 8, generator=g, requires_grad=True)
    zb = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    labels = torch.rand(2, 2, 4, generator=g)
    no_reg = single_loss(zr, zb, labels, cfg.loss.__class__(w_reg=0.0))
    no_reg["loss"].backward()
    assert zr.grad.abs().sum() > 0 and (zb.grad is None or zb.grad.abs().sum() == 0)  # bases: targets only
    from voco_lib.losses import position_loss, regularizer, similarity

    out = single_loss(zr, zb, labels, cfg.loss)
    expect = position_loss(similarity(zr, zb), labels) + regularizer(zb)
    torch.testing.assert_close(out["loss"], expect)


def test_voco_single_step_reaches_backbone_and_head():
    torch.manual_seed(0)
    method = get_method("voco-single")
    model = method.build_model(resolve("smoke", ["method=voco-single"])).train()
    loss, logs = method.step(model, model, _views(k=4), True)
    loss.backward()
    assert set(logs) == {"intra", "reg"}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:  # 32³ crops: encoder10 is bypassed and frozen (build_backbone)
            assert n.startswith("backbone.encoder10."), n


# ------------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def task_targets():
    from voco_lib.tasks import load_task, runner_class
    from voco_lib.tasks.engine import Context

    cfg = resolve("smoke", ["finetune.n_train=1", "finetune.n_val=1"])
    out = {}
    for name in ("phantom-seg", "phantom-cls", "phantom-vl", "phantom-rg"):  # phantom-reg: 2 input channels
        task = load_task(name)
        out[name] = runner_class(task.type)(Context(task, cfg, 0, None, None, torch.device("cpu"), 12)).init_target()
    return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_exports_an_encoder_that_loads_fully_into_every_task_model(name, task_targets, tmp_path):
    from voco_lib.tasks.engine import load_init

    torch.manual_seed(0)
    method = get_method(name)
    model = method.build_model(resolve("smoke", [f"method={name}"]))
    path = method.export(model, tmp_path / "encoder.pt")
    state = model.encoder.state_dict()
    for task, target in task_targets.items():
        report = load_init(target, path, min_coverage=1.0)
        assert report["coverage"] == 1.0 and report["loaded"] == len(state), (task, report["summary"])
        loaded = target.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), task


# ------------------------------------------------------------------------------------------------ learning
@pytest.mark.slow
@pytest.mark.parametrize("name", ["voco-single", "mae", "swin-ssl"])
def test_a_smoke_run_improves_its_pretext_metric(name, tmp_path):
    from voco_lib.pretrain import load_run, read_metrics, run_pretraining

    run = run_pretraining("smoke", "phantom", tmp_path / name,
                          [f"method={name}", "steps=8", "train.eval_every=8", "train.checkpoint_every=8",
                           "train.warmup_steps=2", "n_volumes=4", "data.n_eval=2"], show_progress=False)
    method = get_method(name)
    evals = read_metrics(run, "eval")
    first, last = evals[0][method.metric], evals[-1][method.metric]
    assert (last > first) if method.higher_is_better else (last < first), evals
    assert (run / "encoder.pt").is_file()
    assert type(load_run(run)) is type(method.build_model(resolve("smoke", [f"method={name}"])))
