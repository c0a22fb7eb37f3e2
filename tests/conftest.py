"""Shared fixtures: a scratch copy of the repository and one smoke run of the workflow."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SKIP_DIRS = {".venv", "results", "logs", ".snakemake", ".git", ".pytest_cache", "__pycache__", "bench/out"}


def env_with_venv() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def copy_repo(dest: Path) -> Path:
    """A scratch copy of the working tree (no results, no caches), with the data layer's raw
    digits file absent so the copy starts clean; the virtualenv is linked, not copied."""
    def ignore(dirpath, names):
        rel = Path(dirpath).relative_to(ROOT)
        out = set()
        for n in names:
            p = str(rel / n) if str(rel) != "." else n
            if n in SKIP_DIRS or p in SKIP_DIRS or n.endswith(".egg-info") or p == "data":
                out.add(n)
        return out

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "snakemake"), *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env_with_venv(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def planned_jobs(workdir: Path, *args: str) -> int:
    """Number of jobs a dry run would execute (0 means the run is a no-op)."""
    proc = snakemake(workdir, "-n", *args)
    return sum(1 for line in (proc.stdout + proc.stderr).splitlines()
               if line.startswith("rule ") or line.startswith("localrule "))


# one thread per job: 2 cores (or a 2-CPU SLURM node) run two smoke jobs at a time; the smoke jobs are
# seconds of interpreter start-up and tiny tensors, which a second core serves better as a second job
ONE_THREAD_PER_JOB = ("--max-threads", "1")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """The smoke config run once, end to end, in a scratch copy; tests read (not modify) it."""
    work = copy_repo(tmp_path_factory.mktemp("smoke") / "repo")
    snakemake(work, "-c2", *ONE_THREAD_PER_JOB, "--configfile", "config/smoke.yaml")
    return work


def pytest_collection_finish(session):
    """The incremental method tests read small shared inputs (prepared digits, scenarios,
    first-task pretrained backbones): build them once before those tests run."""
    if any(Path(str(item.fspath)).name.startswith("test_incremental_") for item in session.items):
        from tests.shared_data import ensure_shared

        ensure_shared()


def require_system_dependency(present: bool, what: str) -> None:
    """`make test` installs the system packages itself (root with apt): a missing one is a
    failure, not a skip. Where the suite runs without them on purpose (not root, no apt), set
    CLASSLAB_ALLOW_MISSING_SYSTEM_DEPS=1 to skip instead."""
    if present:
        return
    if os.environ.get("CLASSLAB_ALLOW_MISSING_SYSTEM_DEPS") == "1":
        pytest.skip(f"{what} is missing (CLASSLAB_ALLOW_MISSING_SYSTEM_DEPS=1)")
    pytest.fail(f"{what} is missing although `make test` installs it (make system-deps)")


@pytest.fixture
def one_thread():
    """One torch thread for the test (small tensors; deterministic and no oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory) -> Path:
    """scikit-learn's digits, downloaded (no network) and prepared once per session in a scratch dir."""
    from classlab.data.prepare import prepare
    from classlab.data.registry import get_dataset

    root = tmp_path_factory.mktemp("digits")
    get_dataset("digits").download(root / "raw")
    prepare("digits", root / "raw", root / "prepared")
    return root / "prepared"


@pytest.fixture(scope="session")
def clip_of_base(digits_prepared, tmp_path_factory) -> Path:
    """The vlm family's offline CLIP of digits' base classes (0-4): a 2-block ConvNet and 32-d
    projections aligned to the MiniLM tower for 4 epochs, trained once per session (model.pt)."""
    from classlab.train import train

    out = tmp_path_factory.mktemp("image_text")
    train("pretrain", "image_text", digits_prepared, "convnet", 0, out,
          overrides={"classes": [0, 1, 2, 3, 4], "epochs": 4, "batch_size": 64, "augment_pad": 0,
                     "augment_hflip": False, "lr": 0.003, "embed_dim": 32},
          backbone_kwargs={"widths": [16, 32], "pool_after": [0]}, threads=1, progress=False)
    return out / "model.pt"
