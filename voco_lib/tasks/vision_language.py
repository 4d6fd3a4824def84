"""Vision-language: CLIP-style alignment (retrieval R@k, vocabulary classification) or report generation.

The image side is the Swin encoder's pooled embedding and a linear projection; the text side is pluggable:
any `nn.Module` whose `forward(list_of_reports)` returns (N, dim) and that has a `dim` attribute. Ours is
trained from scratch on the task's reports: a word tokenizer fitted on the training reports and a small
transformer (or a bag of words). `finetune.text_encoder=package.module:factory` plugs in another one;
the factory is called as `factory(reports=training_reports, dim=256)`.
Phantom analog: reports written from the phantom's attributes (organ sizes against the training cohort,
lesion organ and side); upstream: CT-RATE retrieval (CT-CLIP) and CTRG-Chest (M2KT), Luffy03/Large-Scale-Medical
Downstream/monai/CT_CLIP and M2KT (commit 1ad538b).
Real data: an MSD-style datalist whose entries carry a `report` string beside `image`.

The task manifest's `vision_language` section picks the mode and the vocabulary:
- `mode: alignment` (default): CLIP training; evaluation = retrieval and, where the task lists a
  `vocabulary` of findings, CT-CLIP's zero-shot classification: per finding, the image embedding is compared
  with a positive and a negative prompt ("{finding}." / "not {finding}.", `Luffy03/Large-Scale-Medical:
  Downstream/monai/CT_CLIP/zero_shot.py`), softmax over the pair = the finding's probability; per-finding
  AUC, mean AUC, accuracy/F1 at 0.5. Labels: phantom findings come from the attributes (`phantom_findings`),
  real entries carry `"findings": {name: 0|1}`. `vocab_loss_weight > 0` adds CT-CLIP's VocabFine objective
  (the same prompt pairs trained against the labels) to the CLIP loss.
- `mode: generation`: `voco_lib.tasks.report_generation` (decoder on the encoder, BLEU-1..4, ROUGE-L).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voco_lib.tasks.data import (Sample, labelled_count, labelled_datalist, phantom_samples, phantom_seeds,
                                 random_flips, resize_to, stack)
from voco_lib.tasks.engine import Context, Runner
from voco_lib.tasks.metrics import bleu, multilabel_metrics, recall_at_k, rouge_l
from voco_lib.tasks.registry import Task
from voco_lib.tasks.report_generation import ReportGenerator, split_words

SIZE_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "stomach")
LESION_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas")  # data_manifests/phantom_classes.yaml
MODES = ("alignment", "generation")
CT_CLIP_PROMPTS = ("{finding}.", "not {finding}.")


# ------------------------------------------------------------------------------------------------ task settings
@dataclass(frozen=True)
class VLSettings:
    """The task manifest's `vision_language` section (schema: data_manifests/schemas/tasks.json)."""

    mode: str = "alignment"
    vocabulary: tuple[str, ...] = ()
    prompts: tuple[str, str] = CT_CLIP_PROMPTS
    vocab_loss_weight: float = 0.0
    max_tokens: int = 64
    min_word_count: int = 1


def vl_settings(task: Task) -> VLSettings:
    """Settings of a vision-language task, checked against each other (errors name the manifest and the fix)."""
    sec = dict(task.raw.get("vision_language") or {})
    where = f"data_manifests/tasks/{task.name}.yaml (vision_language)"
    st = VLSettings(mode=sec.get("mode", "alignment"), vocabulary=tuple(sec.get("vocabulary") or ()),
                    prompts=tuple(sec.get("prompts") or CT_CLIP_PROMPTS),  # type: ignore[arg-type]
                    vocab_loss_weight=float(sec.get("vocab_loss_weight", 0.0)),
                    max_tokens=int(sec.get("max_tokens", 64)), min_word_count=int(sec.get("min_word_count", 1)))
    if st.mode not in MODES:
        raise ValueError(f"{where}: mode {st.mode!r}; use one of {MODES}")
    if st.mode == "generation" and st.vocabulary:
        raise ValueError(f"{where}: a vocabulary needs the text encoder of mode alignment; drop it or the mode")
    if len(st.prompts) != 2 or not all("{finding}" in t for t in st.prompts):
        raise ValueError(f"{where}: prompts must be two templates with {{finding}}, e.g. {list(CT_CLIP_PROMPTS)}")
    if task.is_phantom and st.vocabulary:
        unknown = sorted(set(st.vocabulary) - set(PHANTOM_FINDINGS))
        if unknown:
            raise ValueError(f"{where}: {unknown} cannot be derived from a phantom; choose from {list(PHANTOM_FINDINGS)}")
    return st


