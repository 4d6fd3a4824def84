"""Safe loading of VoCo / MONAI SwinUNETR checkpoints, with a coverage report; export; `voco weights`.

Upstream's loaders keep a random weight for every key whose name or shape does not match and say nothing
(Luffy03/Large-Scale-Medical VoComni/models/models.py:L152-191 and the
README's `load()`, commit 1ad538b). Here every load reports what was loaded, missing, unexpected and shape-mismatched, and
`load_encoder` fails, naming the missing keys, when less than the checkpoint kind promises was loaded.
Files are read with `torch.load(weights_only=True)` or as safetensors (no pickle at all); a pickle that would
run code is refused. Weights with NaN/inf or an integer dtype where a float belongs are refused by name (a NaN
weight otherwise trains on silently to a NaN loss).

Weights out: `export_weights` writes safetensors, the released `.pt` layout, or a MONAI bundle directory.
Released files whose sha256 the repository's manifest cannot record yet: a user who downloaded one registers
it (`voco weights add NAME PATH`) in a user-level manifest, after which `fetch_weights(NAME)` (and
`--init NAME`) returns that file, its sha256 checked again on every use.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONTAINER_KEYS = ("state_dict", "model", "network_weights", "net", "student")  # as Luffy03/Large-Scale-Medical VoComni/models/models.py:L152-191, plus `model`
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.")  # DDP, torch.compile, the authors' SSL wrapper
HEAD_PREFIXES = ("student.", "teacher.", "proj_head.", "heads.")  # SSL projection heads: not part of a SwinUNETR
ENCODER_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
MANIFEST = "checkpoints"
USER_MANIFEST = "user/checkpoints"  # schema data_manifests/schemas/user/checkpoints.json; the file lives in data_dir()
INTEGER_BUFFERS = ("relative_position_index", "num_batches_tracked")  # integer by design; every other tensor is a float
FORMATS = ("safetensors", "monai-bundle", "pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as promised; the message names the file and what to do."""


# ------------------------------------------------------------------------------------------------ reading
def load_checkpoint(path: str | Path) -> Any:
    """A checkpoint on CPU: safetensors (by content, whatever the suffix) or `torch.load(weights_only=True)`;
    a file that needs arbitrary code to unpickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file; check the path (or `voco weights fetch NAME`)")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({str(e)[:300]}); the file may be "
                                  "truncated: export or download it again") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()), "not a plain state dict")
        raise CheckpointError(
            f"{path}: refused: the file holds Python objects beyond tensors and plain containers, which could run "
            f"code when loaded ({detail[:300]}). Load only files from a source you trust; if you trust it, re-save "
            "it as a plain state dict: torch.save(model.state_dict(), PATH)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:300]}); "
                              "the file may be truncated: download it again") from None


def _is_safetensors(path: Path) -> bool:
    """safetensors starts with its JSON header's length (u64, little-endian) and then `{`; a torch zip with `PK`."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def check_weights(state: Mapping[str, torch.Tensor], where: str,
                  expected: Mapping[str, torch.Tensor] | None = None, limit: int = 5) -> None:
    """Refuse tensors with NaN/inf values and tensors whose dtype kind (float vs integer) is not the expected one.

    Expected: the model's tensor of the same name where `expected` (a model state dict) has it, else float for
    everything but the integer index buffers (`relative_position_index`). One CheckpointError names `where`, up
    to `limit` bad tensors per problem, and their count.
    """
    wrong, non_finite = [], []
    for k, v in state.items():
        ref = expected.get(k) if expected is not None else None
        want_float = ref.is_floating_point() if ref is not None else not k.endswith(INTEGER_BUFFERS)
        if v.is_floating_point() != want_float:
            wrong.append(f"{k} ({str(v.dtype).removeprefix('torch.')}, expected {'a float' if want_float else 'an integer'})")
        elif v.is_floating_point() and not bool(torch.isfinite(v).all()):
            non_finite.append(k)
    problems = []
    if non_finite:
        problems.append(f"{len(non_finite)} tensor(s) with NaN/inf values: {_names(non_finite, limit)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong dtype: {_names(wrong, limit)}")
    if problems:
        raise CheckpointError(f"{where}: refused: {'; '.join(problems)}. These are not usable weights (a diverged "
                              "run or a damaged file): export them again from a good checkpoint, or download again")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file as a flat, checked {SwinUNETR name: tensor} (see `normalize_state_dict`, `check_weights`)."""
    state = normalize_state_dict(load_checkpoint(path))
    check_weights(state, str(path))
    return state


def normalize_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} with SwinUNETR names from a checkpoint object.

    Unwraps containers (`state_dict`, `model`, `network_weights`, `net`, `student`), strips the prefixes
    `module.`, `_orig_mod.`, `backbone.` from every key, renames `swin_vit` to `swinViT`, and drops SSL
    projection-head keys (`student.*`, `teacher.*`, `proj_head.*`).
    """
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise CheckpointError(f"no state dict found: top-level keys {list(obj)[:10]}; expected tensors or one of "
                                  f"{CONTAINER_KEYS}")
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"a checkpoint must be a dict of tensors, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = _strip(key).replace("swin_vit", "swinViT")
        if not name.startswith(HEAD_PREFIXES):
            out[name] = value
    return out


