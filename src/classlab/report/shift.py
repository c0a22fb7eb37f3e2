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


def dg_runs(record_files: list[str | Path]) -> pd.DataFrame:
    """One row per job: ``scenario`` is "<suite>/<test domain>" (the claims' setting); the suite's
    name is the records file's directory (``.../<suite>/<test domain>/<method>/trial<k>/``)."""
    rows = []
    for path in record_files:
        rec = read_json(path)
        suite = Path(path).parents[3].name
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


def _cell(m: float, se: float) -> str:
    """A table cell in %: "mean ± s.e.", the mean alone with one trial, "-" without any."""
    if np.isnan(m):
        return "-"
    return f"{100 * m:.1f} ± {100 * se:.1f}" if not np.isnan(se) else f"{100 * m:.1f}"


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
    keyed = summary.assign(_order=summary.selection.map({s: i for i, s in enumerate(SELECTIONS)}))
    for (dataset, backbone, suite, _, selection), group in keyed.groupby(
            ["dataset", "backbone", "suite", "_order", "selection"]):
        domains = [d for d in dict.fromkeys(group.test_domain) if d != "avg"] + ["avg"]
        what = "training-domain validation" if selection == "training_domain" else "oracle (test-domain validation)"
        out.append(f"### {suite} ({dataset}, {backbone}): model selection by {what}\n")
        out.append("| method | " + " | ".join(domains) + " |")
        out.append("|---|" + "---|" * len(domains))
        for method, g in group.groupby("method"):
            cells = []
            for d in domains:
                r = g[g.test_domain == d]
                cells.append("-" if r.empty else _cell(r.acc_mean.iloc[0], r.acc_se.iloc[0]))
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# --- test-time adaptation ----------------------------------------------------------------------

def tta_runs(metric_files: list[str | Path]) -> pd.DataFrame:
    """One row per (method, seed, corruption): ``tta_acc``, the stream accuracy averaged over the
    corruption's severities; the setting ``tta/mean`` averages over every corrupted stream and
    ``tta/clean`` is the uncorrupted stream (column ``clean_acc``, so that no claim reads it).
    ``scenario`` is "tta/<corruption>"."""
    rows = []
    for path in metric_files:
        m = read_json(path)
        base = {"family": "shift", "protocol": "test_time", "dataset": m["dataset"], "backbone": m["backbone"],
                "method": m["method"], "seed": int(m["seed"]), "source": m["source"],
                "batch_size": m["batch_size"], "images_per_s": m.get("images_per_s"),
                "git_commit": (m.get("provenance") or {}).get("git_commit", UNKNOWN)}
        streams = pd.DataFrame(m["streams"])
        for name, g in streams.groupby("corruption", sort=False):
            # the clean stream is a reference, not a claim's setting: its accuracy has its own column
            metric = "clean_acc" if name == "clean" else "tta_acc"
            rows.append({**base, "corruption": name, "scenario": f"tta/{name}", metric: float(g.accuracy.mean())})
        corrupted = streams[streams.corruption != "clean"]
        if len(corrupted):
            rows.append({**base, "corruption": "mean", "scenario": "tta/mean", "tta_acc": float(corrupted.accuracy.mean())})
    return pd.DataFrame(rows)