# ------------------------------------------------------------------------------------------------ reports
def _size(v: float, lo: float, hi: float) -> str:
    return "small" if v < lo else "large" if v > hi else "normal"


def phantom_report(attributes: dict[str, Any], thresholds: dict[str, tuple[float, float]]) -> str:
    """A radiology-style sentence list from a phantom's attributes (sizes: small/normal/large by cohort tertiles)."""
    parts = []
    for organ in SIZE_ORGANS:
        parts.append(f"{organ.replace('_', ' ')} {_size(attributes['organ_volumes_ml'][organ], *thresholds[organ])}")
    les = attributes.get("lesion")
    if les is None:
        parts.append("no focal lesion")
    else:
        parts.append(f"hypodense lesion in the {les['organ'].replace('_', ' ')}, "
                     f"{'large' if les['radius_mm'] > 9 else 'small'}")
    return ". ".join(parts) + "."


# The findings a phantom's attributes decide, worded as its report words them.
PHANTOM_FINDINGS = (*(f"{o.replace('_', ' ')} {s}" for o in SIZE_ORGANS for s in ("large", "small")),
                    "hypodense lesion", *(f"lesion in the {o.replace('_', ' ')}" for o in LESION_ORGANS))


def phantom_findings(attributes: dict[str, Any], thresholds: dict[str, tuple[float, float]]) -> dict[str, bool]:
    """Each of `PHANTOM_FINDINGS`: present or not (sizes by the same cohort tertiles as the report)."""
    out = {}
    for organ in SIZE_ORGANS:
        size = _size(attributes["organ_volumes_ml"][organ], *thresholds[organ])
        for s in ("large", "small"):
            out[f"{organ.replace('_', ' ')} {s}"] = size == s
    les = attributes.get("lesion")
    out["hypodense lesion"] = les is not None
    for organ in LESION_ORGANS:
        out[f"lesion in the {organ.replace('_', ' ')}"] = les is not None and les["organ"] == organ
    return out


