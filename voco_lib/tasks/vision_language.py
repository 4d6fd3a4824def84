"""Vision-language: CLIP-style contrastive alignment of the 3D encoder with a text encoder; retrieval R@k.

The image side is the Swin encoder's pooled embedding and a linear projection; the text side is pluggable:
any `nn.Module` whose `forward(list_of_reports)` returns (N, dim) and that has a `dim` attribute. Ours is
trained from scratch on the task's reports: a word tokenizer fitted on the training reports and a small
transformer (or a bag of words). `finetune.text_encoder=package.module:factory` plugs in another one;
the factory is called as `factory(reports=training_reports, dim=256)`.
Phantom analog: reports written from the phantom's attributes (organ sizes against the training cohort,
lesion organ and side); upstream: CT-RATE retrieval (CT-CLIP) and CTRG-Chest (M2KT), spec §7.1.
Real data: an MSD-style datalist whose entries carry a `report` string beside `image`.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voco_lib.tasks.data import Sample, datalist_samples, phantom_samples, phantom_seeds, random_flips, resize_to, stack
from voco_lib.tasks.engine import Context, Runner
from voco_lib.tasks.metrics import recall_at_k

SIZE_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "stomach")


# ------------------------------------------------------------------------------------------------ reports
def phantom_report(attributes: dict[str, Any], thresholds: dict[str, tuple[float, float]]) -> str:
    """A radiology-style sentence list from a phantom's attributes (sizes: small/normal/large by cohort tertiles)."""
    parts = []
    for organ in SIZE_ORGANS:
        v = attributes["organ_volumes_ml"][organ]
        lo, hi = thresholds[organ]
        size = "small" if v < lo else "large" if v > hi else "normal"
        parts.append(f"{organ.replace('_', ' ')} {size}")
    les = attributes.get("lesion")
    if les is None:
        parts.append("no focal lesion")
    else:
        parts.append(f"hypodense lesion in the {les['organ'].replace('_', ' ')}, "
                     f"{'large' if les['radius_mm'] > 9 else 'small'}")
    return ". ".join(parts) + "."


def size_thresholds(cohort: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Tertiles of each organ's volume in a reference cohort (the training phantoms)."""
    out = {}
    for organ in SIZE_ORGANS:
        v = np.array([a["organ_volumes_ml"][organ] for a in cohort])
        out[organ] = (float(np.quantile(v, 1 / 3)), float(np.quantile(v, 2 / 3)))
    return out


# ------------------------------------------------------------------------------------------------ text side
class WordTokenizer:
    """Lower-case words and punctuation; vocabulary from the training reports; unknown words -> <unk>."""

    PAD, UNK = 0, 1

    def __init__(self, reports: Sequence[str], max_len: int = 64):
        words = sorted({w for r in reports for w in self.split(r)})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}
        self.max_len = max_len

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())

    def __len__(self) -> int:
        return len(self.vocab) + 2

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        ids = torch.zeros((len(texts), self.max_len), dtype=torch.long)
        for i, t in enumerate(texts):
            tok = [self.vocab.get(w, self.UNK) for w in self.split(t)][: self.max_len]
            ids[i, : len(tok)] = torch.tensor(tok, dtype=torch.long)
        return ids


