"""End to end: the smoke config through Snakemake to the HTML report; reruns are no-ops; the
lock refuses a second concurrent run; the workflow lints clean."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import VENV_BIN, env_with_venv, planned_jobs, snakemake

pytestmark = pytest.mark.slow


def test_smoke_run_produces_tables_figures_claims(smoke_run):
    summary = pd.read_csv(smoke_run / "results/tables/supervised/summary.csv")
    assert set(summary.method) == {"erm", "linear_probe", "ps_kd", "erm_simclr"}
    assert (summary.seeds == 1).all()
    # far above 10-class chance on digits from the supervised backbone (the smoke SimCLR node trains
    # one epoch, so erm_simclr is only required to run)
    assert summary[summary.method != "erm_simclr"].top1_mean.between(0.2, 1.0).all()
    distill = pd.read_csv(smoke_run / "results/tables/distill/summary.csv")
    assert set(distill.method) == {"ce", "kd"} and distill.feature_norm_mean_mean.gt(0).all()
    claims = pd.read_csv(smoke_run / "results/claims.csv")
    assert claims.verdict.isin(["holds", "inconclusive", "does not hold"]).all()
    assert {"supervised", "distill"} <= set(claims.family)
    for family in ("supervised", "distill"):
        for name in ("learning_curves", "accuracy_by_method", "reliability", "confusion", "feature_norms"):
            png = smoke_run / f"results/figures/{family}/digits/convnet/{name}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one pretrained backbone per seed (one) and pretraining node (supervised, simclr), shared by the methods
    assert len(list((smoke_run / "results/checkpoints/pretrain").rglob("model.pt"))) == 2
    # one teacher per seed, shared by the students that use one
    assert len(list((smoke_run / "results/checkpoints/teacher").rglob("model.pt"))) == 1
    # the vlm family's three protocols land in one table: base-to-novel on the CLIP of digits' base
    # classes, compositional zero-shot on digits_pairs (its own CLIP of the seen pairs), label noise
    vlm = pd.read_csv(smoke_run / "results/tables/vlm/runs.csv")
    assert set(vlm.scenario) == {"base_to_novel/4shot/saw_base", "compositional/2shot", "label_noise/web0.4"}
    assert set(vlm.method) == {"zeroshot", "coop", "csp", "capro"} and (vlm.groupby("method").seed.count() == 1).all()
    assert {p.parent.parent.name for p in (smoke_run / "results/checkpoints/vlm_pretrain").rglob("model.pt")} == \
        {"saw_base", "saw_seen"}
    # the metric family: retrieval on digits' unseen classes; the single_paper family: two protocols
    # through one rule; the ssl family: three pretrain nodes read by both probes
    metric = pd.read_csv(smoke_run / "results/tables/metric/runs.csv")
    assert set(zip(metric.scenario, metric.method)) == {("retrieval/test", "multi_similarity")}
    assert metric.recall_at_1.between(0, 1).all() and metric.map_at_r.between(0, 1).all()
    ssl = pd.read_csv(smoke_run / "results/tables/ssl/runs.csv")
    assert set(zip(ssl.scenario, ssl.method, ssl.probe)) == {("sorting", "sorting", "image"), ("mim", "hpm", "image"),
                                                            ("dense", "cotap", "segmentation")}
    assert ssl.dropna(subset=["linear_probe_acc"]).linear_probe_acc.between(0.1, 1).all()
    assert ssl.dropna(subset=["miou"]).miou.between(0, 1).all()
    single = pd.read_csv(smoke_run / "results/tables/single_paper/runs.csv")
    assert set(zip(single.protocol, single.method)) == {("icl_gd", "icl_gd"), ("aspl", "aspl")}
    # the dense family: one detector and one segmenter; the generative family: one DDPM node read by the
    # classifier (a row per timestep weighting and chance) and by both personalisations
    dense = pd.read_csv(smoke_run / "results/tables/dense/runs.csv")
    assert set(zip(dense.scenario, dense.method)) == {("detection", "cq_dino"), ("segmentation", "nacl")}
    generative = pd.read_csv(smoke_run / "results/tables/generative/runs.csv")
    assert set(zip(generative.scenario, generative.method)) == {
        ("ddpm", "ddpm"), ("classification", "chance"), ("personalisation", "classdiffusion"),
        ("personalisation", "personalize"),
        *(("classification", f"diffusion_classifier_{w}") for w in ("uniform", "learned", "elbo"))}
    assert len(list((smoke_run / "results/generative").rglob("model.pt"))) == 1
    assert "generative" in set(claims.family)  # (the smoke dense slice runs no claim's two arms)
    for name in ("metric/digits_retrieval", "ssl/probes", "single_paper/icl_gd_loss",
                 "single_paper/aspl_accuracy_vs_labels", "dense/digits_lt_scenes_examples",
                 "generative/digits_pairs_seed0_samples", "generative/digits_pairs_personalised"):
        assert (smoke_run / f"results/figures/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_is_a_noop(smoke_run):
    assert planned_jobs(smoke_run, "--configfile", "config/smoke.yaml") == 0


def test_report_html(smoke_run):
    snakemake(smoke_run, "--configfile", "config/smoke.yaml", "--report", "results/report.html")
    html = (smoke_run / "results/report.html").read_text(errors="ignore")
    assert len(html) > 100_000
    for text in ("claims.csv", "summary_table.csv", "confusion.png", "reliability.png", "learning_curves.png",
                 "accuracy_by_method.png"):
        assert text in html, text


def test_second_concurrent_run_is_refused_by_the_lock(smoke_run, tmp_path):
    work = tmp_path / "locked"
    shutil.copytree(smoke_run, work, symlinks=True)
    # re-evaluating four runs keeps the first instance busy (and locked) for about half a minute
    targets = [f"results/eval/supervised/digits/convnet/{method}/seed0/metrics.json"
               for method in ("erm", "ps_kd", "linear_probe", "erm_simclr")]
    # (targets before the options: --configfile and --forcerun take every word that follows them)
    cmd = [str(VENV_BIN / "snakemake"), "-c1", *targets, "--configfile", "config/smoke.yaml",
           "--forcerun", "evaluate_classifier"]
    first = subprocess.Popen(cmd, cwd=work, env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    locks = work / ".snakemake" / "locks"
    deadline = time.time() + 120
    while not (locks.exists() and any(locks.iterdir())):
        assert first.poll() is None, "the first run ended before it took the lock"
        assert time.time() < deadline
        time.sleep(0.05)
    # --rerun-incomplete (as in the default profile) skips the incomplete-file guard, so only
    # the lock stands between the two runs
    second = snakemake(work, "-c1", "--configfile", "config/smoke.yaml", "--forcerun", "aggregate_classifiers",
                       "--rerun-incomplete", check=False)
    first_out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, first_out[-3000:]
    assert second.returncode != 0, "the second run was not refused"
    assert "cannot be locked" in (second.stdout + second.stderr)
    # the first run's results are whole: nothing left to do for its targets, and they parse
    assert planned_jobs(work, *targets, "--configfile", "config/smoke.yaml") == 0
    for target in targets:
        assert json.loads((work / target).read_text())["top1"] > 0


def test_lint_is_clean():
    from tests.conftest import ROOT

    proc = snakemake(ROOT, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_full_incremental_grid_resolves():
    """config/incremental.yaml (every method, four scenarios, continual forgetting) builds its DAG."""
    from tests.conftest import ROOT

    proc = snakemake(ROOT, "-n", "--configfile", "config/incremental.yaml")
    out = proc.stdout + proc.stderr
    for rule in ("build_scenario", "pretrain_first_task", "train_incremental", "train_forgetting", "train_multilabel",
                 "evaluate_incremental", "aggregate_incremental", "plot_incremental"):
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, rule


def test_retrain_under_an_edited_setting_re_evaluates(smoke_run, tmp_path):
    """Evaluation reads its model.pt as an ancient() input (a `dvc pull` must not re-evaluate), so a
    retrain caused by an edited override reaches the evaluation through the rule's params. Snakemake
    does not follow an ancient() input within the invocation that retrains, so the evaluations are
    planned by the next one (a known limitation, stated in the README)."""
    work = tmp_path / "repo"
    shutil.copytree(smoke_run, work, symlinks=True)
    smoke = work / "config/smoke.yaml"
    smoke.write_text(smoke.read_text().replace("ps_kd: {epochs: 2,", "ps_kd: {epochs: 1,"))
    models = [f"results/checkpoints/supervised/digits/convnet/ps_kd/seed{k}/model.pt" for k in (0,)]
    snakemake(work, "-c1", *models, "--allowed-rules", "train_classifier", "--configfile", "config/smoke.yaml")
    proc = snakemake(work, "-n", "--configfile", "config/smoke.yaml")
    lines = (proc.stdout + proc.stderr).splitlines()
    jobs = [line.split()[1].rstrip(":") for line in lines if line.startswith(("rule ", "localrule "))]
    assert jobs.count("train_classifier") == 0 and jobs.count("evaluate_classifier") == 1, jobs
