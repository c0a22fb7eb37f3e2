"""DVC: `dvc repro` wraps the workflow (a second repro does nothing), and data/ plus the
checkpoints survive a push / delete / pull round trip through a local remote without
making Snakemake retrain anything."""
import os
import shutil
import subprocess

import pytest

from tests.conftest import VENV_BIN, env_with_venv, planned_jobs

pytestmark = pytest.mark.slow


def run(cwd, *cmd, check=True):
    env = env_with_venv()
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def test_dvc_repro_push_pull_round_trip(smoke_run, tmp_path):
    work = tmp_path / "repo"
    shutil.copytree(smoke_run, work, symlinks=True)
    (work / "params.yaml").write_text("configfile: config/smoke.yaml\ncores: 2\n")
    dvc = str(VENV_BIN / "dvc")
    run(work, "git", "init", "-q")
    run(work, "git", "add", "-A")
    run(work, "git", "commit", "-qm", "scratch")

    run(work, dvc, "add", "-q", "data")
    first = run(work, dvc, "repro")
    assert "Running stage 'run_workflow'" in first
    second = run(work, dvc, "repro")
    assert "Running stage" not in second and "up to date" in second.lower()

    remote = tmp_path / "remote"
    run(work, dvc, "remote", "add", "-d", "local", str(remote))
    run(work, dvc, "push")
    checkpoints = sorted(p.relative_to(work) for p in (work / "results/checkpoints").rglob("model.pt"))
    assert checkpoints
    shutil.rmtree(work / "data")
    shutil.rmtree(work / "results/checkpoints")
    shutil.rmtree(work / ".dvc/cache")  # the pull must come from the remote
    run(work, dvc, "pull")
    assert all((work / p).exists() for p in checkpoints)
    assert (work / "data/prepared/digits/train.pt").exists()
    status = run(work, dvc, "status")
    assert "up to date" in status.lower(), status
    # pulled files have fresh mtimes; ancient() inputs keep Snakemake from retraining
    assert planned_jobs(work, "--configfile", "config/smoke.yaml") == 0