class TransformerTextEncoder(nn.Module):
    """Token + position embeddings, a small transformer encoder, masked mean pooling."""

    def __init__(self, reports: Sequence[str], dim: int = 256, layers: int = 2, heads: int = 4, max_len: int = 64):
        super().__init__()
        self.tokenizer, self.dim = WordTokenizer(reports, max_len), dim
        self.tok = nn.Embedding(len(self.tokenizer), dim, padding_idx=WordTokenizer.PAD)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(texts).to(self.pos.device)
        pad = ids == WordTokenizer.PAD
        h = self.body(self.tok(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class BagOfWordsTextEncoder(nn.Module):
    """Mean of word embeddings and an MLP: the simplest trainable text encoder."""

    def __init__(self, reports: Sequence[str], dim: int = 256, max_len: int = 64):
        super().__init__()
        self.tokenizer, self.dim = WordTokenizer(reports, max_len), dim
        self.bag = nn.EmbeddingBag(len(self.tokenizer), dim, mode="mean", padding_idx=WordTokenizer.PAD)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(dim, dim))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.mlp(self.bag(self.tokenizer(texts).to(self.bag.weight.device)))


def build_text_encoder(spec: str, reports: Sequence[str], dim: int = 256) -> nn.Module:
    """"transformer" | "bag" | "package.module:factory" (called as factory(reports=..., dim=...))."""
    if spec == "transformer":
        return TransformerTextEncoder(reports, dim)
    if spec == "bag":
        return BagOfWordsTextEncoder(reports, dim)
    if ":" in spec:
        module, name = spec.split(":", 1)
        enc = getattr(importlib.import_module(module), name)(reports=list(reports), dim=dim)
        if not hasattr(enc, "dim"):
            raise ValueError(f"text encoder {spec}: the module needs a `dim` attribute (its output width)")
        return enc
    raise ValueError(f"unknown text encoder {spec!r}; use transformer, bag or package.module:factory")


# ------------------------------------------------------------------------------------------------ model
class CLIPModel(nn.Module):
    """Image encoder + text encoder, each projected to a shared unit sphere; learnable temperature."""

    def __init__(self, encoder: nn.Module, text: nn.Module, dim: int = 128):
        super().__init__()
        self.encoder, self.text = encoder, text
        # BatchNorm first: pooled embeddings of different volumes (and reports) share a large common part that
        # would otherwise make every pair look alike (cosine ≈ 0.99 at initialisation).
        self.img_proj = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, momentum=None), nn.Linear(encoder.embed_dim, dim))
        self.txt_proj = nn.Sequential(nn.BatchNorm1d(text.dim, momentum=None), nn.Linear(text.dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.img_proj(self.encoder.embed(x)), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.txt_proj(self.text(texts)), dim=-1)

    def forward(self, x: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Symmetric InfoNCE (image->text and text->image) over the batch."""
        img, txt = self.embed_images(x), self.embed_texts(texts)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T
        target = torch.arange(len(texts), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class VisionLanguageRunner(Runner):
    def __init__(self, ctx: Context):
        super().__init__(ctx)
        task, fc = ctx.task, ctx.fc
        if task.is_phantom:
            train = phantom_samples(task, phantom_seeds(task, "training", ctx.n_labeled or fc.n_train, ctx.seed), labels=False)
            val = phantom_samples(task, phantom_seeds(task, "validation", fc.n_val), labels=False)
            th = size_thresholds([s["attributes"] for s in train])
            for s in train + val:
                s["report"] = phantom_report(s["attributes"], th)
        else:
            train = datalist_samples(task, ctx.datalist, "training", ctx.roi, keys=("image",))
            val = datalist_samples(task, ctx.datalist, "validation", ctx.roi, keys=("image",))
            if ctx.n_labeled:
                train = train[: ctx.n_labeled]
            for s in train + val:
                if not isinstance(s.get("report"), str):
                    raise ValueError(f"{ctx.datalist}: entry {s['name']} has no 'report' text")
        self.train = [resize_to(s, ctx.roi) for s in train]
        self.val = [resize_to(s, ctx.roi) for s in val]
        self.n_train = len(self.train)
        from voco_lib.backbone import build_encoder

        enc = build_encoder(ctx.feature_size, task.in_channels, small_crop=ctx.small_crop)
        text = build_text_encoder(fc.text_encoder, [s["report"] for s in self.train])
        self.model = CLIPModel(enc, text)

    def init_target(self) -> nn.Module:
        return self.model.encoder

    def loss(self, step: int) -> torch.Tensor:
        g = self.ctx.generator(5, step)
        b = min(max(self.ctx.fc.batch_size, 4), self.n_train)  # a contrastive batch needs negatives
        idx = torch.randperm(self.n_train, generator=g)[:b].tolist()
        x = torch.stack([random_flips([self.train[i]["image"]], g)[0] for i in idx]).to(self.ctx.device)
        return self.model(x, [self.train[i]["report"] for i in idx])

    def similarity(self, samples: list[Sample]) -> torch.Tensor:
        """Cosine similarity, images (rows) x reports (columns)."""
        img = torch.cat([self.model.embed_images(stack(samples[i:i + 4]).to(self.ctx.device))
                         for i in range(0, len(samples), 4)])
        txt = self.model.embed_texts([s["report"] for s in samples])
        return (img @ txt.T).float().cpu()

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        s = self.similarity(self.val)
        n = len(self.val)
        return {"r_at_1": recall_at_k(s, 1), "r_at_5": recall_at_k(s, min(5, n)), "r_at_10": recall_at_k(s, min(10, n)),
                "text_to_image_r_at_1": recall_at_k(s.T, 1), "chance_r_at_1": 1.0 / n, "n_val": n}
