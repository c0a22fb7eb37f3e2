"""Where a result came from: the code's git commit and the command line that ran it.

``run_provenance()`` goes into every run's ``metrics.json`` (key ``provenance``); the tables
carry it to ``runs.csv`` and the claims table. It costs two short ``git`` calls and never
raises: outside a git checkout, or without git, the commit is ``"unknown"``.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

UNKNOWN = "unknown"
_TIMEOUT_S = 10


def _git(args: list[str], cwd: Path) -> str | None:
    env = dict(os.environ)
    # a read-only look: never take .git/index.lock (git status would otherwise refresh the
    # index and collide with a concurrent commit)
    env["GIT_OPTIONAL_LOCKS"] = "0"
    env["LC_ALL"] = "C"
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_commit(path: str | os.PathLike | None = None) -> str:
    """HEAD's sha of the checkout holding ``path`` (default: this package's source), with
    ``-dirty`` appended when tracked files differ from HEAD (untracked files do not count);
    ``"unknown"`` outside a git checkout."""
    try:
        where = Path(path) if path is not None else Path(__file__).resolve().parent
        if where.is_file():
            where = where.parent
        sha = _git(["rev-parse", "--verify", "HEAD"], where)
        if not sha or not sha.strip():
            return UNKNOWN
        status = _git(["status", "--porcelain", "--untracked-files=no"], where)
        if status is None:
            return UNKNOWN
        return sha.strip() + ("-dirty" if status.strip() else "")
    except Exception:  # provenance must never break a run
        return UNKNOWN


def run_provenance(path: str | os.PathLike | None = None) -> dict:
    """``{"git_commit": <sha>[-dirty] | "unknown", "command": <the command line, shell-quoted>}``."""
    try:
        command = shlex.join(str(a) for a in sys.argv)
    except Exception:
        command = ""
    return {"git_commit": git_commit(path), "command": command}