def tta_streams(metric_files: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in metric_files:
        m = read_json(path)
        for r in m["streams"]:
            rows.append({"method": m["method"], "seed": int(m["seed"]), **r})
    return pd.DataFrame(rows)


def tta_markdown(streams: pd.DataFrame, runs: pd.DataFrame) -> str:
    """Accuracy (%) by corruption (mean over severities and seeds) and by severity (mean over
    corruptions), mean ± s.e. over seeds."""
    out = ["### Test-time adaptation: stream accuracy by corruption (mean over severities), mean ± s.e. over seeds\n"]
    methods = [m for m in ("source", "bn_adapt", "tent", "cafa") if m in set(runs.method)] + \
        sorted(set(runs.method) - {"source", "bn_adapt", "tent", "cafa"})
    corruptions = list(dict.fromkeys(runs.corruption))
    corruptions = [c for c in corruptions if c not in ("clean", "mean")] + ["mean", "clean"]
    out.append("| method | " + " | ".join(corruptions) + " |")
    out.append("|---|" + "---|" * len(corruptions))
    for method in methods:
        cells = []
        for c in corruptions:
            v = runs[(runs.method == method) & (runs.corruption == c)]["clean_acc" if c == "clean" else "tta_acc"]
            cells.append(_cell(*_mean_se(v)) if len(v) else "-")
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    corrupted = streams[streams.corruption != "clean"]
    severities = sorted(set(corrupted.severity))
    out.append("\n### Test-time adaptation: accuracy by severity (mean over corruptions), mean ± s.e. over seeds\n")
    out.append("| method | " + " | ".join(f"severity {k}" for k in severities) + " |")
    out.append("|---|" + "---|" * len(severities))
    for method in methods:
        cells = []
        for k in severities:
            per_seed = corrupted[(corrupted.method == method) & (corrupted.severity == k)].groupby("seed").accuracy.mean()
            cells.append(_cell(*_mean_se(per_seed)) if len(per_seed) else "-")
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def dg_report_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The DomainBed tables as one CSV for the HTML report: suite, selection, method, one column per
    test domain and avg, each "mean ± s.e." (%)."""
    rows = []
    for (suite, selection, method), g in summary.groupby(["suite", "selection", "method"]):
        row = {"suite": suite, "selection": selection, "method": method}
        for _, r in g.iterrows():
            row[r.test_domain] = _cell(r.acc_mean, r.acc_se)
        rows.append(row)
    return pd.DataFrame(rows)


def tta_report_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Method x corruption (mean over severities), "mean ± s.e." over seeds (%), for the HTML report."""
    rows = []
    for method, g in runs.groupby("method"):
        row = {"method": method}
        for c, gc in g.groupby("corruption", sort=False):
            row[c] = _cell(*_mean_se(gc["clean_acc" if c == "clean" else "tta_acc"]))
        rows.append(row)
    return pd.DataFrame(rows)


def write_shift_tables(record_files, tta_files, runs_csv: Path, summary_csv: Path, summary_md: Path,
                       dg_table: Path | None = None, tta_table: Path | None = None) -> pd.DataFrame:
    """Both protocols' rows in one runs.csv (``protocol`` tells them apart), the DomainBed summary
    and the TTA tables in summary.md (and as CSVs for the HTML report)."""
    dg = dg_runs(record_files) if record_files else pd.DataFrame()
    tta = tta_runs(tta_files) if tta_files else pd.DataFrame()
    runs = pd.concat([dg, tta], ignore_index=True)
    summary = dg_summary(dg) if len(dg) else pd.DataFrame()
    if len(tta):
        t = tta.groupby(["dataset", "backbone", "method", "corruption"]).tta_acc
        tsum = t.agg(["mean", "std", "count"]).reset_index().rename(
            columns={"mean": "acc_mean", "std": "acc_std", "count": "seeds"})
        tsum["protocol"] = "test_time"
        summary = pd.concat([summary.assign(protocol="domain_generalization") if len(summary) else summary, tsum],
                            ignore_index=True)
    write_text(runs_csv, runs.to_csv(index=False))
    write_text(summary_csv, summary.to_csv(index=False))
    if dg_table is not None:
        write_text(dg_table, dg_report_table(dg_summary(dg)).to_csv(index=False) if len(dg) else "no runs\n")
    if tta_table is not None:
        write_text(tta_table, tta_report_table(tta).to_csv(index=False) if len(tta) else "no runs\n")
    parts = ["# shift\n"]
    if len(dg):
        parts.append("## Domain generalisation (DomainBed protocol)\n\nTest-domain accuracy (%) of the draw selected "
                     "by each rule, mean ± s.e. over trials; avg: the mean over test domains, per trial.\n")
        parts.append(dg_markdown(dg_summary(dg)))
    if len(tta):
        sources = ", ".join(sorted(set(tta.source)))
        parts.append(f"## Test-time adaptation\n\nSource model: {sources}; online, one step per batch of "
                     f"{int(tta.batch_size.iloc[0])}.\n")
        parts.append(tta_markdown(tta_streams(tta_files), tta))
    write_text(summary_md, "\n".join(parts) if len(parts) > 1 else "no runs\n")
    return runs


def shift_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, "shift", group_by=("dataset", "backbone", "scenario"), claims=claims)