def _is_state_dict(obj: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def _strip(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key, stripped = key[len(p):], True
    return key


# ------------------------------------------------------------------------------------------------ coverage
@dataclass
class CoverageReport:
    """What a state dict provides for a model: names loaded, missing, unexpected, and shape mismatches."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # name, ckpt, model
    expected: int = 0  # keys the checkpoint's kind promises (encoder keys, or all keys for a full model)
    kind: str = "encoder"

    @property
    def coverage(self) -> float:
        """Fraction of the promised keys that were loaded."""
        return len(self.loaded) / self.expected if self.expected else 0.0

    def summary(self) -> str:
        return (f"{self.kind}: loaded {len(self.loaded)}/{self.expected} ({self.coverage:.1%}), missing "
                f"{len(self.missing)}, shape-mismatched {len(self.mismatched)}, unexpected {len(self.unexpected)}")


def coverage(model_shapes: Mapping[str, torch.Size | tuple], state: Mapping[str, torch.Tensor]) -> CoverageReport:
    """Compare a model's {name: shape} with a normalised state dict, without loading anything.

    The promise is the encoder (swinViT.*, encoder1/2/3/4/10.*) unless the checkpoint has decoder keys, in
    which case it is the whole model.
    """
    full = any(not k.startswith(ENCODER_PREFIXES) for k in state if k in model_shapes)
    promised = [k for k in model_shapes if full or k.startswith(ENCODER_PREFIXES)]
    loaded, missing, mismatched = [], [], []
    for k in promised:
        if k not in state:
            missing.append(k)
        elif tuple(state[k].shape) != tuple(model_shapes[k]):
            mismatched.append((k, tuple(state[k].shape), tuple(model_shapes[k])))
        else:
            loaded.append(k)
    unexpected = [k for k in state if k not in model_shapes]
    return CoverageReport(loaded, missing, unexpected, mismatched, len(promised), "full model" if full else "encoder")


def load_encoder(model: nn.Module, path: str | Path | Mapping, min_coverage: float = 1.0,
                 name: str | None = None) -> CoverageReport:
    """Load a checkpoint (path or already loaded object) into `model` (ours or MONAI's SwinUNETR).

    Tensors whose name and shape match are loaded; the rest of the model keeps its weights. Raises
    CheckpointError naming the missing / mismatched keys when the loaded fraction of what the checkpoint
    promises (its encoder, or the whole model when it has a decoder) is below `min_coverage`, and before
    anything is loaded when a tensor is non-finite or of the wrong dtype (`check_weights`). `name`: what the
    errors call an already loaded object (e.g. the file it came from).
    """
    where = str(path) if isinstance(path, (str, Path)) else name or "<state dict>"
    state = normalize_state_dict(load_checkpoint(path) if isinstance(path, (str, Path)) else path)
    own = model.state_dict()
    check_weights(state, where, own)
    report = coverage({k: v.shape for k, v in own.items()}, state)
    if report.coverage < min_coverage:
        raise CheckpointError(
            f"{where}: {report.summary()}, below the required {min_coverage:.0%}. Missing: {_names(report.missing)}; "
            f"shape-mismatched (checkpoint vs model): {_names([f'{k} {a} vs {b}' for k, a, b in report.mismatched])}. "
            "Check feature_size / in_channels / out_channels against the checkpoint (`voco weights inspect PATH`), or "
            "pass a lower min_coverage to keep random weights for the rest")
    with torch.no_grad():
        for k in report.loaded:
            own[k].copy_(state[k])
    return report


def _names(names: list[str], limit: int = 20) -> str:
    if not names:
        return "none"
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ------------------------------------------------------------------------------------------------ writing
def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder part (swinViT + encoder1/2/3/4/10) with bare SwinUNETR names, as the released SSL files."""
    state = {_strip(k): v for k, v in model.state_dict().items()}
    out = {k: v.detach().cpu().clone() for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    if not out:
        raise CheckpointError(f"{type(model).__name__} has no swinViT./encoder* parameters: not a SwinUNETR encoder")
    return out


def export_encoder(model: nn.Module, path: str | Path) -> Path:
    """Write the encoder-only state dict (released `VoCo_*_SSL_head.pt` layout) atomically: temp file + rename."""
    from voco_lib.files import atomic_write

    state = encoder_state_dict(model)
    with atomic_write(path) as f:
        torch.save(state, f)
    return Path(path)


def weights_source(target: str | Path) -> Path:
    """The weights file of `target`: a pre-training run directory's `encoder.pt`, or the file itself."""
    p = Path(target)
    if p.is_dir():
        if not (p / "encoder.pt").is_file():
            raise FileNotFoundError(f"{p}: no encoder.pt (a pre-training run writes it when it finishes): finish the "
                                    "run (voco pretrain --resume) or pass a checkpoint file")
        return p / "encoder.pt"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such run directory or checkpoint file; check the path")
    return p


def export_weights(target: str | Path, fmt: str, out: str | Path | None = None,
                   out_channels: int | None = None) -> Path:
    """Write the weights of `target` (run dir or file) as `fmt`: "safetensors", "pt" or "monai-bundle".

    The content is the source's, with bare SwinUNETR names (an encoder stays an encoder, a full model stays
    full); "pt" is the released layout. Default `out`: beside the source (`X.safetensors`, `X_released.pt`,
    `X_bundle/`). Files are written atomically; a bundle is built in a temporary folder and renamed into place.
    """
    from voco_lib.files import atomic_write

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    src = weights_source(target)
    state = load_weights(src)
    default = {"safetensors": src.with_suffix(".safetensors"), "pt": src.with_name(f"{src.stem}_released.pt"),
               "monai-bundle": src.with_name(f"{src.stem}_bundle")}[fmt]
    dst = Path(out) if out else default
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: is the source file itself; pass another --out")
    if fmt == "monai-bundle":
        return export_bundle(state, dst, out_channels, source=str(src))
    with atomic_write(dst) as f:
        if fmt == "pt":
            torch.save(state, f)
        else:
            from safetensors.torch import save

            f.write(save({k: v.contiguous() for k, v in state.items()}, metadata={"source": src.name}))
    return dst


def export_bundle(state: Mapping[str, torch.Tensor], out: str | Path, out_channels: int | None = None,
                  source: str = "<state dict>") -> Path:
    """A MONAI bundle directory: configs/metadata.json, configs/inference.json (a MONAI SwinUNETR-v2), models/model.pt.

    models/model.pt is the full SwinUNETR state dict (loads with strict=True): the encoder from `state`; the
    decoder and output layer from `state` too when it has them, else MONAI's initialisation under seed 0 (so
    `out_channels` is needed, and the bundle's description says to fine-tune before use).
    """
    from monai.networks.nets import SwinUNETR

    from voco_lib.files import write_text

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; pass a new --out or remove it first")
    embed = state.get("swinViT.patch_embed.proj.weight")
    if embed is None:
        raise CheckpointError(f"{source}: no swinViT.patch_embed.proj.weight: not a SwinUNETR checkpoint")
    fs, cin = int(embed.shape[0]), int(embed.shape[1])
    head = state.get("out.conv.conv.weight")
    if head is not None and out_channels not in (None, int(head.shape[0])):
        raise ValueError(f"{source}: has {int(head.shape[0])} output channels, not --out-channels {out_channels}; "
                         "drop --out-channels")
    k = int(head.shape[0]) if head is not None else out_channels
    if k is None:
        raise ValueError(f"{source}: encoder only, so the bundle's output layer needs its size: pass --out-channels K "
                         "(classes including background)")
    torch.manual_seed(0)
    net = SwinUNETR(in_channels=cin, out_channels=k, feature_size=fs, use_v2=True)
    load_encoder(net, state, name=source)
    inference, metadata = _bundle_configs(fs, cin, k, Path(source).name, head is not None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        (tmp / "models").mkdir()
        torch.save(net.state_dict(), tmp / "models" / "model.pt")
        write_text(tmp / "configs" / "inference.json", json.dumps(inference, indent=2) + "\n")
        write_text(tmp / "configs" / "metadata.json", json.dumps(metadata, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        os.rename(tmp, out)  # fails rather than merge if `out` appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _bundle_configs(fs: int, cin: int, k: int, source: str, has_head: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """configs/inference.json and configs/metadata.json of a bundle around a SwinUNETR-v2 with k outputs."""
    import monai
    import numpy as np

    roi = [96, 96, 96]
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "monai.networks.nets.SwinUNETR", "in_channels": cin, "out_channels": k,
                        "feature_size": fs, "use_v2": True, "spatial_dims": 3},
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "inferer": {"_target_": "monai.inferers.SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 2,
                    "overlap": 0.75},
        "initialize": ["$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))"],
    }
    decoder = "decoder and output layer from the same checkpoint" if has_head else (
        "decoder and output layer randomly initialised (seed 0): fine-tune before use")
    shape = ["32*n"] * 3  # every side a multiple of 32 and at least 64 (n ≥ 2: encoder10's instance norm needs > 1³)
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported by `voco weights export --format monai-bundle`"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {},
        "task": "3D segmentation with a VoCo-pre-trained Swin encoder",
        "description": f"SwinUNETR-v2 (feature_size {fs}) with the encoder of {source}; {decoder}",
        "authors": "exported by voco",
        "copyright": "see the licence of the source checkpoint",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CT", "num_channels": cin,
                                 "spatial_shape": shape, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {str(c): f"channel {c}" for c in range(cin)}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": k, "spatial_shape": shape,
                                 "dtype": "float32", "value_range": [], "is_patch_data": True,
                                 "channel_def": {str(c): f"class {c}" for c in range(k)}}},
        },
    }
    return inference, metadata


# ------------------------------------------------------------------------------------------------ registry
def released(manifest: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The released checkpoints by name, from `data_manifests/checkpoints.yaml` (or another manifest file)."""
    from voco_lib.data.manifests import load_manifest, validate_manifest

    if manifest is None:
        doc = load_manifest(MANIFEST)
    else:
        import yaml

        doc = yaml.safe_load(Path(manifest).read_text())
        validate_manifest(doc, MANIFEST, manifest)
    return {c["name"]: c for c in doc["checkpoints"]}


def user_manifest_path() -> Path:
    """The user's own checkpoint registry (not the repository's): `$VOCO_DATA_DIR/checkpoints.user.yaml`,
    else `~/.cache/voco/checkpoints.user.yaml`."""
    from voco_lib.data.manifests import data_dir

    return data_dir() / "checkpoints.user.yaml"


def user_weights() -> dict[str, dict[str, Any]]:
    """Checkpoints the user registered with `voco weights add`, by name (validated; empty when none)."""
    import yaml

    from voco_lib.data.manifests import ManifestError, validate_manifest

    path = user_manifest_path()
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML ({str(e)[:200]}); fix it, or delete it and register the "
                            "files again (voco weights add NAME PATH)") from None
    validate_manifest(doc, USER_MANIFEST, path)
    return {c["name"]: c for c in doc["checkpoints"]}


def add_weights(name: str, path: str | Path) -> dict[str, Any]:
    """Register a downloaded checkpoint under `name` in the user manifest, after checking that it is a complete
    SwinUNETR (encoder or full model) and, for a released name, the released architecture. Returns the entry."""
    import yaml

    from voco_lib.data.manifests import validate_manifest
    from voco_lib.files import sha256, write_text

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"checkpoint name {name!r}: use letters, digits, '_', '-', '.' only")
    path = Path(path).resolve()
    info, report = describe(path)
    if report is None:
        raise CheckpointError(f"{path}: {info['architecture']}; only SwinUNETR checkpoints can be added "
                              "(nnU-Net weights: voco nnunet check)")
    if report.coverage < 1.0:
        raise CheckpointError(f"{path}: {report.summary()} of a SwinUNETR with feature_size {info['feature_size']}; "
                              f"missing: {_names(report.missing)}; shape-mismatched: "
                              f"{_names([k for k, _, _ in report.mismatched])}: not a complete checkpoint (download again)")
    kind = "swinunetr" if "out_channels" in info else "encoder"
    arch = {k: info[k] for k in ("feature_size", "in_channels", "out_channels") if k in info}
    release = released().get(name)
    if release is not None:
        if release["kind"] != kind:
            raise CheckpointError(f"{path}: kind {kind}, but {name} is kind {release['kind']} in "
                                  "data_manifests/checkpoints.yaml; add it under another name")
        for key, value in release["architecture"].items():
            if key in arch and arch[key] != value:
                raise CheckpointError(f"{path}: {key} {arch[key]}, but {name} ({release['file']}) has {key} {value} "
                                      "in data_manifests/checkpoints.yaml: not that file; add it under another name")
    entry = {"name": name, "path": str(path), "sha256": sha256(path), "kind": kind, "architecture": arch,
             "tensors": int(info["tensors"])}
    entries = {**user_weights(), name: entry}
    doc = {"name": "checkpoints.user", "checkpoints": list(entries.values())}
    validate_manifest(doc, USER_MANIFEST, user_manifest_path())
    write_text(user_manifest_path(), yaml.safe_dump(doc, sort_keys=False))
    return entry


def _registered_file(entry: dict[str, Any]) -> Path:
    """A user-registered file, its sha256 checked again (a file replaced since `voco weights add` is refused)."""
    from voco_lib.files import sha256

    path, manifest = Path(entry["path"]), user_manifest_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: registered as {entry['name']} in {manifest} but missing; put it back or "
                                f"register the file again: voco weights add {entry['name']} FILE")
    got = sha256(path)
    if got != entry["sha256"]:
        raise CheckpointError(f"{path}: sha256 {got[:12]}… differs from {entry['sha256'][:12]}… recorded when it was "
                              f"added as {entry['name']} ({manifest}): the file changed; check it and add it again "
                              f"(voco weights add {entry['name']} {path})")
    return path


def fetch_weights(name: str, out_dir: str | Path | None = None, manifest: str | Path | None = None,
                  progress: bool = True) -> Path:
    """A checkpoint by name: a file registered with `voco weights add` (sha256 re-checked), else a released
    checkpoint downloaded into `out_dir` (default: data dir/checkpoints) and checked against its sha256."""
    from voco_lib.data.fetch import fetch_file
    from voco_lib.data.manifests import data_dir

    user = user_weights()
    if name in user:
        return _registered_file(user[name])
    entries = released(manifest)
    if name not in entries:
        raise CheckpointError(f"unknown checkpoint {name!r}; known: {sorted(entries)}, registered: {sorted(user)} "
                              "(`voco weights list`; register a file with `voco weights add NAME PATH`)")
    entry = entries[name]
    if not entry.get("sha256"):
        raise CheckpointError(
            f"{name}: no sha256 recorded in data_manifests/checkpoints.yaml, so the download cannot be verified. "
            f"Download {entry['url']} yourself and register it: voco weights add {name} FILE (it checks the "
            "architecture and coverage and records the file's sha256)")
    out = Path(out_dir) if out_dir else data_dir() / "checkpoints"
    return fetch_file(entry["url"], entry["sha256"], out, fname=entry["file"], progress=progress)


def describe(path: str | Path) -> tuple[dict[str, Any], CoverageReport | None]:
    """What a checkpoint file holds (tensors, parameters, feature size, classes) and its coverage of the
    matching SwinUNETR, compared on the meta device (no weights allocated). Bad tensors are refused."""
    from voco_lib.backbone import build_backbone

    state = load_weights(path)
    info: dict[str, Any] = {"tensors": len(state), "values": sum(v.numel() for v in state.values()),
                            "first_keys": list(state)[:5]}
    embed = state.get("swinViT.patch_embed.proj.weight")
    if embed is None:
        info["architecture"] = "not a SwinUNETR (no swinViT.patch_embed.proj.weight)"
        return info, None
    fs, cin = int(embed.shape[0]), int(embed.shape[1])
    out = state.get("out.conv.conv.weight")
    info.update(feature_size=fs, in_channels=cin)
    if out is not None:
        info["out_channels"] = int(out.shape[0])
    with torch.device("meta"):
        model = build_backbone(fs, in_channels=cin, out_channels=None if out is None else int(out.shape[0]))
    return info, coverage({k: v.shape for k, v in model.state_dict().items()}, state)


def cli_weights(args: argparse.Namespace) -> int:
    """`voco weights list | fetch NAME | inspect PATH | export RUN_DIR|PATH --format F [--out P] | add NAME PATH`."""
    if args.action == "list":
        for name, c in released().items():
            arch = c["architecture"]
            print(f"{name:18} {c['kind']:9} fs={arch.get('feature_size', '-')!s:4} {c['size']:22} "
                  f"sha256={'recorded' if c['sha256'] else 'unknown (fetch refuses)'}  {c['url']}")
        for name, c in user_weights().items():
            print(f"{name:18} {c['kind']:9} fs={c['architecture']['feature_size']!s:4} registered "
                  f"({user_manifest_path()}) sha256={c['sha256'][:12]}…  {c['path']}")
        return 0
    needs = {"fetch": "NAME", "inspect": "PATH", "export": "RUN_DIR|PATH", "add": "NAME PATH"}[args.action]
    if not args.target or (args.action == "add" and not getattr(args, "path", None)):
        raise ValueError(f"`voco weights {args.action}` needs {needs}")
    if args.action == "fetch":
        print(fetch_weights(args.target, args.out))
        return 0
    if args.action == "export":
        if not getattr(args, "format", None):
            raise ValueError(f"`voco weights export` needs --format {'|'.join(FORMATS)}")
        print(export_weights(args.target, args.format, args.out, getattr(args, "out_channels", None)))
        return 0
    if args.action == "add":
        entry = add_weights(args.target, args.path)
        print(f"registered {entry['name']} -> {entry['path']} (sha256 {entry['sha256']}) in {user_manifest_path()}; "
              f"`--init {entry['name']}` and `voco weights fetch {entry['name']}` now use it")
        return 0
    info, report = describe(args.target)
    for k, v in info.items():
        print(f"{k}: {v}")
    if report is not None:
        print(report.summary())
        for label, names in (("missing", report.missing), ("unexpected", report.unexpected),
                             ("shape-mismatched", [f"{k} {a} vs {b}" for k, a, b in report.mismatched])):
            if names:
                print(f"{label}: {_names(names)}")
    return 0
