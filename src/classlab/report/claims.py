"""The claims table: a paper's qualitative claim, the measured effect over seeds, a verdict.

Claims are data: each family declares its claims in ``config/claims/<family>.yaml`` (the header
of ``config/claims/incremental.yaml`` describes the fields). This module loads and validates
those files and evaluates them; it knows no family. A claim compares a treatment to a baseline
on one metric, paired by seed (same pretrained backbone and data order per seed). The effect is
the mean paired difference with a two-sided 95% Student-t interval. Verdicts:

- ``holds``: the whole interval lies on the claimed side of zero;
- ``inconclusive``: the mean is on the claimed side but the interval crosses zero (or one seed);
- ``does not hold``: the mean is zero or on the other side.

A non-inferiority claim ("base accuracy holds") sets ``margin`` m > 0: the claimed side is
then effect > -m (the treatment is at most m worse).

Each row also carries the training budgets of both arms (``train_steps`` and ``batch_size`` of
the runs behind it, where their metrics record them) and the git commit(s) the runs came from.

No threshold is tuned per claim; small data gets what it measures.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from classlab.config import ConfigError

log = logging.getLogger(__name__)

CLAIMS_DIR = Path(__file__).resolve().parents[3] / "config" / "claims"

COLUMNS = ["family", "paper", "claim", "dataset", "backbone", "setting", "metric", "treatment", "baseline",
           "treatment_mean", "baseline_mean", "effect", "ci_low", "ci_high", "n_seeds", "verdict",
           "treatment_steps", "baseline_steps", "treatment_batch_size", "baseline_batch_size", "git_commit"]


class ClaimsError(ConfigError):
    """A claims file is malformed; the message names the file, the claim and the key."""


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
    scenarios: tuple[str, ...] = ()  # evaluated only in these scenarios; empty: in every setting


# --- loading and validation -------------------------------------------------------------------

_TEXT_KEYS = ("paper", "statement", "metric", "treatment")
_KEYS = (*_TEXT_KEYS, "baseline", "direction", "margin", "threshold", "scenario")
_DIRECTIONS = {"higher": True, "lower": False}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_entry(entry, family: str, where: str) -> Claim:
    def fail(key: str, problem: str):
        raise ClaimsError(f"{where}, key {key!r}: {problem}")

    if not isinstance(entry, dict):
        raise ClaimsError(f"{where}: expected a mapping with keys {list(_KEYS)}, got {type(entry).__name__} "
                          f"{entry!r}")
    for key in entry:
        if key not in _KEYS:
            fail(key, f"unknown key; allowed keys: {list(_KEYS)}")
    for key in (*_TEXT_KEYS, "direction"):
        if key not in entry:
            fail(key, "missing (required)")
    for key in _TEXT_KEYS:
        if not isinstance(entry[key], str) or not entry[key].strip():
            fail(key, f"expected a non-empty string, got {entry[key]!r}")
    if entry["direction"] not in _DIRECTIONS:
        fail("direction", f"expected one of {list(_DIRECTIONS)}, got {entry['direction']!r}")
    baseline, threshold = entry.get("baseline"), entry.get("threshold")
    if baseline is not None and (not isinstance(baseline, str) or not baseline.strip()):
        fail("baseline", f"expected a method name, got {baseline!r}")
    if threshold is not None and not _is_number(threshold):
        fail("threshold", f"expected a number, got {threshold!r}")
    if baseline is not None and threshold is not None:
        fail("threshold", "give either a baseline (paired by seed) or a threshold (a fixed level), not both")
    if baseline is None and threshold is None:
        fail("baseline", "missing: give a baseline method or, for a fixed-level claim, a threshold")
    margin = entry.get("margin", 0)
    if not _is_number(margin) or margin < 0:
        fail("margin", f"expected a number >= 0, got {margin!r}")
    scenarios = entry.get("scenario", [])
    if isinstance(scenarios, str):
        scenarios = [scenarios]
    if not isinstance(scenarios, list) or not all(isinstance(s, str) and s for s in scenarios) or (
            "scenario" in entry and not scenarios):
        fail("scenario", f"expected a scenario name or a non-empty list of names, got {entry.get('scenario')!r}")
    return Claim(family, entry["paper"].strip(), entry["statement"].strip(), entry["metric"].strip(),
                 entry["treatment"].strip(), (baseline or "").strip(), _DIRECTIONS[entry["direction"]],
                 float(margin), None if threshold is None else float(threshold), tuple(scenarios))


def parse_claims_file(path: str | Path) -> list[Claim]:
    """The claims of one ``config/claims/<family>.yaml``, validated; the family is the file's stem."""
    path = Path(path)
    text = path.read_text()
    try:
        doc, node = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ClaimsError(f"{path}: not valid YAML: {exc}") from None
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise ClaimsError(f"{path}: expected a list of claims (each entry starting with '- '), "
                          f"got a {type(doc).__name__}")
    claims, seen = [], {}
    for i, (entry, entry_node) in enumerate(zip(doc, node.value)):
        where = f"{path}, claim {i + 1} of {len(doc)} (line {entry_node.start_mark.line + 1})"
        claim = _parse_entry(entry, path.stem, where)
        key = (claim.statement, claim.scenarios)
        if key in seen:
            raise ClaimsError(f"{where}, key 'statement': repeats claim {seen[key]} ({claim.statement!r}); "
                              "restrict one of them to another scenario or reword it")
        seen[key] = i + 1
        claims.append(claim)
    return claims


