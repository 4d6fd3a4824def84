"""The Swin encoder of SwinUNETR-v2 as a readable model, with MONAI's parameter names.

Same maths as `monai.networks.nets.SwinUNETR(use_v2=True)`'s encoder (swinViT + encoder1/2/3/4/10), so
MONAI and released VoCo state dicts load strictly both ways (Luffy03/Large-Scale-Medical
Self-supervised/models/voco_head.py:L58-129, commit 1ad538b): a patch embedding, four
stages of Swin blocks each after a residual conv block, the encoder conv blocks, and (for segmentation)
MONAI's decoder. The patch embedding, patch merging and MLP are MONAI's own modules; the conv blocks are
MONAI's modules (same names) with a faster forward of the same maths.

How shifted-window attention and the conv blocks are computed fast on a CPU (window plans instead of
padding, rolling and masking; fused instance norm and LeakyReLU; routed 3³ convolutions) lives in
`voco_lib.swin_kernels`, with why each is the same maths as MONAI.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from monai.networks.blocks import MLPBlock, PatchEmbed, UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrUpBlock
from monai.networks.layers import DropPath
from monai.networks.nets.swin_unetr import PatchMerging
from torch import nn

from voco_lib.swin_kernels import (WindowPlan, conv3x3, group_biases, norm_act, pad_key_value, reorder,
                                   window_attention, window_plan)

SMALL_CROP_VARIANTS = ("bypass", "upsample")


# ------------------------------------------------------------------------------------------------ attention
class WindowAttention(nn.Module):
    """Multi-head (shifted) window attention with a relative position bias; MONAI's names and maths."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int, int], qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.scale = (dim // num_heads) ** -0.5
        n_rel = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + torch.tensor(window) - 1
        index = (rel[..., 0] * (2 * window[1] - 1) + rel[..., 1]) * (2 * window[2] - 1) + rel[..., 2]
        self.register_buffer("relative_position_index", index)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """x: (b, N, C) normalised tokens in `plan.order` -> (b, N, C) in the same order."""
        qkv = self.qkv(x)
        biases = group_biases(self.relative_position_bias_table, self.relative_position_index, plan)
        pad_kv = pad_key_value(self.qkv, self.num_heads, qkv.dtype)
        return self.proj(window_attention(qkv, pad_kv, biases, plan, self.scale))


# ------------------------------------------------------------------------------------------------ blocks
class SwinBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x)). MONAI: SwinTransformerBlock.

    Works on tokens in its plan's order: every part except attention is per token, so order is free.
    """

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int, int], shift: tuple[int, int, int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(hidden_size=dim, mlp_dim=int(dim * mlp_ratio), act="GELU", dropout_mode="swin")

    def plan(self, dims: tuple[int, int, int], device: torch.device) -> WindowPlan:
        return window_plan(dims, self.window, self.shift, str(device))

    def forward(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), plan))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """Two blocks (plain, then shifted windows) and patch merging. MONAI: BasicLayer (same names)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: tuple[int, int, int],
                 drop_path: list[float], grad_checkpoint: bool = False, **block_opts):
        super().__init__()
        shift = tuple(w // 2 for w in window)
        self.grad_checkpoint = grad_checkpoint
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window, (0, 0, 0) if i % 2 == 0 else shift, drop_path=drop_path[i], **block_opts)
            for i in range(depth)])
        self.downsample = PatchMerging(dim=dim, norm_layer=nn.LayerNorm, spatial_dims=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(b, c, d, h, w) -> (b, 2c, d/2, h/2, w/2)."""
        b, c, d, h, w = x.shape
        t = x.permute(0, 2, 3, 4, 1).reshape(b, d * h * w, c)
        prev = None  # None: tokens in natural (d, h, w) order
        for blk in self.blocks:
            plan = blk.plan((d, h, w), x.device)
            t = reorder(t, prev, plan)
            if self.grad_checkpoint and torch.is_grad_enabled():
                t = cp.checkpoint(blk, t, plan, use_reentrant=False)
            else:
                t = blk(t, plan)
            prev = plan
        t = reorder(t, prev, None)
        return self.downsample(t.view(b, d, h, w, c)).permute(0, 4, 1, 2, 3)


# ------------------------------------------------------------------------------------------------ conv blocks
def residual_block(layer: UnetResBlock, x: torch.Tensor) -> torch.Tensor:
    """MONAI's UnetResBlock forward (conv-norm-act, conv-norm, + residual (conv-norm), act), same maths, with
    norm and activation fused (`norm_act`) and routed 3³ convolutions (`conv3x3`)."""
    slope, eps = layer.lrelu.negative_slope, layer.norm1.eps
    h = norm_act(conv3x3(layer.conv1.conv, x), None, slope, eps)
    r = norm_act(layer.conv3(x), None, 1.0, eps) if hasattr(layer, "conv3") else x
    return norm_act(conv3x3(layer.conv2.conv, h), r, slope, eps)


class ConvBlock(UnetrBasicBlock):
    """SwinUNETR's residual conv block (MONAI's UnetrBasicBlock, same names), with the fused forward."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__(spatial_dims=3, in_channels=channels_in, out_channels=channels_out, kernel_size=3,
                         stride=1, norm_name="instance", res_block=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[2:].numel() == 1:  # as MONAI's InstanceNorm does
            raise ValueError(f"Expected more than 1 spatial element when training, got input size {tuple(x.shape)}: "
                             "crops below 64³ need build_encoder(..., small_crop='bypass' or 'upsample')")
        return residual_block(self.layer, x)


