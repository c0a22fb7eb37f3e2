"""Tables, figures and claims of the `metric` family (deep metric learning and retrieval).

``runs.csv`` has one row per (dataset, setting, method, seed) with every number the run's metrics.json
holds (``classlab.report.tables.numeric_fields``). Settings (``scenario``): ``retrieval/test`` (trained on
the first half of the classes, scored on the test images of the other half: Recall@K, NMI, MAP@R),
``retrieval/select`` (the last ``val_classes`` training classes held out and scored, for choosing
options; the test classes untouched) and ``scenes`` (CFCD's protocol: the query object among
distractors, mAP). A claim compares methods within one setting, paired by seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from classlab.io import read_json
from classlab.report.tables import (method_table, numeric_fields, percent_cell, run_fields, summarize_numbers,
                                    with_integer_budgets, write_table_set)

FAMILY = "metric"
DISPLAY = {
    "retrieval/test": [("recall_at_1", "R@1"), ("recall_at_2", "R@2"), ("recall_at_4", "R@4"),
                       ("recall_at_8", "R@8"), ("nmi", "NMI"), ("map_at_r", "MAP@R")],
    "retrieval/select": [("val_recall_at_1", "val R@1"), ("val_nmi", "val NMI"), ("val_map_at_r", "val MAP@R")],
    "scenes": [("map", "mAP"), ("recall_at_1", "R@1"), ("val_map", "val mAP")],
}
SKIP = ("seed", "train_seconds")


def _scenario(m: dict) -> str:
    if m["protocol"] == "metric_scenes":
        return "scenes"
    return "retrieval/select" if m.get("select") else "retrieval/test"


def metric_runs(metric_files) -> pd.DataFrame:
    rows = []
    for path in metric_files:
        m = read_json(path)
        rows.append({"family": FAMILY, "protocol": m["protocol"], "scenario": _scenario(m),
                     "dataset": m.get("dataset", ""), "backbone": m.get("backbone", "") or "", "method": m["method"],
                     "seed": int(m["seed"]), **numeric_fields(m, SKIP), **run_fields(m)})
    if not rows:
        raise ValueError("no metrics files to aggregate")
    return with_integer_budgets(pd.DataFrame(rows).sort_values(["scenario", "method", "seed"]).reset_index(drop=True))


def metric_summary(runs: pd.DataFrame) -> pd.DataFrame:
    return summarize_numbers(runs, ["dataset", "backbone", "scenario", "method"])


def metric_markdown(summary: pd.DataFrame) -> str:
    lines = []
    titles = {"retrieval/test": "retrieval on the unseen classes (test images of the second half of the classes)",
              "retrieval/select": "validation on held-out training classes (for choosing options)",
              "scenes": "scene retrieval, the query object among distractors"}
    for (dataset, backbone, scenario), group in summary.groupby(["dataset", "backbone", "scenario"]):
        lines.append(f"### {dataset} ({backbone}), {titles.get(scenario, scenario)}: %, mean ± std over seeds\n")
        lines += method_table(group, DISPLAY.get(scenario, []), percent_cell)
    return "\n".join(lines)


def write_metric_tables(metric_files, runs_csv: Path, summary_csv: Path, summary_md: Path) -> pd.DataFrame:
    runs = metric_runs(metric_files)
    summary = metric_summary(runs)
    write_table_set(runs, summary, "# metric\n\n" + metric_markdown(summary), runs_csv, summary_csv, summary_md)
    return runs


def metric_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, FAMILY, group_by=("dataset", "backbone", "scenario"), claims=claims)


# --- the retrieval-examples figure ---------------------------------------------------------------

EXAMPLE_QUERIES = 4
TOP = 5


def _examples_of_run(run_dir: Path, m: dict) -> tuple[str, list[dict]]:
    """(split, examples) of one run: each example a query's position in the split, its label, and its
    TOP nearest neighbours' positions, labels and relevance. Scene runs wrote them
    (retrieval_examples.json); retrieval runs wrote their embeddings, ranked here by the same Euclidean
    distance the metrics use (query excluded), for the first query of each of the first classes."""
    if (run_dir / "retrieval_examples.json").exists():
        doc = read_json(run_dir / "retrieval_examples.json")
        return doc.get("split", "test"), [{"query": e["query"], "label": e["query_label"], "top": e["top"][:TOP],
                                           "top_labels": e["top_labels"][:TOP]} for e in doc["examples"][:EXAMPLE_QUERIES]]
    blob = np.load(run_dir / "embeddings.npz")
    emb, labels, index = blob["embeddings"].astype(np.float64), blob["labels"], blob["index"]
    rows = [int(np.flatnonzero(labels == c)[0]) for c in list(dict.fromkeys(labels.tolist()))[:EXAMPLE_QUERIES]]
    examples = []
    for q in rows:
        dist = ((emb - emb[q]) ** 2).sum(1)
        dist[q] = np.inf
        top = np.argsort(dist, kind="stable")[:TOP]
        examples.append({"query": int(index[q]), "label": int(labels[q]), "top": [int(index[j]) for j in top],
                         "top_labels": [int(labels[j]) for j in top]})
    return str(blob["split"]), examples


def _thumbnail(x) -> np.ndarray:
    img = np.asarray(x, dtype=np.float32) / 255.0
    return img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))


def plot_retrieval_examples(metric_files, figure: Path, prepared_root: Path = Path("data/prepared")) -> None:
    """Queries and their nearest neighbours, one block of rows per method (the first seed's test run):
    a green frame where the neighbour shares the query's class, red where it does not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from classlab.data.prepare import load_prepared
    from classlab.io import atomic_path

    runs = []
    for path in metric_files:
        m = read_json(path)
        split, examples = _examples_of_run(Path(path).parent, m)
        runs.append((m, split, examples))
    data = load_prepared(Path(prepared_root) / runs[0][0]["dataset"])
    names = list(data.manifest.get("class_names") or [])
    nrows = sum(len(ex) for _, _, ex in runs)
    fig, axes = plt.subplots(nrows, TOP + 1, figsize=(1.3 * (TOP + 1), 1.35 * nrows), squeeze=False)
    r = 0
    for m, split, examples in runs:
        x = getattr(data, split).x
        for e in examples:
            ax = axes[r][0]
            ax.imshow(_thumbnail(x[e["query"]]), cmap="gray", vmin=0, vmax=1)
            label = names[e["label"]] if e["label"] < len(names) else str(e["label"])
            ax.set_title(f"{m['method']}\n{label}", fontsize=6)
            for j, (pos, lab) in enumerate(zip(e["top"], e["top_labels"]), start=1):
                ax = axes[r][j]
                ax.imshow(_thumbnail(x[pos]), cmap="gray", vmin=0, vmax=1)
                for spine in ax.spines.values():
                    spine.set_edgecolor("green" if lab == e["label"] else "red")
                    spine.set_linewidth(2.5)
            r += 1
    for row in axes:
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{runs[0][0]['dataset']}: queries (left) and their {TOP} nearest neighbours", fontsize=8)
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(figure)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
