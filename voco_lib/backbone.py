"""The Swin encoder of SwinUNETR-v2, rewritten for speed, with MONAI's parameter names.

Same maths as `monai.networks.nets.SwinUNETR(use_v2=True)`'s encoder (swinViT + encoder1/2/3/4/10), so
MONAI and released VoCo state dicts load strictly both ways (method spec §2.1, §8.3). What is different is
only how shifted-window attention is computed (see `WindowPlan` and `WindowAttention`):

- no padding, rolling or window partitioning of the feature map: each window's tokens are gathered by a
  precomputed index, cached per input size;
- a shifted window is split into its shift regions: MONAI's -100 mask between regions leaves softmax weights
  below fp32/bf16 resolution (unless logits in a window differ by > 80; see `WindowGroup`), so attending within
  each region is the same result without the mask;
- sub-windows that share a pattern (real and pad positions) form one batch with one additive bias
  (relative position bias) fed to one attention call;
- padded query positions are dropped (MONAI crops their outputs away);
- padded key positions are kept exactly: MONAI pads *after* norm1, so every pad token has k = qkv-bias(k) and
  v = qkv-bias(v); all pad keys of a window collapse into one key whose bias is the log-sum-exp of their
  biases (Σ_j exp(s + b_j) v = exp(s + logsumexp_j b_j) v).

The patch embedding, patch merging and MLP are MONAI's own modules. The residual conv blocks are MONAI's
modules (same names) with a faster forward of the same maths (see `ConvBlock`): instance norm and LeakyReLU
fused with a hand-written backward, and each 3³ convolution routed to the fastest exact CPU form.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from monai.networks.blocks import MLPBlock, PatchEmbed, UnetOutBlock, UnetrBasicBlock, UnetResBlock, UnetrUpBlock
from monai.networks.layers import DropPath
from monai.networks.nets.swin_unetr import PatchMerging
from torch import nn

SMALL_CROP_VARIANTS = ("bypass", "upsample")


# ------------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class WindowGroup:
    """Sub-windows sharing one pattern; their real tokens sit contiguously in the plan's token order.

    A sub-window is the set of tokens of one window that lie in one shift region. MONAI masks attention
    between regions by adding -100, which gives such a pair the softmax weight e^(Δ-100) relative to the
    largest weight of its row (Δ: how far its logit lies above the row's largest unmasked logit). Unless
    logits within a window differ by more than 80, that is below e^-20 ≈ 2e-9, under fp32/bf16 resolution (and
    its exp is a denormal number, which slows the CPU down). Attending within each region gives the same
    result with less work and no mask; the equivalence tests check it against MONAI."""

    n_windows: int  # sub-windows in the group
    real_slots: torch.Tensor  # (n_real,) positions inside the window of the real tokens (row-major)
    pad_slots: torch.Tensor  # (n_pad,) positions of the region's padding tokens


@dataclass(frozen=True)
class WindowPlan:
    """One attention layout on a d×h×w grid: token order (sub-windows grouped by pattern) and the groups.

    pairs: for every group, the flat positions q·n + k in the n×n window bias of its (real query, real key)
    pairs, then of its (real query, pad key) pairs, all groups concatenated: the bias of a whole block is one
    gather."""

    window: tuple[int, int, int]
    groups: tuple[WindowGroup, ...]
    order: torch.Tensor  # (N,) natural token index at each position of the plan order
    inverse: torch.Tensor  # (N,) position in the plan order of each natural token
    pairs: torch.Tensor  # (P,) see above

    @property
    def group_sizes(self) -> list[int]:
        return [g.n_windows * g.real_slots.numel() for g in self.groups]

    @property
    def pair_sizes(self) -> list[int]:
        return [g.real_slots.numel() * n for g in self.groups for n in (g.real_slots.numel(), g.pad_slots.numel())]


def effective_window(dims: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]):
    """MONAI's rule: an axis not larger than the window uses its full length as window and no shift."""
    win = tuple(min(d, w) for d, w in zip(dims, window))
    sh = tuple(0 if d <= w else s for d, w, s in zip(dims, window, shift))
    return win, sh


@functools.lru_cache(maxsize=64)
def window_plan(dims: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int],
                device: str) -> WindowPlan:
    """Cached geometry of one attention layout (computed once per input size, stage and shift)."""
    win, sh = effective_window(dims, window, shift)
    padded = [-(-d // w) * w for d, w in zip(dims, win)]
    # shifted coordinate p holds the padded token at (p + shift) mod padded (MONAI rolls by -shift)
    axes = []
    for d, w, s, p in zip(dims, win, sh, padded):
        src = (torch.arange(p) + s) % p
        region = torch.zeros(p, dtype=torch.long)  # MONAI's compute_mask slices, in shifted coordinates
        if s > 0:
            region[p - w: p - s] = 1
            region[p - s:] = 2
        axes.append((src.view(p // w, w), (src >= d).view(p // w, w), region.view(p // w, w)))
    groups: dict[tuple, list[torch.Tensor]] = {}
    for wi in itertools.product(*[range(p // w) for p, w in zip(padded, win)]):
        (sd, pd, rd), (sy, py, ry), (sx, px, rx) = [(a[0][i], a[1][i], a[2][i]) for a, i in zip(axes, wi)]
        src = ((sd[:, None, None] * dims[1] + sy[None, :, None]) * dims[2] + sx[None, None, :]).flatten()
        pad = (pd[:, None, None] | py[None, :, None] | px[None, None, :]).flatten()
        region = (rd[:, None, None] * 9 + ry[None, :, None] * 3 + rx[None, None, :]).flatten()
        for r in region.unique().tolist():
            real = (region == r) & ~pad
            if real.any():
                key = (tuple(torch.nonzero(real).flatten().tolist()),
                       tuple(torch.nonzero((region == r) & pad).flatten().tolist()))
                groups.setdefault(key, []).append(src[real])
    n = win[0] * win[1] * win[2]
    out, order, pairs = [], [], []
    for (real, pad), toks in groups.items():
        real, pad = torch.tensor(real, dtype=torch.long), torch.tensor(pad, dtype=torch.long)
        out.append(WindowGroup(len(toks), real.to(device), pad.to(device)))
        pairs += [(real[:, None] * n + real[None, :]).flatten(), (real[:, None] * n + pad[None, :]).flatten()]
        order.extend(toks)
    perm = torch.cat(order)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    return WindowPlan(win, tuple(out), perm.to(device), inverse.to(device), torch.cat(pairs).to(device))


class _Reorder(torch.autograd.Function):
    """x[:, index] along the token axis for a permutation; backward is the inverse gather (no scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def reorder(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return _Reorder.apply(x, index, inverse)


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

    def group_biases(self, plan: WindowPlan) -> list[torch.Tensor]:
        """Per group (heads, n_real, n_real [+1]): the relative position bias between its real tokens, and one
        column for all its pad keys (log-sum-exp of their biases). One gather for the whole block.

        MONAI indexes the full-window table with [:n, :n] also when the window shrinks (small maps)."""
        n = plan.window[0] * plan.window[1] * plan.window[2]
        rows = self.relative_position_index[:n, :n].reshape(-1)[plan.pairs]
        # index_select: its gradient is an index_add into the small table (embedding's sorts the indices)
        parts = self.relative_position_bias_table.index_select(0, rows).split(plan.pair_sizes)
        out = []
        for g, real, pad in zip(plan.groups, parts[0::2], parts[1::2]):
            nr = g.real_slots.numel()
            bias = real.view(nr, nr, -1).permute(2, 0, 1)
            if g.pad_slots.numel():
                pad = pad.view(nr, g.pad_slots.numel(), -1).permute(2, 0, 1).logsumexp(-1, keepdim=True)
                bias = torch.cat([bias, pad], -1)
            out.append(bias)
        return out

    def forward(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """x: (b, N, C) normalised tokens in `plan.order` -> (b, N, C) in the same order."""
        b, _, c = x.shape
        h, hd = self.num_heads, c // self.num_heads
        outs = []
        parts = zip(plan.groups, self.qkv(x).split(plan.group_sizes, 1), self.group_biases(plan))
        for g, t, bias in parts:
            n_real, bw = g.real_slots.numel(), b * g.n_windows
            q, k, v = t.view(b, g.n_windows, n_real, 3, h, hd).permute(3, 0, 1, 4, 2, 5).reshape(
                3, bw, h, n_real, hd).unbind(0)
            if g.pad_slots.numel():  # one key standing for all pad tokens of the region (zeros after norm1)
                pad_k, pad_v = self._pad_key_value(c, q.dtype).unbind(0)
                k = torch.cat([k, pad_k.expand(bw, h, 1, hd)], 2)
                v = torch.cat([v, pad_v.expand(bw, h, 1, hd)], 2)
            o = attention(q, k, v, bias.to(q.dtype), self.scale)
            outs.append(o.view(b, g.n_windows, h, n_real, hd).transpose(2, 3).reshape(b, -1, c))
        return self.proj(torch.cat(outs, 1))

    def _pad_key_value(self, c: int, dtype: torch.dtype) -> torch.Tensor:
        """(2, 1, h, 1, c/h): the key and value of a zero token, i.e. the qkv bias (or zeros without bias)."""
        h = self.num_heads
        if self.qkv.bias is None:
            return self.qkv.weight.new_zeros(2, 1, h, 1, c // h, dtype=dtype)
        return self.qkv.bias[c:].view(2, 1, h, 1, c // h).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v for (windows, heads, tokens, head dim) inputs and a (heads, n, m) bias.

    CUDA: PyTorch's fused kernels. CPU: the plain form, without gradients a few windows at a time. (The fused
    CPU kernel refuses a bias that needs a gradient and was 1.5-2× slower without one. A chunked form whose
    backward recomputes the softmax was tried: ~15 % slower at feature 12, even at feature 48.)"""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
        return torch.matmul(_scores(q, k, bias, scale).softmax(-1), v)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for c in _window_chunks(q, k):
        torch.matmul(_scores(q[c], k[c], bias, scale).softmax(-1), v[c], out=out[c])
    return out


def _scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.matmul(q * scale, k.transpose(-2, -1)).add_(bias)  # MONAI scales q before the product


def _window_chunks(q: torch.Tensor, k: torch.Tensor) -> list[slice]:
    """Slices of the window axis whose score block (chunk, heads, n, m) stays within ~4 MB, so that on a CPU
    the scores stay in cache between their product, softmax and use (1.3-3× faster at 128×3×343² here)."""
    per_window = q.shape[1] * q.shape[2] * k.shape[2] * q.element_size()
    step = max(1, (4 << 20) // per_window)
    return [slice(i, i + step) for i in range(0, q.shape[0], step)]


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
            if prev is None:
                t = reorder(t, plan.order, plan.inverse)
            else:  # from prev's order straight to plan's order
                t = reorder(t, prev.inverse[plan.order], plan.inverse[prev.order])
            if self.grad_checkpoint and torch.is_grad_enabled():
                t = cp.checkpoint(blk, t, plan, use_reentrant=False)
            else:
                t = blk(t, plan)
            prev = plan
        t = reorder(t, prev.inverse, prev.order)
        return self.downsample(t.view(b, d, h, w, c)).permute(0, 4, 1, 2, 3)


# ------------------------------------------------------------------------------------------------ conv blocks
class _NormAct(torch.autograd.Function):
    """y = leaky_relu(instance_norm(z) + r) with a hand-written backward that keeps only y (and r).

    MONAI's block runs InstanceNorm, then an in-place LeakyReLU on the norm's reshaped output: autograd keeps
    both z and y and copies whole maps in backward (CopySlices). Here the backward recovers everything from y:
    the LeakyReLU gradient is 1 or slope by the sign of y, the normalised map is y (or y/slope, minus r), and
    the instance-norm gradient is the batch-norm gradient over (1, B·C, voxels) with weight 1/σ."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, r: torch.Tensor | None, slope: float, eps: float) -> torch.Tensor:
        b, c = z.shape[:2]
        y, _, rstd = torch.native_batch_norm(z.reshape(1, b * c, -1), None, None, None, None, True, 0.0, eps)
        y = y.view_as(z)
        if r is not None:
            y.add_(r)
        if slope != 1.0:
            F.leaky_relu(y, slope, inplace=True)
        ctx.slope, ctx.eps = slope, eps
        ctx.save_for_backward(y, rstd, r)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, rstd, r = ctx.saved_tensors
        normed = y
        if ctx.slope != 1.0:
            grad = torch.ops.aten.leaky_relu_backward(grad, y, ctx.slope, True)
            normed = torch.ops.aten.leaky_relu_backward(y, y, 1.0 / ctx.slope, False)
        if r is not None:
            normed = normed - r
        n = rstd.numel()
        dz = torch.ops.aten.native_batch_norm_backward(
            grad.reshape(1, n, -1), normed.reshape(1, n, -1), rstd, None, None, rstd.new_zeros(n), rstd.new_ones(n),
            True, ctx.eps, [True, False, False])[0]
        return dz.view_as(y), grad if ctx.needs_input_grad[1] else None, None, None


def conv3x3(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a 3³ kernel, stride 1, padding 1, routed to the fastest exact CPU form for its shape.

    - Maps of at most 2³ voxels (encoder10: 768 channels at feature 48) as one matrix product over the 27
      shifted copies: oneDNN spends ~4× longer there, mostly on the 16M-entry weight gradient and reorders.
    - A small batch-1 map as two depth halves: PyTorch sends a batch-1 3D convolution with N·C·D·H ≤ 20480
      to its slow im2col kernel instead of oneDNN (a heuristic in ATen's Convolution.cpp), forward and
      backward, 5× slower at 12×32³. The two halves of the depth axis, each with its one-slice halo, are a
      batch of two with the same products and sums."""
    b, c, d, h, w = x.shape
    if x.is_cuda:
        return conv(x)
    if d * h * w <= 8:
        cols = F.pad(x, (1, 1, 1, 1, 1, 1)).unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)  # b c d h w 3 3 3
        cols = cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b * d * h * w, c * 27)
        y = F.linear(cols, conv.weight.flatten(1), conv.bias)
        return y.view(b, d, h, w, -1).permute(0, 4, 1, 2, 3)
    if b > 1 or c * d * h > 20480 or d < 8 or d % 2:
        return conv(x)
    xp = F.pad(x, (0, 0, 0, 0, 1, 1))
    halves = torch.cat([xp[:, :, : d // 2 + 2], xp[:, :, d // 2:]], 0)
    y = F.conv3d(halves, conv.weight, conv.bias, padding=(0, 1, 1))
    return torch.cat([y[:1], y[1:]], 2)


def residual_block(layer: UnetResBlock, x: torch.Tensor) -> torch.Tensor:
    """MONAI's UnetResBlock forward (conv-norm-act, conv-norm, + residual (conv-norm), act), same maths, with
    norm and activation fused by `_NormAct`."""
    slope, eps = layer.lrelu.negative_slope, layer.norm1.eps
    h = _NormAct.apply(conv3x3(layer.conv1.conv, x), None, slope, eps)
    r = _NormAct.apply(layer.conv3(x), None, 1.0, eps) if hasattr(layer, "conv3") else x
    return _NormAct.apply(conv3x3(layer.conv2.conv, h), r, slope, eps)


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

    def __init__(self, in_chans: int, embed_dim: int, window: int = 7, depths=(2, 2, 2, 2),
                 num_heads=(3, 6, 12, 24), drop_path_rate: float = 0.0, grad_checkpoint: bool = False, **block_opts):
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
    """SwinViT + SwinUNETR's encoder1/2/3/4/10 blocks: VoCo's backbone (spec §2.1-2.2).

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
        """(B, 24·feature_size): global average pool of the five maps, concatenated (spec §2.2)."""
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
