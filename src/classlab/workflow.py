"""Helpers the Snakefile imports: kept in Python so rule files hold only rules."""
from __future__ import annotations

import os
import shutil
import sys


def ensure_cli_on_path() -> None:
    """Rules call the ``classlab`` CLI. Snakemake started from a virtualenv that was not
    activated would not find it: put the interpreter's bin directory first (under
    ``--sdm conda`` the job's conda env is prepended later and still wins)."""
    bin_dir = os.path.dirname(sys.executable)
    if shutil.which("classlab") is None and os.path.exists(os.path.join(bin_dir, "classlab")):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
