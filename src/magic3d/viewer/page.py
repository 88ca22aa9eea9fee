"""Write ``<folder>/view/index.html``: one section per run, one card per stage (mesh, turntable,
metrics).

What the page needs from a run folder, all written by other commands:

- ``<stage>/export/mesh.glb`` (``magic3d export``; made here when a finished stage lacks it);
- ``<stage>/turntable.mp4`` (the stage's last act) and ``<stage>/DONE.json``;
- ``<run>/eval/eval.json`` when the run was evaluated (``make eval``), else the card says how.

Browsers read nothing from ``file://`` by script (fetch and XHR are refused there), so each GLB
is handed to the page as a classic script, ``meshes/<id>.js``, holding the file in base64. The
videos and the GLB download links point into the run folders by relative path (media elements
and links may), so nothing large is copied; keep ``view/`` beside its runs.

The folder is built next to ``view/`` and swapped in whole: a failure leaves the previous page.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from magic3d.config import ConfigError
from magic3d.runs import stage_summary, stages

VIEW_DIR = "view"
EVAL_REPORT = Path("eval") / "eval.json"  # written by magic3d.eval.run (EVAL_DIR / "eval.json")
RUN_FILE = "run.json"  # written by the recipe runner into every run folder
MESH_FILE = Path("export") / "mesh.glb"  # export_stage's GLB
VENDOR_FILES = ("three-bundle.min.js", "LICENSE-three.txt")


@dataclass
class StageView:
    """One stage's card.

    Args:
        name: the stage folder's name.
        finished: whether it has DONE.json.
        mesh_id: the id of its ``meshes/<id>.js`` (None: no mesh, see ``mesh_error``).
        mesh_error: why there is no mesh (unfinished, or the export failed), else None.
        video: the turntable's path relative to the page, None when absent.
        mesh_file: the GLB's path relative to the page (a download link), None without a mesh.
        metrics: its entry of the run's eval.json ``metrics`` (None when not evaluated).
        summary: DONE.json's entries.
    """

    name: str
    finished: bool
    mesh_id: str | None = None
    mesh_error: str | None = None
    video: str | None = None
    mesh_file: str | None = None
    metrics: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunView:
    run_dir: Path
    title: str
    recipe: str | None
    prompt: str | None
    stages: list[StageView]
    evaluated: bool


@dataclass
class ViewPage:
    """What ``write_view`` wrote: the page and its sections."""

    index: Path
    runs: list[RunView]


def is_run_dir(path: Path) -> bool:
    return (path / RUN_FILE).is_file() or bool(stages(path))


def runs_to_view(folder: Path | str) -> list[Path]:
    """The run folders a folder stands for: itself when it is a run, else every run below it (an
    ablation folder ``runs/ablations/<name>/`` holds several), in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder: pass a run folder (runs/<recipe>/<name>) "
                          "or a folder of runs (runs/ablations/<name>)")
    if is_run_dir(folder):
        return [folder]
    found = sorted({p.parent for p in folder.rglob(RUN_FILE) if VIEW_DIR not in p.relative_to(folder).parts})
    if not found:
        raise ConfigError(f"{folder} holds no run ({RUN_FILE} or <stage>/config.yaml): pass a run folder "
                          "(runs/<recipe>/<name>) or a folder of runs (runs/ablations/<name>)")
    return found


def view(folder: Path | str, export_missing: bool = True, texture_resolution: int = 1024,
         mesh_resolution: int = 128) -> ViewPage:
    """``magic3d view FOLDER``: the page of a run, or of every run of an ablation folder, in
    ``FOLDER/view/``."""
    folder = Path(folder)
    runs = runs_to_view(folder)
    return write_view(runs, folder / VIEW_DIR, title=folder.name, export_missing=export_missing,
                      texture_resolution=texture_resolution, mesh_resolution=mesh_resolution)


