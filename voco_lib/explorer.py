"""Position explorer (notebook 03): one API for a pre-training run of ours and for a released VoCo file.

`load_explorer_model(checkpoint)` tells the two kinds apart by what they hold:

- a run of ours (its directory, or a `checkpoints/step_*.pt`) has trained projection heads, so the
  prediction is VoCo's own P = ReLU(cos(student(random crop), teacher(base crop))) (Luffy03/Large-Scale-Medical
  Self-supervised/models/voco_head.py:L259-336, commit 1ad538b);
- a released `VoCo_*_SSL_head.pt` (or `VoComni_*.pt`, or the `encoder.pt` a run exports) holds the backbone
  only (their sizes on Hugging Face Luffy503/VoCo match the encoder's parameters; Luffy03/Large-Scale-Medical issue
  #40): there is no trained position predictor in it. What can be shown honestly is the
  same formula on the raw pooled backbone embeddings (24·feature_size values per crop, voco_head.py:L180-205),
  ReLU(cos(e(random crop), e(base crop))): how alike the backbone finds the crops, not a trained
  prediction. `fit_probe` adds a per-volume linear probe (ridge regression from embeddings to overlap
  labels, fitted on other random crops of the same volume) as a second, learned-on-the-spot reading.

`predict_positions(model, views)` works for both kinds, so notebooks and widgets do not care which is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from voco_lib.checkpoints import CheckpointError, CoverageReport, load_checkpoint, load_encoder, normalize_state_dict
from voco_lib.config import PRESETS, DataConfig, Profile, ViewConfig, profile_from_dict, resolve
from voco_lib.crops import Views
from voco_lib.losses import similarity

EMBED_KEY = "swinViT.patch_embed.proj.weight"  # (feature_size, in_channels, 2, 2, 2) in every SwinUNETR
RUN_KEYS = {"model", "config", "step"}  # a full-state checkpoint written by voco_lib.pretrain
ENCODER_VIEWS = ("auto", "tpami", "cvpr", "profile")
# the data settings of the authors' TPAMI abdomen recipe (1.5 mm, random 192x192x64 region;
# Luffy03/Large-Scale-Medical Self-supervised/utils/data_trans.py:L61-88):
# DataConfig's defaults, which the smoke/cpu profiles replace with small resized phantoms
_RECIPE_DATA = ("chain", "region_mode", "phantom_shape", "phantom_spacing")


# ------------------------------------------------------------------------------------------------ encoder-only
class EncoderOnly(nn.Module):
    """A VoCo backbone without heads: positions as ReLU(cos) of raw pooled embeddings (see module doc).

    Base-crop embeddings are kept for the last set of base crops seen, so moving the random crop over one
    volume costs one backbone call per move. Nothing here depends on which crops are batched together
    (no BatchNorm), unlike the heads of a run of ours.
    """

    def __init__(self, encoder: nn.Module, source: Path, report: CoverageReport):
        super().__init__()
        self.encoder, self.source, self.report = encoder, source, report
        self.probe: torch.Tensor | None = None  # (D + 1, K) ridge weights from `fit_probe`
        self._bases: tuple[torch.Tensor, torch.Tensor] | None = None  # (base crops, their embeddings)

    @property
    def feature_size(self) -> int:
        return int(self.encoder.feature_size)

    def describe(self) -> str:
        return (f"{self.source.name}: a backbone without VoCo's position heads (feature_size {self.feature_size}; "
                f"{self.report.summary()}). Predictions are ReLU(cos) of raw pooled backbone features "
                "(no trained head), not VoCo's trained position predictor")

    @torch.no_grad()
    def embed(self, crops: torch.Tensor, batch: int = 4) -> torch.Tensor:
        """(N, C, X, Y, Z) -> (N, 24·fs) pooled embeddings, a few crops per backbone call (bounded memory)."""
        self.encoder.eval()
        dev = next(self.encoder.parameters()).device
        return torch.cat([self.encoder.embed(crops[i:i + batch].to(dev)).float().cpu()
                          for i in range(0, len(crops), batch)])

    def base_embeddings(self, bases: torch.Tensor) -> torch.Tensor:
        if self._bases is None or self._bases[0].shape != bases.shape or not torch.equal(self._bases[0], bases):
            self._bases = (bases.clone(), self.embed(bases))
        return self._bases[1]

    @torch.no_grad()
    def predict(self, views: Views) -> torch.Tensor:
        """(S, K) in [0, 1]: ReLU(cos(e(random_s), e(base_k))), or the probe's clamped output once fitted."""
        e_r = self.embed(views.random)
        if self.probe is not None:
            return _probe_apply(self.probe, e_r).clamp(0, 1)
        return similarity(e_r, self.base_embeddings(views.bases))


