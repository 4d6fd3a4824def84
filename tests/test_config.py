"""One config path: profiles + typed overrides, and a run's config.yaml read back into the same Profile."""

from __future__ import annotations

import pytest
import yaml

from voco_lib.config import PROFILES, profile_from_dict, resolve, to_dict


@pytest.mark.parametrize("order", [["views.grid=3x3x1", "views.region=96x96x32"],
                                   ["views.region=96x96x32", "views.grid=3x3x1"]])
def test_overrides_of_one_section_are_validated_together(order):
    # cpu: region 64x64x32, grid 2x2x1. Alone, grid 3x3x1 does not divide 64 and region 96 is not
    # divisible by grid 2: only the pair is valid, whichever comes first.
    cfg = resolve("cpu", order)
    assert cfg.views.region == (96, 96, 32) and cfg.views.grid == (3, 3, 1) and cfg.views.crop_size == (32, 32, 32)
    with pytest.raises(ValueError, match="not divisible"):
        resolve("cpu", ["views.grid=3x3x1"])


def test_override_types_and_unknown_keys():
    cfg = resolve("cpu", {"train.lr": "1e-3", "views.augment": "true", "finetune.steps": "7", "steps": "3"})
    assert cfg.train.lr == 1e-3 and cfg.views.augment is True and cfg.finetune.steps == 7 and cfg.steps == 3
    # fields that default to None take their declared type
    ft = resolve("gpu", ["finetune.lr=3e-4", "finetune.roi=96x96x96", "finetune.eval_every=none"]).finetune
    assert ft.lr == 3e-4 and isinstance(ft.lr, float) and ft.roi == (96, 96, 96) and ft.eval_every is None
    with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
        resolve("cpu", ["train.nope=1"])


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_round_trips_through_yaml(name, monkeypatch):
    monkeypatch.delenv("VOCO_PROFILE", raising=False)
    cfg = resolve(name, ["finetune.roi=48x48x48", "train.lr=2e-4"])
    back = profile_from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert back == cfg and back.finetune.roi == (48, 48, 48)
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        profile_from_dict({**to_dict(cfg), "train": {**to_dict(cfg)["train"], "bogus": 1}})
