"""Tables, figures and claims of the `single_paper` family (each method its own protocol).

``runs.csv`` has one row per (protocol, method, seed) with every number the run's metrics.json holds
(``classlab.report.tables.numeric_fields``); ``scenario`` is the protocol's name, so a claim compares
methods of one protocol. icl_gd's rows gain ``loss_gap_relative`` = |loss_trained - loss_gd| / loss_gd,
the paper's "loss gap near 0" on a scale that does not depend on the task's noise level.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from classlab.io import read_json
from classlab.report.tables import (method_table, numeric_fields, run_fields, summarize_numbers,
                                    with_integer_budgets, write_table_set)

FAMILY = "single_paper"
# what each protocol's table shows, in order (a column no run reports is left out)
DISPLAY = {
    "icl_gd": [("loss_trained", "loss, trained LSA"), ("loss_gd", "loss, one GD step"),
               ("loss_gap_relative", "relative loss gap"), ("pred_cosine", "prediction cosine"),
               ("sensitivity_cosine", "sensitivity cosine"), ("pred_gap", "prediction gap")],
    "mil": [("bag_auc", "bag AUC"), ("instance_auc", "instance AUC"), ("val_bag_auc", "val bag AUC"),
            ("val_instance_auc", "val instance AUC")],
    "aspl": [("labels_to_target", "labels to target (test)"), ("val_labels_to_target", "labels to target (val)"),
             ("final_test_acc", "final test accuracy"), ("test_auc", "area under the test curve"),
             ("pseudo_count_total", "pseudo-labels"), ("pseudo_acc_overall", "pseudo-label accuracy")],
}
SKIP = ("seed", "train_seconds")


def single_paper_runs(metric_files) -> pd.DataFrame:
    rows = []
    for path in metric_files:
        m = read_json(path)
        row = {"family": FAMILY, "protocol": m["protocol"], "scenario": m["protocol"], "dataset": m.get("dataset", ""),
               "backbone": m.get("backbone", "") or "", "method": m["method"], "seed": int(m["seed"]),
               **numeric_fields(m, SKIP), **run_fields(m)}
        if m["protocol"] == "icl_gd" and m.get("loss_gd"):
            row["loss_gap_relative"] = abs(float(m["loss_trained"]) - float(m["loss_gd"])) / float(m["loss_gd"])
        rows.append(row)
    if not rows:
        raise ValueError("no metrics files to aggregate")
    runs = pd.DataFrame(rows).sort_values(["protocol", "method", "seed"]).reset_index(drop=True)
    return with_integer_budgets(runs)


def single_paper_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summarize_numbers(runs.drop(columns=["scenario"]), ["protocol", "dataset", "backbone", "method"])


def _cell(row, key: str) -> str:
    mean, std = row.get(f"{key}_mean", np.nan), row.get(f"{key}_std", np.nan)
    if mean != mean:
        return "-"
    digits = 0 if "labels" in key or "count" in key else 4 if abs(mean) < 0.1 else 3
    return f"{mean:.{digits}f} ± {(std if std == std else 0.0):.{digits}f}"


def single_paper_markdown(summary: pd.DataFrame, runs: pd.DataFrame) -> str:
    lines = []
    for protocol, group in summary.groupby("protocol"):
        dataset = group.dataset.iloc[0]
        lines.append(f"### {protocol} ({dataset}): mean ± std over seeds\n")
        if protocol == "aspl":
            missed = runs[(runs.protocol == "aspl") & runs.labels_to_target.isna()] if "labels_to_target" in runs else []
            if len(missed):
                lines.append(f"{len(missed)} run(s) never reached the target accuracy within the query budget; their "
                             "`labels to target` is missing and the mean is over the others.\n")
        lines += method_table(group, DISPLAY.get(protocol, []), _cell)
    return "\n".join(lines)


def write_single_paper_tables(metric_files, runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = single_paper_runs(metric_files)
    summary = single_paper_summary(runs)
    write_table_set(runs, summary, "# single_paper\n\n" + single_paper_markdown(summary, runs), runs_csv,
                    summary_csv, summary_md)
    return runs


def single_paper_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, FAMILY, group_by=("dataset", "backbone", "scenario"), claims=claims)


# --- figures ------------------------------------------------------------------------------------

def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from classlab.io import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_icl_losses(metrics: list[dict], path: Path) -> None:
    """Left: the trained layer's test loss over training steps against the GD construction's, per seed.
    Right: the cosine between the two models' sensitivities to the query (the paper's model cosine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, m in enumerate(sorted(metrics, key=lambda m: m["seed"])):
        curve = np.asarray(m["loss_curve"], dtype=float)
        ax.plot(curve[:, 0], curve[:, 1], color=f"C{k}", label=f"trained LSA, seed {m['seed']}")
        ax.axhline(float(m["loss_gd"]), color=f"C{k}", linestyle="--", linewidth=1,
                   label="one step of GD" if k == 0 else None)
        if m.get("cosine_curve"):
            cos = np.asarray(m["cosine_curve"], dtype=float)
            ax2.plot(cos[:, 0], cos[:, 1], color=f"C{k}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("squared loss on the test tasks")
    ax.set_title("trained layer vs one GD step: loss")
    ax.legend(fontsize=7)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("cosine of d y_hat / d x_query")
    ax2.set_title("model cosine with the GD construction")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy_vs_labels(metrics: list[dict], path: Path) -> None:
    """Test accuracy against labels queried, mean and min-max over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[dict]] = {}
    for m in metrics:
        by_method.setdefault(m["method"], []).append(m)
    for k, (method, runs) in enumerate(sorted(by_method.items())):
        labels = np.asarray(runs[0]["curve_labels"], dtype=float)
        acc = np.asarray([r["curve_test_acc"] for r in runs if len(r["curve_test_acc"]) == len(labels)])
        ax.plot(labels, 100 * acc.mean(0), marker="o", markersize=3, color=f"C{k}", label=f"{method} ({len(acc)} seeds)")
        ax.fill_between(labels, 100 * acc.min(0), 100 * acc.max(0), color=f"C{k}", alpha=0.15)
    target = runs[0].get("target_accuracy")
    if target:
        ax.axhline(100 * float(target), color="grey", linestyle=":", label="target accuracy")
    ax.set_xlabel("labels queried")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("active self-paced learning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_single_paper(metric_files, figure_dir: Path) -> list[Path]:
    metrics = [read_json(p) for p in metric_files]
    written = []
    icl = [m for m in metrics if m["protocol"] == "icl_gd"]
    if icl:
        plot_icl_losses(icl, Path(figure_dir) / "icl_gd_loss.png")
        written.append(Path(figure_dir) / "icl_gd_loss.png")
    active = [m for m in metrics if m["protocol"] == "aspl"]
    if active:
        plot_accuracy_vs_labels(active, Path(figure_dir) / "aspl_accuracy_vs_labels.png")
        written.append(Path(figure_dir) / "aspl_accuracy_vs_labels.png")
    return written
