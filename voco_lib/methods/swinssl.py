"""`swin-ssl`: Swin UNETR's pretext (Tang et al., "Self-Supervised Pre-Training of Swin Transformers for 3D
Medical Image Analysis", CVPR 2022), after the authors' Project-MONAI/research-contributions
SwinUNETR/Pretrain (main.py, models/ssl_head.py, losses/loss.py, utils/ops.py).

Each crop gives two views: rotated by k·90° (k uniform in 0..3, in the plane of the last two axes as
upstream's `x.rot90(k, (2, 3))` on (C, H, W, D) samples), then cut out (blocks filled with noise, then
blocks copied from another crop of the batch). From the deepest Swin map: a linear rotation head on its
first token, a linear contrastive head on its second (the first when the map is one voxel, as for 32³
crops), and a decoder back to voxels. Loss: w_rot · CE(rotation) + w_contrast · NT-Xent(view 1, view 2)
+ w_recon · L1(reconstruction, rotated crop before the cut-outs), all weights 1 upstream.
The decoder is upstream's default "vae" (conv, instance norm, LeakyReLU, ×2 upsampling, five times) when the
deepest map has more than one voxel, else its "deconv" option (instance norm of one voxel is undefined).
Only the transformer and the heads learn; the conv blocks (encoder1..4, 10) stay frozen, as upstream trains
`swinViT` alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voco_lib.config import Profile, SwinSSLConfig
from voco_lib.crops import Views, collate_views
from voco_lib.methods.common import STRIDE, crops_of, transformer_only


# ------------------------------------------------------------------------------------------------ views
def rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Crop n of (N, C, X, Y, Z) rotated by k[n]·90° in the (Y, Z) plane."""
    out = x.clone()
    for r in range(1, 4):
        idx = (k == r).nonzero().flatten()
        if len(idx):
            out[idx] = torch.rot90(x[idx], r, (3, 4))
    return out


def _randint(low: int, high: int, gen: torch.Generator | None) -> int:
    return int(torch.randint(low, max(high, low + 1), (1,), generator=gen))


def cutout_boxes(size: tuple[int, ...], max_drop: float, max_block: float,
                 gen: torch.Generator | None = None) -> list[tuple[slice, ...]]:
    """Random blocks until they cover a fraction U(0, max_drop) of the crop (upstream `patch_rand_drop`):
    each side starts in [0, s − tol) and is [tol, max_block · s) long (tol = 5 % of the side, ≥ 1), clipped."""
    target = float(torch.rand((), generator=gen)) * max_drop * math.prod(size)
    tol = [max(1, int(0.05 * s)) for s in size]
    longest = [int(s * max_block) for s in size]
    boxes, covered = [], 0
    while covered < target:
        box = []
        for s, t, m in zip(size, tol, longest):
            a = _randint(0, s - t, gen)
            box.append(slice(a, min(a + _randint(t, m, gen), s)))
        boxes.append(tuple(box))
        covered += math.prod(b.stop - b.start for b in box)
    return boxes


