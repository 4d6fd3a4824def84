"""Safe loading of VoCo / MONAI SwinUNETR checkpoints, with a coverage report; export; `voco weights`.

Upstream's loaders keep a random weight for every key whose name or shape does not match and say nothing
(method spec §8.4). Here every load reports what was loaded, missing, unexpected and shape-mismatched, and
`load_encoder` fails, naming the missing keys, when less than the checkpoint kind promises was loaded.
Files are read with `torch.load(weights_only=True)` only: a pickle that would run code is refused.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONTAINER_KEYS = ("state_dict", "model", "network_weights", "net", "student")  # spec §8.4-8.5
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.")  # DDP, torch.compile, the authors' SSL wrapper
HEAD_PREFIXES = ("student.", "teacher.", "proj_head.", "heads.")  # SSL projection heads: not part of a SwinUNETR
ENCODER_PREFIXES = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.")
MANIFEST = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as promised; the message names the file and what to do."""


# ------------------------------------------------------------------------------------------------ reading
def load_checkpoint(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; a file that needs arbitrary code to unpickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file; check the path (or `voco weights fetch NAME`)")
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


def normalize_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} with SwinUNETR names from a checkpoint object.

    Unwraps containers (`state_dict`, `model`, `network_weights`, `net`, `student`), strips the prefixes
    `module.`, `_orig_mod.`, `backbone.` from every key, renames `swin_vit` to `swinViT`, and drops SSL
    projection-head keys (spec §8.5).
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
    promises (its encoder, or the whole model when it has a decoder) is below `min_coverage`. `name`: what
    the errors call an already loaded object (e.g. the file it came from).
    """
    where = str(path) if isinstance(path, (str, Path)) else name or "<state dict>"
    state = normalize_state_dict(load_checkpoint(path) if isinstance(path, (str, Path)) else path)
    own = model.state_dict()
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


def fetch_weights(name: str, out_dir: str | Path | None = None, manifest: str | Path | None = None,
                  progress: bool = True) -> Path:
    """Download a released checkpoint (checked against its sha256) into `out_dir` (default: data dir/checkpoints)."""
    from voco_lib.data.fetch import fetch_file
    from voco_lib.data.manifests import data_dir

    entries = released(manifest)
    if name not in entries:
        raise CheckpointError(f"unknown checkpoint {name!r}; known: {sorted(entries)} (`voco weights list`)")
    entry = entries[name]
    if not entry.get("sha256"):
        raise CheckpointError(
            f"{name}: no sha256 recorded in data_manifests/checkpoints.yaml, so the download cannot be verified. "
            f"Download {entry['url']} yourself, check it with `voco weights inspect FILE`, and add its "
            "`sha256sum` to the manifest entry")
    out = Path(out_dir) if out_dir else data_dir() / "checkpoints"
    return fetch_file(entry["url"], entry["sha256"], out, fname=entry["file"], progress=progress)


def describe(path: str | Path) -> tuple[dict[str, Any], CoverageReport | None]:
    """What a checkpoint file holds (tensors, parameters, feature size, classes) and its coverage of the
    matching SwinUNETR, compared on the meta device (no weights allocated)."""
    from voco_lib.backbone import build_encoder, build_swinunetr

    state = normalize_state_dict(load_checkpoint(path))
    info: dict[str, Any] = {"tensors": len(state), "values": sum(v.numel() for v in state.values()),
                            "first_keys": list(state)[:5]}
    embed = state.get("swinViT.patch_embed.proj.weight")
    if embed is None:
        info["architecture"] = "not a SwinUNETR (no swinViT.patch_embed.proj.weight)"
        return info, None
    fs, cin = int(embed.shape[0]), int(embed.shape[1])
    out = state.get("out.conv.conv.weight")
    info.update(feature_size=fs, in_channels=cin)
    with torch.device("meta"):
        if out is not None:
            info["out_channels"] = int(out.shape[0])
            model = build_swinunetr(fs, int(out.shape[0]), cin)
        else:
            model = build_encoder(fs, cin)
    return info, coverage({k: v.shape for k, v in model.state_dict().items()}, state)


def cli_weights(args: argparse.Namespace) -> int:
    """`voco weights list | fetch NAME | inspect PATH`."""
    if args.action == "list":
        for name, c in released().items():
            arch = c["architecture"]
            print(f"{name:18} {c['kind']:9} fs={arch.get('feature_size', '-')!s:4} {c['size']:22} "
                  f"sha256={'recorded' if c['sha256'] else 'unknown (fetch refuses)'}  {c['url']}")
        return 0
    if not args.target:
        raise ValueError(f"`voco weights {args.action}` needs a {'NAME' if args.action == 'fetch' else 'PATH'}")
    if args.action == "fetch":
        print(fetch_weights(args.target, args.out))
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