def claims_dir() -> Path:
    """``config/claims`` of this checkout, else of the working directory."""
    for candidate in (CLAIMS_DIR, Path.cwd() / "config" / "claims"):
        if candidate.is_dir():
            return candidate
    raise ClaimsError(f"no claims directory: neither {CLAIMS_DIR} nor ./config/claims exists")


def load_claims(directory: str | Path | None = None) -> list[Claim]:
    """Every claim of every ``<family>.yaml`` in ``directory`` (default: ``config/claims``), in file
    order; the families in alphabetical order."""
    directory = Path(directory) if directory is not None else claims_dir()
    return [c for path in sorted(directory.glob("*.yaml")) for c in parse_claims_file(path)]


# --- evaluation -------------------------------------------------------------------------------

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


def _budget(runs: pd.DataFrame, column: str) -> str:
    """The runs' value of a budget field: one number, a "low-high" range where seeds differ, or
    "" where no run records it."""
    if column not in runs.columns:
        return ""
    values = pd.to_numeric(runs[column], errors="coerce").dropna()
    if values.empty:
        return ""
    low, high = values.min(), values.max()
    text = [f"{v:g}" if v != int(v) else str(int(v)) for v in (low, high)]
    return text[0] if low == high else f"{text[0]}-{text[1]}"


def _commits(runs: pd.DataFrame) -> str:
    if "git_commit" not in runs.columns:
        return ""
    return ",".join(sorted({str(c) for c in runs.git_commit.dropna() if str(c)}))


def evaluate_claims(runs: pd.DataFrame, family: str, group_by: tuple[str, ...] = ("dataset", "backbone"),
                    claims: list[Claim] | None = None) -> pd.DataFrame:
    """One row per claim of ``family`` and setting (``group_by`` key) where both arms ran."""
    rows = []
    for claim in (c for c in (claims if claims is not None else load_claims()) if c.family == family):
        if claim.metric not in runs.columns:
            log.info("claim %r: no run reports %s", claim.statement, claim.metric)
            continue
        for key, group in runs.groupby(list(group_by)):
            key = key if isinstance(key, tuple) else (key,)
            where = dict(zip(group_by, key))
            if claim.scenarios and where.get("scenario") not in claim.scenarios:
                continue
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
            t_runs = group[(group.method == claim.treatment) & group.seed.isin(seeds)]
            b_runs = group[(group.method == claim.baseline) & group.seed.isin(seeds)] if claim.baseline \
                else group.iloc[:0]
            rows.append({"family": family, "paper": claim.paper, "claim": claim.statement,
                         "dataset": where.get("dataset"), "backbone": where.get("backbone"),
                         "setting": where.get("scenario", ""), "metric": claim.metric,
                         "treatment": claim.treatment,
                         "baseline": claim.baseline or f"fixed level {claim.threshold:g}",
                         "treatment_mean": float(t.loc[seeds].mean()), "baseline_mean": float(b.loc[seeds].mean()),
                         **result,
                         "treatment_steps": _budget(t_runs, "train_steps"),
                         "baseline_steps": _budget(b_runs, "train_steps"),
                         "treatment_batch_size": _budget(t_runs, "batch_size"),
                         "baseline_batch_size": _budget(b_runs, "batch_size"),
                         "git_commit": _commits(pd.concat([t_runs, b_runs]))})
    return pd.DataFrame(rows, columns=COLUMNS)
