"""Metrics, tables, claims and figures of the discovery family, from each run's saved predictions.

Per run (``discovery_metrics``): clustering accuracy with one Hungarian matching over the scored
samples, split into All / Old / New ("v2", the GCD papers' protocol; ``acc_*``), the per-subset
matching ("v1"; ``v1_*``) and the class-balanced variant (``balanced_*``), NMI and ARI, on the
unlabelled train pool (transductive, as the papers report; no prefix) and on the test samples of
the classes seen (``test_`` prefix), after the last task; the validation split's samples of those
classes (``val_`` prefix) are scored the same way for choosing settings, never reported. Continual
splits add Old / New accuracy per stage and the forgetting of the known classes (their test
accuracy after stage 0 minus after the last stage); active splits add the accuracy after each query round against the labels spent;
methods that estimate the number of classes add ``estimated_k`` and ``k_error`` = |k_hat - k|.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from classlab.io import read_json  # noqa: E402
from classlab.metrics.discovery import clustering_scores, cluster_mapping, matched_confusion  # noqa: E402
from classlab.report.claims import evaluate_claims  # noqa: E402
from classlab.report.figures import _save  # noqa: E402
from classlab.report.tables import collect_protocol_runs, run_fields, summarize_protocol_runs, write_table_set  # noqa: E402

KEYS = ["dataset", "backbone", "scenario", "method"]
SUBSETS = ("all", "old", "new")
SCALARS = tuple(f"{p}{m}_{s}" for p in ("", "test_") for m in ("acc", "v1", "balanced") for s in SUBSETS) + (
    "nmi", "ari", "test_nmi", "test_ari", "estimated_k", "k_error", "known_forgetting", "labels_spent")


def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _scores(prefix: str, y: np.ndarray, pred: np.ndarray, old: np.ndarray) -> dict:
    s = clustering_scores(y, pred, old)
    out = {}
    for m in ("acc", "v1", "balanced"):
        for sub in SUBSETS:
            out[f"{prefix}{m}_{sub}"] = _finite(s[f"{m}_{sub}"])
    out[f"{prefix}nmi"], out[f"{prefix}ari"] = _finite(s["nmi"]), _finite(s["ari"])
    return out


def discovery_metrics(predictions: str | Path, split: str | Path, history: str | Path) -> dict:
    """metrics.json of one run (see the module docstring)."""
    split_doc, hist = read_json(split), read_json(history)
    meta = hist["meta"]
    with np.load(predictions) as z:
        arrays = {k: z[k] for k in z.files}
    tasks = sorted(int(k[len("pred_unlabelled_task"):]) for k in arrays if k.startswith("pred_unlabelled_task"))
    last = tasks[-1]
    old = arrays[f"old_classes_task{last}"]
    out = {"dataset": meta["dataset"], "backbone": meta["backbone"], "scenario": meta["split"],
           "method": meta["method"], "seed": int(meta["seed"]), "init_kind": meta.get("init_kind", "scratch"),
           "split_kind": split_doc["kind"], "known_classes": split_doc["known_classes"],
           "novel_classes": split_doc["novel_classes"], **run_fields(meta)}
    out.update(_scores("", arrays[f"labels_unlabelled_task{last}"], arrays[f"pred_unlabelled_task{last}"], old))
    out.update(_scores("test_", arrays[f"labels_test_task{last}"], arrays[f"pred_test_task{last}"], old))
    if "pred_val_last" in arrays:  # for choices only (`make choices`); the tables report train and test
        out.update(_scores("val_", arrays["labels_val_last"], arrays["pred_val_last"], old))
    k_true = len(np.unique(np.concatenate([arrays[f"labels_unlabelled_task{last}"],
                                           np.asarray(split_doc["known_classes"], dtype=np.int64)])))
    if f"estimated_k_task{last}" in arrays:
        k_hat = int(arrays[f"estimated_k_task{last}"][0])
        # NCD estimates the novel classes only
        k_ref = len(split_doc["novel_classes"]) if split_doc["kind"] == "ncd" else k_true
        out.update({"estimated_k": k_hat, "k_error": abs(k_hat - k_ref), "k_true": k_ref})
    if split_doc["kind"] == "continual":
        known = np.asarray(split_doc["known_classes"])
        rows = []
        for t in tasks:
            y, p, o = arrays[f"labels_test_task{t}"], arrays[f"pred_test_task{t}"], arrays[f"old_classes_task{t}"]
            s = clustering_scores(y, p, o)
            mapping = cluster_mapping(y, p)  # the v2 matching over the stage's test samples
            mapped = np.array([mapping.get(int(c), -1) for c in p])
            on_known = np.isin(y, known)
            rows.append({"stage": t, "acc_all": _finite(s["acc_all"]), "acc_old": _finite(s["acc_old"]),
                         "acc_new": _finite(s["acc_new"]),
                         "known_accuracy": float((mapped[on_known] == y[on_known]).mean()) if on_known.any() else None})
        out["stages"] = rows
        if rows[0]["known_accuracy"] is not None and rows[-1]["known_accuracy"] is not None:
            out["known_forgetting"] = rows[0]["known_accuracy"] - rows[-1]["known_accuracy"]
    if split_doc["kind"] == "active":
        spent, rounds = 0, []
        for t in tasks:
            if f"queries_round{t}" in arrays:
                spent += len(arrays[f"queries_round{t}"])
            y, p = arrays[f"labels_unlabelled_task{t}"], arrays[f"pred_unlabelled_task{t}"]
            s = clustering_scores(y, p, arrays[f"old_classes_task{t}"])
            rounds.append({"round": t, "labels_spent": spent, "acc_all": _finite(s["acc_all"]),
                           "acc_new": _finite(s["acc_new"])})
        out["rounds"], out["labels_spent"] = rounds, spent
    return out


# --- tables and claims ---------------------------------------------------------------------------

def collect(metric_files: list[str | Path]) -> pd.DataFrame:
    return collect_protocol_runs(metric_files, KEYS, SCALARS)


def _describe_inits(kinds: pd.Series) -> str:
    # which labels the starting backbone saw (each seed has its own known classes: name the kind)
    if all(" only" in k for k in kinds):
        return kinds.iloc[0].split(" on ")[0] + " on the known classes only"
    return "; ".join(sorted(set(kinds)))


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    return summarize_protocol_runs(runs, KEYS, SCALARS, _describe_inits)


def _pm(row, name: str, scale: float = 100.0) -> str:
    mean, std = row.get(f"{name}_mean"), row.get(f"{name}_std")
    if mean is None or pd.isna(mean):
        return "-"
    return f"{scale * mean:.1f} ± {0.0 if pd.isna(std) else scale * std:.1f}"


def markdown(summary: pd.DataFrame) -> str:
    lines = ["Clustering accuracy (%, v2: one Hungarian matching over all scored samples), mean ± std over "
             "seeds. Unlabelled: the unlabelled train pool (transductive); test: the test samples of the "
             "classes seen. Last epoch; nothing chosen on these numbers.", "",
             "| dataset | split | method | seeds | All | Old | New | test All | test Old | test New | NMI | "
             "k error | known forgetting | backbone init |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        k = "-" if pd.isna(r.get("k_error_mean", np.nan)) else f"{r['k_error_mean']:.1f}"
        lines.append(f"| {r['dataset']} | {r['scenario']} | {r['method']} | {r['seeds']} | {_pm(r, 'acc_all')} | "
                     f"{_pm(r, 'acc_old')} | {_pm(r, 'acc_new')} | {_pm(r, 'test_acc_all')} | "
                     f"{_pm(r, 'test_acc_old')} | {_pm(r, 'test_acc_new')} | {_pm(r, 'nmi')} | {k} | "
                     f"{_pm(r, 'known_forgetting')} | {r['backbone_init']} |")
    return "\n".join(lines) + "\n"


def write_discovery_tables(metric_files, runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = collect(metric_files)
    summary = summarize(runs)
    write_table_set(runs, summary, markdown(summary), runs_csv, summary_csv, summary_md)
    return runs


def discovery_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    return evaluate_claims(runs, "discovery", group_by=("dataset", "backbone", "scenario"), claims=claims)


# --- figures ---------------------------------------------------------------------------------------

def accuracy_bars(metric_files, out: Path) -> None:
    """All / Old / New (unlabelled pool) per method, one panel per split."""
    runs = collect(metric_files)
    splits = sorted(runs.scenario.unique())
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        sub = runs[runs.scenario == split]
        methods = sorted(sub.method.unique())
        x = np.arange(len(methods))
        for j, s in enumerate(SUBSETS):
            col = f"acc_{s}"
            g = sub.groupby("method")[col] if col in sub else None
            means = [100 * g.mean().get(m, np.nan) for m in methods] if g is not None else [np.nan] * len(methods)
            stds = [100 * np.nan_to_num(g.std().get(m, 0.0)) for m in methods] if g is not None else [0] * len(methods)
            ax.bar(x + (j - 1) * 0.27, means, 0.27, yerr=stds, label=s.capitalize(), capsize=2)
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set_ylabel("clustering accuracy (%)")
        ax.set_title(f"{split}: unlabelled pool")
    axes[0][0].legend()
    _save(fig, out)


def projections(prediction_files, out: Path, max_methods: int = 8) -> None:
    """2-D PCA of the unlabelled pool's backbone features (first seed of each run group), coloured by
    the true class (left) and by the matched predicted class (right)."""
    from sklearn.decomposition import PCA

    files = [Path(p) for p in prediction_files][:max_methods]
    fig, axes = plt.subplots(len(files), 2, figsize=(8, 3.6 * len(files)), squeeze=False)
    for row, path in zip(axes, files):
        with np.load(path) as z:
            f, y, p = z["projection_features"], z["projection_labels"], z["projection_pred"]
        xy = PCA(n_components=2, random_state=0).fit_transform(f) if len(f) > 2 else np.zeros((len(f), 2))
        mapping = cluster_mapping(y, p)
        matched = np.array([mapping.get(int(c), -1) for c in p])
        name = "/".join(path.parts[-4:-1])
        for ax, colour, title in ((row[0], y, "true class"), (row[1], matched, "predicted (matched)")):
            ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap="tab10", s=3, vmin=-1, vmax=9)
            ax.set_title(f"{name}: {title}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    _save(fig, out)


def confusions(prediction_files, out: Path, max_methods: int = 8) -> None:
    """Confusion matrix of the unlabelled pool after the v2 matching (last column: unmatched clusters)."""
    files = [Path(p) for p in prediction_files][:max_methods]
    cols = min(4, len(files))
    rows = -(-len(files) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path in zip(axes.flat, files):
        with np.load(path) as z:
            last = max(int(k[len("pred_unlabelled_task"):]) for k in z.files if k.startswith("pred_unlabelled_task"))
            y, p = z[f"labels_unlabelled_task{last}"], z[f"pred_unlabelled_task{last}"]
        k = int(max(y.max(), 0)) + 1
        cm = matched_confusion(y, p, k).astype(float)
        cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.axis("on")
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
        ax.set_title("/".join(path.parts[-4:-1]), fontsize=7)
        ax.set_xlabel("matched prediction (last: unmatched)", fontsize=7)
        ax.set_ylabel("true class", fontsize=7)
    _save(fig, out)


def stage_curves(metric_files, out: Path) -> None:
    """Continual splits: Old and New test accuracy after each stage, mean over seeds, per method."""
    rows = []
    for path in metric_files:
        m = read_json(path)
        for s in m.get("stages", []):
            rows.append({"method": m["method"], "scenario": m["scenario"], **s})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    if rows:
        df = pd.DataFrame(rows)
        for (split, method), g in df.groupby(["scenario", "method"]):
            mean = g.groupby("stage")[["acc_old", "acc_new", "known_accuracy"]].mean()
            axes[0].plot(mean.index, 100 * mean.known_accuracy, marker="o", label=f"{split}/{method}")
            axes[1].plot(mean.index, 100 * mean.acc_new, marker="o", label=f"{split}/{method}")
        axes[0].legend(fontsize=7)
    axes[0].set_title("accuracy on the known classes by stage")
    axes[1].set_title("New accuracy by stage (the stage's classes)")
    for ax in axes:
        ax.set_xlabel("stage")
        ax.set_ylabel("test accuracy (%)")
    _save(fig, out)


def query_curves(metric_files, out: Path) -> None:
    """Active splits: All accuracy of the unlabelled pool against the labels spent, per method."""
    rows = []
    for path in metric_files:
        m = read_json(path)
        for r in m.get("rounds", []):
            rows.append({"method": m["method"], "scenario": m["scenario"], **r})
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if rows:
        df = pd.DataFrame(rows)
        for (split, method), g in df.groupby(["scenario", "method"]):
            mean = g.groupby("labels_spent")["acc_all"].agg(["mean", "std"])
            ax.errorbar(mean.index, 100 * mean["mean"], yerr=100 * mean["std"].fillna(0), marker="o", capsize=2,
                        label=f"{split}/{method}")
        ax.legend(fontsize=7)
    ax.set_xlabel("labels queried")
    ax.set_ylabel("All accuracy, unlabelled pool (%)")
    _save(fig, out)
