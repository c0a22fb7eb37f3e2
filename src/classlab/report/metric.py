"""Tables, figures and claims of the `metric` family (deep metric learning and retrieval).

``runs.csv`` has one row per (dataset, setting, method, seed) with every number the run's metrics.json
holds (``classlab.report.tables.numeric_fields``). Settings (``scenario``): ``retrieval/test`` (trained on
the first half of the classes, scored on the test images of the other half: Recall@K, NMI, MAP@R),
``retrieval/select`` (the last ``val_classes`` training classes held out and scored, for choosing
options; the test classes untouched) and ``scenes`` (CFCD's protocol: the query object among
distractors, mAP). A claim compares methods within one setting, paired by seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from classlab.io import read_json
from classlab.report.tables import numeric_fields, run_fields, with_integer_budgets, write_table_set

FAMILY = "metric"
DISPLAY = {
    "retrieval/test": [("recall_at_1", "R@1"), ("recall_at_2", "R@2"), ("recall_at_4", "R@4"),
                       ("recall_at_8", "R@8"), ("nmi", "NMI"), ("map_at_r", "MAP@R")],
    "retrieval/select": [("val_recall_at_1", "val R@1"), ("val_nmi", "val NMI"), ("val_map_at_r", "val MAP@R")],
    "scenes": [("map", "mAP"), ("recall_at_1", "R@1"), ("val_map", "val mAP")],
}
SKIP = ("seed", "train_seconds")


def _scenario(m: dict) -> str:
    if m["protocol"] == "metric_scenes":
        return "scenes"
    return "retrieval/select" if m.get("select") else "retrieval/test"


def metric_runs(metric_files) -> pd.DataFrame:
    rows = []
    for path in metric_files:
        m = read_json(path)
        rows.append({"family": FAMILY, "protocol": m["protocol"], "scenario": _scenario(m),
                     "dataset": m.get("dataset", ""), "backbone": m.get("backbone", "") or "", "method": m["method"],
                     "seed": int(m["seed"]), **numeric_fields(m, SKIP), **run_fields(m)})
    if not rows:
        raise ValueError("no metrics files to aggregate")
    return with_integer_budgets(pd.DataFrame(rows).sort_values(["scenario", "method", "seed"]).reset_index(drop=True))


def metric_summary(runs: pd.DataFrame) -> pd.DataFrame:
    keys = ["dataset", "backbone", "scenario", "method"]
    columns = [c for c in runs.columns if c not in keys + ["family", "protocol", "seed", "git_commit", "command"]
               and pd.api.types.is_numeric_dtype(runs[c])]
    g = runs.groupby(keys)
    out = g[columns].agg(["mean", "std"])
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    out["seeds"] = g.seed.nunique()
    return out.reset_index()


def _cell(row, key: str) -> str:
    mean, std = row.get(f"{key}_mean", np.nan), row.get(f"{key}_std", np.nan)
    if mean != mean:
        return "-"
    return f"{100 * mean:.1f} ± {100 * (std if std == std else 0.0):.1f}"


def metric_markdown(summary: pd.DataFrame) -> str:
    lines = []
    titles = {"retrieval/test": "retrieval on the unseen classes (test images of the second half of the classes)",
              "retrieval/select": "validation on held-out training classes (for choosing options)",
              "scenes": "scene retrieval, the query object among distractors"}
    for (dataset, backbone, scenario), group in summary.groupby(["dataset", "backbone", "scenario"]):
        shown = [(k, label) for k, label in DISPLAY.get(scenario, []) if f"{k}_mean" in group]
        lines.append(f"### {dataset} ({backbone}), {titles.get(scenario, scenario)}: %, mean ± std over seeds\n")
        lines.append("| method | " + " | ".join(label for _, label in shown) + " | seeds |")
        lines.append("|---|" + "---|" * (len(shown) + 1))
        for _, row in group.iterrows():
            lines.append(f"| {row.method} | " + " | ".join(_cell(row, k) for k, _ in shown) + f" | {row.seeds} |")
        lines.append("")
    return "\n".join(lines)


def write_metric_tables(metric_files, runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = metric_runs(metric_files)
    summary = metric_summary(runs)
    write_table_set(runs, summary, "# metric\n\n" + metric_markdown(summary), runs_csv, summary_csv, summary_md)
    return runs


def metric_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, FAMILY, group_by=("dataset", "backbone", "scenario"), claims=claims)
