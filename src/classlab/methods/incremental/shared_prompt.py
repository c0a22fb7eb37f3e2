"""Shared-prompt baseline of MULTI-LANE: one lane (selectors, prompts, head) for every task.

The baseline of De Min, Mancini, Lathuilière, Roy, Ricci, "Less is more: Summarizing Patch
Tokens for Efficient Multi-Label Class-Incremental Learning", CoLLAs (PMLR 274), 2024, with
the paths of all tasks merged: the same patch selectors S and prefix prompts (p^K_l, p^V_l) on
the same frozen ViT, and one head over all classes, trained sequentially task after task
(no prompt selection, no exemplars). In task t, with the lane's feature f (see multi_lane.py):

  L_t = -(1/|C_t|) sum_{c in C_t} [ y_c log sigmoid(w_c^T f + b_c) + (1 - y_c) log(1 - sigmoid(w_c^T f + b_c)) ]

on the current task's annotated classes only. Because S and the prompts keep changing, the
scores of earlier classes drift: the forgetting that MULTI-LANE's per-task lanes remove.
"""
from __future__ import annotations

from classlab.methods.incremental.multi_lane import MultiLane
from classlab.methods.registry import register_method


@register_method("incremental", "shared_prompt")
class SharedPrompt(MultiLane):
    """MULTI-LANE with a single lane shared by every task (``shared_lane``)."""

    shared_lane = True
