"""Provenance: the git commit (with -dirty) and the command line of a run, cheap and never raising."""
import shlex
import shutil
import subprocess
import sys

import pytest

from classlab.provenance import git_commit, run_provenance

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(cwd, *args):
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture()
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never find a repository above tmp_path
    work = tmp_path / "repo"
    work.mkdir()
    _git(work, "init", "-q")
    (work / "code.py").write_text("x = 1\n")
    _git(work, "add", "code.py")
    _git(work, "commit", "-q", "-m", "first")
    return work


def test_clean_checkout_gives_head(repo):
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert git_commit(repo) == head and len(head) == 40
    assert git_commit(repo / "code.py") == head  # a file's checkout


def test_untracked_files_do_not_make_it_dirty(repo):
    (repo / "notes.txt").write_text("scratch\n")
    assert not git_commit(repo).endswith("-dirty")


def test_changed_tracked_file_marks_it_dirty(repo):
    head = _git(repo, "rev-parse", "HEAD").strip()
    (repo / "code.py").write_text("x = 2\n")
    assert git_commit(repo) == f"{head}-dirty"
    _git(repo, "add", "code.py")  # staged but not committed: still dirty
    assert git_commit(repo) == f"{head}-dirty"


def test_outside_a_checkout_or_without_git_it_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_commit(plain) == "unknown"
    assert git_commit(tmp_path / "does" / "not" / "exist") == "unknown"
    empty = tmp_path / "empty"  # a repository without a commit has no HEAD
    empty.mkdir()
    _git(empty, "init", "-q")
    assert git_commit(empty) == "unknown"
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git executable at all
    assert run_provenance(plain)["git_commit"] == "unknown"


def test_command_is_the_shell_quoted_argv(repo, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/classlab", "train", "--overrides", '{"lr": 0.1}', "--seed", "0"])
    prov = run_provenance(repo)
    assert set(prov) == {"git_commit", "command"}
    assert prov["command"] == "/venv/bin/classlab train --overrides '{\"lr\": 0.1}' --seed 0"
    assert shlex.split(prov["command"]) == sys.argv


def test_default_is_this_checkout():
    # the package's own source: a sha (40 hex digits, maybe -dirty) in a git checkout, else "unknown"
    commit = run_provenance()["git_commit"]
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40
