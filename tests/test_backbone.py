"""The fast Swin encoder computes what MONAI SwinUNETR(use_v2=True)'s encoder computes, with its names."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock
from monai.networks.nets import SwinUNETR

from voco_lib.backbone import ConvBlock, UpBlock, build_encoder, build_swinunetr, pooled_embedding
from voco_lib.swin_kernels import _NormAct, _window_chunks, attention, conv3x3, window_plan


def monai_and_ours(fs: int, out_channels: int = 2):
    torch.manual_seed(fs)
    ref = SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=fs, use_v2=True)
    ours = build_encoder(fs)
    encoder_keys = {k: v for k, v in ref.state_dict().items() if not k.startswith(("decoder", "out."))}
    ours.load_state_dict(encoder_keys, strict=True)  # MONAI -> ours
    return ref, ours


def monai_maps(ref: SwinUNETR, x: torch.Tensor) -> list[torch.Tensor]:
    h = ref.swinViT(x, ref.normalize)
    return [ref.encoder1(x), ref.encoder2(h[0]), ref.encoder3(h[1]), ref.encoder4(h[2]), ref.encoder10(h[4])]


def loss_of(maps: list[torch.Tensor]) -> torch.Tensor:
    return sum(m.square().mean() for m in maps)  # every output element matters


@pytest.mark.slow
@pytest.mark.parametrize("fs,size", [(12, 64), (24, 96)])  # both feature sizes, both window layouts (pad 35/49)
def test_matches_monai_forward_and_gradients(fs, size):
    ref, ours = monai_and_ours(fs)
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(size))

    # train mode, with gradients (the explicit-softmax path)
    ref.train(), ours.train()
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = monai_maps(ref, xr), ours(xo)
    assert [m.shape for m in a] == [m.shape for m in b]
    for m_ref, m_ours in zip(a, b):
        assert (m_ref - m_ours).abs().max() < 1e-4
    loss_of(a).backward()
    loss_of(b).backward()
    grads = dict(ref.named_parameters())
    pairs = [(n, p.grad, grads[n].grad) for n, p in ours.named_parameters()] + [("input", xo.grad, xr.grad)]
    diff = torch.stack([(g - r).norm() for _, g, r in pairs]).norm()
    assert diff / torch.stack([r.norm() for _, _, r in pairs]).norm() < 1e-3  # all gradients together
    # per tensor: 1e-3 at 64³; at 96³ the stage-1 weights sum 48³ tokens per gradient and fp32 summation
    # order alone moves their (small-norm) gradients by 1.0-1.4e-3 relative (measured; forward agrees to 2e-5)
    per_tensor = 1e-3 if size == 64 else 2e-3
    for name, g, r in pairs:
        rel = (g - r).norm() / r.norm()
        assert rel < per_tensor, f"{name}: relative gradient error {rel:.2e}"

    # eval mode, no gradient, and the pooled embedding
    ref.eval(), ours.eval()
    with torch.no_grad():
        emb_ref = pooled_embedding(monai_maps(ref, x))
        emb = ours.embed(x)
    assert emb.shape == (1, 24 * fs)
    assert (emb - emb_ref).abs().max() < 1e-4


def test_state_dict_names_equal_monai_both_ways():
    """Same names and shapes at the paper's size B (meta device: nothing allocated), strict loads both ways."""
    ref = SwinUNETR(in_channels=1, out_channels=21, feature_size=48, use_v2=True)  # MONAI cannot build on meta
    with torch.device("meta"):
        ours = build_encoder(48)
        full = build_swinunetr(48, 21)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    enc = {k: v.shape for k, v in ours.state_dict().items()}
    assert enc == {k: s for k, s in ref_shapes.items() if not k.startswith(("decoder", "out."))}
    assert len(enc) == 145  # released SSL files hold 145 tensors (Luffy03/Large-Scale-Medical issue #40)
    assert {k: v.shape for k, v in full.state_dict().items()} == ref_shapes
    # analytical parameter counts of MONAI SwinUNETR-v2: encoder 53.2M, full SwinUNETR(21) 72.8M
    assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 1) == 53.2
    assert round(sum(p.numel() for p in full.parameters()) / 1e6, 1) == 72.8
    # ours -> MONAI, strict on the encoder part
    ref_small, ours_small = monai_and_ours(12)
    torch.nn.init.normal_(ours_small.swinViT.layers3[0].blocks[1].attn.relative_position_bias_table)
    missing, unexpected = ref_small.load_state_dict(ours_small.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith(("decoder", "out.")) for k in missing)
    assert torch.equal(ref_small.swinViT.layers3[0].blocks[1].attn.relative_position_bias_table,
                       ours_small.swinViT.layers3[0].blocks[1].attn.relative_position_bias_table)


