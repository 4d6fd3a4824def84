"""CPU speed kernels of the Swin encoder (`voco_lib.backbone`): the same maths as MONAI, computed faster.

`monai.networks.nets.SwinUNETR(use_v2=True)` pads the token map, rolls it by the shift, partitions it into
windows, attends with a -100 mask between shift regions and crops the padding away again. The window kernels
compute the same result without any of that:

- `window_plan`: no padding, rolling or window partitioning of the feature map: each window's tokens are
  gathered by a precomputed index, cached per input size; `reorder` moves tokens between plan orders;
- shift regions (`WindowGroup`): a shifted window is split into its shift regions: MONAI's -100 mask between
  regions leaves softmax weights below fp32/bf16 resolution (unless logits in a window differ by > 80), so
  attending within each region is the same result without the mask;
- per-pattern bias (`group_biases`): sub-windows that share a pattern (real and pad positions) form one batch
  with one additive bias (relative position bias) fed to one attention call;
- pad queries are dropped (MONAI crops their outputs away);
- pad keys are kept exactly (`window_attention`): MONAI pads *after* norm1, so every pad token has
  k = qkv-bias(k) and v = qkv-bias(v); all pad keys of a window collapse into one key whose bias is the
  log-sum-exp of their biases (Σ_j exp(s + b_j) v = exp(s + logsumexp_j b_j) v);
- `attention`: PyTorch's fused kernels on CUDA; on CPU the plain form, chunked over windows without gradients.

The conv kernels compute MONAI's residual conv blocks (UnetResBlock) faster:

- `norm_act`: instance norm (+ residual) and LeakyReLU fused, with a hand-written backward that keeps only
  the output, instead of autograd's copies of whole maps;
- `conv3x3`: each 3³ convolution routed to the fastest exact CPU form for its shape (a matrix product over
  the 27 shifted copies on ≤ 2³ maps; a batch-1 map as two depth halves with a halo).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


def effective_window(dims: tuple[int, ...], window: tuple[int, ...],
                     shift: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
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


def reorder(x: torch.Tensor, src: WindowPlan | None, dst: WindowPlan | None) -> torch.Tensor:
    """(b, N, C) tokens in `src`'s order -> `dst`'s order, in one gather; None is the natural (d, h, w) order.

    Every part of a Swin block except attention is per token, so tokens stay in plan order between blocks."""
    if src is None:
        index, inverse = dst.order, dst.inverse
    elif dst is None:
        index, inverse = src.inverse, src.order
    else:
        index, inverse = src.inverse[dst.order], dst.inverse[src.order]
    return _Reorder.apply(x, index, inverse)


# ------------------------------------------------------------------------------------------------ attention
def group_biases(table: torch.Tensor, index: torch.Tensor, plan: WindowPlan) -> list[torch.Tensor]:
    """Per group (heads, n_real, n_real [+1]): the relative position bias between its real tokens, and one
    column for all its pad keys (log-sum-exp of their biases). One gather for the whole block.

    table, index: MONAI's relative_position_bias_table and relative_position_index. MONAI indexes the
    full-window table with [:n, :n] also when the window shrinks (small maps)."""
    n = plan.window[0] * plan.window[1] * plan.window[2]
    rows = index[:n, :n].reshape(-1)[plan.pairs]
    # index_select: its gradient is an index_add into the small table (embedding's sorts the indices)
    parts = table.index_select(0, rows).split(plan.pair_sizes)
    out = []
    for g, real, pad in zip(plan.groups, parts[0::2], parts[1::2]):
        nr = g.real_slots.numel()
        bias = real.view(nr, nr, -1).permute(2, 0, 1)
        if g.pad_slots.numel():
            pad = pad.view(nr, g.pad_slots.numel(), -1).permute(2, 0, 1).logsumexp(-1, keepdim=True)
            bias = torch.cat([bias, pad], -1)
        out.append(bias)
    return out


def window_attention(qkv: torch.Tensor, pad_kv: torch.Tensor, biases: list[torch.Tensor], plan: WindowPlan,
                     scale: float) -> torch.Tensor:
    """qkv: (b, N, 3C) projections of tokens in `plan.order` -> (b, N, C) attention outputs, before proj.

    Each group is one attention call over its sub-windows' real tokens (pad queries are dropped), plus one key
    standing for all pad tokens of the region when it has any: pad_kv, from `pad_key_value`."""
    b, c, h = qkv.shape[0], qkv.shape[2] // 3, pad_kv.shape[2]
    hd = c // h
    outs = []
    for g, t, bias in zip(plan.groups, qkv.split(plan.group_sizes, 1), biases):
        n_real, bw = g.real_slots.numel(), b * g.n_windows
        q, k, v = t.view(b, g.n_windows, n_real, 3, h, hd).permute(3, 0, 1, 4, 2, 5).reshape(
            3, bw, h, n_real, hd).unbind(0)
        if g.pad_slots.numel():
            pad_k, pad_v = pad_kv.unbind(0)
            k = torch.cat([k, pad_k.expand(bw, h, 1, hd)], 2)
            v = torch.cat([v, pad_v.expand(bw, h, 1, hd)], 2)
        o = attention(q, k, v, bias.to(q.dtype), scale)
        outs.append(o.view(b, g.n_windows, h, n_real, hd).transpose(2, 3).reshape(b, -1, c))
    return torch.cat(outs, 1)


def pad_key_value(qkv: nn.Linear, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(2, 1, h, 1, c/h): the key and value of a zero token (what a pad token is after norm1), i.e. the qkv
    bias (or zeros without bias)."""
    c, h = qkv.in_features, num_heads
    if qkv.bias is None:
        return qkv.weight.new_zeros(2, 1, h, 1, c // h, dtype=dtype)
    return qkv.bias[c:].view(2, 1, h, 1, c // h).to(dtype)


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


def norm_act(z: torch.Tensor, r: torch.Tensor | None, slope: float, eps: float) -> torch.Tensor:
    """leaky_relu(instance_norm(z) + r), slope 1.0 for none, r None for no residual (see `_NormAct`)."""
    return _NormAct.apply(z, r, slope, eps)


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
