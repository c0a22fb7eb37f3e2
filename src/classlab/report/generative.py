"""Tables, figure and claims of the `generative` family (a class-conditional DDPM and what reads it).

``runs.csv`` has one row per (dataset, method, seed) in one of three scenarios:

- ``ddpm`` (the shared node, from its ``history.json``): ``val_loss`` (the noise-prediction MSE on val
  seen pairs at fixed (t, eps) draws), ``final_loss`` (the last epoch's training loss), the budget;
- ``classification`` (the diffusion classifier's ``metrics.json``, split into one row per timestep
  weighting, method ``diffusion_classifier_<weighting>``): ``accuracy_unseen`` (held-out pairs: the
  claims), ``accuracy_seen``, ``attribute_accuracy_unseen``, ``object_accuracy_unseen``, ``val_accuracy``
  (the val images the learned weighting is fitted on), ``p_unseen_above_chance`` (one-sided binomial),
  ``disagreement_vs_uniform`` and ``mcnemar_p_vs_uniform``; plus a ``chance`` row per seed whose
  accuracies are one over the number of pair conditions, the baseline of "above chance";
- ``personalisation`` (classdiffusion, personalize): ``composition_accuracy`` (the claim),
  ``colour_accuracy``, ``garment_accuracy``, ``identity``, ``instance_*`` (the "V* <garment>" samples),
  ``base_composition_accuracy`` (the base model before fine-tuning, same phrase and noise) and
  ``class_after_composition_accuracy`` (the class phrase after fine-tuning: drift).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from classlab.io import read_json
from classlab.report.tables import (method_table, numeric_fields, percent_cell, run_fields, summarize_numbers,
                                    with_integer_budgets, write_table_set)

FAMILY = "generative"
CLASSIFIER = "diffusion_classifier"
# the per-weighting keys of a diffusion-classifier metrics.json, by their runs.csv column
WEIGHTING_KEYS = ("accuracy", "accuracy_unseen", "accuracy_seen", "attribute_accuracy_unseen",
                  "object_accuracy_unseen", "attribute_accuracy_seen", "object_accuracy_seen", "val_accuracy",
                  "p_unseen_above_chance")
CHANCE_KEYS = ("accuracy", "accuracy_unseen", "accuracy_seen", "val_accuracy")
DISPLAY = {
    "ddpm": [("val_loss", "val loss (MSE)"), ("final_loss", "last epoch loss"), ("train_steps", "steps"),
             ("train_cpu_minutes", "CPU min")],
    "classification": [("accuracy_unseen", "held-out pairs"), ("accuracy_seen", "seen pairs"),
                       ("attribute_accuracy_unseen", "colour (held-out)"),
                       ("object_accuracy_unseen", "garment (held-out)"), ("val_accuracy", "val (fit)"),
                       ("disagreement_vs_uniform", "changed vs uniform")],
    "personalisation": [("composition_accuracy", "composition"), ("colour_accuracy", "colour"),
                        ("garment_accuracy", "garment"), ("identity", "identity (cos)"),
                        ("instance_colour", "V* colour"), ("base_composition_accuracy", "base model"),
                        ("class_after_composition_accuracy", "class after")],
}
PERCENT = {"accuracy_unseen", "accuracy_seen", "attribute_accuracy_unseen", "object_accuracy_unseen",
           "val_accuracy", "disagreement_vs_uniform", "composition_accuracy", "colour_accuracy",
           "garment_accuracy", "instance_colour", "base_composition_accuracy",
           "class_after_composition_accuracy"}
DIGITS = {"val_loss": 4, "final_loss": 4, "train_steps": 0, "train_cpu_minutes": 1, "identity": 3}
SKIP = ("seed", "model_seed")


def _number(value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float("nan")


def _base(m: dict, scenario: str, method: str) -> dict:
    return {"family": FAMILY, "protocol": m.get("protocol", FAMILY), "scenario": scenario,
            "dataset": m.get("dataset", ""), "backbone": "ddpm", "method": method, "seed": int(m["seed"])}


def classifier_rows(m: dict) -> list[dict]:
    """One row per timestep weighting of a diffusion-classifier run, and the chance row."""
    rows = []
    for weighting in m.get("weightings", []):
        row = _base(m, "classification", f"{CLASSIFIER}_{weighting}")
        row.update({key: _number(m.get(f"{key}_{weighting}")) for key in WEIGHTING_KEYS})
        if weighting != "uniform":
            row["disagreement_vs_uniform"] = _number(m.get(f"disagreement_{weighting}_vs_uniform"))
            row["mcnemar_p_vs_uniform"] = _number(m.get(f"mcnemar_p_{weighting}_vs_uniform"))
        row.update({"n_test_images": _number(m.get("n_test_images")), "cpu_seconds": _number(m.get("cpu_seconds")),
                    **run_fields(m)})
        rows.append(row)
    chance = _base(m, "classification", "chance")
    chance.update({key: _number(m.get("chance_pair")) for key in CHANCE_KEYS})
    chance.update({"attribute_accuracy_unseen": _number(m.get("chance_attribute")),
                   "object_accuracy_unseen": _number(m.get("chance_object"))})
    return rows + [chance]


def personalisation_row(m: dict) -> dict:
    row = _base(m, "personalisation", m["method"])
    row.update(numeric_fields(m, SKIP))
    row.update(run_fields(m))
    return row


def ddpm_row(h: dict) -> dict:
    row = _base(h, "ddpm", "ddpm")
    history = h.get("history") or []
    last = history[-1] if history and isinstance(history[-1], dict) else {}
    row.update({"val_loss": _number(h.get("val_loss")), "final_loss": _number(last.get("loss")),
                "train_steps": _number(h.get("train_steps")), "n_train_images": _number(h.get("n_train_images")),
                "train_cpu_minutes": _number(h.get("train_cpu_seconds")) / 60.0,
                "n_parameters": _number(h.get("n_parameters")), **run_fields(h)})
    return row


def generative_runs(metric_files, history_files=()) -> pd.DataFrame:
    rows = []
    for path in metric_files:
        m = read_json(path)
        if m.get("method") == CLASSIFIER:
            rows += classifier_rows(m)
        else:
            rows.append(personalisation_row(m))
    rows += [ddpm_row(read_json(path)) for path in history_files]
    if not rows:
        raise ValueError("no metrics files to aggregate")
    runs = pd.DataFrame(rows).sort_values(["scenario", "dataset", "method", "seed"]).reset_index(drop=True)
    return with_integer_budgets(runs)


def generative_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summarize_numbers(runs, ["dataset", "backbone", "scenario", "method"])


def _cell(row, key: str) -> str:
    if key in PERCENT:
        return percent_cell(row, key)
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None or pd.isna(mean):
        return "-"
    std = 0.0 if std is None or pd.isna(std) else float(std)
    digits = DIGITS.get(key, 3)
    return f"{float(mean):.{digits}f} ± {std:.{digits}f}"


TITLES = {
    "ddpm": "the shared DDPM (val loss: noise-prediction MSE on val seen pairs at fixed draws)",
    "classification": "diffusion classifier among every pair condition, test images of held-out and seen pairs, "
                      "per timestep weighting (%; chance = 1 / pairs)",
    "personalisation": "personalisation on one instance: '<other colour> V* <garment>' samples read as that colour "
                       "and garment (%)",
}


def generative_markdown(summary: pd.DataFrame) -> str:
    lines = []
    for scenario in ("ddpm", "classification", "personalisation"):
        part = summary[summary.scenario == scenario]
        for dataset, group in part.groupby("dataset"):
            lines.append(f"### {scenario}: {dataset}, {TITLES[scenario]}, mean ± std over seeds\n")
            lines += method_table(group, DISPLAY[scenario], _cell)
    return "\n".join(lines)


def write_generative_tables(metric_files, history_files, runs_csv: Path, summary_csv: Path,
                            summary_md: Path) -> pd.DataFrame:
    runs = generative_runs(metric_files, history_files)
    summary = generative_summary(runs)
    write_table_set(runs, summary, "# generative\n\n" + generative_markdown(summary), runs_csv, summary_csv,
                    summary_md)
    return runs


def generative_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, FAMILY, group_by=("dataset", "backbone", "scenario"), claims=claims)


# --- the figure: personalised samples -------------------------------------------------------------------

def _tile(images: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` images (N, C, H, W uint8) side by side as one (H, n W, 3) float image."""
    images = images[:n].astype(np.float32) / 255.0
    if images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    return np.concatenate(list(images.transpose(0, 2, 3, 1)), axis=1)