@pytest.mark.slow
def test_full_swinunetr_matches_monai():
    torch.manual_seed(0)
    ref = SwinUNETR(in_channels=1, out_channels=21, feature_size=12, use_v2=True).eval()
    ours = build_swinunetr(12, 21).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-4


def test_window_plan_is_a_permutation_with_grouped_patterns():
    # 8³ tokens, window 7, shift 3: padded to 14³, 2 windows per axis. Along one axis (shifted coordinate p
    # holds token (p + 3) mod 14): window 0 = tokens 3..7 + 2 pads, all region 0; window 1 = region 1 (4 pads,
    # no real token: no sub-window) and region 2 (tokens 0..2, no pad). So 2³ = 8 sub-windows with
    # (real, real + pad) = (5 or 3, 7 or 3) per axis.
    plan = window_plan((8, 8, 8), (7, 7, 7), (3, 3, 3), "cpu")
    assert torch.equal(plan.order.sort().values, torch.arange(512))
    assert torch.equal(plan.order[plan.inverse], torch.arange(512))
    assert len(plan.groups) == 8 and sum(plan.group_sizes) == 512
    sizes = sorted((g.real_slots.numel(), g.real_slots.numel() + g.pad_slots.numel()) for g in plan.groups)
    expected = sorted((a * b * c, x * y * z) for (a, x), (b, y), (c, z)
                      in itertools.product([(5, 7), (3, 3)], repeat=3))
    assert sizes == expected
    assert plan.pairs.numel() == sum(r * (r + p) for r, p in
                                     ((g.real_slots.numel(), g.pad_slots.numel()) for g in plan.groups))
    # a 4³ map is smaller than the window: one 4³ window, no shift, no padding (MONAI's rule)
    small = window_plan((4, 4, 4), (7, 7, 7), (3, 3, 3), "cpu")
    assert small.window == (4, 4, 4) and len(small.groups) == 1
    assert small.groups[0].pad_slots.numel() == 0 and small.groups[0].real_slots.numel() == 64


def grads_after(model, inputs: list[torch.Tensor], weight: torch.Tensor, params=None):
    """Output and every gradient (inputs', then the parameters') of sum(weight · model(*inputs))."""
    params = list(params if params is not None else model.parameters())
    inputs = [t.clone().requires_grad_() for t in inputs]
    for p in params:
        p.grad = None
    out = model(*inputs)
    (out * weight).sum().backward()
    return [out.detach()] + [t.grad for t in inputs] + [p.grad for p in params]


