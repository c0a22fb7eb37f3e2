"""Tables and claims of the shift family.

Domain generalisation, as DomainBed reports it: for each domain suite, one row per method and
one column per test domain plus their average, the test domain's accuracy of the draw selected
by training-domain validation (and, in a table apart, by the oracle), mean ± standard error
over trials. ``runs.csv`` has one row per (suite, test domain, method, trial) with both
selections, so that claims pair trials (same data split) between methods.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from classlab.io import read_json, write_text
from classlab.protocols.shift import SELECTIONS, select_draws
from classlab.provenance import UNKNOWN


def dg_runs(record_files: list[str | Path], suite_names: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per job: ``scenario`` is "<suite>/<test domain>" (the claims' setting);
    ``suite_names`` maps a records file's suite directory name when it differs from the kind."""
    rows = []
    for path in record_files:
        rec = read_json(path)
        suite = Path(path).parents[3].name if suite_names is None else suite_names[str(path)]
        chosen = select_draws(rec)
        row = {"family": "shift", "protocol": "domain_generalization", "dataset": rec.get("dataset", ""),
               "backbone": rec["backbone"], "suite": suite, "test_domain": rec["test_domain"],
               "scenario": f"{suite}/{rec['test_domain']}", "method": rec["method"], "seed": int(rec["trial"]),
               "n_draws": int(rec["n_draws"]),
               "git_commit": (rec.get("provenance") or {}).get("git_commit", UNKNOWN)}
        for selection in SELECTIONS:
            pick = chosen[selection]
            row[f"test_acc_{selection}"] = pick["test_acc"]
            row[f"val_acc_{selection}"] = pick["val_acc"]
            row[f"draw_{selection}"] = pick["draw"]
        row["train_steps"] = chosen["training_domain"]["train_steps"]
        row["batch_size"] = chosen["training_domain"]["hparams"].get("batch_size")
        rows.append(row)
    runs = pd.DataFrame(rows)
    return runs.sort_values(["suite", "test_domain", "method", "seed"]).reset_index(drop=True) if len(runs) else runs


def _mean_se(values: pd.Series) -> tuple[float, float]:
    v = values.dropna().to_numpy(dtype=float)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def dg_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (suite, selection, method, test domain or "avg"): mean and s.e. over trials.
    The average over test domains is taken per trial first (DomainBed's "Avg")."""
    rows = []
    for (dataset, backbone, suite, method), group in runs.groupby(["dataset", "backbone", "suite", "method"]):
        for selection in SELECTIONS:
            col = f"test_acc_{selection}"
            for domain, g in group.groupby("test_domain"):
                m, se = _mean_se(g[col])
                rows.append({"dataset": dataset, "backbone": backbone, "suite": suite, "selection": selection,
                             "method": method, "test_domain": domain, "acc_mean": m, "acc_se": se,
                             "trials": int(g[col].notna().sum())})
            per_trial = group.groupby("seed")[col].mean()
            complete = group.groupby("seed")["test_domain"].nunique() == group["test_domain"].nunique()
            m, se = _mean_se(per_trial[complete])
            rows.append({"dataset": dataset, "backbone": backbone, "suite": suite, "selection": selection,
                         "method": method, "test_domain": "avg", "acc_mean": m, "acc_se": se,
                         "trials": int(complete.sum())})
    return pd.DataFrame(rows)


def dg_markdown(summary: pd.DataFrame) -> str:
    """DomainBed's tables: per suite and selection, methods x test domains (+ Avg), accuracy %."""
    out = []
    for (dataset, backbone, suite, selection), group in summary.groupby(["dataset", "backbone", "suite", "selection"]):
        domains = [d for d in dict.fromkeys(group.test_domain) if d != "avg"] + ["avg"]
        what = "training-domain validation" if selection == "training_domain" else "oracle (test-domain validation)"
        out.append(f"### {suite} ({dataset}, {backbone}): model selection by {what}\n")
        out.append("| method | " + " | ".join(domains) + " |")
        out.append("|---|" + "---|" * len(domains))
        for method, g in group.groupby("method"):
            cells = []
            for d in domains:
                r = g[g.test_domain == d]
                if r.empty or np.isnan(r.acc_mean.iloc[0]):
                    cells.append("-")
                else:
                    se = r.acc_se.iloc[0]
                    cells.append(f"{100 * r.acc_mean.iloc[0]:.1f} ± {100 * se:.1f}" if not np.isnan(se)
                                 else f"{100 * r.acc_mean.iloc[0]:.1f}")
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_dg_tables(record_files, runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = dg_runs(record_files)
    summary = dg_summary(runs) if len(runs) else pd.DataFrame()
    write_text(runs_csv, runs.to_csv(index=False))
    write_text(summary_csv, summary.to_csv(index=False))
    header = ("# shift: domain generalisation (DomainBed protocol)\n\nTest-domain accuracy (%) of the draw selected "
              "by each rule, mean ± s.e. over trials; avg: the mean over test domains, per trial.\n\n")
    write_text(summary_md, header + (dg_markdown(summary) if len(summary) else "no runs\n"))
    return runs


def shift_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, "shift", group_by=("dataset", "backbone", "scenario"), claims=claims)
