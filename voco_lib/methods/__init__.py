"""The pre-training methods on the one loop: `method=NAME` picks one of `REGISTRY`.

Each method shares the encoder, the views/data pipeline, the optimizer, the schedule and the budget, and
brings its own model (heads, decoders), step and pretext evaluation. Every model exposes `.encoder` (the
SwinUNETR-named Swin encoder), so every method exports the same released-layout `encoder.pt` and every
downstream path takes it unchanged. The config side (the overrides a name expands to, the method's
hyper-parameters) is `voco_lib.config.METHODS` and its `mae` / `swinssl` sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from voco_lib.config import Profile
from voco_lib.crops import Views
from voco_lib.methods import mae, swinssl, voco

StepFn = Callable[[nn.Module, nn.Module, Views, bool], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EvalFn = Callable[[nn.Module, list[Views], int], dict[str, float]]


@dataclass(frozen=True)
class Method:
    """name, model factory, `step(net, model, views, first_micro) -> (loss, logs)`, `evaluate(model, held-out
    views, batch size) -> pretext metrics`, and how many encoder passes each crop of a step costs."""

    name: str
    build_model: Callable[[Profile], nn.Module]
    step: StepFn
    evaluate: EvalFn
    metric: str  # the continuous pretext metric that says it learns (voco: mean |label − predicted position|)
    higher_is_better: bool
    passes: int = 1

    def export(self, model: nn.Module, path: str | Path) -> Path:
        """The released-layout encoder file (the same for every method)."""
        from voco_lib.checkpoints import export_encoder

        return export_encoder(model.encoder, path)


REGISTRY: dict[str, Method] = {
    "voco": Method("voco", voco.VoCoModel, voco.voco_step, voco.evaluate, "mae", False),
    "voco-cvpr": Method("voco-cvpr", voco.VoCoModel, voco.voco_step, voco.evaluate, "mae", False),
    "voco-single": Method("voco-single", voco.VoCoSingleModel, voco.single_step, voco.evaluate, "mae", False),
    "mae": Method("mae", mae.MaskedModel, mae.step, mae.evaluate, "recon_l1", False),
    "swin-ssl": Method("swin-ssl", swinssl.SwinSSLModel, swinssl.step, swinssl.evaluate, "loss", False,
                       passes=2),
}


def get_method(name: str) -> Method:
    """The method of a resolved profile's `method` (see `voco_lib.config.method_name` for aliases)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method={name!r}; choose one of {sorted(REGISTRY)}") from None


def budget(cfg: Profile, global_batch: int) -> str:
    """The equal-budget figure: steps × volumes per step × crops per volume × crop voxels (+ encoder passes)."""
    crop = cfg.views.out_size or cfg.views.crop_size
    crops = cfg.views.n_random + cfg.views.n_bases
    voxels = cfg.steps * global_batch * crops * crop[0] * crop[1] * crop[2]
    passes = REGISTRY[cfg.method].passes
    return (f"budget {cfg.steps} steps × {global_batch} volumes × {crops} crops × {'x'.join(map(str, crop))} = "
            f"{voxels:.3g} crop voxels, {passes} encoder pass{'es' if passes > 1 else ''} per crop")
