"""One config path: profiles + typed overrides, and a run's config.yaml read back into the same Profile."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from voco_lib.config import PRESETS, PROFILES, DataConfig, TrainConfig, profile_from_dict, profile_name, resolve, to_dict


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


# ------------------------------------------------------------------------------------------------ range checks
BAD_VALUES = [
    ("steps", "0"), ("batch_size", "0"), ("n_volumes", "-1"), ("feature_size", "18"), ("feature_size", "0"),
    ("train.accum", "0"), ("train.checkpoint_every", "0"), ("train.eval_every", "0"), ("train.log_every", "0"),
    ("train.keep_last", "0"), ("train.lr", "0"), ("train.lr", "-1e-4"), ("train.warmup_steps", "-1"),
    ("train.amp", "fp8"), ("train.ema_scope", "both"), ("train.clip", "-1"),
    ("views.n_random", "0"), ("views.flip_p", "1.5"),
    ("loss.variant", "mae"), ("loss.form", "other"),
    ("heads.dropout_p", "1"), ("heads.ema_momentum", "1.1"), ("heads.teacher_init", "zeros"),
    ("data.workers", "-1"), ("data.n_eval", "-1"), ("data.region_mode", "stretch"), ("data.phantom_spacing", "0"),
    ("finetune.steps", "0"), ("finetune.batch_size", "0"), ("finetune.accum", "0"), ("finetune.lr", "0"),
    ("finetune.checkpoint_every", "0"), ("finetune.eval_every", "0"), ("finetune.keep_last", "0"),
    ("finetune.n_train", "0"), ("finetune.n_val", "0"), ("finetune.sw_overlap", "1"), ("finetune.sw_overlap", "-0.1"),
    ("finetune.amp", "fp8"), ("finetune.warmup_steps", "-1"), ("finetune.roi", "0x32x32"),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_out_of_range_values_fail_when_the_config_is_built_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"^{re.escape(key)} must be .*, got .*; set e\.g\. {re.escape(key)}="):
        resolve("smoke", [f"{key}={value}"])


def test_the_suggested_fix_is_itself_valid():
    for key, value in BAD_VALUES:
        with pytest.raises(ValueError) as err:
            resolve("smoke", [f"{key}={value}"])
        resolve("smoke", [str(err.value).rsplit("set e.g. ", 1)[1]])


def test_optional_values_and_edges_are_accepted():
    cfg = resolve("smoke", ["finetune.lr=none", "finetune.steps=none", "finetune.eval_every=none", "data.workers=0",
                            "data.n_eval=0", "train.warmup_steps=0", "heads.ema_momentum=1", "finetune.sw_overlap=0",
                            "feature_size=24", "heads.dropout_p=0"])
    assert cfg.finetune.lr is None and cfg.feature_size == 24


def test_a_stored_config_is_range_checked_too():
    d = to_dict(resolve("smoke"))
    with pytest.raises(ValueError, match="train.accum must be ≥ 1, got 0"):
        profile_from_dict({**d, "train": {**d["train"], "accum": 0}})


# ------------------------------------------------------------------------------------------------ profiles
def test_profiles_are_one_table_with_their_finetune_and_data_sections():
    assert PROFILES["smoke"].finetune.steps == 4 and PROFILES["cpu"].finetune.roi == (32, 32, 32)
    assert PROFILES["gpu"].finetune.amp == "bf16" and PROFILES["paper"].finetune.amp == "fp16"
    assert PROFILES["smoke"].data.region_mode == "resize" and PROFILES["smoke"].data.n_eval == 2
    assert PROFILES["paper"].data == DataConfig(workers=16)


def test_data_settings_live_in_their_own_section_and_round_trip():
    cfg = resolve("cpu", ["data.workers=2", "data.chain=cvpr", "data.phantom_shape=40x40x32", "data.cache_dir=/tmp/c"])
    assert cfg.data == DataConfig(workers=2, chain="cvpr", region_mode="resize", cache_dir="/tmp/c",
                                  phantom_shape=(40, 40, 32), phantom_spacing=3.0, n_eval=4)
    back = profile_from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert back == cfg and isinstance(back.data, DataConfig) and back.data.phantom_shape == (40, 40, 32)
    assert not {"workers", "chain", "n_eval"} & {f.name for f in dataclasses.fields(TrainConfig)}
    with pytest.raises(ValueError, match="unknown config key 'train.workers'"):
        resolve("cpu", ["train.workers=2"])


# ------------------------------------------------------------------------------------------------ method=
def test_method_cvpr_expands_in_resolve():
    cfg = resolve("smoke", ["method=voco-cvpr"])
    assert (cfg.loss.variant, cfg.train.ema_scope, cfg.train.sync_bn, cfg.heads.dropout_p, cfg.heads.out_dim) == \
        ("cvpr", "full", True, 0.0, 2048)
    assert cfg.views == PROFILES["smoke"].views  # the phantom profiles keep their own small views
    assert resolve("paper", ["method=cvpr"]).views == PRESETS["cvpr"]
    assert resolve("gpu", {"method": "cvpr"}).views.grid == (4, 4, 1)
    assert resolve("smoke", ["method=tpami"]) == resolve("smoke")  # the old names are aliases
    assert resolve("smoke", ["method=cvpr"]) == cfg and cfg.method == "voco-cvpr"
    # an explicit key beats the method's, in either order
    assert resolve("smoke", ["heads.out_dim=512", "method=cvpr"]).heads.out_dim == 512


def test_unknown_method_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown method='simclr'; choose one of \['mae', 'swin-ssl', 'voco', "
                                         r"'voco-cvpr', 'voco-single'\] \(aliases: tpami=voco, cvpr=voco-cvpr\)"):
        resolve("smoke", ["method=simclr"])
    with pytest.raises(ValueError, match="method must be one of"):  # a stored profile is checked too
        profile_from_dict({**to_dict(resolve("smoke")), "method": "simclr"})


# ------------------------------------------------------------------------------------------------ VOCO_PROFILE
def test_an_explicit_profile_beats_voco_profile(monkeypatch, capsys):
    monkeypatch.setenv("VOCO_PROFILE", "smoke")
    assert resolve("cpu").name == "cpu" and profile_name("paper") == "paper"
    assert "VOCO_PROFILE" not in capsys.readouterr().err


def test_no_profile_takes_voco_profile_and_says_so(monkeypatch, capsys):
    monkeypatch.setenv("VOCO_PROFILE", "smoke")
    assert resolve(None).name == "smoke"
    assert capsys.readouterr().err.strip() == "voco: profile smoke from VOCO_PROFILE (no profile given)"
    monkeypatch.delenv("VOCO_PROFILE")
    assert resolve().name == "cpu" and capsys.readouterr().err == ""
    monkeypatch.setenv("VOCO_PROFILE", "huge")
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        resolve()


def test_a_reloaded_run_keeps_its_stored_profile(monkeypatch):
    """Both loops reload the profile stored in config.yaml (profile_from_dict), and an explicitly named profile
    (as a stored name re-resolved with its overrides) beats VOCO_PROFILE."""
    monkeypatch.delenv("VOCO_PROFILE", raising=False)
    stored = yaml.safe_dump(to_dict(resolve("cpu", ["steps=7"])))
    prov = {"profile": "cpu", "overrides": ["finetune.steps=9"]}
    monkeypatch.setenv("VOCO_PROFILE", "smoke")
    back = profile_from_dict(yaml.safe_load(stored))
    assert back.name == "cpu" and back.steps == 7 and back.data.n_eval == 4
    again = resolve(prov["profile"], prov["overrides"])
    assert again.name == "cpu" and again.finetune.steps == 9 and again.finetune.n_train == PROFILES["cpu"].finetune.n_train


def test_library_and_cli_defaults_leave_the_profile_unset():
    import inspect

    from voco_lib.cli import build_parser
    from voco_lib.pretrain import run_pretraining
    from voco_lib.tasks import finetune

    assert inspect.signature(run_pretraining).parameters["profile"].default is None
    assert inspect.signature(finetune).parameters["profile"].default is None
    for argv in (["pretrain", "--out", "r"], ["finetune", "phantom-seg"], ["demo"]):
        assert build_parser().parse_args(argv).profile is None
