"""Tables, claims and figures of the incremental family, from each run's metrics.json."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from classlab.io import read_json  # noqa: E402
from classlab.report.claims import evaluate_claims  # noqa: E402
from classlab.report.figures import _save  # noqa: E402
from classlab.report.tables import collect_protocol_runs, summarize_protocol_runs, write_table_set  # noqa: E402

SCALARS = ("last_accuracy", "average_incremental_accuracy", "forgetting", "forgetting_initial",
           "backward_transfer", "last_accuracy_class_balanced", "average_incremental_accuracy_class_balanced",
           "forgetting_class_balanced", "base_accuracy", "novel_accuracy", "harmonic_mean", "performance_drop",
           "anytime_auc", "forgotten_accuracy", "retained_accuracy", "retained_drop", "original_retained_accuracy",
           "original_forgotten_accuracy", "h_mean", "mean_average_precision", "average_incremental_map")
KEYS = ["dataset", "backbone", "scenario", "method"]
TEXT = ("init_kind",)


def _with_map(m: dict) -> dict:
    if "final_map" in m:  # multi-label runs report mAP (protocols/multilabel.py)
        m["mean_average_precision"] = m["final_map"]
    return m


def collect(metric_files: list[str | Path]) -> pd.DataFrame:
    return collect_protocol_runs(metric_files, KEYS, SCALARS, _with_map)


def _describe_inits(kinds: pd.Series) -> str:
    # which labels the starting backbone saw (each seed has its own first task: list the kind)
    if set(kinds) == {"scratch"}:
        return "scratch"
    if all("only" in x for x in kinds):
        return kinds.iloc[0].split(" on ")[0] + " on first-task classes"
    return "; ".join(sorted(set(kinds)))


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    return summarize_protocol_runs(runs, KEYS, SCALARS, _describe_inits)


def _pm(row, name: str, scale: float = 100.0) -> str:
    mean, std = row.get(f"{name}_mean"), row.get(f"{name}_std")
    if mean is None or pd.isna(mean):
        return "-"
    return f"{scale * mean:.2f} ± {0.0 if pd.isna(std) else scale * std:.2f}"


def markdown(summary: pd.DataFrame) -> str:
    lines = ["| dataset | scenario | method | backbone init | last acc. (%) | avg. incr. acc. (%) | forgetting (%) | "
             "last acc., class-bal. (%) | extra | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        extra = []
        for name, label in (("novel_accuracy", "novel"), ("base_accuracy", "base"), ("harmonic_mean", "HM"),
                            ("anytime_auc", "A_auc"), ("forgotten_accuracy", "forgotten"),
                            ("retained_accuracy", "retained"), ("mean_average_precision", "mAP")):
            if f"{name}_mean" in r and not pd.isna(r[f"{name}_mean"]):
                extra.append(f"{label} {_pm(r, name)}")
        lines.append(f"| {r.dataset} | {r.scenario} | {r.method} | {r.backbone_init} | {_pm(r, 'last_accuracy')} | "
                     f"{_pm(r, 'average_incremental_accuracy')} | {_pm(r, 'forgetting')} | "
                     f"{_pm(r, 'last_accuracy_class_balanced')} | {'; '.join(extra) or '-'} | {r.seeds} |")
    return "\n".join(lines) + ("\n\nmean ± std over seeds (each seed its own class order). Accuracies are "
                               "sample-weighted unless marked class-balanced; forgetting is max-based.\n")


def write_incremental_tables(metric_files, runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = collect(metric_files)
    summary = summarize(runs)
    write_table_set(runs, summary, markdown(summary), runs_csv, summary_csv, summary_md)
    return runs


def incremental_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    """The family's claims (config/claims/incremental.yaml unless ``claims`` is given), one row per
    dataset x backbone x scenario that ran both arms."""
    return evaluate_claims(runs, "incremental", group_by=("dataset", "backbone", "scenario"), claims=claims)


def accuracy_curves(metric_files: list[Path], out: Path) -> None:
    """Accuracy on all seen classes after each task, mean over seeds with min-max band."""
    curves: dict[str, list] = {}
    title = ""
    for path in metric_files:
        m = read_json(path)
        curves.setdefault(m["method"], []).append(m["seen_accuracy"])
        title = f"{m['dataset']} {m['scenario']}"
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, runs in sorted(curves.items()):
        arr = 100 * np.array(runs)
        x = np.arange(1, arr.shape[1] + 1)
        ax.plot(x, arr.mean(0), marker="o", label=f"{method} ({len(runs)} seeds)")
        ax.fill_between(x, arr.min(0), arr.max(0), alpha=0.15)
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out)


def accuracy_matrix_heatmaps(metric_files: list[Path], out: Path) -> None:
    """A[t, j] (accuracy on task j after task t), mean over seeds, one panel per method."""
    mats: dict[str, list] = {}
    for path in metric_files:
        m = read_json(path)
        mats.setdefault(m["method"], []).append(np.array(m["accuracy_matrix"], dtype=float))
    methods = sorted(mats)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        a = 100 * np.nanmean(np.stack(mats[method]), axis=0)
        ax.imshow(np.nan_to_num(a, nan=0.0), vmin=0, vmax=100, cmap="viridis")
        for (i, j), v in np.ndenumerate(a):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("task evaluated")
        ax.set_ylabel("after training task")
    _save(fig, out)
