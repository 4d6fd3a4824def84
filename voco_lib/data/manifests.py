"""Datalists (MSD-style JSON) and fact manifests (`data_manifests/`), read and written in one place.

Datalists follow the layout the authors' lists and MONAI's `load_decathlon_datalist` use:
`{"training": [{"image": "rel/x.nii.gz", "label": "rel/y.nii.gz"}, ...], "validation": [...], ...}` with
optional header fields. Paths are stored relative to the JSON's folder (so a data folder can be moved
or shared) and returned absolute, so no caller ever has to know the data root.

Manifests are YAML files of facts (dataset counts, licences, sha256 of downloads) validated against a
JSON schema in `data_manifests/schemas/<kind>.json` with `additionalProperties: false`, so a typo in a
field name fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from voco_lib.files import publish
from voco_lib.data.volumes import check_datalist_files, source_exists

PATH_KEYS = ("image", "label")


class ManifestError(ValueError):
    """A manifest or datalist that does not match its schema; the message names the file, the field and the fix."""


def data_dir() -> Path:
    """Root for downloaded data: `$VOCO_DATA_DIR`, else `~/.cache/voco` (not created here)."""
    env = os.environ.get("VOCO_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "voco"


def manifests_dir() -> Path:
    """The repository's `data_manifests/` folder (next to the package; the repo is installed with `pip install -e`)."""
    d = Path(__file__).resolve().parents[2] / "data_manifests"
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: data_manifests/ not found next to the voco_lib package; install the "
                                "repository in editable mode (pip install -e .) from a full checkout")
    return d


# ----------------------------------------------------------------------------------------------- datalists
def _json_type(v: Any) -> str:
    """The JSON name of a parsed value's type, for messages about a datalist."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


def _check_entry(entry: Any, where: str, require: Sequence[str]) -> dict[str, Any]:
    """Copy of one datalist entry with `images` renamed to `image`, checked: an object that has every key of
    `require`, each path field a string or a non-empty list of strings. `where` names file, split and index."""
    if not isinstance(entry, dict):
        raise ManifestError(f"{where} is {_json_type(entry)} ({json.dumps(entry)[:80]}), not an object — "
                            'write entries as {"image": "path", "label": "path"}')
    out = dict(entry)
    if "images" in out:
        if "image" in out:
            raise ManifestError(f"{where} has both 'image' and 'images' — keep only 'image'")
        out["image"] = out.pop("images")
    for k in require:
        if k not in out:
            raise ManifestError(f"{where} has no '{k}' field (keys: {sorted(out)}) — add the {k} file's path"
                                + (", or drop the entry" if k != "image" else ""))
    for k in (k for k in PATH_KEYS if k in out):
        v = out[k]
        if not (isinstance(v, str) and v or isinstance(v, list) and v and all(isinstance(x, str) and x for x in v)):
            raise ManifestError(f"{where}: '{k}' is {json.dumps(v)}, not a file path — write the path as a string "
                                '(e.g. "imagesTr/case_001.nii.gz"), or a list of paths, one per channel')
    return out


def _absolute(entry: dict[str, Any], root: Path) -> dict[str, Any]:
    """Copy of a checked entry with its path fields made absolute under `root`."""
    out = dict(entry)
    for k in PATH_KEYS:
        if k in out:
            v = out[k]
            out[k] = [os.path.normpath(root / p) for p in v] if isinstance(v, list) else os.path.normpath(root / v)
    return out


def _relative(entry: dict[str, Any], folder: Path) -> dict[str, Any]:
    out = dict(entry)
    if "images" in out and "image" not in out:
        out["image"] = out.pop("images")
    for k in PATH_KEYS:
        if k in out:
            v = out[k]
            rel = lambda p: Path(os.path.relpath(os.path.abspath(p), folder)).as_posix() if os.path.isabs(p) else Path(p).as_posix()  # noqa: E731
            out[k] = [rel(p) for p in v] if isinstance(v, list) else rel(v)
    return out


def datalist_file(path: str | Path) -> Path:
    """`path` as a datalist file; a folder and a missing file each get a message that says what to pass instead."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: is a folder, not a datalist — write one with `voco datalist {path} --out "
                            "FILE.json` (`voco pretrain --data DIR` lists a folder itself); --data also takes "
                            "phantom | samples")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist not found — create it (voco phantom / voco fetch samples) or fix "
                                "the path")
    return path


def _split(path: Path, split: str) -> list[Any]:
    """The raw entry list of one split. The document must be a JSON object with a 'training' list; another split
    that is absent raises KeyError (callers may treat an absent `validation` as empty)."""
    try:
        doc = json.loads(datalist_file(path).read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e}) — fix the file or regenerate it") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not a text file ({e}) — --data takes a datalist JSON, not a scan") from e
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: top level is {_json_type(doc)} — an MSD datalist is an object "
                            '{"training": [{"image": ...}, ...], "validation": [...]}')
    if "training" not in doc:
        raise ManifestError(f"{path}: no 'training' list (keys: {sorted(doc)}) — an MSD datalist lists its volumes "
                            'under "training" (and optionally "validation")')
    if split not in doc:
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        raise KeyError(f"{path}: no '{split}' list (lists present: {lists})")
    raw = doc[split]
    if not isinstance(raw, list):
        raise ManifestError(f"{path}: '{split}' is {_json_type(raw)}, not a list of entries — write "
                            f'"{split}": [{{"image": "path"}}, ...]')
    return raw