class UpBlock(UnetrUpBlock):
    """SwinUNETR's decoder block (MONAI's UnetrUpBlock, same names): upsample, concat the skip, residual block."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__(spatial_dims=3, in_channels=channels_in, out_channels=channels_out, kernel_size=3,
                         upsample_kernel_size=2, norm_name="instance", res_block=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return residual_block(self.conv_block, torch.cat([self.transp_conv(x), skip], 1))


class SwinViT(nn.Module):
    """Patch embedding, then four (v2 conv block, Swin stage) pairs. MONAI: SwinTransformer(use_v2=True)."""

    def __init__(self, in_chans: int, embed_dim: int, window: int = 7, depths: tuple[int, ...] = (2, 2, 2, 2),
                 num_heads: tuple[int, ...] = (3, 6, 12, 24), drop_path_rate: float = 0.0,
                 grad_checkpoint: bool = False, **block_opts):
        super().__init__()
        win = (window,) * 3
        self.patch_embed = PatchEmbed(patch_size=2, in_chans=in_chans, embed_dim=embed_dim, norm_layer=None,
                                      spatial_dims=3)
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linearly rising (MONAI)
        for i in range(4):
            dim = embed_dim * 2**i
            rates = dpr[sum(depths[:i]): sum(depths[: i + 1])]
            stage = SwinStage(dim, depths[i], num_heads[i], win, rates, grad_checkpoint, **block_opts)
            setattr(self, f"layers{i + 1}", nn.ModuleList([stage]))
            setattr(self, f"layers{i + 1}c", nn.ModuleList([ConvBlock(dim, dim)]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Five maps (patch embedding, then each stage), each layer-normalised over channels as MONAI's."""
        x = self.patch_embed(x)
        outs = [x]
        for i in range(1, 5):
            x = getattr(self, f"layers{i}")[0](getattr(self, f"layers{i}c")[0](x))
            outs.append(x)
        return [_channel_norm(o) for o in outs]


