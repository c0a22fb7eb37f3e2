"""Metrics, tables, claims and figures of the explain family, from each job's saved maps.

Per job (``explain_metrics``): for every layer, over the explained scenes, the pointing game of the
target-class map (hit rate, with the tolerance in pixels), the box-area share (the hit rate of a
uniformly random point) and their ratio ``pointing_lift``, energy-based pointing, deletion and
insertion AUC of the predicted class, class sensitivity (Spearman between the top and the bottom
class's maps; lower is more class-sensitive) and the randomisation check: the Spearman correlation
between the trained model's map and the map after each step of the cascade (``randomisation`` is
the fully randomised model, ``randomisation_head`` the first step, the head alone). Every number
comes from ``maps.npz`` through ``classlab.metrics.saliency``.

In the tables a run is ``method@layer`` on a model (``scenario``): a claim compares layers or
methods on the same model and seed. The readouts of a frozen ViT (``promptcam``, ``linear_probe``)
and the explained model itself add rows with their test ``accuracy``.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from classlab.io import read_json  # noqa: E402
from classlab.metrics import saliency as sal  # noqa: E402
from classlab.report.claims import evaluate_claims  # noqa: E402
from classlab.report.figures import _save  # noqa: E402
from classlab.report.tables import run_fields, summarize_protocol_runs, with_integer_budgets, write_table_set  # noqa: E402

KEYS = ["dataset", "backbone", "scenario", "method"]
SCALARS = ("pointing", "box_share", "pointing_lift", "energy", "deletion_auc", "insertion_auc", "class_sensitivity",
           "randomisation_head", "randomisation", "accuracy")
# (column, label, scale, digits) of the markdown table
COLUMNS = [("pointing", "pointing (%)", 100.0, 1), ("box_share", "box share (%)", 100.0, 1),
           ("energy", "energy (%)", 100.0, 1), ("deletion_auc", "deletion AUC", 1.0, 3),
           ("insertion_auc", "insertion AUC", 1.0, 3), ("class_sensitivity", "class sens. ρ", 1.0, 3),
           ("randomisation", "randomised ρ", 1.0, 3), ("accuracy", "accuracy (%)", 100.0, 1)]


def _mean(values) -> float | None:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def explain_metrics(maps_path: str | Path, info_path: str | Path, tolerance: int = 0) -> dict:
    """metrics.json of one explain job (see the module docstring)."""
    info = read_json(info_path)
    with np.load(maps_path) as z:
        arrays = {k: z[k] for k in z.files}
    boxes, images = arrays["boxes"], arrays["images"]
    height, width = images.shape[-2:]
    accuracy = float((arrays["top"] == arrays["labels"]).mean())
    share = sal.box_area_share(boxes, height, width, tolerance)
    layers = []
    for layer in info["layers"]:
        key = layer.replace(".", "_")
        target = arrays[f"{key}__target"]
        hits = sal.pointing_game(target, boxes, tolerance)
        row = {"layer": layer, "pointing": float(np.mean(hits)), "box_share": float(np.mean(share)),
               "energy": _mean(sal.energy_pointing(target, boxes)),
               "deletion_auc": _mean(sal.curve_auc(arrays[f"{key}__deletion"])),
               "insertion_auc": _mean(sal.curve_auc(arrays[f"{key}__insertion"])),
               "class_sensitivity": _mean(sal.class_sensitivity(arrays[f"{key}__top"], arrays[f"{key}__bottom"]))}
        row["pointing_lift"] = row["pointing"] / row["box_share"] if row["box_share"] > 0 else None
        randomised = arrays[f"{key}__randomised"]
        if randomised.size:
            r = randomised.shape[1]
            sims = sal.randomisation_similarity(target[:r], randomised)  # (levels, r)
            row["randomisation_curve"] = [_mean(level) for level in sims]
            row["randomisation_head"] = row["randomisation_curve"][0]
            row["randomisation"] = row["randomisation_curve"][-1]
        layers.append(row)
    model = info["model"]
    return {"dataset": info["scenes"], "model_dataset": model.get("dataset"), "backbone": model.get("backbone"),
            "explainer": info["method"], "seed": int(model.get("seed") or 0), "layers": layers,
            "accuracy": accuracy, "tolerance": int(tolerance), "cascade": [str(c) for c in arrays["cascade"]],
            "n_images": int(info["n_images"]), "seconds": info.get("seconds"),
            "maps_per_second": info.get("maps_per_second"), "git_commit": info.get("git_commit"),
            "command": info.get("command")}


def run_rows(metric_files, accuracy_files=()) -> pd.DataFrame:
    """One row per (saliency job, layer), from ``results/explain/<scenes>/<model>/<method>/seed<k>/metrics.json``,
    and one per accuracy file ``results/eval/explain/<scenes>/<model>/<run>/seed<k>/metrics.json`` (the
    scene model itself, named by its training method, and its readouts). The model's name is the path's."""
    rows = []
    for path in metric_files:
        m, model = read_json(path), Path(path).parts[-4]
        for layer in m["layers"]:
            method = m["explainer"] if layer["layer"] == "input" else f"{m['explainer']}@{layer['layer']}"
            rows.append({"dataset": m["dataset"], "backbone": m["backbone"], "scenario": model, "method": method,
                         "seed": int(m["seed"]), "init_kind": "trained",
                         **{k: layer[k] for k in SCALARS if layer.get(k) is not None},
                         "git_commit": m.get("git_commit") or ""})
    for path in accuracy_files:
        m, model = read_json(path), Path(path).parts[-4]
        rows.append({"dataset": m["dataset"], "backbone": m["backbone"], "scenario": model, "method": m["method"],
                     "seed": int(m["seed"]), "init_kind": "trained", "accuracy": float(m["top1"]),
                     "val_accuracy": m.get("val_top1"), **run_fields(m)})
    if not rows:
        raise ValueError("no explain metrics to aggregate")
    return with_integer_budgets(pd.DataFrame(rows).sort_values(KEYS + ["seed"]).reset_index(drop=True))


def _cell(r, key: str, scale: float, digits: int) -> str:
    mean = r.get(f"{key}_mean")
    if mean is None or not np.isfinite(mean):
        return ""
    std = r.get(f"{key}_std")
    std = 0.0 if std is None or not np.isfinite(std) else std
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def markdown(summary: pd.DataFrame, tolerance: int) -> str:
    names = ["dataset", "model", "method@layer"] + [label for _, label, _, _ in COLUMNS] + ["seeds"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for _, r in summary.iterrows():
        cells = [r.dataset, r.scenario, r.method] + [_cell(r, *c[:1], c[2], c[3]) for c in COLUMNS] + [str(r.seeds)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return ("\n".join(lines) + f"\n\nmean ± std over seeds (ddof=1); pointing game with a tolerance of {tolerance} px; "
            "box share: the hit rate of a uniformly random point; deletion AUC lower is better, insertion AUC "
            "higher; class sensitivity and randomisation are Spearman correlations (lower: more class-sensitive, "
            "more dependent on the weights).\n")


def write_tables(runs: pd.DataFrame, runs_csv: Path, summary_csv: Path, summary_md: Path, claims_csv: Path,
                 tolerance: int) -> pd.DataFrame:
    # (Prompt-CAM has a maps row and an accuracy row per seed; the summary counts seeds, not rows)
    summary = summarize_protocol_runs(runs, KEYS, SCALARS, lambda kinds: "trained")
    write_table_set(runs, summary, markdown(summary, tolerance), runs_csv, summary_csv, summary_md)
    claims = evaluate_claims(runs, "explain", group_by=("dataset", "scenario"))
    from classlab.io import write_text

    write_text(claims_csv, claims.to_csv(index=False))
    return summary


# --- figures -------------------------------------------------------------------------------------

def map_grid(maps_files, labels, out: Path, n_scenes: int = 4) -> None:
    """Rows: method@layer (one file per method, seed 0 of one model); columns: the first ``n_scenes``
    explained scenes, the target-class map over the scene with the target's box drawn."""
    panels = []
    for path, label in zip(maps_files, labels):
        info = read_json(Path(path).with_name("explain.json"))
        with np.load(path) as z:
            for layer in info["layers"]:
                key = layer.replace(".", "_")
                name = label if layer == "input" else f"{label}@{layer}"
                panels.append((name, z["images"][:n_scenes], z["boxes"][:n_scenes], z[f"{key}__target"][:n_scenes]))
    rows = max(len(panels), 1)
    cols = n_scenes
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for r, (name, images, boxes, maps) in enumerate(panels):
        for c in range(min(cols, len(images))):
            ax = axes[r][c]
            ax.imshow(images[c].mean(0), cmap="gray")
            m = maps[c] - maps[c].min()
            ax.imshow(m / m.max() if m.max() > 0 else m, cmap="jet", alpha=0.45)
            x0, y0, x1, y1 = boxes[c]
            ax.add_patch(mpatches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.2))
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    _save(fig, out)


def randomisation_curves(metric_files, labels, out: Path) -> None:
    """Spearman correlation to the trained model's map after each step of the cascade (mean over
    seeds), one line per method@layer of one model."""
    curves: dict[str, list] = {}
    cascade: list[str] = []
    for path, label in zip(metric_files, labels):
        m = read_json(path)
        cascade = m["cascade"]
        for layer in m["layers"]:
            if "randomisation_curve" in layer:
                name = label if layer["layer"] == "input" else f"{label}@{layer['layer']}"
                curves.setdefault(name, []).append(layer["randomisation_curve"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, rows in sorted(curves.items()):
        ax.plot(np.nanmean(np.asarray(rows, dtype=float), axis=0), marker="o", label=name)
    ax.set_xticks(range(len(cascade)), [f"+{c}" for c in cascade], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("Spearman to the trained map")
    ax.set_xlabel("cascading randomisation (from the top)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, out)
