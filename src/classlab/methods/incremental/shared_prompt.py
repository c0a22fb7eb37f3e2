"""Shared-prompt baseline: MULTI-LANE with one lane (selectors, prompts, head) for every task.

This baseline is this repository's own; it is neither in the paper nor in its code. The paper
is De Min, Mancini, Lathuilière, Roy, Ricci, "Less is more: Summarizing Patch Tokens for
Efficient Multi-Label Class-Incremental Learning", CoLLAs (PMLR 274), 2024, whose own ablations
(no normalisation, no drop-and-replace, key-query task selection) are the ``extends:
multi_lane`` variants that the claims compare against. Here the paths of all tasks are merged:
the same patch selectors S and prefix prompts (p^K_l, p^V_l) on the same frozen ViT, and one
head over all classes, trained sequentially task after task (no prompt selection, no
exemplars). In task t, with the lane's feature f (see multi_lane.py):

  L_t = -(1/|C_t|) sum_{c in C_t} [ y_c log sigmoid(w_c^T f + b_c) + (1 - y_c) log(1 - sigmoid(w_c^T f + b_c)) ]

on the current task's annotated classes only. Because S and the prompts keep changing, the
scores of earlier classes drift, so against one drifting lane MULTI-LANE's advantage holds
almost by construction: no claim rests on this comparison.
"""
from __future__ import annotations

from classlab.methods.incremental.multi_lane import MultiLane
from classlab.methods.registry import register_method


@register_method("incremental", "shared_prompt")
class SharedPrompt(MultiLane):
    """MULTI-LANE with a single lane shared by every task (``shared_lane``)."""

    shared_lane = True
