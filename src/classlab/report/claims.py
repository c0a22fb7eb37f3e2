"""The claims table: a paper's qualitative claim, the measured effect over seeds, a verdict.

Each family registers its claims here. A claim compares a treatment to a baseline on one
metric, paired by seed (same pretrained backbone and data order per seed). The effect is
the mean paired difference with a two-sided 95% Student-t interval. Verdicts:

- ``holds``: the whole interval lies on the claimed side of zero;
- ``inconclusive``: the mean is on the claimed side but the interval crosses zero (or one seed);
- ``does not hold``: the mean is zero or on the other side.

No threshold is tuned per claim; small data gets what it measures.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


@dataclass(frozen=True)
class Claim:
    family: str
    paper: str
    statement: str
    metric: str
    treatment: str
    baseline: str
    higher_is_better: bool = True


CLAIMS: list[Claim] = [
    Claim("supervised", "ERM fine-tuning vs. linear probing (standard transfer protocol)",
          "full fine-tuning beats the linear probe on top-1", "top1", "erm", "linear_probe"),
]


def paired_effect(treatment: np.ndarray, baseline: np.ndarray, higher_is_better: bool = True,
                  confidence: float = 0.95) -> dict:
    """Mean of the paired differences (signed so that positive means the claim's direction) and its t-interval."""
    diff = np.asarray(treatment, float) - np.asarray(baseline, float)
    if not higher_is_better:
        diff = -diff
    n = len(diff)
    mean = float(diff.mean()) if n else float("nan")
    if n >= 2:
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * diff.std(ddof=1) / np.sqrt(n))
        low, high = mean - half, mean + half
    else:
        low = high = float("nan")
    if n == 0:
        verdict = "not run"
    elif mean <= 0:
        verdict = "does not hold"
    elif n >= 2 and low > 0:
        verdict = "holds"
    else:
        verdict = "inconclusive"
    return {"effect": mean, "ci_low": low, "ci_high": high, "n_seeds": n, "verdict": verdict}


def evaluate_claims(runs: pd.DataFrame, family: str) -> pd.DataFrame:
    rows = []
    for claim in (c for c in CLAIMS if c.family == family):
        for (dataset, backbone), group in runs.groupby(["dataset", "backbone"]):
            t = group[group.method == claim.treatment].set_index("seed")[claim.metric]
            b = group[group.method == claim.baseline].set_index("seed")[claim.metric]
            seeds = sorted(set(t.index) & set(b.index))
            if not seeds:
                continue
            result = paired_effect(t.loc[seeds].to_numpy(), b.loc[seeds].to_numpy(), claim.higher_is_better)
            rows.append({"family": family, "paper": claim.paper, "claim": claim.statement,
                         "dataset": dataset, "backbone": backbone, "metric": claim.metric,
                         "treatment": claim.treatment, "baseline": claim.baseline,
                         "treatment_mean": float(t.loc[seeds].mean()), "baseline_mean": float(b.loc[seeds].mean()),
                         **result})
    columns = ["family", "paper", "claim", "dataset", "backbone", "metric", "treatment", "baseline",
               "treatment_mean", "baseline_mean", "effect", "ci_low", "ci_high", "n_seeds", "verdict"]
    return pd.DataFrame(rows, columns=columns)
