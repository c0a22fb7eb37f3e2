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


# --- claims as data: config/claims/<family>.yaml ------------------------------------------------

import json  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

from classlab.config import ConfigError  # noqa: E402
from classlab.report.claims import CLAIMS_DIR, COLUMNS, ClaimsError, load_claims, parse_claims_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_file_loads_and_names_existing_methods():
    claims = load_claims()
    families = {c.family for c in claims}
    assert {"supervised", "incremental"} <= families
    assert families == {p.stem for p in CLAIMS_DIR.glob("*.yaml")}
    for c in claims:
        for method in filter(None, (c.treatment, c.baseline)):
            # explain runs are method@layer, and its linear-probe readout is the supervised family's;
            # the ssl family compares pretrain-stage methods; the generative family's classifier rows are
            # diffusion_classifier_<timestep weighting>, against a chance row computed from the pair grid
            name = method.split("@")[0]
            if c.family == "generative":
                if name == "chance":
                    continue
                name = "diffusion_classifier" if name.startswith("diffusion_classifier_") else name
            family = "supervised" if (c.family, name) == ("explain", "linear_probe") else c.family
            family = "pretrain" if family == "ssl" else family
            assert (ROOT / "config" / "methods" / family / f"{name}.yaml").exists(), (c.family, method)
        assert bool(c.baseline) != (c.threshold is not None)


def test_yaml_fields_become_claims(tmp_path):
    path = tmp_path / "fam.yaml"
    path.write_text(textwrap.dedent("""\
        # a comment header
        - paper: "A et al., X: Y, 2024"
          statement: "t beats b"
          metric: acc
          treatment: t
          baseline: b
          direction: higher
        - paper: "B"
          statement: "t forgets at most 0.1"
          metric: forgotten
          treatment: t
          threshold: 0.1
          direction: lower
          margin: 0.02
          scenario: [s1, s2]
        - paper: "C"
          statement: "only in s3"
          metric: acc
          treatment: t
          baseline: b
          direction: higher
          scenario: s3
        """))
    a, b, c = parse_claims_file(path)
    assert (a.family, a.paper, a.statement, a.metric, a.treatment, a.baseline) == \
        ("fam", "A et al., X: Y, 2024", "t beats b", "acc", "t", "b")
    assert a.higher_is_better and a.margin == 0.0 and a.threshold is None and a.scenarios == ()
    assert not b.higher_is_better and b.baseline == "" and b.threshold == 0.1 and b.margin == 0.02
    assert b.scenarios == ("s1", "s2") and c.scenarios == ("s3",)


GOOD = {"paper": "P", "statement": "S", "metric": "acc", "treatment": "t", "baseline": "b", "direction": "higher"}


@pytest.mark.parametrize("change,key,words", [
    ({"baseine": "b"}, "baseine", "unknown key"),
    ({"direction": None}, "direction", "missing"),
    ({"direction": "up"}, "direction", "higher"),
    ({"metric": ""}, "metric", "non-empty string"),
    ({"treatment": 3}, "treatment", "non-empty string"),
    ({"threshold": 0.1}, "threshold", "not both"),
    ({"baseline": None}, "baseline", "threshold"),
    ({"baseline": None, "threshold": "high"}, "threshold", "number"),
    ({"margin": -0.01}, "margin", ">= 0"),
    ({"margin": True}, "margin", ">= 0"),
    ({"scenario": []}, "scenario", "non-empty"),
    ({"scenario": [1]}, "scenario", "scenario name"),
])
def test_a_bad_entry_names_file_claim_and_key(tmp_path, change, key, words):
    bad = {**GOOD, **change}
    bad = {k: v for k, v in bad.items() if v is not None}
    path = tmp_path / "family.yaml"
    # the bad entry is the second one, on line 9 of the file
    path.write_text("# header\n" + yaml_dump([GOOD, bad]))
    with pytest.raises(ClaimsError) as info:
        parse_claims_file(path)
    message = str(info.value)
    assert str(path) in message and "claim 2 of 2" in message and f"key {key!r}" in message, message
    assert words in message, message
    assert isinstance(info.value, ConfigError)  # the CLI prints it as a config error, not a traceback


def yaml_dump(entries: list[dict]) -> str:
    import yaml

    return yaml.safe_dump(entries, sort_keys=False)


def test_line_number_of_the_bad_entry(tmp_path):
    path = tmp_path / "family.yaml"
    path.write_text("# header\n\n" + yaml_dump([GOOD, {**GOOD, "statement": "S2", "direction": "sideways"}]))
    with pytest.raises(ClaimsError, match=r"claim 2 of 2 \(line 9\)"):
        parse_claims_file(path)


@pytest.mark.parametrize("text,words", [
    ("paper: P\nstatement: S\n", "expected a list of claims"),
    ("- [1, 2]\n", "expected a mapping"),
    ("- paper: 'P\n", "not valid YAML"),
])
def test_malformed_files(tmp_path, text, words):
    path = tmp_path / "family.yaml"
    path.write_text(text)
    with pytest.raises(ClaimsError, match=words):
        parse_claims_file(path)


