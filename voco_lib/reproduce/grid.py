"""A table as a grid of cells: rows (inits) × tasks × label budgets × protocols × seeds.

A table is data (`data_manifests/paper/<name>.yaml`, schema `paper.json`): which tasks, which inits, which
protocols and seeds, the per-profile budget, and the paper's numbers where known. `expand` turns it into
`Cell`s; each cell's `key` hashes everything that decides its result (the resolved fine-tuning config, the
init and, for a row's own pre-training, that run's resolved config), so a finished cell is reused only for
the same resolved config and any change reruns it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from voco_lib.data.manifests import ManifestError, list_manifests, load_manifest, validate_manifest
from voco_lib.files import read_yaml

KIND = "paper"
NOTEBOOKS = {"segmentation": "10_segmentation", "classification": "11_classification",
             "registration": "12_registration", "vision_language": "13_vision_language"}


@dataclass(frozen=True)
class Row:
    """One initialisation: scratch, a released checkpoint, its own pre-training run, or none (not run)."""

    name: str
    label: str
    init: str | None
    pretrain: dict[str, Any] | None = None
    n_labeled: tuple[int | None, ...] | None = None
    note: str = ""


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    raw: dict[str, Any] = field(compare=False, repr=False)

    @property
    def rows(self) -> list[Row]:
        return [Row(r["name"], r.get("label", r["name"]), r["init"], r.get("pretrain"),
                    None if r.get("n_labeled") is None else tuple(r["n_labeled"]), r.get("note", ""))
                for r in self.raw["rows"]]

    @property
    def baseline(self) -> str:
        return self.raw.get("baseline", "scratch")

    def budget(self, profile: str, part: str) -> list[str]:
        """Config overrides of `part` (full | frozen | pretrain) for `profile`; nothing listed: the profile's own."""
        return list((self.raw["budget"].get(profile) or {}).get(part) or [])

    def seeds(self, profile: str) -> list[int]:
        """The profile's seeds where the budget names some (smoke, to fit CI), else the table's."""
        return list((self.raw["budget"].get(profile) or {}).get("seeds") or self.raw["seeds"])

    def paper_value(self, row: str, column: str) -> float | None:
        paper = self.raw.get("paper")
        return None if paper is None else (paper["values"].get(row) or {}).get(column)


def load_table(name_or_path: str | Path) -> Table:
    """A registered table by name (`voco reproduce list`) or a YAML file of the same schema, validated."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        doc = read_yaml(p, "fix the YAML syntax")
        validate_manifest(doc, KIND, p)
    else:
        if str(name_or_path) not in list_manifests(KIND):
            raise ManifestError(f"unknown table {name_or_path!r}; choose one of {list_manifests(KIND)} or pass a "
                                "table YAML file (schema data_manifests/schemas/paper.json)")
        doc = load_manifest(KIND, str(name_or_path))
    _check_rows(doc, p)
    return Table(doc["name"], doc["title"], doc)


def _check_rows(doc: dict[str, Any], where: Path) -> None:
    names = [r["name"] for r in doc["rows"]]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: row names repeat ({names}); give every row its own name")
    for r in doc["rows"]:
        if (r["init"] == "pretrain") != ("pretrain" in r):
            raise ManifestError(f"{where}: row {r['name']}: init: pretrain and a pretrain section go together")
    unknown = set((doc.get("paper") or {}).get("values", {})) - set(names)
    if unknown:
        raise ManifestError(f"{where}: paper values for rows {sorted(unknown)} that the table does not have")


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run of the grid (executed as a papermill run of the task type's notebook)."""

    row: str
    task: str
    task_type: str
    protocol: str
    n_labeled: int | None
    seed: int
    overrides: tuple[str, ...]
    init: str | None  # scratch | released name | "pretrain:<row>" | None (no weights: not run)

    @property
    def column(self) -> str:
        return self.task if self.n_labeled is None else f"n={self.n_labeled}"

    @property
    def notebook(self) -> str:
        return NOTEBOOKS[self.task_type]

    @property
    def slug(self) -> str:
        n = "all" if self.n_labeled is None else self.n_labeled
        return f"{self.row}/{self.task}-{self.protocol}-n{n}-s{self.seed}"


def expand(table: Table, profile: str, seeds: Sequence[int] | None = None) -> list[Cell]:
    """Every cell of the table for `profile`, in a stable order (row, task, budget, protocol, seed)."""
    from voco_lib.tasks.registry import load_task

    seeds = list(table.seeds(profile) if seeds is None else seeds)
    cells = []
    for row in table.rows:
        budgets = row.n_labeled or tuple(table.raw.get("n_labeled") or (None,))
        for task in table.raw["tasks"]:
            t = load_task(task)
            for n in budgets:
                for protocol in table.raw["protocols"]:
                    extra = table.budget(profile, protocol) + [f"finetune.protocol={protocol}"]
                    init = f"pretrain:{row.name}" if row.init == "pretrain" else row.init
                    cells += [Cell(row.name, task, t.type, protocol, n, s, tuple(extra), init) for s in seeds]
    return cells


def digest(obj: Any) -> str:
    """12 hex digits of the sha256 of `obj` as canonical JSON: the identity of a resolved config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cell_key(cell: Cell, profile: str, pretrain_key: str | None, datalist: str | None) -> str:
    """The cell's identity: its resolved fine-tuning config (profile + overrides), task, init, budget, seed, data."""
    from voco_lib.config import resolve, to_dict

    return digest({"cell": cell.__dict__, "profile": to_dict(resolve(profile, list(cell.overrides))),
                   "pretrain": pretrain_key, "datalist": datalist})
