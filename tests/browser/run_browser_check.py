"""Real-browser check of the 3-D viewer: JupyterLab + headless Chromium run 01_geometric_context; the NiiVue
canvas must show the volume (not a blank canvas), the organ label layer (saturated colours over the grey CT),
the base-crop outlines (the box colour, yellow) and the crosshair (cyan), and a click on the axial panel must
move the crosshair; then 03_position_explorer runs in the same JupyterLab and dragging its x slider must change
the slider's value and the prediction figures.

Installs nothing: it needs Debian's Chromium at /usr/bin/chromium and the `browser` extra (playwright);
`make test-browser` provides both. Steps: start JupyterLab on 127.0.0.1 (no token, a temporary settings
folder), open the notebook, run all cells, wait for the viewer's canvas, screenshot it and count the pixels
that differ from the background colour. Screenshots go to test-artifacts/.

    VOCO_PROFILE=smoke .venv/bin/python tests/browser/run_browser_check.py [--negative-control]

`--negative-control` disables WebGL and passes only if the check then FAILS (proves the check can fail).
Exit code 0 = passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = "notebooks/01_geometric_context.ipynb"
EXPLORER = "notebooks/03_position_explorer.ipynb"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
MIN_FOREGROUND = 0.02  # fraction of canvas pixels that must differ from the background
# Colours viz._view_niivue draws with: the grid boxes' label colour and the crosshair.
BOX_RGB, CROSSHAIR_RGB = (255, 210, 31), (0, 204, 255)
MIN_BOX, MIN_LABEL = 0.002, 0.02  # fractions of canvas pixels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(port: int, tmp: Path) -> subprocess.Popen:
    """JupyterLab serving a copy of the notebook (so an autosave can never write outputs into the repo)."""
    env = dict(os.environ, VOCO_PROFILE=os.environ.get("VOCO_PROFILE", "smoke"),
               JUPYTER_CONFIG_DIR=str(tmp / "jupyter-config"), JUPYTER_RUNTIME_DIR=str(tmp / "jupyter-runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "lab-ws"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
           f"--ServerApp.root_dir={tmp / 'root'}", "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited (code {proc.returncode}); log: {tmp / 'jupyterlab.log'}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("JupyterLab did not answer within 90 s")


def foreground_fraction(png: Path) -> float:
    """Share of pixels that differ (by > 24 in some channel) from the most common colour, the background."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(np.int16)
    colours, counts = np.unique(a, axis=0, return_counts=True)
    bg = colours[counts.argmax()]
    return float((np.abs(a - bg).max(1) > 24).mean())