def cut_out(x: torch.Tensor, cfg: SwinSSLConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """Upstream `aug_rand`: per crop, blocks filled with min-max-normalised Gaussian noise, then (unless the
    drawn partner is itself) blocks copied from a partner crop of the batch. x (N, C, ...) -> a new tensor."""
    out = x.clone()
    size = tuple(x.shape[2:])
    for i in range(len(x)):
        for box in cutout_boxes(size, cfg.max_drop, cfg.max_block, gen):
            shape = out[(i, slice(None), *box)].shape
            noise = torch.randn(shape, generator=gen).to(x.device, x.dtype)
            out[(i, slice(None), *box)] = (noise - noise.min()) / (noise.max() - noise.min()).clamp_min(1e-12)
        j = _randint(0, len(x), gen)
        if j != i:
            for box in cutout_boxes(size, cfg.max_drop, cfg.max_block, gen):
                out[(i, slice(None), *box)] = out[(j, slice(None), *box)]
    return out


def two_views(x: torch.Tensor, cfg: SwinSSLConfig, gen: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs (2N, ...): cut-out views, targets (2N, ...): rotated crops, rotation labels (2N,))."""
    k = torch.randint(0, 4, (2 * len(x),), generator=gen).to(x.device)
    rotated = rotate(torch.cat([x, x]), k)
    return cut_out(rotated, cfg, gen), rotated, k


# ------------------------------------------------------------------------------------------------ losses
def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Upstream `Contrast`: over the 2N embeddings, −log(exp(s_ip/τ) / Σ_{j≠i} exp(s_ij/τ)) averaged, where
    s is the cosine similarity and p the other view of the same crop."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = len(a)
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def swinssl_loss(rot_logits: torch.Tensor, rot: torch.Tensor, contrast: torch.Tensor, recon: torch.Tensor,
                 target: torch.Tensor, cfg: SwinSSLConfig) -> dict[str, torch.Tensor]:
    """The weighted sum and its terms; `contrast` holds view 1 of every crop, then view 2."""
    n = len(contrast) // 2
    terms = {"rot": F.cross_entropy(rot_logits, rot),
             "contrast": nt_xent(contrast[:n], contrast[n:], cfg.temperature),
             "recon": F.l1_loss(recon, target)}
    loss = cfg.w_rot * terms["rot"] + cfg.w_contrast * terms["contrast"] + cfg.w_recon * terms["recon"]
    return {"loss": loss, **terms}


# ------------------------------------------------------------------------------------------------ model
def _vae_decoder(dim: int, cout: int) -> nn.Sequential:
    chans = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
    layers: list[nn.Module] = []
    for i, o in zip(chans, chans[1:]):
        layers += [nn.Conv3d(i, o, 3, padding=1), nn.InstanceNorm3d(o), nn.LeakyReLU(),
                   nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)]
    return nn.Sequential(*layers, nn.Conv3d(chans[-1], cout, 1))


def _deconv_decoder(dim: int, cout: int) -> nn.Sequential:
    chans = [dim, dim // 2, dim // 4, dim // 8, dim // 16, cout]
    return nn.Sequential(*[nn.ConvTranspose3d(i, o, 2, stride=2) for i, o in zip(chans, chans[1:])])


class SwinSSLModel(nn.Module):
    """Swin encoder + rotation head, contrastive head and reconstruction decoder (upstream `SSLHead`)."""

    def __init__(self, cfg: Profile):
        super().__init__()
        crop = cfg.views.out_size or cfg.views.crop_size
        if crop[1] != crop[2]:
            raise ValueError(f"method=swin-ssl rotates crops in their last two axes, which must be equal; got crop "
                             f"{crop}; set e.g. views.out_size=64x64x64")
        self.cfg = cfg.swinssl
        self.backbone = transformer_only(cfg)
        dim = 16 * cfg.feature_size
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, cfg.swinssl.contrast_dim)
        deepest = math.prod(s // STRIDE for s in crop)
        self.decoder = _vae_decoder(dim, 1) if deepest > 1 else _deconv_decoder(dim, 1)

    @property
    def encoder(self) -> nn.Module:
        return self.backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, ...) -> rotation logits (N, 4), contrastive embeddings (N, D), reconstruction (N, C, ...)."""
        deep = self.backbone.swinViT(x)[4]
        tokens = deep.flatten(2).transpose(1, 2)
        rot = self.rotation_head(tokens[:, 0])
        contrast = self.contrastive_head(tokens[:, 1 if tokens.shape[1] > 1 else 0])
        return rot, contrast, self.decoder(deep)


def step(net: nn.Module, model: SwinSSLModel, views: Views, first_micro: bool) -> tuple[torch.Tensor, dict]:
    inputs, targets, k = two_views(crops_of(views), model.cfg)
    rot, contrast, recon = net(inputs)
    with torch.autocast(inputs.device.type, enabled=False):
        terms = swinssl_loss(rot.float(), k, contrast.float(), recon.float(), targets.float(), model.cfg)
    return terms.pop("loss"), terms


@torch.no_grad()
def evaluate(model: SwinSSLModel, views: list[Views], batch_size: int) -> dict[str, float]:
    """On the held-out crops with fixed views (seed 0): rotation top-1, contrastive top-1 (the most similar
    other embedding is the crop's other view), reconstruction L1 and the loss."""
    gen = torch.Generator().manual_seed(0)
    dev = next(model.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(views), batch_size):
        inputs, targets, k = two_views(crops_of(collate_views(views[i:i + batch_size])).to(dev), model.cfg, gen)
        rot, contrast, recon = model(inputs)
        terms = swinssl_loss(rot.float(), k, contrast.float(), recon.float(), targets.float(), model.cfg)
        z = F.normalize(contrast.float(), dim=1)
        sim = (z @ z.t()).fill_diagonal_(float("-inf"))
        half = len(z) // 2
        partner = torch.cat([torch.arange(half, 2 * half), torch.arange(half)]).to(dev)
        m = {"rot_top1": (rot.argmax(1) == k).float().mean().item(),
             "contrast_top1": (sim.argmax(1) == partner).float().mean().item(),
             "recon_l1": terms["recon"].item(), "loss": terms["loss"].item()}
        for key, v in m.items():
            sums[key] = sums.get(key, 0.0) + v * len(z)
        n += len(z)
    return {k: v / n for k, v in sums.items()} | {"rot_chance": 0.25}
