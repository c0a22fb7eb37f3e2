"""Tables and claims of the vlm family.

``runs.csv`` has one row per (dataset, setting, method, seed): base accuracy among the base classes,
new accuracy among the new classes and their harmonic mean H (``classlab.metrics.vlm``), with the
training budget. The summary is CoOp/CoCoOp's base-to-novel table: mean ± std over seeds.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from classlab.io import read_json
from classlab.provenance import UNKNOWN
from classlab.report.tables import write_table_set

METRICS = ("base", "new", "hm")


def vlm_runs(metric_files: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in metric_files:
        m = read_json(path)
        rows.append({"family": "vlm", "dataset": m.get("dataset", ""), "backbone": m.get("backbone", ""),
                     "scenario": f"base_to_novel/{int(m['shots'])}shot", "method": m["method"], "seed": int(m["seed"]),
                     **{k: float(m[k]) for k in METRICS}, "shots": int(m["shots"]),
                     "image_side_saw": " ".join(str(c) for c in m.get("image_side_saw", [])),
                     "test_samples": m.get("test_samples"), "train_steps": m.get("train_steps"),
                     "batch_size": (m.get("hparams") or {}).get("batch_size"),
                     "git_commit": (m.get("provenance") or {}).get("git_commit", UNKNOWN)})
    runs = pd.DataFrame(rows)
    return runs.sort_values(["scenario", "method", "seed"]).reset_index(drop=True) if len(runs) else runs


def vlm_summary(runs: pd.DataFrame) -> pd.DataFrame:
    g = runs.groupby(["dataset", "backbone", "scenario", "method"])
    out = g[list(METRICS)].agg(["mean", "std"])
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    out["seeds"] = g.seed.count()
    return out.reset_index()


def vlm_markdown(summary: pd.DataFrame, runs: pd.DataFrame) -> str:
    lines = []
    for (dataset, backbone, scenario), group in summary.groupby(["dataset", "backbone", "scenario"]):
        saw = runs[(runs.dataset == dataset) & (runs.scenario == scenario)].image_side_saw.iloc[0]
        lines.append(f"### {dataset} ({backbone}), {scenario}: accuracy (%), mean ± std over seeds\n")
        lines.append(f"The image side of the offline CLIP was trained on classes {saw} only (the base classes).\n")
        lines.append("| method | base | new | H | seeds |")
        lines.append("|---|---|---|---|---|")
        for r in group.itertuples():
            cells = [f"{100 * getattr(r, f'{k}_mean'):.1f} ± {100 * (getattr(r, f'{k}_std') if getattr(r, f'{k}_std') == getattr(r, f'{k}_std') else 0):.1f}"
                     for k in METRICS]
            lines.append(f"| {r.method} | " + " | ".join(cells) + f" | {r.seeds} |")
        lines.append("")
    return "\n".join(lines)


def write_vlm_tables(metric_files, runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = vlm_runs(metric_files)
    summary = vlm_summary(runs) if len(runs) else pd.DataFrame()
    write_table_set(runs, summary, "# vlm\n\n" + (vlm_markdown(summary, runs) if len(summary) else "no runs\n"), runs_csv,
                    summary_csv, summary_md)
    return runs


def vlm_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, "vlm", group_by=("dataset", "backbone", "scenario"), claims=claims)
