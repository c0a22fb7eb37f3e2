"""The smoke config through `--executor slurm` on a real single-node cluster, to the report."""
import os

import pandas as pd
import yaml
import pytest

from tests.conftest import ONE_THREAD_PER_JOB, copy_repo, planned_jobs, require_system_dependency, snakemake
from tests.slurm_cluster import LocalSlurm, missing_requirements

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing_requirements()
    require_system_dependency(not why, f"a local SLURM cluster ({why})")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def test_smoke_run_on_slurm(cluster, tmp_path, monkeypatch):
    work = copy_repo(tmp_path / "repo")
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CLASSLAB_SLURM_GPUS", "0")  # the test node has no GPU; real clusters keep 1
    monkeypatch.setenv("CLASSLAB_SLURM_PARTITION", "debug")
    # one supervised method and the explain family that reads its checkpoint: the executor path is
    # the same for every rule, and the suite's time budget is not (the local smoke run covers every family)
    smoke = yaml.safe_load((work / "config" / "smoke.yaml").read_text())
    smoke["seeds"] = [0]
    smoke["families"] = {"supervised": {"methods": ["erm"], "overrides": {"erm": smoke["families"]["supervised"]["overrides"]["erm"]}},
                         "explain": smoke["families"]["explain"]}
    smoke["pretrain"]["others"] = {}
    (work / "slurm_smoke.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    configs = ["--configfile", "slurm_smoke.yaml"]
    args = [*configs, "--workflow-profile", "workflow/profiles/slurm", *ONE_THREAD_PER_JOB]
    proc = snakemake(work, *args, "--slurm-status-command", "squeue",
                     "--slurm-init-seconds-before-status-checks", "1", "--latency-wait", "5", timeout=1200)
    log = proc.stdout + proc.stderr
    # training and evaluation went through sbatch; downloads, tables and plots stayed local
    remote = {line[len("rule "):].rstrip(":") for line in log.splitlines() if line.startswith("rule ")}
    local = {line[len("localrule "):].rstrip(":") for line in log.splitlines() if line.startswith("localrule ")}
    assert {"pretrain_backbone", "train_classifier", "evaluate_classifier", "compute_saliency"} <= remote, remote
    assert {"download_dataset", "aggregate_classifiers", "plot_classifiers", "evaluate_saliency",
            "aggregate_explain"} <= local, local
    assert log.count("has been submitted with SLURM jobid") == len(
        [l for l in log.splitlines() if l.startswith("rule ")])
    summary = pd.read_csv(work / "results/tables/supervised/summary.csv")
    assert set(summary.method) == {"erm"}
    snakemake(work, *args, "--report", "results/report.html")
    assert (work / "results/report.html").stat().st_size > 100_000
    assert planned_jobs(work, *configs) == 0
