"""Report generation: a small transformer decoder, trained from scratch, conditioned on the 3D encoder.

The paper's CTRG-Chest evaluation runs M2KT on the VoCo Swin encoder, whose pooled 24·fs embedding is the
visual feature (`d_vf: 1152` at fs=48, the pooled embedding of voco_head.py:L180-205; `Luffy03/Large-Scale-Medical:
Downstream/monai/M2KT/config/ctrg_swin3d.yml`). Ours keeps that interface and the simplest decoder that can
use it: the pooled embedding becomes a few memory tokens, a 2-layer transformer decoder reads them
(teacher forcing and cross-entropy in training, greedy decoding in evaluation), and the scores are BLEU-1..4
and ROUGE-L (`voco_lib.tasks.metrics`). M2KT's knowledge-graph and label-prediction parts are not reproduced.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PUNCT = re.compile(r"[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-case words and single punctuation marks (the tokens BLEU and ROUGE-L count)."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


class ReportTokenizer:
    """Word vocabulary of the training reports (words seen fewer than `min_count` times -> <unk>) with BOS/EOS."""

    PAD, UNK, BOS, EOS = 0, 1, 2, 3

    def __init__(self, reports: Sequence[str], max_len: int = 64, min_count: int = 1):
        counts = Counter(w for r in reports for w in split_words(r))
        words = sorted(w for w, c in counts.items() if c >= min_count)
        self.words = ["<pad>", "<unk>", "<bos>", "<eos>", *words]
        self.vocab = {w: i for i, w in enumerate(self.words)}
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, max_len) ids: BOS, the words (cut to fit), EOS, padding."""
        ids = torch.full((len(texts), self.max_len), self.PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            tok = [self.vocab.get(w, self.UNK) for w in split_words(t)][: self.max_len - 2]
            ids[i, : len(tok) + 2] = torch.tensor([self.BOS, *tok, self.EOS], dtype=torch.long)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first EOS; punctuation joins the word before it ("liver normal.")."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if i in (self.PAD, self.BOS):
                continue
            w = self.words[i]
            if out and PUNCT.fullmatch(w):
                out[-1] += w
            else:
                out.append(w)
        return " ".join(out)


class ReportGenerator(nn.Module):
    """Encoder (pooled embedding -> `n_memory` tokens) + causal transformer decoder over report words."""

    def __init__(self, encoder: nn.Module, reports: Sequence[str], dim: int = 128, layers: int = 2, heads: int = 4,
                 n_memory: int = 4, max_len: int = 64, min_count: int = 1):
        super().__init__()
        self.encoder, self.tokenizer, self.dim, self.n_memory = encoder, ReportTokenizer(reports, max_len, min_count), dim, n_memory
        # BatchNorm first, as in CLIPModel: pooled embeddings of different volumes share a large common part.
        self.img_proj = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, momentum=None),
                                      nn.Linear(encoder.embed_dim, n_memory * dim))
        self.tok = nn.Embedding(len(self.tokenizer), dim, padding_idx=ReportTokenizer.PAD)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(dim))
        self.out = nn.Linear(dim, len(self.tokenizer))

    def memory(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_memory, dim) tokens from the encoder's pooled embedding."""
        return self.img_proj(self.encoder.embed(x)).view(len(x), self.n_memory, self.dim)

    def logits(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(N, L, vocab) next-word logits for the prefixes `ids` (N, L)."""
        L = ids.shape[1]
        causal = torch.ones((L, L), dtype=torch.bool, device=ids.device).triu(1)  # True: may not attend
        h = self.body(self.tok(ids) + self.pos[:L], memory, tgt_mask=causal,
                      tgt_key_padding_mask=ids == ReportTokenizer.PAD)
        return self.out(h)

    def forward(self, x: torch.Tensor, reports: Sequence[str]) -> torch.Tensor:
        """Teacher-forced cross-entropy of the reports' next words (padding ignored)."""
        ids = self.tokenizer.encode(reports).to(x.device)
        ids = ids[:, : int((ids != ReportTokenizer.PAD).sum(1).max())]
        z = self.logits(self.memory(x), ids[:, :-1])
        return F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), ids[:, 1:].reshape(-1),
                               ignore_index=ReportTokenizer.PAD)

    @torch.no_grad()
    def generate(self, x: torch.Tensor, max_len: int | None = None) -> list[str]:
        """Greedy decoding: from BOS, append the most likely next word until EOS or `max_len` tokens."""
        max_len = min(max_len or self.tokenizer.max_len, self.tokenizer.max_len)
        mem = self.memory(x)
        ids = torch.full((len(x), 1), ReportTokenizer.BOS, dtype=torch.long, device=x.device)
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(max_len - 1):
            nxt = self.logits(mem, ids)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, ReportTokenizer.PAD), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == ReportTokenizer.EOS
            if bool(done.all()):
                break
        return [self.tokenizer.decode(row.tolist()) for row in ids.cpu()]
