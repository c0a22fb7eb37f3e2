"""The claims table: a paper's qualitative claim, the measured effect over seeds, a verdict.

Each family registers its claims here. A claim compares a treatment to a baseline on one
metric, paired by seed (same pretrained backbone and data order per seed). The effect is
the mean paired difference with a two-sided 95% Student-t interval. Verdicts:

- ``holds``: the whole interval lies on the claimed side of zero;
- ``inconclusive``: the mean is on the claimed side but the interval crosses zero (or one seed);
- ``does not hold``: the mean is zero or on the other side.

A non-inferiority claim ("base accuracy holds") sets ``margin`` m > 0: the claimed side is
then effect > -m (the treatment is at most m worse).

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
    margin: float = 0.0
    threshold: float | None = None  # with baseline "": compare the treatment with a fixed level


SURVEY = "Zhou et al., Deep Class-Incremental Learning: A Survey (2023)"

CLAIMS: list[Claim] = [
    Claim("supervised", "ERM fine-tuning vs. linear probing (standard transfer protocol)",
          "full fine-tuning beats the linear probe on top-1", "top1", "erm", "linear_probe"),
    # incremental: the survey's ordering joint > exemplar methods > LwF > finetune, pairwise
    Claim("incremental", SURVEY, "joint training beats iCaRL on last accuracy", "last_accuracy", "joint", "icarl"),
    Claim("incremental", SURVEY, "joint training beats DER on last accuracy", "last_accuracy", "joint", "der"),
    Claim("incremental", SURVEY, "iCaRL (exemplars) beats LwF on last accuracy", "last_accuracy", "icarl", "lwf"),
    Claim("incremental", SURVEY, "DER (exemplars) beats LwF on last accuracy", "last_accuracy", "der", "lwf"),
    Claim("incremental", SURVEY, "LwF beats sequential fine-tuning on last accuracy", "last_accuracy", "lwf", "finetune"),
    Claim("incremental", SURVEY, "EWC beats sequential fine-tuning on last accuracy", "last_accuracy", "ewc", "finetune"),
    Claim("incremental", SURVEY, "iCaRL forgets less than LwF (max-based forgetting)", "forgetting", "icarl", "lwf",
          higher_is_better=False),
    Claim("incremental", SURVEY, "LwF forgets less than fine-tuning (max-based forgetting)", "forgetting", "lwf",
          "finetune", higher_is_better=False),
    Claim("incremental", "Zhang et al., SLCA: Slow Learner with Classifier Alignment, ICCV 2023",
          "SLCA beats sequential fine-tuning of the same pretrained backbone", "last_accuracy", "slca", "finetune"),
    Claim("incremental", "Wang et al., Few-Shot Class-Incremental Learning via Training-Free Prototype Calibration, NeurIPS 2023",
          "TEEN raises new-class accuracy over uncalibrated prototypes", "novel_accuracy", "teen", "simplecil"),
    Claim("incremental", "Wang et al., Few-Shot Class-Incremental Learning via Training-Free Prototype Calibration, NeurIPS 2023",
          "TEEN keeps base accuracy (within 2 points of uncalibrated prototypes)", "base_accuracy", "teen", "simplecil",
          margin=0.02),
    Claim("incremental", "Asadi et al., Prototype-Sample Relation Distillation, ICML 2023",
          "PRD beats LwF without replay on last accuracy", "last_accuracy", "prd", "lwf"),
    Claim("incremental", "Malepathirana et al., NAPA-VQ, ICCV 2023",
          "NAPA-VQ beats PASS prototype augmentation without exemplars on last accuracy", "last_accuracy",
          "napa_vq", "pass_protoaug"),
    Claim("incremental", "Huang et al., OVOR: OnePrompt with Virtual Outlier Regularization, ICLR 2024",
          "virtual outlier regularization raises OnePrompt's last accuracy", "last_accuracy", "ovor", "oneprompt"),
    Claim("incremental", "Moon et al., Online CIL on Stochastic Blurry Task Boundary (MVP), ICCV 2023",
          "MVP's components raise A_auc over its prompt-pool base model", "anytime_auc", "mvp", "mvp_base"),
    Claim("incremental", "Moon et al., Online CIL on Stochastic Blurry Task Boundary (MVP), ICCV 2023",
          "MVP's components raise A_last over its prompt-pool base model", "last_accuracy", "mvp", "mvp_base"),
    Claim("incremental", "De Min et al., Less is more: Summarizing Patch Tokens (MULTI-LANE), CoLLAs 2024",
          "MULTI-LANE beats a shared-prompt baseline on final mAP", "mean_average_precision", "multi_lane",
          "shared_prompt"),
    Claim("incremental", "Zhao et al., Continual Forgetting for Pre-trained Vision Models (GS-LoRA), CVPR 2024",
          "GS-LoRA drops forgotten classes to near chance (accuracy at most 0.15 on 10 classes)",
          "forgotten_accuracy", "gs_lora", "", higher_is_better=False, threshold=0.15),
    Claim("incremental", "Zhao et al., Continual Forgetting for Pre-trained Vision Models (GS-LoRA), CVPR 2024",
          "GS-LoRA keeps the remaining classes within 3 points of the original model", "retained_drop", "gs_lora", "",
          higher_is_better=False, threshold=0.03),
]


def paired_effect(treatment: np.ndarray, baseline: np.ndarray, higher_is_better: bool = True,
                  confidence: float = 0.95, margin: float = 0.0) -> dict:
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
    elif mean <= -margin:
        verdict = "does not hold"
    elif n >= 2 and low > -margin:
        verdict = "holds"
    else:
        verdict = "inconclusive"
    return {"effect": mean, "ci_low": low, "ci_high": high, "n_seeds": n, "verdict": verdict}


def evaluate_claims(runs: pd.DataFrame, family: str, group_by: tuple[str, ...] = ("dataset", "backbone"),
                    claims: list[Claim] | None = None) -> pd.DataFrame:
    rows = []
    for claim in (c for c in (claims if claims is not None else CLAIMS) if c.family == family):
        if claim.metric not in runs.columns:
            continue
        for key, group in runs.groupby(list(group_by)):
            key = key if isinstance(key, tuple) else (key,)
            where = dict(zip(group_by, key))
            t = group[group.method == claim.treatment].set_index("seed")[claim.metric].dropna()
            if claim.baseline:
                b = group[group.method == claim.baseline].set_index("seed")[claim.metric].dropna()
            else:  # a fixed level, e.g. "at most chance + 5 points"
                b = pd.Series(claim.threshold, index=t.index, dtype=float)
            seeds = sorted(set(t.index) & set(b.index))
            if not seeds:
                continue
            result = paired_effect(t.loc[seeds].to_numpy(), b.loc[seeds].to_numpy(), claim.higher_is_better,
                                   margin=claim.margin)
            rows.append({"family": family, "paper": claim.paper, "claim": claim.statement,
                         "dataset": where.get("dataset"), "backbone": where.get("backbone"),
                         "setting": where.get("scenario", ""), "metric": claim.metric,
                         "treatment": claim.treatment,
                         "baseline": claim.baseline or f"fixed level {claim.threshold:g}",
                         "treatment_mean": float(t.loc[seeds].mean()), "baseline_mean": float(b.loc[seeds].mean()),
                         **result})
    columns = ["family", "paper", "claim", "dataset", "backbone", "setting", "metric", "treatment", "baseline",
               "treatment_mean", "baseline_mean", "effect", "ci_low", "ci_high", "n_seeds", "verdict"]
    return pd.DataFrame(rows, columns=columns)
