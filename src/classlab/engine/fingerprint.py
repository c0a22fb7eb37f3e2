"""A checkpoint belongs to one computation: the fingerprint of what determines a run.

A resume checkpoint (``last.pt``, ``task<t>.pt``, ...) is written under a path that survives a
killed job, and neither Snakemake nor DVC (``persist: true``) deletes it. If the job's
hyperparameters, scenario, data, backbone, seed or starting checkpoint are edited before the
rerun, resuming from that file would splice two different computations together. So every
resume checkpoint carries the fingerprint of the computation that wrote it, and a loader
compares it with the current one: on any difference the stale file is discarded, with a log
line naming the keys that differ, and the run starts fresh.

A fingerprint is a flat ``{name: str}`` mapping (plain strings, so it survives
``torch.load(weights_only=True)``). Execution options that do not change the result (threads,
progress bars, checkpoint frequency) are never part of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("classlab.engine")


def canonical(value: Any) -> str:
    """A stable text form: JSON with sorted keys (tuples become lists)."""
    return json.dumps(value, sort_keys=True, default=str)


def file_digest(path: str | Path | None) -> str:
    """sha256 of a file's bytes ("" for None): identifies a scenario manifest or an init checkpoint."""
    if path is None or str(path) == "":
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dataset_digest(manifest: dict) -> str:
    """The prepared dataset's identity: its name and the checksums of its split files."""
    return hashlib.sha256(canonical({"dataset": manifest.get("dataset"),
                                     "splits": manifest.get("splits")}).encode()).hexdigest()


def make_fingerprint(**parts: Any) -> dict[str, str]:
    """``{name: canonical(value)}`` for every part; callers pass the resolved hyperparameters,
    ``data=dataset_digest(...)``, ``scenario=file_digest(...)``, backbone, its kwargs, seed and
    ``init=file_digest(init)``, plus whatever else determines their computation."""
    return {name: value if isinstance(value, str) else canonical(value) for name, value in sorted(parts.items())}


def differing_keys(saved: dict | None, current: dict) -> list[str]:
    """Names whose values differ (a checkpoint without a fingerprint differs in every key)."""
    saved = dict(saved or {})
    if not saved:
        return sorted(current) or ["fingerprint"]
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def check_resume(state: dict, current: dict | None, path: str | Path) -> bool:
    """True if ``state`` (a loaded checkpoint) was written by the computation ``current``.

    ``current`` None means the caller did not fingerprint its run (tests of the bare loop):
    anything resumes. On a mismatch, a line names the differing keys."""
    if current is None:
        return True
    keys = differing_keys(state.get("fingerprint"), current)
    if not keys:
        return True
    message = (f"discarding stale checkpoint {path}: it was written by a different computation "
               f"(differs in {', '.join(keys)}); starting fresh")
    log.warning(message)
    print(message, file=sys.stderr, flush=True)
    return False
