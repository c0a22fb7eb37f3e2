"""Figures for the supervised family: learning curves, accuracy by method with the seed
spread, reliability diagrams and confusion matrices. Each is a function of saved files."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from classlab.io import atomic_path, read_json  # noqa: E402
from classlab.metrics import confusion_matrix, reliability_bins  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def learning_curves(history_files: list[Path], out: Path) -> None:
    """Training loss per epoch, mean over seeds with min-max band, one line per method."""
    curves: dict[str, list[list[float]]] = {}
    for path in history_files:
        h = read_json(path)
        label = f"{h['meta']['family']}/{h['meta']['method']}"
        curves.setdefault(label, []).append([e["loss"] for e in h["epochs"]])
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in sorted(curves.items()):
        length = min(len(r) for r in runs)
        arr = np.array([r[:length] for r in runs])
        epochs = np.arange(1, length + 1)
        ax.plot(epochs, arr.mean(0), marker="o", label=f"{label} ({len(runs)} seeds)")
        ax.fill_between(epochs, arr.min(0), arr.max(0), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out)


def accuracy_by_method(runs: pd.DataFrame, out: Path, metric: str = "top1") -> None:
    """Bar of the mean per method with each seed drawn as a point and the std as an error bar."""
    methods = sorted(runs.method.unique())
    fig, ax = plt.subplots(figsize=(1.6 * len(methods) + 2, 4))
    for i, method in enumerate(methods):
        vals = 100 * runs[runs.method == method][metric].to_numpy()
        ax.bar(i, vals.mean(), yerr=vals.std(ddof=1) if len(vals) > 1 else 0, color="C0", alpha=0.5, capsize=6)
        ax.scatter(np.full(len(vals), i) + np.linspace(-0.12, 0.12, len(vals)), vals, color="k", s=14, zorder=3)
        ax.text(i, vals.mean(), f"{vals.mean():.2f}", ha="center", va="bottom", fontsize=8)
    lo = 100 * runs[metric].min()
    ax.set_ylim(max(0.0, lo - 5), min(100.0, 100 * runs[metric].max() + 2))
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel(f"test {metric} (%)")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, out)


def _pooled_predictions(prediction_files: list[Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    pooled: dict[str, list] = {}
    for path in prediction_files:
        method = Path(path).parent.parent.name  # .../<method>/seed<k>/predictions.npz
        with np.load(path) as z:
            pooled.setdefault(method, []).append((z["logits"], z["labels"]))
    return {m: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for m, v in pooled.items()}


def reliability_diagram(prediction_files: list[Path], out: Path, n_bins: int = 15) -> None:
    """Accuracy against confidence per equal-width bin, predictions pooled over seeds."""
    pooled = _pooled_predictions(prediction_files)
    fig, axes = plt.subplots(1, len(pooled), figsize=(4 * len(pooled), 4), squeeze=False)
    for ax, (method, (logits, labels)) in zip(axes[0], sorted(pooled.items())):
        bins = reliability_bins(logits, labels, n_bins)
        centers = (bins["edges"][:-1] + bins["edges"][1:]) / 2
        ok = bins["count"] > 0
        ax.bar(centers[ok], bins["accuracy"][ok], width=1 / n_bins, edgecolor="k", alpha=0.7, label="accuracy")
        ax.bar(centers[ok], (bins["confidence"] - bins["accuracy"])[ok], bottom=bins["accuracy"][ok],
               width=1 / n_bins, color="C3", alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        n = bins["count"].sum()
        ece = float((bins["count"][ok] / n * np.abs(bins["accuracy"][ok] - bins["confidence"][ok])).sum())
        ax.set_title(f"{method}: ECE-{n_bins} {100 * ece:.2f}%")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="upper left")
    _save(fig, out)


def confusion_matrices(prediction_files: list[Path], class_names: list[str], out: Path) -> None:
    """Row-normalised confusion matrix per method, counts summed over seeds."""
    pooled = _pooled_predictions(prediction_files)
    k = len(class_names)
    fig, axes = plt.subplots(1, len(pooled), figsize=(5.2 * len(pooled), 4.8), squeeze=False)
    for ax, (method, (logits, labels)) in zip(axes[0], sorted(pooled.items())):
        cm = confusion_matrix(logits, labels, k).astype(float)
        cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                if cm[i, j] >= 0.01:
                    ax.text(j, i, f"{100 * cm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if cm[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(k), class_names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(method)
    _save(fig, out)


def feature_norm_histograms(prediction_files: list[Path], out: Path, bins: int = 40) -> None:
    """Histogram of the penultimate features' L2 norms on the test set per method, pooled over
    seeds (KD++'s claim: distillation with the ND loss grows the student's feature norms). Methods
    that predict through themselves record no features and are left out."""
    norms: dict[str, list[np.ndarray]] = {}
    for path in prediction_files:
        with np.load(path) as z:
            if "feature_norm" in z.files:
                norms.setdefault(Path(path).parents[1].name, []).append(z["feature_norm"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if not norms:
        ax.text(0.5, 0.5, "no run recorded feature norms", ha="center", va="center", transform=ax.transAxes)
    else:
        pooled = {m: np.concatenate(v) for m, v in sorted(norms.items())}
        edges = np.linspace(0, max(float(v.max()) for v in pooled.values()) * 1.02 + 1e-9, bins + 1)
        for method, values in pooled.items():
            ax.hist(values, bins=edges, histtype="step", lw=1.5, label=f"{method} (mean {values.mean():.2f})")
        ax.legend(fontsize=7)
    ax.set_xlabel("L2 norm of the penultimate features (test set)")
    ax.set_ylabel("images")
    _save(fig, out)