def write_view(
    run_dirs: Sequence[Path | str],
    out_dir: Path | str,
    title: str,
    export_missing: bool = True,
    texture_resolution: int = 1024,
    mesh_resolution: int = 128,
) -> ViewPage:
    """One section per run of ``run_dirs`` into ``out_dir/index.html`` (replaced whole).

    A finished stage without ``export/mesh.glb`` is exported first when ``export_missing``
    (``magic3d.export.export_stage`` with the two resolutions); an export that fails is named
    on the stage's card and the page is still written.
    """
    out_dir = Path(out_dir)
    if not run_dirs:
        raise ConfigError("no runs to view: pass a run folder or a folder of runs")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    building.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the page is an ordinary folder
    try:
        (building / "meshes").mkdir()
        runs = [_run_view(Path(run), index, building, out_dir, export_missing, texture_resolution, mesh_resolution)
                for index, run in enumerate(run_dirs)]
        _copy_assets(building)
        (building / "index.html").write_text(page_html(title, runs), encoding="utf-8")
        _swap_in(building, out_dir)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return ViewPage(out_dir / "index.html", runs)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_assets(folder: Path) -> None:
    package = resources.files("magic3d.viewer")
    (folder / "viewer.js").write_bytes(package.joinpath("viewer.js").read_bytes())
    for name in VENDOR_FILES:
        (folder / name).write_bytes(package.joinpath("vendor", name).read_bytes())


def _swap_in(building: Path, out_dir: Path) -> None:
    """``building`` becomes ``out_dir``; the previous ``out_dir`` is removed only after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(building, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


def _run_title(run_dir: Path) -> str:
    return "/".join(run_dir.resolve().parts[-2:])


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None  # a report being rewritten, or damaged: the card says "not evaluated"


def _run_view(run_dir: Path, index: int, building: Path, out_dir: Path, export_missing: bool,
              texture_resolution: int, mesh_resolution: int) -> RunView:
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder: pass a run folder (runs/<recipe>/<name>)")
    info = _read_json(run_dir / RUN_FILE) or {}
    report = _read_json(run_dir / EVAL_REPORT)
    evaluated = {entry.get("stage"): entry.get("metrics") for entry in (report or {}).get("stages", [])}
    cards = []
    for stage_dir in stages(run_dir):
        summary = stage_summary(stage_dir)
        card = StageView(name=stage_dir.name, finished=summary is not None, summary=summary or {},
                         metrics=evaluated.get(stage_dir.name))
        video = stage_dir / "turntable.mp4"
        if video.is_file():
            card.video = Path(os.path.relpath(video, out_dir)).as_posix()
        glb = stage_dir / MESH_FILE
        if not card.finished:
            card.mesh_error = "the stage is unfinished: continue the run (make run=...)"
        elif not glb.is_file() and not export_missing:
            card.mesh_error = f"no {MESH_FILE} yet: run `magic3d export {stage_dir}`"
        else:
            if not glb.is_file():
                card.mesh_error = _export(stage_dir, texture_resolution, mesh_resolution)
            if card.mesh_error is None:
                card.mesh_id = f"r{index}-{_slug(stage_dir.name)}"
                card.mesh_file = Path(os.path.relpath(glb, out_dir)).as_posix()
                _write_mesh_script(glb, card.mesh_id, building / "meshes")
        cards.append(card)
    return RunView(run_dir, _run_title(run_dir), info.get("recipe"), info.get("prompt"), cards, report is not None)


def _export(stage_dir: Path, texture_resolution: int, mesh_resolution: int) -> str | None:
    """Export a stage's mesh; the reason on failure (None when it worked)."""
    from magic3d.export import ExportError, export_stage

    try:
        export_stage(stage_dir, texture_resolution=texture_resolution, mesh_resolution=mesh_resolution)
    except (ExportError, ValueError, TypeError, ConfigError, FileNotFoundError) as err:
        return f"the mesh export failed: {err}"
    return None


def _write_mesh_script(glb: Path, mesh_id: str, folder: Path) -> None:
    data = base64.b64encode(glb.read_bytes()).decode("ascii")
    (folder / f"{mesh_id}.js").write_text(
        f"(window.magic3dMeshes = window.magic3dMeshes || {{}})[{json.dumps(mesh_id)}] = \"{data}\";\n",
        encoding="ascii")


# ------------------------------------------------------------------------------------ HTML

