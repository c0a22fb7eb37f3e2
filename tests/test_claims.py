"""Claims: paired effect with a Student-t interval, and verdicts that follow from the numbers."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from classlab.report.claims import evaluate_claims, paired_effect


def test_paired_effect_matches_hand_computed_interval():
    t = np.array([0.92, 0.921, 0.919])
    b = np.array([0.90, 0.90, 0.90])
    # d = 0.020, 0.021, 0.019: mean 0.02, sd 0.001; half-width t_{0.975,2} * sd / sqrt(3) = 0.00248
    half = stats.t.ppf(0.975, 2) * 0.001 / np.sqrt(3)
    r = paired_effect(t, b)
    assert r["effect"] == pytest.approx(0.02)
    assert r["ci_low"] == pytest.approx(0.02 - half) and r["ci_high"] == pytest.approx(0.02 + half)
    assert r["verdict"] == "holds"
    # the same mean with sd 0.01 gives a half-width 0.0248 > 0.02: the interval crosses zero
    assert paired_effect(np.array([0.92, 0.91, 0.93]), b)["verdict"] == "inconclusive"


@pytest.mark.parametrize("t,b,verdict", [
    ([0.9, 0.78], [0.85, 0.85], "does not hold"),  # mean -0.01
    ([0.9, 0.86], [0.85, 0.87], "inconclusive"),    # mean > 0 but the interval crosses 0
    ([0.9], [0.8], "inconclusive"),                 # one seed: no interval
    ([0.7, 0.7], [0.8, 0.8], "does not hold"),
])
def test_verdicts(t, b, verdict):
    assert paired_effect(np.array(t), np.array(b))["verdict"] == verdict


def test_lower_is_better_flips_the_sign():
    r = paired_effect(np.array([0.1, 0.12]), np.array([0.2, 0.21]), higher_is_better=False)
    assert r["effect"] == pytest.approx(0.095)


def test_supervised_claim_pairs_by_seed():
    runs = pd.DataFrame({"dataset": "d", "backbone": "b", "method": ["erm", "erm", "linear_probe", "linear_probe"],
                         "seed": [0, 1, 1, 0], "top1": [0.9, 0.8, 0.75, 0.85]})
    out = evaluate_claims(runs, "supervised")
    assert len(out) == 1
    # pairs (seed0: .9 vs .85, seed1: .8 vs .75) -> both +0.05, zero spread
    assert out.effect.iloc[0] == pytest.approx(0.05)


def test_fixed_level_claim_compares_against_the_threshold():
    from classlab.report.claims import Claim

    runs = pd.DataFrame({"dataset": "d", "backbone": "b", "scenario": "s", "method": "m", "seed": [0, 1, 2],
                         "forgotten_accuracy": [0.02, 0.04, 0.03]})
    claim = Claim("incremental", "p", "near chance", "forgotten_accuracy", "m", "", higher_is_better=False,
                  threshold=0.15)
    out = evaluate_claims(runs, "incremental", ("dataset", "backbone", "scenario"), [claim])
    assert out.effect.iloc[0] == pytest.approx(0.12) and out.verdict.iloc[0] == "holds"
    assert out.baseline.iloc[0] == "fixed level 0.15"