def infer_architecture(state: dict[str, torch.Tensor], where: str) -> tuple[int, int]:
    """(feature_size, in_channels) from the patch-embedding weight's shape; a clear error for other files."""
    w = state.get(EMBED_KEY)
    if w is None or w.dim() != 5:
        keys = ", ".join(list(state)[:5]) or "none"
        raise CheckpointError(
            f"{where}: not a VoCo / SwinUNETR encoder: no 5-D tensor {EMBED_KEY} (first keys: {keys}). Pass a run "
            "directory of ours, one of its checkpoints/step_*.pt, a released VoCo_*_SSL_head.pt / VoComni_*.pt, or "
            "the encoder.pt a `voco pretrain` run exports")
    fs, cin = int(w.shape[0]), int(w.shape[1])
    if fs % 12:
        raise CheckpointError(f"{where}: {EMBED_KEY} has {fs} output channels; a SwinUNETR's feature_size is a "
                              "multiple of 12, so this is not a VoCo / SwinUNETR encoder")
    if cin != 1:
        raise CheckpointError(f"{where}: the encoder takes {cin} input channels; the explorer feeds single-channel CT "
                              "crops (in_channels 1)")
    return fs, cin


def encoder_config(profile: Profile | str | None, feature_size: int, views: str | ViewConfig = "auto") -> Profile:
    """The explorer's settings for an encoder-only file: the profile, with the file's feature size and views.

    views: "auto" = "tpami" (the 64³ crops the released models were trained on, with the authors'
    abdomen data settings) except in the smoke profile, where it is "profile"; "cvpr" = 4x4 grid of 96³
    resized to 64³; "profile" = the profile's own (small) views; or a ViewConfig.
    """
    cfg = profile if isinstance(profile, Profile) else resolve(profile)
    if isinstance(views, ViewConfig):
        return dataclasses.replace(cfg, feature_size=feature_size, views=views)
    if views not in ENCODER_VIEWS:
        raise ValueError(f"encoder_views must be one of {ENCODER_VIEWS} or a ViewConfig, got {views!r}")
    if views == "auto":
        views = "profile" if cfg.name == "smoke" else "tpami"
    if views == "profile":
        return dataclasses.replace(cfg, feature_size=feature_size)
    recipe = {f: getattr(DataConfig(), f) for f in _RECIPE_DATA}
    if views == "cvpr":
        recipe["chain"] = "cvpr"
    return dataclasses.replace(cfg, feature_size=feature_size, views=PRESETS[views],
                               data=dataclasses.replace(cfg.data, **recipe))


