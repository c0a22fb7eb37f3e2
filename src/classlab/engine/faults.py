"""Fault injection for the reliability check (``make faults``): a job kills itself on purpose.

``CLASSLAB_KILL_AT=<event>:<n>`` makes the process SIGKILL itself at the n-th occurrence
(1-based) of ``event``: ``step`` (after an optimizer step, mid-epoch), ``epoch`` (after an
epoch, before its checkpoint) or ``checkpoint_write`` (inside a checkpoint write, after the
bytes reached the temporary file and before the rename). Unset, it costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("CLASSLAB_KILL_AT", "")
_counts: dict[str, int] = {}


def maybe_kill(event: str) -> None:
    if not _SPEC:
        return
    name, _, nth = _SPEC.partition(":")
    if name != event:
        return
    _counts[event] = _counts.get(event, 0) + 1
    if _counts[event] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