def test_a_repeated_claim_is_refused(tmp_path):
    path = tmp_path / "family.yaml"
    path.write_text(yaml_dump([GOOD, {**GOOD, "baseline": "c"}]))
    with pytest.raises(ClaimsError, match="claim 2 of 2.*key 'statement': repeats claim 1"):
        parse_claims_file(path)


def test_load_claims_reads_every_file_of_a_directory(tmp_path):
    (tmp_path / "alpha.yaml").write_text(yaml_dump([GOOD]))
    (tmp_path / "beta.yaml").write_text(yaml_dump([GOOD, {**GOOD, "statement": "S2"}]))
    (tmp_path / "empty.yaml").write_text("# no claims yet\n")
    assert [(c.family, c.statement) for c in load_claims(tmp_path)] == \
        [("alpha", "S"), ("beta", "S"), ("beta", "S2")]


def test_a_scenario_restricted_claim_is_evaluated_only_there():
    from classlab.report.claims import Claim

    runs = pd.DataFrame({"dataset": "d", "backbone": "b", "scenario": ["s1", "s1", "s2", "s2"],
                         "method": ["t", "b", "t", "b"], "seed": 0, "acc": [0.9, 0.8, 0.7, 0.6]})
    everywhere = Claim("fam", "p", "t beats b", "acc", "t", "b")
    only_s2 = Claim("fam", "p", "t beats b in s2", "acc", "t", "b", scenarios=("s2",))
    out = evaluate_claims(runs, "fam", ("dataset", "backbone", "scenario"), [everywhere, only_s2])
    assert list(zip(out.claim, out.setting)) == [("t beats b", "s1"), ("t beats b", "s2"), ("t beats b in s2", "s2")]


def test_rows_carry_both_budgets_and_the_commits():
    from classlab.report.claims import Claim

    runs = pd.DataFrame({"dataset": "d", "backbone": "b", "method": ["t", "t", "b", "b", "x"], "seed": [0, 1, 0, 1, 0],
                         "acc": [0.9, 0.8, 0.7, 0.6, 0.5], "train_steps": [36, 36, 8, 9, 1000],
                         "batch_size": [32, 32, 128, 128, 1],
                         "git_commit": ["abc", "abc", "abc", "def-dirty", "zzz"]})
    claims = [Claim("fam", "p", "t beats b", "acc", "t", "b"),
              Claim("fam", "p", "t above 0.5", "acc", "t", "", threshold=0.5)]
    paired, fixed = evaluate_claims(runs, "fam", claims=claims).to_dict("records")
    assert (paired["treatment_steps"], paired["baseline_steps"]) == ("36", "8-9")  # seeds differ: a range
    assert (paired["treatment_batch_size"], paired["baseline_batch_size"]) == ("32", "128")
    assert paired["git_commit"] == "abc,def-dirty"  # method x is not behind the row
    assert (fixed["treatment_steps"], fixed["baseline_steps"], fixed["git_commit"]) == ("36", "", "abc")


def test_runs_without_budgets_or_provenance_give_empty_cells():
    runs = pd.DataFrame({"dataset": "d", "backbone": "b", "method": ["erm", "linear_probe"], "seed": 0,
                         "top1": [0.9, 0.8]})
    out = evaluate_claims(runs, "supervised")
    assert list(out.columns) == COLUMNS
    row = out.iloc[0]
    assert (row.treatment_steps, row.baseline_steps, row.git_commit) == ("", "", "")


def _metrics_file(path: Path, method: str, seed: int, **extra) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    m = {"dataset": "d", "backbone": "b", "method": method, "seed": seed, "top1": 0.9, "balanced_top1": 0.9,
         "nll": 0.3, "ece_15": 0.01, "ece_10_x100": 1.0, **extra}
    (path / "metrics.json").write_text(json.dumps(m))
    return path / "metrics.json"


def test_runs_csv_carries_budget_and_provenance_when_recorded(tmp_path):
    from classlab.report.tables import collect_runs

    files = [_metrics_file(tmp_path / "a", "erm", 0, train_steps=120, batch_size=64,
                           provenance={"git_commit": "0123abc", "command": "classlab train --seed 0"}),
             _metrics_file(tmp_path / "b", "erm", 1)]  # an older run: no such fields
    runs = collect_runs(files)
    assert runs.git_commit.tolist()[0] == "0123abc" and pd.isna(runs.git_commit.tolist()[1])
    assert runs.command.tolist()[0] == "classlab train --seed 0"
    csv = runs.to_csv(index=False)
    assert ",120,64," in csv and "120.0" not in csv  # integers stay integers beside a missing value
    # no run records them: no such columns
    assert not {"train_steps", "git_commit", "command"} & set(collect_runs(files[1:]).columns)


