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
LABEL_METRIC = ("all_acc", "unobserved_acc", "expected_sq_distance")  # every class a candidate (Loki)


PAIR_METRICS = ("seen", "unseen", "hm", "auc", "best_hm")  # compositional zero-shot (CSP, ComCa)
NOISE_METRICS = ("top1", "corrected_fraction")             # label noise (CAPro): clean test accuracy


def _protocol(m: dict) -> str:
    return m.get("protocol", "base_to_novel")  # every protocol writes it (runs before it: base-to-novel)


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _saw(value) -> str:
    """The classes the image side saw, as text; real CLIP's is a sentence."""
    return value if isinstance(value, str) else " ".join(str(c) for c in value)


def vlm_runs(metric_files: list[str | Path], epoch_files: list[str | Path] = ()) -> pd.DataFrame:
    """One row per run of any of the family's protocols; ``scenario`` names the protocol and its setting
    (base_to_novel/<shots>shot/saw_<side>, compositional/<shots>shot, label_noise/<kind><rate>). The
    long-training curve's runs (``epoch_files``) are base-to-novel runs whose scenario ends in
    /<epochs>ep, so that a claim can compare methods at one budget of the curve."""
    rows = []
    for path, curve in [(p, False) for p in metric_files] + [(p, True) for p in epoch_files]:
        m = read_json(path)
        protocol = _protocol(m)
        row = {"family": "vlm", "dataset": m.get("dataset", ""), "backbone": m.get("backbone", ""),
               "protocol": protocol, "method": m["method"], "seed": int(m["seed"]),
               "test_samples": m.get("test_samples"), "train_steps": m.get("train_steps"),
               "batch_size": (m.get("hparams") or {}).get("batch_size"),
               "git_commit": (m.get("provenance") or {}).get("git_commit", UNKNOWN)}
        if protocol == "compositional":
            row.update(scenario=f"compositional/{int(m['shots'])}shot", shots=int(m["shots"]),
                       **{k: float(m[k]) for k in PAIR_METRICS})
        elif protocol == "label_noise":
            row.update(scenario=f"label_noise/{m['noise_kind']}{float(m['noise_rate']):g}",
                       noise_rate=float(m["noise_rate"]), **{k: _number(m.get(k)) for k in NOISE_METRICS})
        else:
            scenario = f"base_to_novel/{int(m['shots'])}shot/saw_{m.get('image_side', 'base')}"
            row.update(scenario=scenario + (f"/{int(m['hparams']['epochs'])}ep" if curve else ""),
                       shots=int(m["shots"]), **{k: float(m[k]) for k in METRICS},
                       **{k: float(m[k]) for k in LABEL_METRIC if k in m},
                       image_side_saw=_saw(m.get("image_side_saw", [])))
        rows.append(row)
    runs = pd.DataFrame(rows)
    return runs.sort_values(["scenario", "method", "seed"]).reset_index(drop=True) if len(runs) else runs


def vlm_summary(runs: pd.DataFrame) -> pd.DataFrame:
    g = runs.groupby(["dataset", "backbone", "protocol", "scenario", "method"])
    columns = list(dict.fromkeys(k for k in (*METRICS, *LABEL_METRIC, *PAIR_METRICS, *NOISE_METRICS) if k in runs))
    out = g[columns].agg(["mean", "std"])
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    out["seeds"] = g.seed.count()
    return out.reset_index()


