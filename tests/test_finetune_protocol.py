"""The fine-tuning protocols: a frozen encoder with a linear probe, the full protocol's lr groups, flip_p, results."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from voco_lib.backbone import build_backbone, build_encoder
from voco_lib.config import resolve
from voco_lib.loop import adamw
from voco_lib.runs import checkpoint_paths
from voco_lib.tasks import finetune, load_task, runner_class
from voco_lib.tasks.classification import EncoderClassifier
from voco_lib.tasks.data import random_flips
from voco_lib.tasks.engine import Context
from voco_lib.tasks.probe import LinearSegmentationProbe, encoder_depth, param_groups

ROI = (32, 32, 32)


def _probe(seed: int = 0) -> LinearSegmentationProbe:
    torch.manual_seed(seed)
    return LinearSegmentationProbe(build_backbone(12, ROI, 1), 3)


def test_probe_is_one_linear_map_of_the_upsampled_concatenated_maps():
    p = _probe()
    x = torch.randn(1, 1, *ROI)
    with torch.no_grad():
        maps = p.encoder.swinViT(x)
        up = torch.cat([F.interpolate(m, size=ROI, mode="trilinear", align_corners=False) for m in maps], 1)
        w, b = p.concat_weight()
        expected = torch.einsum("kc,bcxyz->bkxyz", w, up) + b[None, :, None, None, None]
        assert up.shape[1] == 31 * 12 == w.shape[1]
        torch.testing.assert_close(p(x), expected, rtol=1e-4, atol=1e-5)


def test_frozen_encoder_stays_in_eval_mode_and_out_of_the_graph_while_the_probe_learns():
    p = _probe().train()
    assert not p.encoder.training and all(h.training for h in p.heads)
    assert not any(q.requires_grad for q in p.encoder.parameters())
    before = {k: v.clone() for k, v in p.encoder.state_dict().items()}
    torch.manual_seed(1)
    x = torch.randn(2, 1, *ROI)
    y = (x[:, 0] > 0).long()  # a per-voxel target a linear read-out of the features can fit
    opt, sched = adamw(p, 1e-2, 0.0, warmup=0, steps=100)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(p(x), y)
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(before[k], v) for k, v in p.encoder.state_dict().items())
    assert sum(q.numel() for g in opt.param_groups for q in g["params"]) == 31 * 12 * 3 + 3  # the probe only


def test_frozen_classifier_trains_only_its_head():
    m = EncoderClassifier(build_encoder(12, small_crop="bypass"), 2, frozen=True).train()
    assert not m.encoder.training and m.head.training
    assert [n for n, q in m.named_parameters() if q.requires_grad] == ["head.weight", "head.bias"]
    m.head.weight.grad = None
    m(torch.randn(1, 1, *ROI)).sum().backward()
    assert m.head.weight.grad is not None
    full = EncoderClassifier(build_encoder(12, small_crop="bypass"), 2)
    assert full.train().encoder.training and all(q.requires_grad for q in full.encoder.swinViT.parameters())


def test_layer_decay_groups_have_the_hand_computed_lrs():
    torch.manual_seed(0)
    model = build_backbone(12, ROI, 1, out_channels=3)  # SwinUNETR: encoder names + decoder
    groups = param_groups(model, model, lr=1e-3, encoder_lr_scale=0.2, layer_decay=0.5)
    lr_of = {id(q): g["lr"] for g in groups for q in g["params"]}
    named = dict(model.named_parameters())
    # lr · scale · decay^(5 − depth): depth 0 -> 1e-3·0.2·0.5^5, …, depth 4 -> 1e-3·0.2·0.5
    expected = {"swinViT.patch_embed.proj.weight": 6.25e-6, "encoder1.layer.conv1.conv.weight": 6.25e-6,
                "swinViT.layers1c.0.layer.conv1.conv.weight": 1.25e-5, "encoder2.layer.conv1.conv.weight": 1.25e-5,
                "swinViT.layers1.0.blocks.0.attn.qkv.weight": 1.25e-5, "encoder3.layer.conv1.conv.weight": 2.5e-5,
                "swinViT.layers3.0.downsample.reduction.weight": 5e-5,
                "swinViT.layers4.0.blocks.1.mlp.linear1.weight": 1e-4, "decoder1.transp_conv.conv.weight": 1e-3,
                "out.conv.conv.weight": 1e-3}
    for name, lr in expected.items():
        assert lr_of[id(named[name])] == pytest.approx(lr, rel=1e-12), name
    assert groups[0]["name"] == "head" and groups[0]["lr"] == 1e-3
    trainable = [q for q in model.parameters() if q.requires_grad]
    assert sorted(lr_of) == sorted(id(q) for q in trainable) and len(lr_of) == sum(len(g["params"]) for g in groups)
    assert id(named["encoder10.layer.conv1.conv.weight"]) not in lr_of  # frozen below 64³ (build_backbone)
    # the schedule scales every group alike: after the 2-step warmup each group is at its own lr
    opt, sched = adamw(model, 1e-3, 0.0, warmup=2, steps=10, groups=groups)
    for _ in range(2):
        opt.step(), sched.step()  # no gradients: the weights stay, the schedule advances
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([g["lr"] for g in groups])
    assert encoder_depth("decoder5.conv_block.conv1.conv.weight") is None


def test_adamw_refuses_groups_that_miss_or_repeat_a_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    a, b = list(model[0].parameters()), list(model[1].parameters())
    with pytest.raises(ValueError, match="exactly one group"):
        adamw(model, 1e-3, 0.0, 0, 10, groups=[{"params": a, "lr": 1e-3}])
    with pytest.raises(ValueError, match="exactly one group"):
        adamw(model, 1e-3, 0.0, 0, 10, groups=[{"params": a + b, "lr": 1e-3}, {"params": b, "lr": 1e-4}])
    opt, _ = adamw(model, 1e-3, 0.0, 0, 10, groups=[{"params": a, "lr": 1e-3}, {"params": b, "lr": 1e-4}])
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]


def test_flip_probability_zero_never_flips_and_one_flips_every_axis():
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    for s in range(20):
        assert torch.equal(random_flips([t], torch.Generator().manual_seed(s), 0.0)[0], t)
        assert torch.equal(random_flips([t], torch.Generator().manual_seed(s), 1.0)[0], t.flip([1, 2, 3]))


def test_segmentation_crops_use_finetune_flip_p():
    task = load_task("phantom-seg")
    ctx = Context(task, resolve("smoke", ["finetune.n_train=1", "finetune.n_val=1", "finetune.flip_p=0"]), 0, None,
                  None, torch.device("cpu"), 12)
    r = runner_class("segmentation")(ctx)
    x0, y0 = r.batch(3)
    r.ctx = dataclasses.replace(ctx, cfg=resolve("smoke", ["finetune.n_train=1", "finetune.n_val=1",
                                                           "finetune.flip_p=1"]))
    x1, y1 = r.batch(3)  # the same crop (flips draw the same numbers whatever p), flipped on all three axes
    assert torch.equal(x1, x0.flip([2, 3, 4])) and torch.equal(y1, y0.flip([2, 3, 4]))
    assert not torch.equal(x1, x0)


def test_frozen_run_keeps_the_init_bitwise_and_records_protocol_and_split(tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "encoder.pt"
    torch.save(build_encoder(12).state_dict(), init)
    res = finetune("phantom-seg", init=init, profile="smoke", seed=0, out=tmp_path / "run", show_progress=False,
                   overrides=["finetune.protocol=frozen", "finetune.steps=4", "finetune.checkpoint_every=2",
                              "finetune.keep_last=5", "finetune.eval_every=100", "finetune.n_train=1",
                              "finetune.n_val=1", "finetune.hd95=false", "finetune.lr=1e-2"])
    assert res["protocol"] == "frozen" and res["split"] == {"file": "phantom", "part": "validation"}
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["protocol"] == "frozen" and on_disk["split"] == res["split"]
    saved = torch.load(init, weights_only=True)
    ck = [torch.load(p, weights_only=True) for p in checkpoint_paths(tmp_path / "run")]
    assert [c["step"] for c in ck] == [2, 4]
    for c in ck:
        enc = {k[len("encoder."):]: v for k, v in c["model"].items() if k.startswith("encoder.")}
        assert enc.keys() == saved.keys() and all(torch.equal(enc[k], saved[k]) for k in saved)
    assert not torch.equal(ck[0]["model"]["heads.0.weight"], ck[1]["model"]["heads.0.weight"])
    assert len(ck[1]["optimizer"]["param_groups"]) == 1 and len(ck[1]["optimizer"]["param_groups"][0]["params"]) == 6


def test_frozen_protocol_is_refused_for_registration_in_one_line(capsys):
    with pytest.raises(ValueError, match=r"finetune.protocol=frozen is not supported for task phantom-reg"):
        finetune("phantom-reg", profile="smoke", overrides=["finetune.protocol=frozen"], show_progress=False)
    from voco_lib.cli import main

    assert main(["finetune", "phantom-vl", "--profile", "smoke", "finetune.protocol=frozen"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finetune.protocol" in err[0] and "segmentation, classification" in err[0]