def _channel_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over channels without affine parameters (MONAI's proj_out(normalize=True))."""
    return F.layer_norm(x.movedim(1, -1), [x.shape[1]]).movedim(-1, 1)


# ------------------------------------------------------------------------------------------------ models
class SwinEncoder(nn.Module):
    """SwinViT + SwinUNETR's encoder1/2/3/4/10 blocks: VoCo's backbone (Luffy03/Large-Scale-Medical
    Self-supervised/models/voco_head.py:L58-129, L180-205, commit 1ad538b).

    `forward(x)` returns the five maps the SSL head uses (encoder1, 2, 3, 4, 10 outputs); `embed(x)` their
    global average pools concatenated, 24·feature_size values per crop.

    small_crop (for inputs below 64³, where the deepest map is 1³ and encoder10's InstanceNorm refuses it in
    training):
      None:       exactly SwinUNETR (needs ≥ 64³ in training);
      "bypass":   when the deepest map has one voxel, encoder10 is replaced by the value its formula gives
                  there (instance norm of a single value is 0, so the residual block reduces to LeakyReLU of its
                  input; PyTorch refuses to compute it, in train and eval mode). Costs what the crop size costs;
                  encoder10's weights get no gradient at that size;
      "upsample": crops below 64³ are trilinearly resized to 64³ first, then the exact model runs
                  (≈8× the compute of a 32³ crop, all weights train).
    """

    def __init__(self, feature_size: int, in_channels: int = 1, small_crop: str | None = None,
                 grad_checkpoint: bool = False, drop_path_rate: float = 0.0):
        super().__init__()
        if feature_size % 12:
            raise ValueError(f"feature_size must be a multiple of 12 (MONAI SwinUNETR), got {feature_size}")
        if small_crop not in (None, *SMALL_CROP_VARIANTS):
            raise ValueError(f"small_crop must be None or one of {SMALL_CROP_VARIANTS}, got {small_crop!r}")
        self.feature_size, self.small_crop = feature_size, small_crop
        self.embed_dim = 24 * feature_size
        self.swinViT = SwinViT(in_channels, feature_size, drop_path_rate=drop_path_rate,
                               grad_checkpoint=grad_checkpoint)
        fs = feature_size
        self.encoder1 = ConvBlock(in_channels, fs)
        self.encoder2 = ConvBlock(fs, fs)
        self.encoder3 = ConvBlock(2 * fs, 2 * fs)
        self.encoder4 = ConvBlock(4 * fs, 4 * fs)
        self.encoder10 = ConvBlock(16 * fs, 16 * fs)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or any(s % 32 for s in x.shape[2:]):
            raise ValueError(f"input must be (B, C, D, H, W) with D, H, W divisible by 32, got {tuple(x.shape)}")
        if self.small_crop == "upsample" and min(x.shape[2:]) < 64:
            size = [max(s, 64) for s in x.shape[2:]]
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        return x

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(swinViT maps, encoder maps): the second list is what `forward` returns."""
        x = self._check(x)
        hidden = self.swinViT(x)
        deepest = hidden[4]
        if self.small_crop == "bypass" and deepest.shape[2:].numel() == 1:
            enc10 = F.leaky_relu(deepest, 0.01)
        else:
            enc10 = self.encoder10(deepest)
        encs = [self.encoder1(x), self.encoder2(hidden[0]), self.encoder3(hidden[1]), self.encoder4(hidden[2]), enc10]
        return hidden, encs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encode(x)[1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 24·feature_size): global average pool of the five maps, concatenated (voco_head.py:L180-205)."""
        return pooled_embedding(self(x))


def pooled_embedding(maps: list[torch.Tensor]) -> torch.Tensor:
    """Global average pool each (B, C, ...) map and concatenate along channels."""
    return torch.cat([m.flatten(2).mean(-1) for m in maps], 1)


class SwinUNETR(SwinEncoder):
    """Our encoder plus MONAI SwinUNETR's decoder (decoder5..1, out): full VoComni-style segmentation model."""

    def __init__(self, feature_size: int, out_channels: int, in_channels: int = 1, **opts):
        super().__init__(feature_size, in_channels, **opts)
        fs = feature_size

        self.decoder5 = UpBlock(16 * fs, 8 * fs)
        self.decoder4 = UpBlock(8 * fs, 4 * fs)
        self.decoder3 = UpBlock(4 * fs, 2 * fs)
        self.decoder2 = UpBlock(2 * fs, fs)
        self.decoder1 = UpBlock(fs, fs)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=fs, out_channels=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Segmentation logits (B, out_channels, D, H, W)."""
        hidden, (enc0, enc1, enc2, enc3, dec4) = self.encode(x)
        dec3 = self.decoder5(dec4, hidden[3])
        dec = self.decoder4(dec3, enc3)
        dec = self.decoder3(dec, enc2)
        dec = self.decoder2(dec, enc1)
        return self.out(self.decoder1(dec, enc0))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_embedding(self.encode(x)[1])


def build_encoder(feature_size: int, in_channels: int = 1, *, small_crop: str | bool | None = None,
                  grad_checkpoint: bool = False, use_checkpoint: bool | None = None,
                  drop_path_rate: float = 0.0) -> SwinEncoder:
    """VoCo's encoder. small_crop=True picks "bypass" (see SwinEncoder); use_checkpoint is MONAI's alias
    for grad_checkpoint (checkpoint each Swin block)."""
    if small_crop is True:
        small_crop = "bypass"
    return SwinEncoder(feature_size, in_channels, small_crop=small_crop or None,
                       grad_checkpoint=bool(use_checkpoint) if use_checkpoint is not None else grad_checkpoint,
                       drop_path_rate=drop_path_rate)


def build_swinunetr(feature_size: int, out_channels: int, in_channels: int = 1, **opts) -> SwinUNETR:
    """Segmentation SwinUNETR-v2 with our encoder; state dict identical to MONAI's SwinUNETR(use_v2=True)."""
    return SwinUNETR(feature_size, out_channels, in_channels, **opts)


def build_backbone(feature_size: int, crop: Sequence[int] = (96, 96, 96), in_channels: int = 1,
                   out_channels: int | None = None, grad_checkpoint: bool = False) -> SwinEncoder:
    """The backbone for inputs of size `crop`: VoCo's encoder, or a SwinUNETR with `out_channels` outputs.

    The one place of the small-crop rule: below 64³ the deepest Swin map shrinks to one voxel along a side,
    so the "bypass" variant is used; when every side is below 64 that map is one voxel, encoder10 is skipped
    and never gets a gradient, so it is frozen (DDP then needs no `find_unused_parameters`). Its weights stay
    in the exported encoder at their initial values.
    """
    small = "bypass" if min(crop) < 64 else None
    model = (build_encoder(feature_size, in_channels, small_crop=small, grad_checkpoint=grad_checkpoint)
             if out_channels is None else
             build_swinunetr(feature_size, out_channels, in_channels, small_crop=small, grad_checkpoint=grad_checkpoint))
    if max(crop) < 64:
        model.encoder10.requires_grad_(False)
    return model