def vlm_markdown(summary: pd.DataFrame, runs: pd.DataFrame) -> str:
    lines = []
    b2n = summary[summary.protocol == "base_to_novel"]
    for (dataset, backbone, scenario), group in b2n.groupby(["dataset", "backbone", "scenario"]):
        saw = runs[(runs.dataset == dataset) & (runs.scenario == scenario)].image_side_saw.iloc[0]
        lines.append(f"### {dataset} ({backbone}), {scenario}: accuracy (%), mean ± std over seeds\n")
        if not saw[:1].isdigit():  # real CLIP
            lines.append("The image side is real CLIP's, pretrained on the web: what it saw of these classes is unknown.\n")
        else:
            side = ("the base classes only: the new classes are new to the image side" if scenario.endswith("saw_base")
                    else "every class, as CLIP's web pretraining saw them: the new classes are new to the prompt "
                         "learning only")
            lines.append(f"The image side of the offline CLIP was trained on classes {saw}: {side}.\n")
        lines.append("| method | base | new | H | seeds |")
        lines.append("|---|---|---|---|---|")
        for r in group.itertuples():
            lines.append(f"| {r.method} | " + " | ".join(_cell(r, k) for k in METRICS) + f" | {r.seeds} |")
        if all(f"{k}_mean" in group for k in LABEL_METRIC) and group[f"{LABEL_METRIC[0]}_mean"].notna().any():
            lines.append("\nEvery class a candidate, judged under the label metric (distances between the "
                         "classes' MiniLM prompt embeddings):\n")
            lines.append("| method | accuracy, all classes | accuracy on the unobserved classes | E[d(y^, y)^2] |")
            lines.append("|---|---|---|---|")
            for r in group.itertuples():
                lines.append(f"| {r.method} | {_cell(r, 'all_acc')} | {_cell(r, 'unobserved_acc')} | "
                             f"{_cell(r, 'expected_sq_distance', scale=1.0, digits=3)} |")
        lines.append("")
    pairs = summary[summary.protocol == "compositional"]
    for (dataset, backbone, scenario), group in pairs.groupby(["dataset", "backbone", "scenario"]):
        lines.append(f"### {dataset} ({backbone}), {scenario}: compositional zero-shot (%), mean ± std over seeds\n")
        lines.append("Every pair a candidate; seen / unseen: accuracy on the seen / unseen pairs' test images, H their "
                     "harmonic mean; AUC and best H over a bias added to the unseen pairs' scores (CZSL's "
                     "calibrated evaluation). The CLIP's image side saw the seen pairs only.\n")
        lines.append("| method | seen | unseen | H | AUC | best H | seeds |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in group.itertuples():
            lines.append(f"| {r.method} | " + " | ".join(_cell(r, k) for k in PAIR_METRICS) + f" | {r.seeds} |")
        lines.append("")
    noise = summary[summary.protocol == "label_noise"]
    if len(noise):
        rates = runs[runs.protocol == "label_noise"].groupby("scenario").noise_rate.first()
        for (dataset, backbone), group in noise.groupby(["dataset", "backbone"]):
            lines.append(f"### {dataset} ({backbone}), label noise: test accuracy (%) against the injected rate, "
                         "mean ± std over seeds\n")
            order = sorted(group.scenario.unique(), key=lambda sc: rates[sc])
            lines.append("| method | " + " | ".join(sc.split("/", 1)[1] for sc in order) + " |")
            lines.append("|---|" + "---|" * len(order))
            for method, rows in group.groupby("method"):
                cells = {r.scenario: _cell(r, "top1") for r in rows.itertuples()}
                lines.append(f"| {method} | " + " | ".join(cells.get(sc, "-") for sc in order) + " |")
            lines.append("")
    return "\n".join(lines)


def _cell(r, key: str, scale: float = 100.0, digits: int = 1) -> str:
    mean, std = getattr(r, f"{key}_mean"), getattr(r, f"{key}_std")
    if mean != mean:  # NaN: the method does not predict it
        return "-"
    return f"{scale * mean:.{digits}f} ± {scale * (std if std == std else 0.0):.{digits}f}"


def write_vlm_tables(metric_files, runs_csv: Path, summary_csv: Path, summary_md: Path,
                     epoch_files=()) -> pd.DataFrame:
    runs = vlm_runs(metric_files, epoch_files)
    summary = vlm_summary(runs) if len(runs) else pd.DataFrame()
    write_table_set(runs, summary, "# vlm\n\n" + (vlm_markdown(summary, runs) if len(summary) else "no runs\n"), runs_csv,
                    summary_csv, summary_md)
    return runs


def epoch_curve(metric_files) -> pd.DataFrame:
    """One row per (setting, method, epochs): base, new and H, mean and std over seeds."""
    rows = []
    for path in metric_files:
        m = read_json(path)
        rows.append({"image_side": m.get("image_side", "base"), "method": m["method"], "seed": int(m["seed"]),
                     "epochs": int(m["hparams"]["epochs"]), **{k: float(m[k]) for k in METRICS}})
    runs = pd.DataFrame(rows)
    out = runs.groupby(["image_side", "method", "epochs"])[list(METRICS)].agg(["mean", "std"])
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    out["seeds"] = runs.groupby(["image_side", "method", "epochs"]).seed.count()
    return out.reset_index().sort_values(["image_side", "method", "epochs"])


def write_epoch_curve(metric_files, figure: Path, table: Path) -> pd.DataFrame:
    """OGEN's long-training figure: base, new and H against epochs, one line per method, one row of
    panels per image-side setting; the table beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from classlab.io import atomic_path, write_text

    curve = epoch_curve(metric_files)
    sides = list(dict.fromkeys(curve.image_side))
    fig, axes = plt.subplots(len(sides), 3, figsize=(11, 3.2 * len(sides)), squeeze=False)
    for row, side in enumerate(sides):
        for col, metric in enumerate(METRICS):
            ax = axes[row][col]
            for method, group in curve[curve.image_side == side].groupby("method"):
                ax.errorbar(group.epochs, 100 * group[f"{metric}_mean"], yerr=100 * group[f"{metric}_std"].fillna(0),
                            marker="o", capsize=3, label=method)
            ax.set_title(f"{ {'base': 'base', 'new': 'new', 'hm': 'H'}[metric]} (image side saw {side})")
            ax.set_xlabel("training epochs")
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(figure)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    write_text(table, curve.to_csv(index=False))
    return curve


def vlm_claims(runs: pd.DataFrame, claims=None) -> pd.DataFrame:
    from classlab.report.claims import evaluate_claims

    return evaluate_claims(runs, "vlm", group_by=("dataset", "backbone", "scenario"), claims=claims)