def _rgb(png: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def near(a, rgb: tuple[int, int, int], tol: int = 40):
    """Mask of pixels within `tol` of `rgb` in every channel."""
    import numpy as np

    return (np.abs(a - np.asarray(rgb)) <= tol).all(-1)


def layer_fractions(png: Path) -> dict[str, float]:
    """Shares of canvas pixels in the box colour, and saturated non-box, non-crosshair pixels (the organ labels
    blended over a grey CT; the CT itself has R ≈ G ≈ B)."""
    a = _rgb(png)
    box, cross = near(a, BOX_RGB), near(a, CROSSHAIR_RGB)
    saturated = (a.max(-1) - a.min(-1)) > 40
    return {"box": float(box.mean()), "label": float((saturated & ~box & ~cross).mean())}


def crosshair_moved(before: Path, after: Path) -> bool:
    """The crosshair's pixels are not where they were: the click moved it."""
    a, b = near(_rgb(before), CROSSHAIR_RGB, 30), near(_rgb(after), CROSSHAIR_RGB, 30)
    return bool(a.any() and b.any() and (a ^ b).mean() > 0.001)


def run(negative_control: bool, timeout_s: int) -> float:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) or run "
                         "`make test-browser`, which does")
    ARTIFACTS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="voco-browser-"))
    (tmp / "root" / "notebooks").mkdir(parents=True)
    shutil.copy(REPO / NOTEBOOK, tmp / "root" / NOTEBOOK)
    shutil.copy(REPO / EXPLORER, tmp / "root" / EXPLORER)
    port = _free_port()
    t0 = time.time()
    lab = start_lab(port, tmp)
    name = "negative-control" if negative_control else "01_geometric_context"
    try:
        args = ["--no-first-run", "--disable-dev-shm-usage"]
        if negative_control:
            args += ["--disable-webgl", "--disable-3d-apis"]
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(tmp / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=args,
                viewport={"width": 1400, "height": 1000}, env=dict(os.environ, HOME=str(tmp)))
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?reset", timeout=60_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=60_000)
            # the "Jupyter news" toast can cover the canvas: answer it if it shows up
            for label in ("No", "Dismiss"):
                btn = page.locator(".jp-toast-button, .jp-Notification-Toast button", has_text=label)
                if btn.count():
                    btn.first.click()
            page.evaluate("window.jupyterapp.commands.execute('runmenu:run-all')")
            canvas = page.locator(".jp-OutputArea-output canvas").first
            try:
                canvas.wait_for(state="visible", timeout=timeout_s * 1000)
            except PlaywrightTimeout:
                if not negative_control:
                    page.screenshot(path=str(ARTIFACTS / f"browser-{name}-page.png"))
                    raise SystemExit(f"FAILED: no viewer canvas after {timeout_s} s; see {ARTIFACTS}/browser-{name}-page.png")
                ctx.close()
                print("negative control: no canvas at all (WebGL off)")
                return 0.0
            # done when the kernel is idle and no cell waits for execution ("[*]")
            page.wait_for_function(
                "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'"
                " && ![...document.querySelectorAll('.jp-InputArea-prompt')].some(e => e.textContent.includes('*'))",
                timeout=timeout_s * 1000)
            canvas.scroll_into_view_if_needed()
            page.wait_for_timeout(3000)  # let NiiVue finish drawing (software WebGL)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                  has_text="Traceback")
            n_errors = errors.count()
            shot = ARTIFACTS / f"browser-{name}-canvas.png"
            canvas.screenshot(path=str(shot))
            page.screenshot(path=str(ARTIFACTS / f"browser-{name}-page.png"), full_page=False)
            box = canvas.bounding_box()
            if box and not negative_control:  # a click a third of the way into the axial (leftmost) panel
                page.mouse.click(box["x"] + box["width"] * 0.08, box["y"] + box["height"] * 0.35)
                page.wait_for_timeout(1500)
                canvas.screenshot(path=str(ARTIFACTS / f"browser-{name}-after-click.png"))
            slider_changed = None if negative_control else explorer_slider_changes_prediction(page, port, timeout_s)
            ctx.close()
        frac = foreground_fraction(shot)
        print(f"browser check ({name}): canvas {shot} has {frac:.1%} non-background pixels; "
              f"{n_errors} cell errors; {time.time() - t0:.0f} s")
        if n_errors:
            raise SystemExit(f"FAILED: {n_errors} cell(s) raised in JupyterLab; see {ARTIFACTS}/browser-{name}-page.png")
        if frac >= MIN_FOREGROUND and not negative_control:
            check_layers(shot, ARTIFACTS / f"browser-{name}-after-click.png")
            print(f"03 explorer: moving the x slider changed the prediction output: {slider_changed}")
            if not slider_changed:
                raise SystemExit(f"FAILED: 03's slider did not change the prediction; see {ARTIFACTS}/browser-03-*.png")
        return frac
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=15)
        except subprocess.TimeoutExpired:
            lab.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def explorer_slider_changes_prediction(page, port: int, timeout_s: int) -> bool:
    """Run 03 in the same JupyterLab, drag its x slider, and compare the widget's output before and after."""
    page.goto(f"http://127.0.0.1:{port}/lab/tree/{EXPLORER}?reset", timeout=60_000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session", timeout=60_000)
    page.evaluate("window.jupyterapp.commands.execute('runmenu:run-all')")
    handle = page.locator(".widget-slider .noUi-handle").first
    handle.wait_for(state="visible", timeout=timeout_s * 1000)
    out = page.locator(".widget-output:has(img)").first
    page.wait_for_function("() => document.querySelectorAll('.widget-output img').length >= 2", timeout=timeout_s * 1000)
    out.scroll_into_view_if_needed()
    before, after = ARTIFACTS / "browser-03-before.png", ARTIFACTS / "browser-03-after.png"
    out.screenshot(path=str(before))
    readout = page.locator(".widget-slider .widget-readout").first
    start = readout.inner_text()
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 120, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    page.wait_for_timeout(6000)  # the kernel recomputes the prediction and redraws the two figures
    if page.locator(".jp-Dialog").count():
        page.screenshot(path=str(after))
        raise SystemExit(f"FAILED: a dialog opened instead of the slider moving; see {after}")
    out.scroll_into_view_if_needed()
    out.screenshot(path=str(after))
    moved = readout.inner_text() != start
    print(f"03 explorer: x slider {start} -> {readout.inner_text()}")
    return moved and before.read_bytes() != after.read_bytes()


def check_layers(shot: Path, after_click: Path) -> None:
    """The label layer and the box outlines are drawn, and the click moved the crosshair (else SystemExit)."""
    f = layer_fractions(shot)
    moved = after_click.is_file() and crosshair_moved(shot, after_click)
    print(f"layers: box colour {f['box']:.2%} of the canvas (need {MIN_BOX:.1%}), organ labels {f['label']:.1%} "
          f"(need {MIN_LABEL:.0%}); crosshair moved by the click: {moved}")
    if f["box"] < MIN_BOX or f["label"] < MIN_LABEL or not moved:
        raise SystemExit(f"FAILED: the viewer misses a layer or ignored the click; see {shot} and {after_click}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--negative-control", action="store_true", help="WebGL off: expect a blank canvas")
    ap.add_argument("--timeout", type=int, default=150, help="seconds for running the notebook")
    a = ap.parse_args()
    frac = run(a.negative_control, a.timeout)
    drawn = frac >= MIN_FOREGROUND
    if a.negative_control:
        print("negative control:", "FAILED (the canvas was drawn without WebGL?)" if drawn else "ok, blank as expected")
        return 1 if drawn else 0
    print("PASSED: the viewer drew the volume" if drawn else f"FAILED: canvas is blank (< {MIN_FOREGROUND:.0%})")
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(main())
