"""Aggregate per-run metrics into per-run and mean ± std tables (CSV and markdown)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from classlab.io import read_json, write_text

SCALARS = ("top1", "balanced_top1", "nll", "ece_15", "ece_10_x100")
# recorded by some runs only (top-5 since the recipe families; shot groups on long-tailed training
# sets; feature norms of Classifier models; the validation split): NaN where a run lacks them
OPTIONAL_SCALARS = ("top5", "val_top1", "many_shot_top1", "medium_shot_top1", "few_shot_top1", "feature_norm_mean")
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


def numeric_fields(metrics: dict, skip=("seed",)) -> dict:
    """Every top-level number of a metrics.json (not booleans, lists or nested records), as floats;
    None (a level never reached) becomes NaN. The families whose protocols report their own scalars
    (metric, single_paper) tabulate what their runs wrote."""
    out = {}
    for key, value in metrics.items():
        if key in skip or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def summarize_numbers(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean and std over seeds of every numeric column of ``runs`` (not the keys or the seed) per
    ``keys`` group, and the seed count: the summary of families that tabulate what their runs wrote."""
    skip = set(keys) | {"seed"}
    columns = [c for c in runs.columns if c not in skip and pd.api.types.is_numeric_dtype(runs[c])]
    g = runs.groupby(keys, dropna=False)
    out = g[columns].agg(["mean", "std"])
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    out["seeds"] = g.seed.nunique()
    return out.reset_index()


def method_table(group: pd.DataFrame, shown: list[tuple[str, str]], cell) -> list[str]:
    """A markdown table of one summary group: a row per method, a column per (key, label) of ``shown``
    whose ``<key>_mean`` the summary has, ``cell(row, key)`` its text, and the seeds."""
    shown = [(k, label) for k, label in shown if f"{k}_mean" in group]
    lines = ["| method | " + " | ".join(label for _, label in shown) + " | seeds |",
             "|---|" + "---|" * (len(shown) + 1)]
    for _, row in group.iterrows():
        lines.append(f"| {row.method} | " + " | ".join(cell(row, k) for k, _ in shown) + f" | {row.seeds} |")
    return lines + [""]


def percent_cell(row, key: str) -> str:
    """A summary cell in %: "mean ± std" over seeds (std 0 with one seed), "-" where no run reports it."""
    mean, std = row.get(f"{key}_mean", float("nan")), row.get(f"{key}_std", float("nan"))
    if mean != mean:
        return "-"
    return f"{100 * mean:.1f} ± {100 * (std if std == std else 0.0):.1f}"


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
        optional = {k: float(m[k]) for k in OPTIONAL_SCALARS if isinstance(m.get(k), (int, float))}
        rows.append({"dataset": m["dataset"], "backbone": m["backbone"], "method": m["method"],
                     "seed": int(m["seed"]), **{k: float(m[k]) for k in SCALARS}, **optional, **run_fields(m)})
    if not rows:
        raise ValueError("no metrics files to aggregate")
    runs = pd.DataFrame(rows).sort_values(["dataset", "backbone", "method", "seed"]).reset_index(drop=True)
    return with_integer_budgets(runs)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """mean, std (ddof=1; 0 for one seed) and seed count per dataset x backbone x method."""
    grouped = runs.groupby(["dataset", "backbone", "method"], sort=True)
    columns = list(SCALARS) + [k for k in OPTIONAL_SCALARS if k in runs.columns]
    out = grouped[columns].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out = out.fillna({f"{m}_std": 0.0 for m in SCALARS})
    out["seeds"] = grouped["seed"].nunique()  # seeds, not rows: a run may add several rows per seed
    return out.reset_index()


def _cell(r, key: str, scale: float = 100.0, digits: int = 2) -> str:
    mean = r.get(f"{key}_mean")
    if mean is None or pd.isna(mean):
        return "-"
    std = r.get(f"{key}_std")
    std = 0.0 if std is None or pd.isna(std) else std
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def markdown_table(summary: pd.DataFrame) -> str:
    """Mean ± std per method: the fixed columns, then top-5, ECE-10 (x100, as PS-KD reports it), the
    few-shot classes' top-1 and the mean feature norm where some run recorded them."""
    optional = [(k, label, scale, digits) for k, label, scale, digits in (
        ("top5", "top-5 (%)", 100.0, 2), ("few_shot_top1", "few-shot top-1 (%)", 100.0, 2),
        ("feature_norm_mean", "feature norm", 1.0, 2)) if f"{k}_mean" in summary.columns]
    names = ["dataset", "backbone", "method", "top-1 (%)", "balanced top-1 (%)", "NLL", "ECE-15 (%)", "ECE-10 (x100)"]
    names += [label for _, label, _, _ in optional] + ["seeds"]
    header = "| " + " | ".join(names) + " |\n|" + "---|" * len(names) + "\n"
    lines = []
    for _, r in summary.iterrows():
        cells = [r.dataset, r.backbone, r.method, _cell(r, "top1"), _cell(r, "balanced_top1"),
                 _cell(r, "nll", 1.0, 3), _cell(r, "ece_15"), _cell(r, "ece_10_x100", 1.0, 2)]
        cells += [_cell(r, k, scale, digits) for k, _, scale, digits in optional] + [str(r.seeds)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return header + "\n".join(lines) + "\n\nmean ± std over seeds (sample std, ddof=1); test split.\n"


def markdown_to_frame(markdown: str) -> pd.DataFrame:
    """The first pipe table of ``markdown`` as a frame of strings (cells such as "91.2 ± 0.3")."""
    rows, started = [], False
    for line in markdown.splitlines():
        if not line.startswith("|"):
            if started:
                break  # the first table ended
            continue
        started = True
        if not set(line) <= set("|-: "):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
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


def collect_protocol_runs(metric_files, keys: list[str], scalars, prepare=None) -> pd.DataFrame:
    """One row per run of a protocol family (incremental, discovery): its ``keys`` (dataset, backbone,
    scenario or split, method), seed, init kind, the ``scalars`` it reports and its budget and provenance.
    ``prepare(metrics)`` may rename fields first."""
    rows = []
    for path in metric_files:
        m = read_json(path)
        if prepare is not None:
            m = prepare(m)
        rows.append({**{k: m[k] for k in keys}, "seed": int(m["seed"]), "init_kind": m.get("init_kind", "scratch"),
                     **{k: float(m[k]) for k in scalars if m.get(k) is not None}, **run_fields(m)})
    if not rows:
        raise ValueError("no metrics files to aggregate")
    return with_integer_budgets(pd.DataFrame(rows).sort_values(keys + ["seed"]).reset_index(drop=True))


def summarize_protocol_runs(runs: pd.DataFrame, keys: list[str], scalars, describe_inits) -> pd.DataFrame:
    """mean and std of each scalar, the seed count and ``describe_inits(init kinds of a group)`` per key."""
    cols = [c for c in scalars if c in runs.columns]
    grouped = runs.groupby(keys, sort=True)
    out = grouped[cols].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out["seeds"] = grouped["seed"].nunique()  # seeds, not rows: a run may add several rows per seed
    out["backbone_init"] = grouped["init_kind"].agg(describe_inits)
    return out.reset_index()
