"""Structure of the tutorial notebooks (their execution is `pytest --nbval-lax notebooks/` in `make test`).

Committed notebooks must be clean: no outputs except in cells marked `# NBVAL_CHECK_OUTPUT` (whose stored
output nbval compares), a first markdown cell that says what you learn and what it costs per profile, a
`parameters` cell for papermill, and no logic of their own (no function or class definitions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest
import yaml

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
CHECK = "# NBVAL_CHECK_OUTPUT"


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def _params_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell must carry the papermill `parameters` tag"
    return cells[0]


def _param_names(nb: nbformat.NotebookNode) -> set[str]:
    tree = ast.parse(_params_cell(nb).source)
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def test_the_four_demo_notebooks_exist():
    from voco_lib.demo import DEMO_NOTEBOOKS

    assert [p.stem for p in NOTEBOOKS][:4] == list(DEMO_NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path: Path):
    nb = _read(path)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown", "the first cell must be markdown (what you will learn, runtime)"
    assert "What you will learn" in first.source
    for profile in ("smoke", "cpu"):
        assert f"`{profile}`" in first.source, f"first cell must give the runtime of the {profile} profile"
    names = _param_names(nb)
    assert {"profile", "run_dir"} <= names, f"parameters cell lacks profile/run_dir (has {sorted(names)})"
    # papermill must see every parameter (its line parser gives up on some comments, e.g. ones with "=")
    from papermill.translators import PythonTranslator

    assert {p.name for p in PythonTranslator.inspect(_params_cell(nb))} == names
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_stray_outputs(path: Path):
    """Only `# NBVAL_CHECK_OUTPUT` cells keep (and must keep) their output; nothing else is committed."""
    for i, cell in enumerate(_read(path).cells):
        if cell.cell_type != "code":
            continue
        checked = CHECK in cell.source
        if checked:
            assert cell.outputs, f"cell {i} is marked {CHECK} but has no stored output to compare"
            assert all(o.output_type == "stream" for o in cell.outputs), f"cell {i}: store text output only"
            assert cell.execution_count is not None, f"cell {i}: nbval skips a checked cell without execution count"
        else:
            fix = (f"run `voco strip-outputs {path.relative_to(NB_DIR.parent)}` (keeps the checked cells; "
                   f"`git checkout` the file if you changed one of those)")
            assert not cell.outputs, f"cell {i} has stray outputs (a JupyterLab save?): {fix}"
            assert cell.execution_count is None, f"cell {i} has an execution count: {fix}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cells_call_the_library_only(path: Path):
    """Notebooks tell the story; the logic lives in voco_lib (no def/class in a notebook)."""
    for i, cell in enumerate(_read(path).cells):
        if cell.cell_type != "code":
            continue
        src = "\n".join(ln for ln in cell.source.splitlines() if not ln.lstrip().startswith("%"))
        tree = ast.parse(src)
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
        assert not defs, f"cell {i} defines {[d.name for d in defs]}; move it into voco_lib"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_saves_figures_into_its_run_dir(path: Path):
    sources = "\n".join(c.source for c in _read(path).cells if c.cell_type == "code")
    assert "notebook_run_dir(" in sources
    assert "viz.save_figure(fig, run_dir" in sources or "viz.show_figure(fig, run_dir" in sources


def test_paper_parameter_file_matches_the_pretraining_notebook():
    params = yaml.safe_load((NB_DIR / "params" / "paper_8gpu.yaml").read_text())
    names = _param_names(_read(NB_DIR / "02_pretraining.ipynb"))
    unknown = set(params) - names
    assert not unknown, f"paper_8gpu.yaml sets {sorted(unknown)}, which 02_pretraining has no parameter for"
    assert params["profile"] == "paper" and params["nproc"] == 8


def test_strip_outputs_clears_all_but_the_checked_cells(tmp_path):
    from voco_lib.demo import strip_outputs

    nb = nbformat.v4.new_notebook()
    plain = nbformat.v4.new_code_cell("print(1)", execution_count=3,
                                      outputs=[nbformat.v4.new_output("stream", name="stdout", text="1\n")])
    checked = nbformat.v4.new_code_cell(f"{CHECK}\nprint(2)", execution_count=4,
                                        outputs=[nbformat.v4.new_output("stream", name="stdout", text="2\n")])
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), plain, checked]
    path = tmp_path / "00_t.ipynb"
    nbformat.write(nb, path)
    assert strip_outputs(path) == 1 and strip_outputs(path) == 0
    back = _read(path)
    assert back.cells[1].outputs == [] and back.cells[1].execution_count is None
    assert back.cells[2].outputs[0]["text"] == "2\n" and back.cells[2].execution_count == 4