def test_incremental_runs_csv_carries_provenance(tmp_path):
    from classlab.report.incremental import collect

    tmp_path.mkdir(exist_ok=True)
    m = {"dataset": "d", "backbone": "b", "scenario": "s", "method": "lwf", "seed": 0, "last_accuracy": 0.5,
         "train_steps": 36, "batch_size": 32, "provenance": {"git_commit": "feed-dirty", "command": "x y"}}
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    runs = collect([tmp_path / "metrics.json"])
    assert runs.loc[0, ["train_steps", "batch_size", "git_commit", "command"]].tolist() == [36, 32, "feed-dirty", "x y"]


def test_aggregate_stage_writes_budgets_and_commits_and_refuses_a_bad_claims_file(tmp_path, capsys):
    from classlab.cli import main

    files = [_metrics_file(tmp_path / m / str(s), m, s, top1=acc, train_steps=steps, batch_size=64,
                           provenance={"git_commit": "c0ffee", "command": f"classlab train --method {m}"})
             for m, steps, accs in (("erm", 200, (0.9, 0.91)), ("linear_probe", 100, (0.8, 0.82)))
             for s, acc in enumerate(accs)]
    claims_dir = tmp_path / "claims"
    claims_dir.mkdir()
    (claims_dir / "supervised.yaml").write_text(yaml_dump([{**GOOD, "metric": "top1", "treatment": "erm",
                                                            "baseline": "linear_probe"}]))
    out = {k: str(tmp_path / "out" / f"{k}.{ext}") for k, ext in
           (("runs", "csv"), ("summary", "csv"), ("md", "md"), ("claims", "csv"))}
    args = ["aggregate", "--family", "supervised", "--metrics", *map(str, files), "--runs-csv", out["runs"],
            "--summary-csv", out["summary"], "--summary-md", out["md"], "--claims-csv", out["claims"],
            "--claims-dir", str(claims_dir)]
    assert main(args) == 0
    runs = pd.read_csv(out["runs"])
    assert set(runs.git_commit) == {"c0ffee"} and "classlab train --method erm" in set(runs.command)
    row = pd.read_csv(out["claims"], dtype=str).iloc[0]
    assert (row.treatment_steps, row.baseline_steps, row.git_commit) == ("200", "100", "c0ffee")

    (claims_dir / "supervised.yaml").write_text(yaml_dump([{**GOOD, "direction": "up"}]))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "supervised.yaml, claim 1 of 1" in err and "key 'direction'" in err


def test_optional_metrics_reach_tables_and_claims(tmp_path):
    """top-5, shot groups and feature norms are recorded by some runs only: the tables carry them where
    present ('-' elsewhere) and a claim on them is evaluated where both arms report them."""
    import json

    from classlab.report.tables import collect_runs, markdown_table, summarize

    base = {"dataset": "d", "backbone": "b", "top1": 0.8, "balanced_top1": 0.8, "nll": 0.5, "ece_15": 0.05,
            "ece_10_x100": 5.0}
    files = []
    for method, few in (("sbcl", [0.5, 0.6]), ("ce_lt", [0.3, 0.35])):
        for seed, value in enumerate(few):
            path = tmp_path / f"{method}{seed}.json"
            path.write_text(json.dumps(dict(base, method=method, seed=seed, few_shot_top1=value, top5=0.99)))
            files.append(path)
    path = tmp_path / "erm.json"
    path.write_text(json.dumps(dict(base, method="erm", seed=0)))
    runs = collect_runs(files + [path])
    md = markdown_table(summarize(runs))
    assert "few-shot top-1 (%)" in md and "top-5 (%)" in md
    erm_row = next(line for line in md.splitlines() if "| erm |" in line)
    assert erm_row.count(" - ") >= 2  # no top-5 or few-shot value for this run
    from classlab.report.claims import Claim

    claim = Claim("supervised", "p", "s", "few_shot_top1", "sbcl", "ce_lt")
    out = evaluate_claims(runs, "supervised", claims=[claim])
    assert out.effect.iloc[0] == pytest.approx(0.225)


@pytest.mark.parametrize("grid", ["recipes_cpu.yaml", "recipes.yaml"])
def test_every_recipe_claim_has_both_arms_in_the_grids(grid):
    """A claim row whose arms a grid does not train would silently never be measured: both claims
    grids of the supervised and distill families run every arm their claims compare (erm against
    the linear probe is the default run's own claim)."""
    import yaml

    from tests.conftest import ROOT

    families = yaml.safe_load((ROOT / "config" / grid).read_text())["families"]
    default = set(yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["families"]["supervised"]["methods"])
    for family in ("supervised", "distill"):
        claims = yaml.safe_load((ROOT / "config" / "claims" / f"{family}.yaml").read_text())
        methods = set(families[family]["methods"])
        for claim in claims:
            arms = {claim["treatment"]} | ({claim["baseline"]} if "baseline" in claim else set())
            assert arms <= methods or arms <= default, f"{grid}: {family} claim {claim['statement']!r} misses {arms - methods}"