STYLE = """
:root { --canvas-bg: #f2f2f5; font-family: system-ui, sans-serif; color: #222; }
body { margin: 1.5rem; background: #fff; }
h1 { font-size: 1.4rem; margin: 0 0 1rem; }
section.run { margin-bottom: 2.5rem; }
section.run h2 { font-size: 1.15rem; margin: 0 0 .2rem; }
.meta { color: #666; margin: 0 0 .8rem; }
.stages { display: flex; flex-wrap: wrap; gap: 1.2rem; }
.stage { border: 1px solid #ddd; border-radius: 6px; padding: .8rem; width: 740px; }
.stage h3 { margin: 0 0 .6rem; font-size: 1rem; }
.media { display: flex; gap: 12px; }
.media > * { width: 360px; height: 360px; background: var(--canvas-bg); border-radius: 4px; }
canvas.mesh { display: block; cursor: grab; }
.missing { display: flex; align-items: center; justify-content: center; text-align: center; color: #888;
           padding: 1rem; box-sizing: border-box; }
.mesh-error { color: #b00; font-size: .85rem; min-height: 1em; margin: .3rem 0 0; }
table { border-collapse: collapse; margin-top: .6rem; font-size: .85rem; }
td, th { border-bottom: 1px solid #eee; padding: .15rem .8rem .15rem 0; text-align: left; }
td.num { font-variant-numeric: tabular-nums; }
.hint { color: #888; font-size: .85rem; }
"""

SUMMARY_KEYS = ("steps", "seconds_per_step", "skipped_steps")


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(rows: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{html.escape(key)}</th><td class=\"num\">{_number(value)}</td></tr>"
                   for key, value in rows.items())
    return f"<table>{body}</table>"


def _stage_html(run: RunView, card: StageView) -> str:
    e = html.escape
    if card.mesh_id is not None:
        mesh = (f'<canvas class="mesh" data-mesh="{e(card.mesh_id)}" width="360" height="360" '
                f'title="drag: orbit, wheel: zoom, right-drag: pan"></canvas>')
    else:
        mesh = f'<div class="missing" data-state="none">{e(card.mesh_error or "no mesh")}</div>'
    if card.video is not None:
        video = (f'<video src="{e(card.video)}" controls loop muted autoplay playsinline '
                 'preload="auto"></video>')
    else:
        video = '<div class="missing">no turntable.mp4</div>'
    summary = {key: card.summary[key] for key in SUMMARY_KEYS if key in card.summary}
    parts = [f'<div class="stage" data-stage="{e(card.name)}"><h3>{e(card.name)}</h3>',
             f'<div class="media">{mesh}{video}</div><p class="mesh-error"></p>']
    if card.metrics is not None:
        parts.append(_table(card.metrics))
    elif run.evaluated:
        parts.append('<p class="hint">not in the run\'s evaluation (evaluated before this stage finished?)</p>')
    else:
        parts.append(f'<p class="hint">not evaluated: <code>make eval run={e(str(run.run_dir))}</code></p>')
    if summary:
        parts.append(_table(summary))
    if card.mesh_file is not None:
        parts.append(f'<p class="hint">mesh: <a href="{e(card.mesh_file)}" download>{e(MESH_FILE.name)}</a> '
                     '(with OBJ/MTL/PNG beside it)</p>')
    parts.append("</div>")
    return "".join(parts)


def _run_html(run: RunView) -> str:
    e = html.escape
    meta = " · ".join(e(part) for part in (run.recipe and f"recipe {run.recipe}", run.prompt and f"“{run.prompt}”")
                      if part)
    cards = "".join(_stage_html(run, card) for card in run.stages) or '<p class="hint">no stage has started</p>'
    return (f'<section class="run" data-run="{e(run.title)}"><h2>{e(run.title)}</h2>'
            f'<p class="meta">{meta}</p><div class="stages">{cards}</div></section>')


def page_html(title: str, runs: Sequence[RunView]) -> str:
    """The page: static HTML for every card; ``viewer.js`` only draws the canvases."""
    e = html.escape
    mesh_scripts = "".join(f'<script src="meshes/{e(card.mesh_id)}.js"></script>\n'
                           for run in runs for card in run.stages if card.mesh_id is not None)
    body = "\n".join(_run_html(run) for run in runs)
    return (
        "<!doctype html>\n<html lang=\"en\" data-viewer=\"loading\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>magic3d: {e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>magic3d: {e(title)}</h1>\n{body}\n"
        '<script src="three-bundle.min.js"></script>\n'
        f"{mesh_scripts}"
        '<script src="viewer.js"></script>\n</body>\n</html>\n'
    )
