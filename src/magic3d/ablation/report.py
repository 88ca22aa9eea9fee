"""An ablation's report in its folder: table.md / .csv / .json, charts/<metric>.png and
sheets/<prompt-slug>.png, all made from ablation.json alone (``python -m magic3d ablation
--report-only`` remakes them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from magic3d.ablation.charts import save_charts
from magic3d.ablation.sheets import save_sheets
from magic3d.ablation.state import AblationState
from magic3d.ablation.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED
from magic3d.ablation.table import AblationTable, summarise, write_table


@dataclass
class Report:
    table: AblationTable
    table_md: Path
    table_csv: Path
    table_json: Path
    charts: list[Path]
    sheets: list[Path]


def write_report(
    folder: Path,
    state: AblationState,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Report:
    table = summarise(state, n_resamples, confidence, seed)
    md, csv_path, json_path = write_table(table, state, folder)
    charts = save_charts(table, folder / "charts")
    sheets = save_sheets(state, folder, folder / "sheets")
    return Report(table, md, csv_path, json_path, charts, sheets)
