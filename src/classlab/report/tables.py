"""Aggregate per-run metrics into per-run and mean ± std tables (CSV and markdown)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from classlab.io import read_json, write_text

SCALARS = ("top1", "balanced_top1", "nll", "ece_15", "ece_10_x100")
# what a run records beside its metrics, where it does: its training budget and its provenance
RUN_FIELDS = ("train_steps", "batch_size", "git_commit", "command")


def run_fields(metrics: dict) -> dict:
    """The budget (``train_steps``: optimizer steps, ``batch_size``) and provenance (``git_commit``,
    ``command``, from ``metrics["provenance"]``) that a run's metrics.json records; absent ones are
    left out, so older runs give empty cells, not errors."""
    out = {}
    for key in ("train_steps", "batch_size"):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = int(value) if float(value).is_integer() else float(value)
    provenance = metrics.get("provenance")
    provenance = provenance if isinstance(provenance, dict) else {}
    for key in ("git_commit", "command"):
        value = provenance.get(key, metrics.get(key))
        if isinstance(value, str) and value:
            out[key] = value
    return out


def with_integer_budgets(runs: pd.DataFrame) -> pd.DataFrame:
    """Budget columns as nullable integers, so a CSV says 36, not 36.0, when some runs lack them."""
    for key in ("train_steps", "batch_size"):
        if key in runs.columns:
            values = pd.to_numeric(runs[key], errors="coerce")
            if (values.dropna() % 1 == 0).all():
                runs[key] = values.astype("Int64")
    return runs


def collect_runs(metric_files: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in metric_files:
        m = read_json(path)
        rows.append({"dataset": m["dataset"], "backbone": m["backbone"], "method": m["method"],
                     "seed": int(m["seed"]), **{k: float(m[k]) for k in SCALARS}, **run_fields(m)})
    if not rows:
        raise ValueError("no metrics files to aggregate")
    runs = pd.DataFrame(rows).sort_values(["dataset", "backbone", "method", "seed"]).reset_index(drop=True)
    return with_integer_budgets(runs)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """mean, std (ddof=1; 0 for one seed) and seed count per dataset x backbone x method."""
    grouped = runs.groupby(["dataset", "backbone", "method"], sort=True)
    out = grouped[list(SCALARS)].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out = out.fillna({f"{m}_std": 0.0 for m in SCALARS})
    out["seeds"] = grouped.size()
    return out.reset_index()


def markdown_table(summary: pd.DataFrame) -> str:
    header = "| dataset | backbone | method | top-1 (%) | balanced top-1 (%) | NLL | ECE-15 (%) | seeds |\n"
    header += "|---|---|---|---|---|---|---|---|\n"
    lines = []
    for _, r in summary.iterrows():
        lines.append(
            f"| {r.dataset} | {r.backbone} | {r.method} | {100 * r.top1_mean:.2f} ± {100 * r.top1_std:.2f} | "
            f"{100 * r.balanced_top1_mean:.2f} ± {100 * r.balanced_top1_std:.2f} | "
            f"{r.nll_mean:.3f} ± {r.nll_std:.3f} | {100 * r.ece_15_mean:.2f} ± {100 * r.ece_15_std:.2f} | {r.seeds} |")
    return header + "\n".join(lines) + "\n\nmean ± std over seeds (sample std, ddof=1); test split.\n"


def markdown_to_frame(markdown: str) -> pd.DataFrame:
    """The first pipe table of ``markdown`` as a frame of strings (cells such as "91.2 ± 0.3")."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    return pd.DataFrame(rows[1:], columns=rows[0])


def write_table_set(runs: pd.DataFrame, summary: pd.DataFrame, markdown: str, runs_csv: Path, summary_csv: Path,
                    summary_md: Path) -> None:
    """The table files every family writes: per-run CSV, summary CSV (numbers), summary markdown,
    and ``summary_table.csv`` next to it: the markdown's "mean ± std" cells, which the HTML
    report renders as its results table."""
    write_text(runs_csv, runs.to_csv(index=False))
    write_text(summary_csv, summary.to_csv(index=False))
    write_text(summary_md, markdown)
    write_text(Path(summary_md).with_name("summary_table.csv"), markdown_to_frame(markdown).to_csv(index=False))


def write_tables(metric_files: list[str | Path], runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = collect_runs(metric_files)
    summary = summarize(runs)
    write_table_set(runs, summary, markdown_table(summary), runs_csv, summary_csv, summary_md)
    return summary
