"""Every notebook runs top to bottom on CPU: the run notebooks against the smoke run, the ablation
notebook against the tiny ablation."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
pytestmark = pytest.mark.slow


def _execute(path: Path) -> list[dict]:
    """Run the notebook top to bottom; its code cells' outputs (none may be an error)."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return outputs


RUN_NOTEBOOKS = [p for p in NOTEBOOKS if p.stem != "ablation"]  # the ablation notebook opens an ablation folder


@pytest.mark.parametrize("path", RUN_NOTEBOOKS, ids=[p.stem for p in RUN_NOTEBOOKS])
def test_notebook_executes(path: Path, smoke_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGIC3D_RUN", str(smoke_run))
    images = [o for o in _execute(path) if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the notebook must show the new views and the loss curves"


# --- ablation (issue 11) ---
def test_ablation_notebook_shows_table_charts_and_sheets(tiny_ablation, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_ablation.folder
    monkeypatch.setenv("MAGIC3D_ABLATION", str(folder))
    outputs = _execute(Path(__file__).resolve().parents[2] / "notebooks" / "ablation.ipynb")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    expected = len(list((folder / "charts").glob("*.png"))) + len(list((folder / "sheets").glob("*.png")))
    assert expected >= 4 and len(images) == expected, "every chart and contact sheet is shown"
    shown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "# Ablation `tiny`" in shown and "## Paired difference against coarse_to_fine" in shown
# --- end ablation ---