def load_encoder_only(path: str | Path, profile: Profile | str | None = None, views: str | ViewConfig = "auto",
                      device: str = "cpu", state: Any = None) -> tuple[EncoderOnly, Profile]:
    """Load an encoder-only file with 100% coverage of the encoder keys; architecture from its tensor shapes."""
    from voco_lib.backbone import build_backbone

    path = Path(path)
    obj = load_checkpoint(path) if state is None else state
    try:
        flat = normalize_state_dict(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    fs, _ = infer_architecture(flat, str(path))
    cfg = encoder_config(profile, fs, views)
    enc = build_backbone(cfg.feature_size, cfg.views.out_size or cfg.views.crop_size)  # the pre-training's encoder
    report = load_encoder(enc, flat, min_coverage=1.0, name=str(path))
    return EncoderOnly(enc.to(device).eval(), path, report), cfg


# ------------------------------------------------------------------------------------------------ probe
def _probe_apply(w: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    return torch.cat([e, torch.ones(len(e), 1)], 1) @ w


def fit_probe(model: EncoderOnly, region: torch.Tensor, cfg: Profile, n_crops: int = 32, ridge: float = 1e-2,
              seed: int = 0) -> dict[str, float]:
    """Fit a per-volume linear probe: ridge regression from a random crop's embedding to its overlap labels.

    The training crops are `n_crops` random crops of this volume (labels come free from geometry); after
    this `model.predict` returns the probe's output clamped to [0, 1] (`model.probe = None` goes back to raw
    cosines). Embeddings are standardised per feature; the penalty is `ridge`·n_crops on every weight but
    the intercept. Returns leave-one-out scores (each crop predicted by the probe fitted on the others, in
    closed form), since the fit on its own crops is near perfect whenever 24·fs > n_crops.
    """
    from voco_lib.crops import make_views

    if n_crops < 2:
        raise ValueError(f"a probe needs at least 2 crops, got n_crops={n_crops}")
    v = dataclasses.replace(cfg.views, n_random=n_crops, augment=False)
    views = make_views(region.reshape(1, *region.shape[-3:]).float(), v, torch.Generator().manual_seed(seed))
    e = model.embed(views.random).double()
    y = views.labels.double()
    mu, sd = e.mean(0), e.std(0).clamp_min(1e-6)
    x = torch.cat([(e - mu) / sd, torch.ones(len(e), 1, dtype=torch.float64)], 1)
    a = x.T @ x + ridge * len(e) * torch.diag(torch.cat([torch.ones(x.shape[1] - 1), torch.zeros(1)])).double()
    a_inv_xt = torch.linalg.solve(a, x.T)  # (D + 1, n)
    w = a_inv_xt @ y
    leverage = (x * a_inv_xt.T).sum(1)  # diagonal of the hat matrix x·A⁻¹·xᵀ
    loo = (y - (y - x @ w) / (1 - leverage)[:, None]).clamp(0, 1)
    # fold the standardisation into the weights, so the probe reads raw embeddings
    model.probe = torch.cat([w[:-1] / sd[:, None], (w[-1] - (mu / sd) @ w[:-1])[None]]).float()
    return {"n_crops": n_crops, "top1_loo": (loo.argmax(1) == y.argmax(1)).double().mean().item(),
            "mae_loo": (loo - y).abs().mean().item(), "chance": 1.0 / y.shape[1]}


# ------------------------------------------------------------------------------------------------ one API
def predict_positions(model: nn.Module, views: Views) -> torch.Tensor:
    """(S, K) position predictions for one volume's views, whatever `load_explorer_model` returned."""
    if isinstance(model, EncoderOnly):
        return model.predict(views)
    from voco_lib.pretrain import predict_positions as predict_with_heads

    return predict_with_heads(model, views)


def is_encoder_only(model: nn.Module) -> bool:
    """True for a file without VoCo's heads (released SSL files): predictions are raw-feature similarities."""
    return isinstance(model, EncoderOnly)


def prediction_title(model: nn.Module) -> str:
    if isinstance(model, EncoderOnly):
        what = "linear probe fitted on this volume" if model.probe is not None else "raw-feature ReLU(cos), no trained head"
        return f"{model.source.name}: {what}"
    return "VoCo heads: ReLU(cos(student(random), teacher(base)))"


@dataclasses.dataclass
class HitRate:
    """Top-1 position accuracy over many random crops of held-out volumes, against chance 1/K."""

    top1: float
    chance: float
    n_crops: int
    examples: list[tuple[Any, Views, torch.Tensor, bool]]  # (subject, views of one crop, prediction, hit)

    def __str__(self) -> str:
        return (f"held-out top-1 position accuracy {self.top1:.2f} over {self.n_crops} random crops "
                f"(chance {self.chance:.2f})")


def hit_rate(model: nn.Module, cfg: Profile, seed: int = 500_000, n_subjects: int = 4, crops: int = 16) -> HitRate:
    """How often the most similar base crop is a most-overlapped one (ties count), over `crops` uniformly
    placed random crops in each of `n_subjects` phantoms the run never trained on (seeds from `seed`): one
    showcase crop says little. Each crop is predicted alone (with the fixed second crop `explorer_starts` adds)."""
    from voco_lib.demo import fixed_views, phantom_subject

    g = torch.Generator().manual_seed(seed)
    hi = [r - c for r, c in zip(cfg.views.region, cfg.views.crop_size)]
    examples = []
    for i in range(n_subjects):
        subject = phantom_subject(seed + i, cfg)
        for _ in range(crops):
            start = [int(torch.randint(h + 1, (), generator=g)) for h in hi]
            views = fixed_views(subject.region, cfg, explorer_starts(model, start))
            pred = predict_positions(model, views)
            lab = views.labels[0]
            examples.append((subject, views, pred, bool(lab[pred[0].argmax()] == lab.max())))  # ties: any top base
    hits = sum(e[3] for e in examples)
    return HitRate(hits / len(examples), 1.0 / cfg.views.n_bases, len(examples), examples)


def hit_rate_crops(model: nn.Module, requested: int | None) -> int:
    """Crops per held-out phantom for 03's hit rate: as requested, else 16 for a run of ours and 0 for an
    encoder-only file (a released Swin-B embeds each crop with 9 base crops at 64³: ≈17 s per crop on a CPU)."""
    if requested is not None:
        return int(requested)
    return 0 if isinstance(model, EncoderOnly) else 16


def plot_hits_and_misses(rate: HitRate, cfg: Profile, per_kind: int = 2) -> Any:
    """The first `per_kind` hits and misses of `hit_rate`, one row each (prediction, truth, error): what a
    right and a wrong answer look like at this budget."""
    from matplotlib.figure import Figure

    from voco_lib import viz

    rows = ([e for e in rate.examples if e[3]][:per_kind] + [e for e in rate.examples if not e[3]][:per_kind])
    fig = Figure(figsize=(13, 3.6 * max(len(rows), 1)), layout="constrained")
    for sub, (subject, views, pred, hit) in zip(fig.subfigures(max(len(rows), 1), 1, squeeze=False)[:, 0], rows):
        start = views.random_boxes[0, :, 0].tolist()
        viz.plot_prediction(pred[0], views.labels[0], cfg.views.grid, subject.extent_mm[:2], fig=sub,
                            title=f"{'hit' if hit else 'miss'}: {subject.name}, crop at {start}")
    fig.suptitle(str(rate))
    return fig


def plot_prediction(model: nn.Module, pred: torch.Tensor, views: Views, cfg: Profile, subject: Any) -> Any:
    """`viz.plot_prediction` of the first random crop, titled and labelled by what produced `pred`."""
    from voco_lib import viz

    probe = isinstance(model, EncoderOnly) and model.probe is not None
    return viz.plot_prediction(pred[0], views.labels[0], cfg.views.grid, subject.extent_mm[:2],
                               title=prediction_title(model),
                               pred_name="probe prediction" if probe else "predicted similarity")


def load_explorer_model(checkpoint: str | Path | None, profile: Profile | str | None = None, device: str = "cpu",
                        encoder_views: str | ViewConfig = "auto") -> tuple[nn.Module, Profile]:
    """(model, its config) for `03_position_explorer`, from any of:

    - None: the notebooks' shared run of this profile (`demo.shared_pretrain_dir`), trained first if missing;
    - a run directory of ours (newest checkpoint) or a `checkpoints/step_*.pt` of one: VoCo with its heads;
    - any other file: an encoder-only file given by path (released `VoCo_*_SSL_head.pt`, `VoComni_*.pt`, a
      run's `encoder.pt`), loaded by `load_encoder_only` with the views `encoder_views` (see `encoder_config`).
    """
    from voco_lib.demo import pretrain_or_reuse
    from voco_lib.pretrain import VoCoModel, load_run
    from voco_lib.runs import read_config

    if checkpoint is None:
        checkpoint = pretrain_or_reuse(None, profile if isinstance(profile, str) or profile is None else profile.name,
                                       show_progress=True)
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{path}: a directory without config.yaml is not a pre-training run; pass a run "
                                    "directory of ours or a checkpoint file")
        cfg = profile_from_dict(read_config(path)["profile"])
        print(f"model: {path} (newest checkpoint; VoCo with its trained heads)")
        return load_run(path, device=device), cfg
    obj = load_checkpoint(path)  # names the file if it is missing or unreadable
    if isinstance(obj, dict) and RUN_KEYS <= set(obj) and isinstance(obj["config"], dict):
        cfg = profile_from_dict(obj["config"]["profile"])
        model = VoCoModel(cfg)
        model.load_state_dict(obj["model"])
        print(f"model: {path} (step {obj['step']}; VoCo with its trained heads)")
        return model.to(device).eval(), cfg
    model, cfg = load_encoder_only(path, profile, encoder_views, device, state=obj)
    print(f"model: {model.describe()}")
    return model, cfg


def explorer_widget(model: nn.Module, subject: Any, cfg: Profile, start: Sequence[int] | str = (0, 0, 0)) -> Any:
    """Sliders that move the random crop over the region, starting at `start` (the static figure's crop);
    shows the crop on the slices and the predicted similarities vs the true overlap labels (and the error),
    recomputed on every move. An axis along which the crop fills the region has no slider (nothing to move)."""
    import ipywidgets as W
    from IPython.display import display

    from voco_lib import viz
    from voco_lib.demo import fixed_views

    v = cfg.views
    hi = [r - c for r, c in zip(v.region, v.crop_size)]
    from voco_lib.demo import voxel_triple

    at = [min(max(0, v0), h) for v0, h in zip(voxel_triple(start), hi)]
    sliders = {ax: W.IntSlider(value=a, min=0, max=h, description=f"{ax} start", continuous_update=False)
               for ax, a, h in zip("xyz", at, hi)}
    out = W.Output()

    def update(x: int, y: int, z: int) -> None:
        views = fixed_views(subject.region, cfg, explorer_starts(model, (x, y, z)))
        pred = predict_positions(model, views)
        with out:
            out.clear_output(wait=True)
            display(viz.plane_views(subject.region, subject.spacing, views.base_boxes, views.random_boxes[:1],
                                    label=subject.label, title=subject.name,
                                    label_names=subject.label_names))
            display(plot_prediction(model, pred, views, cfg, subject))

    controls = W.interactive_output(update, sliders)
    return W.VBox([W.HBox([s for s in sliders.values() if s.max > 0]), out, controls])


def explorer_starts(model: nn.Module, start: Sequence[int]) -> list[list[int]]:
    """Random-crop starts to predict for the crop at `start`. With VoCo's heads a second, fixed crop keeps the
    batch (and so the heads' batch normalisation) the same for every position; an encoder alone needs none."""
    from voco_lib.demo import voxel_triple

    return [voxel_triple(start)] if isinstance(model, EncoderOnly) else [voxel_triple(start), [0, 0, 0]]
