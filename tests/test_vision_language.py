"""Vision-language evaluations: vocabulary (zero-shot) classification and report generation.

Metrics against values computed by hand; the vocabulary classifier on a hand-made embedding space; the
report decoder's tokenizer round trip; manifest checks; a smoke generation run that must raise BLEU.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from voco_lib.tasks import finetune, load_task
from voco_lib.tasks.metrics import bleu, lcs_length, multilabel_metrics, rouge_l
from voco_lib.tasks.report_generation import ReportGenerator, ReportTokenizer, split_words
from voco_lib.tasks.vision_language import (PHANTOM_FINDINGS, finding_labels, phantom_findings, phantom_report,
                                            vl_settings, vocabulary_loss, vocabulary_probabilities)


# ------------------------------------------------------------------------------------------------ metrics by hand
def test_bleu_by_hand_with_brevity_penalty():
    # hypothesis "the cat sat on the mat" (6 words) vs reference "the cat is on the mat" (6 words)
    # 1-grams: the×2, cat, sat, on, mat -> matches the×2 (ref has 2), cat, on, mat = 5/6
    # 2-grams: the cat ✓, cat sat ✗, sat on ✗, on the ✓, the mat ✓ -> 3/5
    # 3-grams: the cat sat ✗, cat sat on ✗, sat on the ✗, on the mat ✓ -> 1/4; 4-grams: 0/3
    b = bleu(["the cat sat on the mat"], ["the cat is on the mat"])
    assert b["bleu_1"] == pytest.approx(5 / 6)
    assert b["bleu_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b["bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert b["bleu_4"] == 0.0  # no matching 4-gram, no smoothing
    # brevity: "the cat" (c=2) vs a 6-word reference: p1 = p2 = 1, BP = exp(1 - 6/2)
    short = bleu(["the cat"], ["the cat is on the mat"], max_n=2)
    assert short["bleu_1"] == pytest.approx(math.exp(-2)) and short["bleu_2"] == pytest.approx(math.exp(-2))
    # clipping: "the the the" against "the cat": 1 of 3 unigrams counts; c=3 > r=2 so BP = 1
    assert bleu(["the the the"], ["the cat"], max_n=1)["bleu_1"] == pytest.approx(1 / 3)
    # corpus level: counts pooled over pairs (1/2 + 2/2 unigrams match -> 3/4), lengths pooled (c = r = 4)
    assert bleu(["a b", "c d"], ["a x", "c d"], max_n=1)["bleu_1"] == pytest.approx(3 / 4)
    assert bleu(["liver normal."], ["liver normal."], tokenize=split_words)["bleu_4"] == 0.0  # 3 tokens: no 4-gram
    assert bleu(["a b c d"], ["a b c d"])["bleu_4"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="hypotheses"):
        bleu(["a"], [])


def test_rouge_l_by_hand():
    assert lcs_length("a b c d e".split(), "a c e f".split()) == 3
    assert lcs_length([], ["a"]) == 0
    # hyp "a c e f" (4), ref "a b c d e" (5), LCS "a c e" = 3: P = 3/4, R = 3/5, β = 1.2
    p, r, b2 = 3 / 4, 3 / 5, 1.44
    expected = (1 + b2) * p * r / (r + b2 * p)
    assert rouge_l(["a c e f"], ["a b c d e"]) == pytest.approx(expected)
    assert rouge_l(["a c e f", "x"], ["a b c d e", "y"]) == pytest.approx(expected / 2)  # mean over pairs
    assert rouge_l(["same words"], ["same words"]) == pytest.approx(1.0)


def test_multilabel_metrics_by_hand():
    probs = np.array([[0.9, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.6]])
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    m = multilabel_metrics(probs, labels, ["a", "b"])
    # finding a: positives {0.9, 0.3}, negatives {0.6, 0.1}: pairs pos>neg: 0.9>0.6, 0.9>0.1, 0.3>0.1 -> 3/4
    assert m["auc_per_finding"]["a"] == pytest.approx(0.75)
    assert math.isnan(m["auc_per_finding"]["b"])  # one class only
    assert m["auc_mean"] == pytest.approx(0.75)
    # at 0.5: a predicts [1, 1, 0, 0] vs [1, 0, 1, 0] -> TP 1, FP 1, FN 1: F1 = 2/4; b predicts [0, 0, 1, 1] vs none -> 0
    assert m["f1_per_finding"]["a"] == pytest.approx(0.5) and m["f1_per_finding"]["b"] == 0.0
    assert m["f1_macro"] == pytest.approx(0.25)
    assert m["f1_micro"] == pytest.approx(2 * 1 / (2 * 1 + 3 + 1))  # TP 1, FP 1+2, FN 1
    assert m["accuracy"] == pytest.approx(4 / 8)  # a: 2 right of 4, b: 2 right of 4
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        multilabel_metrics(probs, labels, ["a", "b", "c"])


# ------------------------------------------------------------------------------------------------ vocabulary
def test_vocabulary_probabilities_by_hand_and_on_a_toy_embedding_space():
    img, pos, neg = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # softmax over (1, 0) at scale 1 and (2, 0) at scale 2
    assert float(vocabulary_probabilities(img, pos, neg, 1.0)) == pytest.approx(math.e / (math.e + 1))
    assert float(vocabulary_probabilities(img, pos, neg, 2.0)) == pytest.approx(1 / (1 + math.exp(-2)))
    # Toy space: axis k carries finding k; "X." points along +axis, "no X." along -axis. A volume's embedding
    # leans towards +axis where it has the finding, by how clearly (0.2..0.9), and away otherwise.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (12, 3))
    labels[0], labels[1] = 1, 0  # both classes for every finding
    strength = rng.uniform(0.2, 0.9, (12, 3))
    img = torch.tensor(np.where(labels == 1, strength, -strength), dtype=torch.float32)
    img = torch.nn.functional.normalize(img, dim=-1)
    pos, neg = torch.eye(3), -torch.eye(3)
    p = vocabulary_probabilities(img, pos, neg, 10.0)
    assert ((p > 0.5) == torch.tensor(labels == 1)).all()
    m = multilabel_metrics(p, labels, ["a", "b", "c"])
    assert m["auc_mean"] == 1.0 and m["accuracy"] == 1.0 and m["f1_macro"] == 1.0
    # swap the prompts and the ranking inverts
    assert multilabel_metrics(vocabulary_probabilities(img, neg, pos, 10.0), labels, ["a", "b", "c"])["auc_mean"] == 0.0
    # the VocabFine loss is lower for the right labels than for flipped ones
    y = torch.tensor(labels)
    assert vocabulary_loss(img, pos, neg, 10.0, y) < vocabulary_loss(img, pos, neg, 10.0, 1 - y)


def test_phantom_findings_follow_the_attributes_and_the_report():
    th = {o: (100.0, 200.0) for o in ("liver", "spleen", "kidney_right", "kidney_left", "stomach")}
    vol = {"liver": 250.0, "spleen": 50.0, "kidney_right": 150.0, "kidney_left": 150.0, "stomach": 150.0}
    a = {"organ_volumes_ml": vol, "lesion": {"organ": "kidney_left", "radius_mm": 12.0}}
    f = phantom_findings(a, th)
    assert set(f) == set(PHANTOM_FINDINGS)
    assert {k for k, v in f.items() if v} == {"liver large", "spleen small", "hypodense lesion", "lesion in the kidney left"}
    report = phantom_report(a, th)
    assert report == ("liver large. spleen small. kidney right normal. kidney left normal. stomach normal. "
                      "hypodense lesion in the kidney left, large.")
    assert not any(phantom_findings({**a, "lesion": None}, th)[k] for k in ("hypodense lesion", "lesion in the liver"))
    assert phantom_report({**a, "lesion": None}, th).endswith("no focal lesion.")


def test_finding_labels_from_a_datalist_entry():
    assert finding_labels({"findings": {"a": 1, "b": 0, "c": True}}, ["c", "a", "b"]) == [1, 1, 0]
    assert finding_labels({"findings": [0, 1]}, ["a", "b"]) == [0, 1]
    with pytest.raises(ValueError, match=r"data\.json.*case7.*'b'"):
        finding_labels({"name": "case7", "findings": {"a": 1}}, ["a", "b"], "data.json")
    with pytest.raises(ValueError, match=r"case8.*needs 'findings'"):
        finding_labels({"name": "case8"}, ["a"], "data.json")


def test_vision_language_manifests():
    ct = vl_settings(load_task("ct-rate"))
    assert ct.mode == "alignment" and len(ct.vocabulary) == 18 and ct.prompts == ("{finding}.", "not {finding}.")
    assert "Pleural effusion" in ct.vocabulary and "Interlobular septal thickening" in ct.vocabulary
    assert load_task("ct-rate").metric == "vocab_auc_mean"
    assert vl_settings(load_task("ctrg-chest")).mode == "generation" and load_task("ctrg-chest").metric == "bleu_4"
    assert vl_settings(load_task("phantom-rg")).mode == "generation"
    assert set(vl_settings(load_task("phantom-vl")).vocabulary) <= set(PHANTOM_FINDINGS)


def test_bad_vision_language_sections_fail_with_the_file_and_the_fix(tmp_path):
    from voco_lib.tasks.registry import task_from_dict

    raw = dict(load_task("phantom-vl").raw)

    def settings(**section):
        return vl_settings(task_from_dict({**raw, "vision_language": {**raw["vision_language"], **section}},
                                          tmp_path / "phantom-vl.yaml"))

    with pytest.raises(ValueError, match=r"phantom-vl\.yaml.*cannot be derived from a phantom"):
        settings(vocabulary=["pleural effusion"])
    with pytest.raises(ValueError, match=r"phantom-vl\.yaml.*needs the text encoder"):
        settings(mode="generation")
    with pytest.raises(ValueError, match=r"unknown field|finding"):  # the schema wants {finding} in a prompt
        settings(prompts=["present", "absent"])


# ------------------------------------------------------------------------------------------------ generation
def test_report_tokenizer_round_trip():
    reports = ["liver normal. spleen large.", "liver small. no focal lesion."]
    tok = ReportTokenizer(reports, max_len=12)
    ids = tok.encode(["liver large. spleen bright."])
    assert ids[0, 0] == tok.BOS and tok.EOS in ids[0].tolist()
    assert tok.decode(ids[0].tolist()) == "liver large. spleen <unk>."
    assert tok.decode(tok.encode([reports[1]])[0].tolist()) == reports[1]
    assert (tok.encode(["a " * 40])[0] != tok.PAD).sum() == 12  # cut to max_len, EOS kept
    rare = ReportTokenizer(reports, min_count=2)
    assert "liver" in rare.vocab and "spleen" not in rare.vocab


def test_report_generator_decodes_a_memorised_report():
    """A decoder on a toy encoder overfits two reports; greedy decoding must return each one for its image."""

    class Toy(torch.nn.Module):
        embed_dim = 4

        def embed(self, x):
            return x.flatten(1)[:, :4]

    torch.manual_seed(0)
    reports = ["liver large. no focal lesion.", "spleen small. hypodense lesion in the liver, large."]
    model = ReportGenerator(Toy(), reports, dim=32, layers=1, n_memory=2, max_len=16)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]).view(2, 1, 2, 2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(x, reports)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert model.generate(x) == reports
    assert bleu(model.generate(x), reports, tokenize=split_words)["bleu_4"] == pytest.approx(1.0)


@pytest.mark.slow
def test_report_generation_improves_bleu(tmp_path):
    """Easy case (training pool = validation volumes, seed 50): a few steps must lift BLEU and ROUGE-L."""
    res = finetune("phantom-rg", profile="smoke", seed=50, out=tmp_path / "rg", show_progress=False,
                   overrides=["finetune.steps=12", "finetune.eval_every=6", "finetune.n_train=4", "finetune.n_val=4",
                              "finetune.batch_size=4", "finetune.lr=2e-3"])
    vals = [json.loads(x) for x in (tmp_path / "rg" / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    for key in ("bleu_1", "bleu_4", "rouge_l"):
        assert vals[-1][key] > vals[0][key], (key, [v[key] for v in vals])
    m = res["metrics"]
    assert res["metric"] == "bleu_4" and len(m["examples"]) == 4
    assert all(e["reference"].startswith("liver") for e in m["examples"])


@pytest.mark.slow
def test_vocabulary_metrics_land_in_the_results(tmp_path):
    res = finetune("phantom-vl", profile="smoke", seed=50, out=tmp_path / "vl", show_progress=False,
                   overrides=["finetune.steps=2", "finetune.n_train=4", "finetune.n_val=4", "finetune.batch_size=4"])
    m, vocab = res["metrics"], vl_settings(load_task("phantom-vl")).vocabulary
    assert set(m["vocab_auc"]) == set(vocab) == set(m["vocab_f1"])
    assert 0.0 <= m["vocab_accuracy"] <= 1.0
    scored = [v for v in m["vocab_auc"].values() if v is not None]
    assert m["vocab_auc_mean"] == pytest.approx(sum(scored) / len(scored))
