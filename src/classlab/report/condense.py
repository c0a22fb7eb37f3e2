"""Tables and claims of the condense family.

``runs.csv`` has one row per (dataset, variant, method, images per class, seed): the mean test
accuracy of the fresh ConvNets trained on the condensed set (``test_acc``; each run's own five
evaluations are in its metrics.json), and the condensation budget. The summary sets the measured
accuracy by images per class next to the DC and DSA papers' Fashion-MNIST numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from classlab.io import read_json
from classlab.provenance import UNKNOWN
from classlab.report.tables import write_table_set

# the papers' Fashion-MNIST table (DC: Zhao, Mopuri and Bilen, ICLR 2021; DSA: Zhao and Bilen, ICML
# 2021), ConvNet, test accuracy (%) at 1 / 10 / 50 images per class; the whole training set: 93.5
PAPER_TABLE = {"dc": {1: 70.5, 10: 82.3, 50: 83.6}, "dsa": {1: 70.6, 10: 84.6, 50: 88.7}}
WHOLE_DATASET = 93.5


def condense_runs(metric_files: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in metric_files:
        m = read_json(path)
        variant = Path(path).parents[3].name
        cond = m.get("condensation") or {}
        rows.append({"family": "condense", "dataset": m.get("dataset", ""), "backbone": "convnet_dc",
                     "variant": variant, "method": m["method"], "images_per_class": int(m["images_per_class"]),
                     "seed": int(m["seed"]), "scenario": f"{variant}/ipc{int(m['images_per_class'])}",
                     "test_acc": float(m["mean"]), "test_acc_runs_std": float(m["std"]),
                     "evaluation_runs": len(m["accuracies"]), "train_steps": cond.get("outer_iterations"),
                     "networks": cond.get("networks"), "condense_seconds": cond.get("seconds"),
                     "outer_iterations_per_s": cond.get("outer_iterations_per_s"),
                     "git_commit": (m.get("provenance") or {}).get("git_commit", UNKNOWN)})
    runs = pd.DataFrame(rows)
    return runs.sort_values(["variant", "images_per_class", "method", "seed"]).reset_index(drop=True) if len(runs) else runs


def condense_summary(runs: pd.DataFrame) -> pd.DataFrame:
    g = runs.groupby(["dataset", "variant", "method", "images_per_class"]).test_acc
    out = g.agg(["mean", "std", "count"]).reset_index().rename(columns={"mean": "acc_mean", "std": "acc_std",
                                                                        "count": "seeds"})
    out["paper_acc"] = [PAPER_TABLE.get(m, {}).get(int(k), np.nan) if d == "fashion_mnist" and v == "plain" else np.nan
                        for d, v, m, k in zip(out.dataset, out.variant, out.method, out.images_per_class)]
    return out


def condense_markdown(summary: pd.DataFrame) -> str:
    lines = []
    keyed = summary.assign(_plain_first=summary.variant != "plain")
    for (dataset, _, variant), group in keyed.groupby(["dataset", "_plain_first", "variant"]):
        ipcs = sorted(set(group.images_per_class))
        lines.append(f"### {dataset}, data variant `{variant}`: test accuracy (%) of fresh ConvNets trained on the "
                     f"condensed set, mean ± std over seeds (paper in brackets)\n")
        lines.append("| method | " + " | ".join(f"{k} img/cls" for k in ipcs) + " |")
        lines.append("|---|" + "---|" * len(ipcs))
        for method, g in group.groupby("method"):
            cells = []
            for k in ipcs:
                r = g[g.images_per_class == k]
                if r.empty:
                    cells.append("-")
                    continue
                r = r.iloc[0]
                cell = f"{100 * r.acc_mean:.1f}" + (f" ± {100 * r.acc_std:.1f}" if not np.isnan(r.acc_std) else "")
                if not np.isnan(r.paper_acc):
                    cell += f" [{r.paper_acc:.1f}]"
                cells.append(cell)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        if dataset == "fashion_mnist" and variant == "plain":
            lines.append(f"\nThe whole training set with the same ConvNet: {WHOLE_DATASET} (DC paper).")
        lines.append("")
    return "\n".join(lines)


def write_condense_tables(metric_files, runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = condense_runs(metric_files)
    summary = condense_summary(runs) if len(runs) else pd.DataFrame()
    write_table_set(runs, summary, "# condense\n\n" + (condense_markdown(summary) if len(summary) else "no runs\n"), runs_csv,
                    summary_csv, summary_md)
    return runs


def condense_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, "condense", group_by=("dataset", "backbone", "scenario"), claims=claims)
