"""Tables, figures and claims of the `ssl` family (self-supervised pretraining, probed frozen).

``runs.csv`` has one row per (group, dataset, method, seed) with every number of the probe's
metrics.json (``classlab.report.tables.numeric_fields``): the image probes' ``linear_probe_acc`` and
``knn_acc`` (and their val numbers), the segmentation probe's ``miou``, ``miou_objects``,
``mean_f1``, ``pixel_accuracy`` and ``miou_<band>``. ``scenario`` is the group (the methods compared
at one budget on one backbone); a claim compares two methods within one group, paired by seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from classlab.io import read_json
from classlab.report.tables import (method_table, numeric_fields, percent_cell, run_fields, summarize_numbers,
                                    with_integer_budgets, write_table_set)

FAMILY = "ssl"
DISPLAY = {
    "image": [("linear_probe_acc", "linear probe"), ("knn_acc", "k-NN (k=20)"),
              ("linear_probe_val_acc", "val linear"), ("knn_val_acc", "val k-NN")],
    "segmentation": [("miou", "mIoU"), ("miou_objects", "mIoU objects"), ("mean_f1", "mean F1"),
                     ("pixel_accuracy", "pixel acc"), ("miou_rare", "mIoU rare"), ("val_miou", "val mIoU")],
}
SKIP = ("seed", "train_seconds", "chosen_epoch", "feature_dim", "train_samples", "linear_c")


def group_of(path: Path) -> str:
    """The group of a probe's metrics.json from its path: results/eval/ssl/<group>/<dataset>/<method>/seed<s>/."""
    parts = Path(path).parts
    return parts[-5] if len(parts) >= 5 else ""


def ssl_runs(metric_files) -> pd.DataFrame:
    rows = []
    for path in metric_files:
        m = read_json(path)
        rows.append({"family": FAMILY, "protocol": m["protocol"], "scenario": group_of(path), "probe": m["probe"],
                     "dataset": m.get("dataset", ""), "backbone": m.get("backbone", "") or "",
                     "method": m["method"], "seed": int(m["seed"]), **numeric_fields(m, SKIP), **run_fields(m),
                     # the budget a claim compares at is the pretraining's (the probe's is the same for all)
                     "train_steps": m.get("pretrain_steps"), "batch_size": m.get("pretrain_batch_size")})
    if not rows:
        raise ValueError("no metrics files to aggregate")
    return with_integer_budgets(pd.DataFrame(rows).sort_values(["scenario", "method", "seed"]).reset_index(drop=True))


def ssl_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summarize_numbers(runs, ["dataset", "backbone", "scenario", "probe", "method"])


def ssl_markdown(summary: pd.DataFrame) -> str:
    lines = []
    for (dataset, backbone, scenario, probe), group in summary.groupby(["dataset", "backbone", "scenario", "probe"]):
        what = "linear probe and k-NN on frozen features" if probe == "image" else \
            "linear segmentation probe on frozen feature maps"
        lines.append(f"### {scenario}: {dataset} ({backbone}), {what}: %, mean ± std over seeds\n")
        lines += method_table(group, DISPLAY.get(probe, []), percent_cell)
    return "\n".join(lines)


def write_ssl_tables(metric_files, runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = ssl_runs(metric_files)
    summary = ssl_summary(runs)
    write_table_set(runs, summary, "# ssl\n\n" + ssl_markdown(summary), runs_csv, summary_csv, summary_md)
    return runs


def ssl_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, FAMILY, group_by=("dataset", "backbone", "scenario"), claims=claims)


def plot_ssl_probes(metric_files, figure: Path) -> None:
    """Probe accuracy (image groups) or mIoU (segmentation groups) per method, one panel per group:
    each seed a dot, the mean a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = ssl_runs(metric_files)
    panels = []
    for (scenario, probe), group in runs.groupby(["scenario", "probe"]):
        keys = ["linear_probe_acc", "knn_acc"] if probe == "image" else ["miou", "miou_objects"]
        panels.append((scenario, group, [k for k in keys if k in group.columns]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (scenario, group, keys) in zip(axes[0], panels):
        methods = list(dict.fromkeys(group.method))
        width = 0.8 / max(len(keys), 1)
        for j, key in enumerate(keys):
            for i, method in enumerate(methods):
                values = 100 * group[group.method == method][key].dropna().to_numpy()
                x = i + (j - (len(keys) - 1) / 2) * width
                ax.bar(x, values.mean() if len(values) else 0, width * 0.9, color=f"C{j}", alpha=0.5,
                       label=key if i == 0 else None)
                ax.plot(np.full(len(values), x), values, "k.", ms=4)
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_title(f"{scenario} ({group.dataset.iloc[0]})", fontsize=9)
        ax.set_ylabel("%")
        ax.legend(fontsize=7)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    from classlab.io import atomic_path

    with atomic_path(figure) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
