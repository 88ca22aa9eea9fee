"""The ablation's table: per variant, the number of runs and failures, the mean and bootstrap
interval of every metric the evaluation produced (of the variant's final stage, and stage by
stage), the paired difference against the baseline, wall time and GPU-minutes; written as
table.md, table.csv and table.json."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from magic3d.ablation.state import AblationState, RunRecord
from magic3d.ablation.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED, Interval, bootstrap_mean, paired_difference
from magic3d.eval.markdown import METRIC_TITLES
from magic3d.eval.options import METRIC_KEYS

COST_KEYS = ("wall_s", "gpu_minutes")
QUANTITIES = (*METRIC_KEYS, *COST_KEYS)
TITLES = {**METRIC_TITLES, "wall_s": "wall time (s) ↓", "gpu_minutes": "GPU-minutes ↓"}
DIGITS = {**{k: 3 for k in METRIC_KEYS}, "wall_s": 1, "gpu_minutes": 2}

Key = tuple[str, int]  # (prompt, seed): what pairs a variant's run with the baseline's


@dataclass
class SummaryRow:
    """One variant (``final``: its last stage, with costs) or one stage of a variant."""

    variant: str
    stage: str
    final: bool
    runs: int  # evaluated runs
    failed: int
    missing: int  # neither evaluated nor failed (not run yet, or interrupted)
    means: dict[str, Interval | None]
    vs_baseline: dict[str, Interval | None]  # paired variant - baseline over (prompt, seed); None for the baseline


@dataclass
class AblationTable:
    name: str
    baseline: str
    n_resamples: int
    confidence: float
    seed: int
    final: list[SummaryRow]
    per_stage: list[SummaryRow]
    failures: list[dict[str, object]] = field(default_factory=list)

    @property
    def present(self) -> list[str]:
        """The quantities with at least one value anywhere (the table's columns)."""
        rows = self.final + self.per_stage
        return [q for q in QUANTITIES if any(r.means.get(q) is not None for r in rows)]


def _values(records: list[RunRecord], stage: str | None) -> dict[Key, dict[str, float | None]]:
    """Per (prompt, seed): the metrics of ``stage`` (None: the final stage, plus the costs)."""
    values = {}
    for r in records:
        if r.status != "done":
            continue
        if stage is None:
            values[(r.prompt, r.seed)] = {**r.final_metrics(), "wall_s": r.wall_s, "gpu_minutes": r.gpu_minutes}
        elif stage in r.metrics:
            values[(r.prompt, r.seed)] = dict(r.metrics[stage])
    return values


def summarise(
    state: AblationState,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> AblationTable:
    """Every variant of the state (its finished runs; runs of other sets included)."""
    spec = state.spec
    by_variant = {v.name: [r for r in state.runs if r.variant == v.name] for v in spec.variants}
    baseline = spec.baseline

    def row(variant: str, stage: str | None, stage_label: str) -> SummaryRow:
        records = by_variant[variant]
        mine = _values(records, stage)
        theirs = _values(by_variant[baseline], stage) if variant != baseline else {}
        keys = QUANTITIES if stage is None else METRIC_KEYS
        means = {q: bootstrap_mean([v.get(q) for v in mine.values()], n_resamples, confidence, seed) for q in keys}
        diffs = {q: None if variant == baseline else paired_difference(
            {k: v.get(q) for k, v in mine.items()}, {k: v.get(q) for k, v in theirs.items()},
            n_resamples, confidence, seed) for q in keys}
        failed = sum(r.status == "failed" for r in records)
        done = sum(r.status == "done" for r in records)
        return SummaryRow(variant, stage_label, stage is None, done, failed, len(records) - done - failed, means, diffs)

    final, per_stage = [], []
    for variant, records in by_variant.items():
        finals = sorted({r.final_stage for r in records if r.status == "done" and r.final_stage})
        final.append(row(variant, None, "/".join(finals) or "–"))
        stages: list[str] = []
        for r in records:
            stages += [s for s in r.metrics if s not in stages]
        per_stage += [row(variant, s, s) for s in stages]
    failures = [{"variant": r.variant, "prompt": r.prompt, "seed": r.seed, "error": r.error}
                for r in state.runs if r.status == "failed"]
    return AblationTable(spec.name, baseline, n_resamples, confidence, seed, final, per_stage, failures)


def count(n: int, noun: str) -> str:
    """``1 seed``, ``2 seeds``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cell(interval: Interval | None, digits: int, runs: int, signed: bool = False) -> str:
    if interval is None:
        return "–"
    sign = "+" if signed else ""
    text = f"{interval.mean:{sign}.{digits}f} [{interval.low:{sign}.{digits}f}, {interval.high:{sign}.{digits}f}]"
    return text if interval.n == runs else f"{text} n={interval.n}"


def _markdown_rows(rows: list[SummaryRow], columns: list[str], signed: bool, with_stage: bool) -> list[str]:
    head = ["variant", *(["stage"] if with_stage else []), "runs", "failed", *(TITLES[c] for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = r.vs_baseline if signed else r.means
        cells = [r.variant, *([r.stage] if with_stage else []), str(r.runs), str(r.failed),
                 *(_cell(values.get(c), DIGITS[c], r.runs, signed) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table_markdown(table: AblationTable, state: AblationState) -> str:
    spec = state.spec
    columns = table.present
    metric_columns = [c for c in columns if c in METRIC_KEYS]
    pct = f"{table.confidence:.0%}"
    text = [
        f"# Ablation `{table.name}`\n",
        f"{count(len(spec.variants), 'variant')} x {count(len(spec.prompts), 'prompt')} x "
        f"{count(len(spec.seeds), 'seed')} "
        f"(seeds {', '.join(map(str, spec.seeds))}); baseline **{table.baseline}**. Each cell: mean "
        f"[{pct} percentile-bootstrap interval, {table.n_resamples:,} resamples, seed {table.seed}] over the "
        "variant's evaluated runs (`n=` when a metric exists for fewer runs: Janus rate and view accuracy for "
        "asymmetric objects only). Metrics are those of each variant's final stage; ↑/↓ say which way is better.\n",
        *_markdown_rows(table.final, columns, signed=False, with_stage=True),
        f"\n## Paired difference against {table.baseline}\n",
        f"Mean over (prompt, seed) pairs of `variant − {table.baseline}` with its {pct} bootstrap interval over "
        "pairs; an interval that excludes 0 is a difference the runs support.\n",
        *_markdown_rows([r for r in table.final if r.variant != table.baseline], columns, signed=True, with_stage=False),
    ]
    if table.per_stage and metric_columns:
        text += [
            "\n## Stage by stage\n",
            f"Every evaluated stage of every variant; differences pair a stage with the baseline's stage of the same "
            f"name (e.g. the coarse stage of each two-stage variant against {table.baseline}'s).\n",
            *_markdown_rows(table.per_stage, metric_columns, signed=False, with_stage=True),
            f"\n### Stage by stage, paired difference against {table.baseline}\n",
            *_markdown_rows([r for r in table.per_stage if r.variant != table.baseline], metric_columns, signed=True,
                            with_stage=True),
        ]
    if table.failures:
        text += ["\n## Failed runs\n", *(f"- {f['variant']} / {f['prompt']} / seed {f['seed']}: {f['error']}"
                                         for f in table.failures)]
    return "\n".join(text) + "\n"


def write_table(table: AblationTable, state: AblationState, folder: Path) -> tuple[Path, Path, Path]:
    """table.md, table.csv (one row per variant and per variant stage; every quantity's mean,
    bounds, n and paired difference) and table.json."""
    md = folder / "table.md"
    md.write_text(table_markdown(table, state), encoding="utf-8")

    csv_path = folder / "table.csv"
    header = ["variant", "stage", "final", "runs", "failed", "missing"]
    for q in QUANTITIES:
        header += [f"{q}_mean", f"{q}_low", f"{q}_high", f"{q}_n",
                   f"{q}_diff_mean", f"{q}_diff_low", f"{q}_diff_high", f"{q}_diff_n"]
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in table.final + table.per_stage:
            cells: list[object] = [r.variant, r.stage, r.final, r.runs, r.failed, r.missing]
            for q in QUANTITIES:
                for interval in (r.means.get(q), r.vs_baseline.get(q)):
                    cells += ["", "", "", ""] if interval is None else [
                        interval.mean, interval.low, interval.high, interval.n]
            writer.writerow(cells)

    json_path = folder / "table.json"
    json_path.write_text(json.dumps({**asdict(table), "quantities": table.present}, indent=2,
                                    ensure_ascii=False) + "\n", encoding="utf-8")
    return md, csv_path, json_path