@pytest.mark.parametrize("batch,cin,cout,size", [
    (2, 4, 4, 8),  # identity residual, contiguous batch
    (2, 3, 5, 8),  # residual through conv3 + norm3
    (1, 6, 6, 16),  # batch 1 with C·D·H ≤ 20480: the two-halves convolution
    (1, 2, 6, 16),
    (2, 5, 5, 2),  # a 2³ map: the convolutions as one matrix product
])
def test_conv_blocks_equal_monai_in_float64(batch, cin, cout, size):
    """The fused norm/activation with its hand-written backward is MONAI's block, outputs and all gradients."""
    torch.manual_seed(0)
    ref = UnetrBasicBlock(spatial_dims=3, in_channels=cin, out_channels=cout, kernel_size=3, stride=1,
                          norm_name="instance", res_block=True).double()
    ours = ConvBlock(cin, cout).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(batch, cin, size, size, size, dtype=torch.float64)
    w = torch.randn(batch, cout, size, size, size, dtype=torch.float64)
    for a, b in zip(grads_after(ref, [x], w), grads_after(ours, [x], w), strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    up_ref = UnetrUpBlock(spatial_dims=3, in_channels=cin, out_channels=cout, kernel_size=3, upsample_kernel_size=2,
                          norm_name="instance", res_block=True).double()
    up = UpBlock(cin, cout).double()
    up.load_state_dict(up_ref.state_dict(), strict=True)
    low = torch.randn(batch, cin, size // 2, size // 2, size // 2, dtype=torch.float64)
    skip = torch.randn(batch, cout, size, size, size, dtype=torch.float64)
    for a, b in zip(grads_after(up_ref, [low, skip], w), grads_after(up, [low, skip], w), strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", [(1, 12, 16, 8, 8), (1, 3, 8, 4, 4),  # batch 1, C·D·H ≤ 20480: two halves
                                   (3, 4, 2, 2, 2), (2, 4, 2, 1, 2)])  # ≤ 2³ voxels: one matrix product
def test_routed_convolutions_are_the_convolution(shape):
    """conv3x3's other forms give nn.Conv3d's output and gradients (input, weight, bias)."""
    conv = torch.nn.Conv3d(shape[1], 7, 3, padding=1, bias=True).double()
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(shape[0], 7, *shape[2:], dtype=torch.float64)
    routed = grads_after(lambda t: conv3x3(conv, t), [x], w, conv.parameters())
    for a, b in zip(grads_after(conv, [x], w), routed, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("windows,heads,n,m", [(5, 3, 7, 7), (9, 2, 343, 344)])  # one chunk; five chunks
def test_cpu_attention_is_what_cuda_gets(windows, heads, n, m):
    """On CUDA attention() calls scaled_dot_product_attention with the bias as additive mask; the CPU forms
    (with gradients for q, k, v and the bias; without, chunk by chunk) must compute the same."""
    g = torch.Generator().manual_seed(0)
    q, w = (torch.randn(windows, heads, n, 4, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(windows, heads, m, 4, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(heads, n, m, generator=g, dtype=torch.float64)
    assert len(_window_chunks(q, k)) == (1 if n == 7 else 5)
    ref = grads_after(lambda *t: F.scaled_dot_product_attention(*t[:3], attn_mask=t[3], scale=0.3), [q, k, v, bias], w, [])
    got = grads_after(lambda *t: attention(*t, 0.3), [q, k, v, bias], w, [])
    for a, b in zip(ref, got, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(attention(q, k, v, bias, 0.3), ref[0], atol=1e-12)


def test_norm_act_gradient():
    z = torch.randn(2, 3, 4, 4, 2, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 4, 2, dtype=torch.float64, requires_grad=True)
    for slope in (0.01, 1.0):
        assert torch.autograd.gradcheck(lambda a, b: _NormAct.apply(a, b, slope, 1e-5), (z, r))
        assert torch.autograd.gradcheck(lambda a: _NormAct.apply(a, None, slope, 1e-5), (z,))
        expected = F.leaky_relu(F.instance_norm(z) + r, slope)
        assert torch.allclose(_NormAct.apply(z, r, slope, 1e-5), expected, atol=1e-12)


def test_small_crop_bypass_is_encoder10_on_one_voxel():
    """At 32³ MONAI refuses encoder10 (a 1³ map); the bypass variant trains and gives the block's limit value."""
    ref, ours = monai_and_ours(12)
    ours.small_crop = "bypass"
    x = torch.randn(2, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="spatial element"):
        build_encoder(12).train()(x)
    ours.train()
    emb = ours.embed(x)
    assert emb.shape == (2, 24 * 12)
    emb.sum().backward()
    assert ours.swinViT.patch_embed.proj.weight.grad is not None
    with torch.no_grad():
        h = ref.swinViT(x, ref.normalize)
        maps = [ref.encoder1(x), ref.encoder2(h[0]), ref.encoder3(h[1]), ref.encoder4(h[2])]
        # UnetResBlock on one voxel: conv -> norm (= 0) -> act -> conv -> norm (= 0); + residual; LeakyReLU(0.01)
        maps.append(F.leaky_relu(h[4], 0.01))
    assert (emb.detach() - pooled_embedding(maps)).abs().max() < 1e-4


def test_small_crop_upsample_runs_the_exact_model_at_64():
    torch.manual_seed(0)
    ours = build_encoder(12, small_crop="upsample").eval()
    exact = build_encoder(12).eval()
    exact.load_state_dict(ours.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        big = F.interpolate(x, size=(64, 64, 64), mode="trilinear", align_corners=False)
        assert torch.allclose(ours.embed(x), exact.embed(big), atol=1e-6)
    with pytest.raises(ValueError, match="small_crop"):
        build_encoder(12, small_crop="pool")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_encoder(12, small_crop="bypass")
    ckpt = build_encoder(12, small_crop="bypass", grad_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    plain.embed(x).square().sum().backward()
    ckpt.embed(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if name.startswith("encoder10."):  # bypassed at 32³: no gradient either way
            assert p.grad is None and q.grad is None
        else:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="divisible by 32"):
        build_encoder(12)(torch.zeros(1, 1, 48, 48, 48))
    with pytest.raises(ValueError, match="multiple of 12"):
        build_encoder(16)


def test_conv_block_under_bf16_autocast():
    """Mixed precision (as on GPU with --bf16): the fused norm takes bf16 maps with fp32 statistics."""
    torch.manual_seed(0)
    ref = UnetrBasicBlock(spatial_dims=3, in_channels=4, out_channels=8, kernel_size=3, stride=1,
                          norm_name="instance", res_block=True)
    ours = ConvBlock(4, 8)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = grads_after(ours, [x], 1.0), grads_after(ref, [x], 1.0)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    for a, b in zip(want, got, strict=True):
        assert (a.float() - b.float()).norm() / a.float().norm() < 2e-2