def require_fields(path: str | Path, keys: Sequence[str], splits: Sequence[str] = ("training", "validation")) -> None:
    """Every entry of the `splits` present in datalist `path` has each of `keys` (e.g. a segmentation entry its
    'label'), before any volume is read; else one ManifestError naming the file, split, entry index and key."""
    path = Path(path)
    for split in splits:
        try:
            raw = _split(path, split)
        except KeyError:
            continue
        for i, e in enumerate(raw):
            _check_entry(e, f"{path}: '{split}' entry {i}", keys)


def read_datalist(path: str | Path, split: str = "training", data_root: str | Path | None = None,
                  require: Sequence[str] = ("image",)) -> list[dict[str, Any]]:
    """Entries of one split of an MSD-style datalist, each with the keys `require`, with absolute `image`/`label` paths.

    Relative paths resolve against `data_root` if given; else against the JSON's folder, or `$VOCO_DATA_DIR`
    when the files are there and not beside the JSON (the authors' lists live apart from their data).
    An `image` may name a DICOM series folder (`FOLDER` or `FOLDER#SERIES_UID`). Every listed file must exist
    (one error names all missing files, their entries and the datalist). A split
    other than 'training' that is absent raises KeyError (callers may treat an absent `validation` as empty).
    """
    path = Path(path)
    entries = [_check_entry(e, f"{path}: '{split}' entry {i}", require) for i, e in enumerate(_split(path, split))]
    if data_root is not None:
        roots = [Path(data_root)]
    else:
        roots = [path.parent] + ([data_dir()] if os.environ.get("VOCO_DATA_DIR") else [])
    for root in (r.absolute() for r in roots):
        resolved = [_absolute(e, root) for e in entries]
        if all(source_exists(p) for e in resolved for k in PATH_KEYS if k in e
               for p in (e[k] if isinstance(e[k], list) else [e[k]])):
            return resolved
    # no root holds every file: report the missing ones under the primary root (data_root or the JSON's folder)
    check_datalist_files(entries, roots[0].absolute(), path, split)
    raise AssertionError("unreachable: check_datalist_files found no missing file")  # pragma: no cover


def write_datalist(path: str | Path, training: Iterable[dict[str, Any]], validation: Iterable[dict[str, Any]] | None = None,
                   **header: Any) -> Path:
    """Write an MSD-style datalist atomically; absolute paths are stored relative to the JSON's folder.

    Header fields (name, description, labels, modality, licence, ...) come first, as in MSD files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.absolute()
    doc: dict[str, Any] = dict(header)
    doc["training"] = [_relative(e, folder) for e in training]
    if validation is not None:
        doc["validation"] = [_relative(e, folder) for e in validation]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------- manifests
def _schema(kind: str) -> dict[str, Any]:
    f = manifests_dir() / "schemas" / f"{kind}.json"
    if not f.is_file():
        raise ManifestError(f"{f}: no schema for manifest kind '{kind}'; add data_manifests/schemas/{kind}.json")
    return json.loads(f.read_text())


def _manifest_file(kind: str, name: str | None) -> Path:
    root = manifests_dir()
    if (root / kind).is_dir():
        if name is None:
            raise ManifestError(f"manifest kind '{kind}' is a folder; name one of {list_manifests(kind)}")
        f = root / kind / f"{name}.yaml"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no manifest '{name}' of kind '{kind}'; known: {list_manifests(kind)}")
        return f
    f = root / f"{kind}.yaml"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no manifest kind '{kind}' (neither {root / kind}/ nor {f} exists)")
    return f


def _describe(err: Any, file: Path) -> str:
    """One line per schema violation: the file, where in it, and what to change."""
    where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        allowed = set(err.schema.get("properties", {}))
        unknown = sorted(k for k in err.instance if k not in allowed)
        return (f"{file}: unknown field(s) {unknown} at {where}; allowed fields there: {sorted(allowed)} "
                "(fix the spelling, or add the field to the schema)")
    return f"{file}: at {where}: {err.message}"


def validate_manifest(doc: Any, kind: str, file: str | Path = "<manifest>") -> None:
    """Raise ManifestError listing every violation of `schemas/<kind>.json` (unknown fields named)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema(kind))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ManifestError("\n".join(_describe(e, Path(file)) for e in errors))


def load_manifest(kind: str, name: str | None = None) -> dict[str, Any]:
    """A validated manifest: `data_manifests/<kind>/<name>.yaml`, or `data_manifests/<kind>.yaml` for single-file kinds."""
    f = _manifest_file(kind, name)
    try:
        doc = yaml.safe_load(f.read_text())
    except yaml.YAMLError as e:
        raise ManifestError(f"{f}: not valid YAML ({e}); fix the syntax") from e
    validate_manifest(doc, kind, f)
    if f.parent.name == kind and doc.get("name") != name:
        raise ManifestError(f"{f}: field name is {doc.get('name')!r} but the file is named {name!r}; make them equal")
    return doc


def list_manifests(kind: str) -> list[str]:
    """Names (file stems) of the manifests of a folder kind, sorted; `[kind]` for a single-file kind."""
    root = manifests_dir()
    if (root / kind).is_dir():
        return sorted(p.stem for p in (root / kind).glob("*.yaml"))
    if (root / f"{kind}.yaml").is_file():
        return [kind]
    raise FileNotFoundError(f"no manifest kind '{kind}' under {root}")