def finding_labels(sample: dict[str, Any], vocabulary: Sequence[str], datalist: str | None = None) -> list[int]:
    """0/1 per vocabulary finding from a sample's `findings` ({name: 0|1} or a list in vocabulary order)."""
    f = sample.get("findings")
    src = datalist or "the datalist"
    if isinstance(f, dict):
        missing = [v for v in vocabulary if v not in f]
        if missing:
            raise ValueError(f"{src}: entry {sample.get('name')} has no label for {missing[:3]} in 'findings'; "
                             "give every vocabulary finding 0 or 1")
        return [int(bool(f[v])) for v in vocabulary]
    if isinstance(f, (list, tuple)) and len(f) == len(vocabulary):
        return [int(bool(v)) for v in f]
    raise ValueError(f"{src}: entry {sample.get('name')} needs 'findings': {{name: 0|1}} for the task's "
                     f"{len(vocabulary)} vocabulary findings (or a task manifest without a vocabulary)")


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
        return split_words(text)

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
def pair_logits(img: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """(N, F, 2) scaled cosine similarities of N image embeddings with F positive and F negative prompt embeddings."""
    return scale * torch.stack([img @ positive.T, img @ negative.T], -1)


def vocabulary_probabilities(img: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                             scale: float | torch.Tensor) -> torch.Tensor:
    """(N, F) probability of each finding: softmax over its (positive, negative) prompt pair (CT-CLIP zero-shot)."""
    return torch.softmax(pair_logits(img, positive, negative, scale), -1)[..., 0]


def vocabulary_loss(img: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, scale: float | torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the prompt pair against the labels (CT-CLIP VocabFine; upstream takes the MSE of the softmax)."""
    z = pair_logits(img, positive, negative, scale)
    return F.cross_entropy(z.reshape(-1, 2).float(), (labels.reshape(-1) == 0).long())


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

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100)).exp()

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.img_proj(self.encoder.embed(x)), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.txt_proj(self.text(texts)), dim=-1)

    def contrastive_loss(self, img: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Symmetric InfoNCE (image->text and text->image) over the batch."""
        txt = self.embed_texts(texts)
        logits = self.scale * img @ txt.T
        target = torch.arange(len(texts), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def forward(self, x: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return self.contrastive_loss(self.embed_images(x), texts)

    def prompt_embeddings(self, findings: Sequence[str], prompts: Sequence[str] = CT_CLIP_PROMPTS) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the positive and the negative prompt of each finding, (F, dim) each."""
        pos = self.embed_texts([prompts[0].format(finding=f) for f in findings])
        neg = self.embed_texts([prompts[1].format(finding=f) for f in findings])
        return pos, neg


class VisionLanguageRunner(Runner):
    def __init__(self, ctx: Context):
        super().__init__(ctx)
        task, fc = ctx.task, ctx.fc
        self.settings = st = vl_settings(task)
        if task.is_phantom:
            train = phantom_samples(task, phantom_seeds(task, "training", labelled_count(ctx, fc.n_train), ctx.seed), labels=False)
            val = phantom_samples(task, phantom_seeds(task, "validation", fc.n_val), labels=False)
            th = size_thresholds([s["attributes"] for s in train])
            for s in train + val:
                s["report"] = phantom_report(s["attributes"], th)
                s["findings"] = phantom_findings(s["attributes"], th)
        else:
            train, val = labelled_datalist(ctx, ("image",), "report", lambda v: isinstance(v, str), "'report' text")
        if st.vocabulary:  # labels as (vocabulary order) 0/1 lists; needed in training only for VocabFine
            for s in val + (train if st.vocab_loss_weight > 0 else []):
                s["vocab_labels"] = finding_labels(s, st.vocabulary, ctx.datalist)
        self.train = [resize_to(s, ctx.roi) for s in train]
        self.val = [resize_to(s, ctx.roi) for s in val]
        self.n_train = len(self.train)
        from voco_lib.backbone import build_backbone

        enc = build_backbone(ctx.feature_size, ctx.roi, task.in_channels)
        reports = [s["report"] for s in self.train]
        if st.mode == "generation":
            self.model: nn.Module = ReportGenerator(enc, reports, max_len=st.max_tokens, min_count=st.min_word_count)
        else:  # prompt words the reports lack ("not") are <unk> to our tokenizer: VocabFine teaches them
            self.model = CLIPModel(enc, build_text_encoder(fc.text_encoder, reports))

    def init_target(self) -> nn.Module:
        return self.model.encoder

    def _batch(self, step: int, smallest: int) -> tuple[torch.Tensor, list[int]]:
        """A seeded batch of at least `smallest` volumes (drawn with replacement if the pool is smaller), flipped."""
        g = self.ctx.generator(5, step)
        b = max(self.ctx.fc.batch_size, smallest)
        if self.n_train >= b or self.settings.mode == "alignment":
            idx = torch.randperm(self.n_train, generator=g)[: min(b, self.n_train)].tolist()
        else:
            idx = torch.randint(self.n_train, (b,), generator=g).tolist()
        flips = [random_flips([self.train[i]["image"]], g, self.ctx.fc.flip_p)[0] for i in idx]
        x = torch.stack(flips).to(self.ctx.device)
        return x, idx

    def loss(self, net: nn.Module, step: int, micro: int) -> torch.Tensor:
        """One process only (shards_batches is False): `net` is the model itself."""
        if self.settings.mode == "generation":  # 2 volumes at least: the BatchNorm before the memory tokens
            x, idx = self._batch(step, 2)
            return net(x, [self.train[i]["report"] for i in idx])
        x, idx = self._batch(step, 4)  # a contrastive batch needs negatives
        img = self.model.embed_images(x)
        loss = self.model.contrastive_loss(img, [self.train[i]["report"] for i in idx])
        st = self.settings
        if st.vocabulary and st.vocab_loss_weight > 0:
            pos, neg = self.model.prompt_embeddings(st.vocabulary, st.prompts)
            y = torch.tensor([self.train[i]["vocab_labels"] for i in idx], device=img.device)
            loss = loss + st.vocab_loss_weight * vocabulary_loss(img, pos, neg, self.model.scale, y)
        return loss

    def image_embeddings(self, samples: list[Sample]) -> torch.Tensor:
        return torch.cat([self.model.embed_images(stack(samples[i:i + 4]).to(self.ctx.device))
                          for i in range(0, len(samples), 4)])

    def similarity(self, samples: list[Sample]) -> torch.Tensor:
        """Cosine similarity, images (rows) x reports (columns)."""
        img = self.image_embeddings(samples)
        txt = self.model.embed_texts([s["report"] for s in samples])
        return (img @ txt.T).float().cpu()

    def vocabulary_probabilities(self, samples: list[Sample]) -> torch.Tensor:
        """(N, F) probability of each vocabulary finding in each volume (zero-shot, CT-CLIP prompts)."""
        st = self.settings
        pos, neg = self.model.prompt_embeddings(st.vocabulary, st.prompts)
        return vocabulary_probabilities(self.image_embeddings(samples), pos, neg, self.model.scale).float().cpu()

    def generate(self, samples: list[Sample]) -> list[str]:
        """Greedy reports of the volumes (mode generation)."""
        return [r for i in range(0, len(samples), 4)
                for r in self.model.generate(stack(samples[i:i + 4]).to(self.ctx.device))]

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        if self.settings.mode == "generation":
            return self._evaluate_generation(final)
        s = self.similarity(self.val)
        n = len(self.val)
        out: dict[str, Any] = {"r_at_1": recall_at_k(s, 1), "r_at_5": recall_at_k(s, min(5, n)),
                               "r_at_10": recall_at_k(s, min(10, n)), "text_to_image_r_at_1": recall_at_k(s.T, 1),
                               "chance_r_at_1": 1.0 / n, "n_val": n}
        if self.settings.vocabulary:
            m = multilabel_metrics(self.vocabulary_probabilities(self.val), [v["vocab_labels"] for v in self.val],
                                   self.settings.vocabulary)
            out.update({"vocab_auc_mean": m["auc_mean"], "vocab_accuracy": m["accuracy"], "vocab_f1_macro": m["f1_macro"],
                        "vocab_f1_micro": m["f1_micro"], "vocab_auc": m["auc_per_finding"], "vocab_f1": m["f1_per_finding"]})
        return out

    def _evaluate_generation(self, final: bool) -> dict[str, Any]:
        hyp, ref = self.generate(self.val), [s["report"] for s in self.val]
        out: dict[str, Any] = {**bleu(hyp, ref, tokenize=split_words), "rouge_l": rouge_l(hyp, ref, tokenize=split_words),
                               "mean_words": float(np.mean([len(split_words(h)) for h in hyp])), "n_val": len(ref)}
        if final:
            out["examples"] = [{"name": s["name"], "generated": h, "reference": r}
                               for s, h, r in list(zip(self.val, hyp, ref))[:8]]
        return out
