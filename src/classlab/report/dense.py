"""Tables, figure and claims of the `dense` family (detection and segmentation on long-tailed scenes).

``runs.csv`` has one row per (dataset, method, seed) with every number of the run's metrics.json
(``classlab.report.tables.numeric_fields``): detection's ``ap``, ``ap50``, ``ap75``, ``ap_rare``,
``ap_common``, ``ap_frequent``; segmentation's ``miou``, ``miou_objects``, ``mean_f1``, ``f1_<band>``,
``miou_<band>``, ``pixel_accuracy``, ``pixel_ece``; each with its ``val_`` twin. ``scenario`` is the task:
a claim compares two methods of one task, paired by seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from classlab.io import read_json
from classlab.report.tables import (method_table, numeric_fields, percent_cell, run_fields, summarize_numbers,
                                    with_integer_budgets, write_table_set)

FAMILY = "dense"
DISPLAY = {
    "detection": [("ap", "AP"), ("ap50", "AP50"), ("ap_rare", "AP rare"), ("ap_common", "AP common"),
                  ("ap_frequent", "AP frequent"), ("val_ap", "val AP")],
    "segmentation": [("miou", "mIoU"), ("f1_rare", "F1 rare"), ("miou_rare", "mIoU rare"), ("f1_common", "F1 common"),
                     ("f1_frequent", "F1 frequent"), ("pixel_ece", "pixel ECE"), ("val_miou", "val mIoU"),
                     ("val_pixel_ece", "val ECE")],
}
SKIP = ("seed", "train_seconds", "eval_seconds", "n_train_images", "n_val_images", "n_test_images")
SCORE_MIN = 0.3  # detections drawn in the figure


def dense_runs(metric_files) -> pd.DataFrame:
    rows = []
    for path in metric_files:
        m = read_json(path)
        rows.append({"family": FAMILY, "protocol": m["protocol"], "scenario": m["task"], "dataset": m.get("dataset", ""),
                     "backbone": m.get("backbone", "") or "", "method": m["method"], "seed": int(m["seed"]),
                     **numeric_fields(m, SKIP), **run_fields(m)})
    if not rows:
        raise ValueError("no metrics files to aggregate")
    return with_integer_budgets(pd.DataFrame(rows).sort_values(["scenario", "method", "seed"]).reset_index(drop=True))


def dense_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summarize_numbers(runs, ["dataset", "backbone", "scenario", "method"])


def dense_markdown(summary: pd.DataFrame) -> str:
    lines = []
    for (dataset, backbone, scenario), group in summary.groupby(["dataset", "backbone", "scenario"]):
        what = ("COCO AP (pycocotools) and its mean over each frequency band's classes" if scenario == "detection"
                else "mIoU, band F1 / IoU and pixel ECE (15 bins)")
        lines.append(f"### {scenario}: {dataset} ({backbone}), {what}: %, mean ± std over seeds\n")
        lines += method_table(group, DISPLAY.get(scenario, []), percent_cell)
    return "\n".join(lines)


def write_dense_tables(metric_files, runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = dense_runs(metric_files)
    summary = dense_summary(runs)
    write_table_set(runs, summary, "# dense\n\n" + dense_markdown(summary), runs_csv, summary_csv, summary_md)
    return runs


def dense_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, FAMILY, group_by=("dataset", "backbone", "scenario"), claims=claims)


# --- the figure: predictions drawn on test scenes ---------------------------------------------------

def _class_colours(n: int) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return np.array([cmap(k % 20)[:3] for k in range(n)])


def _overlay(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The image (H, W, 3 in [0, 1]) with each object class's pixels (mask k + 1) tinted by its colour."""
    out = image.copy()
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[(mask[fg] - 1) % len(colours)]
    return out


def plot_dense_examples(metric_files, prediction_files, data_dir: Path, figure: Path, n_scenes: int = 4) -> None:
    """The first ``n_scenes`` test scenes: a row for the ground truth (boxes and masks) and one per method
    (its detections with score >= SCORE_MIN, or its predicted mask), first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from classlab.data.prepare import load_prepared
    from classlab.io import atomic_path

    data = load_prepared(Path(data_dir))
    test = data.test
    names = list(data.manifest.get("class_names") or [])
    n = min(n_scenes, len(test))
    colours = _class_colours(int(data.manifest["num_classes"]))
    images = test.x[:n].permute(0, 2, 3, 1).float().numpy() / 255.0
    runs = []
    for mpath, ppath in zip(metric_files, prediction_files):
        m = read_json(mpath)
        runs.append((m["method"], m["task"], np.load(ppath)))
    fig, axes = plt.subplots(1 + len(runs), n, figsize=(2.1 * n, 2.2 * (1 + len(runs))), squeeze=False)

    def label(k: int) -> str:
        return names[k] if 0 <= k < len(names) else str(k)

    for j in range(n):
        ax = axes[0, j]
        ax.imshow(_overlay(images[j], test.semantic_masks[j].numpy(), colours))
        for box, k in zip(test.object_boxes[j].tolist(), test.object_labels[j].tolist()):
            if k >= 0:
                ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1], fill=False,
                                       ec="white", lw=0.8))
                ax.text(box[0], box[1] - 1, label(k), color="white", fontsize=4.5, va="bottom")
        for i, (method, task, pred) in enumerate(runs, start=1):
            ax = axes[i, j]
            if task == "segmentation":
                ax.imshow(_overlay(images[j], pred["masks"][j], colours))
            else:
                ax.imshow(images[j])
                keep = (pred["image_id"] == j) & (pred["scores"] >= SCORE_MIN)
                for box, score, k in zip(pred["boxes"][keep], pred["scores"][keep], pred["labels"][keep]):
                    ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1],
                                           fill=False, ec=colours[int(k) % len(colours)], lw=0.8))
                    ax.text(box[0], box[1] - 1, f"{label(int(k))} {score:.2f}", color=colours[int(k) % len(colours)],
                            fontsize=4.5, va="bottom")
    for i, row_name in enumerate(["ground truth"] + [f"{method} ({task})" for method, task, _ in runs]):
        axes[i, 0].set_ylabel(row_name, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{data.manifest.get('dataset', '')}: test scenes, first seed", fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(figure) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