def plot_personalised_samples(metric_files, sample_files, figure: Path, per_colour: int = 4) -> None:
    """Row 0: the instance images; then, per other colour, the base model's "<colour> <garment>" and each
    method's "<colour> V* <garment>" samples (first seed), with the run's composition accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from classlab.io import atomic_path

    runs = [(read_json(m), np.load(s)) for m, s in zip(metric_files, sample_files)]
    if not runs:
        raise ValueError("no personalisation runs to plot")
    first_metrics, first = runs[0]
    colours = list(first_metrics["composed_colours"])
    columns = 1 + len(runs)
    fig, axes = plt.subplots(1 + len(colours), columns, figsize=(2.2 * columns, 0.75 * (1 + len(colours))),
                             squeeze=False)
    axes[0, 0].imshow(_tile(first["instance"], per_colour + 1))
    axes[0, 0].set_title(f"instance: {first_metrics['instance_name']}", fontsize=6)
    for j in range(1, columns):
        axes[0, j].axis("off")
    for i, colour in enumerate(colours, start=1):
        axes[i, 0].imshow(_tile(first["base"][i - 1], per_colour))
        axes[i, 0].set_ylabel(colour, fontsize=6)
        for j, (metrics, samples) in enumerate(runs, start=1):
            axes[i, j].imshow(_tile(samples["composed"][i - 1], per_colour))
            if i == 1:
                axes[i, j].set_title(f"{metrics['method']} (composition "
                                     f"{100 * metrics['composition_accuracy']:.0f}%)", fontsize=6)
        if i == 1:
            axes[i, 0].set_title("base model, '<colour> <garment>'", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{first_metrics.get('dataset', '')}: '<colour> V* <garment>' after personalisation, "
                 f"seed {first_metrics['seed']}", fontsize=7)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(figure) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
