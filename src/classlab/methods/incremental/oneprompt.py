"""OnePrompt: OVOR without virtual outlier regularization (the OVOR paper's own ablation).

Huang, Chen, Hsu, "OVOR: OnePrompt with Virtual Outlier Regularization for Rehearsal-Free
Class-Incremental Learning", ICLR 2024, Sec. 4 / Table 3 ("OnePrompt" vs "OnePrompt + VOR").
One prefix prompt shared by every task on the frozen ViT, and a linear head trained with the
task-masked cross-entropy

    L_CE = CE(W f_P(x) + b |_{C_t}, y)

and nothing after the task: no end-of-task phase at all. Everything else, hyperparameters
included (``extends: ovor`` in its YAML), is OVOR's.

So ``oneprompt`` and ``ovor`` differ in two things: the outlier regularization and OVOR's
``vor_epochs`` of extra head-only training after each task (20 epochs x 19 batches, about 380
steps a task, on config/incremental_cpu.yaml's B4Inc2). The pair does not isolate what VOR adds; the baseline for that is
``ovor_no_vor`` (``ovor`` with ``vor_lambda: 0``: the same end-of-task phase with the
cross-entropy alone). ``oneprompt`` stays as the paper's OnePrompt row.
"""
from __future__ import annotations

from classlab.methods.incremental.ovor import OVOR
from classlab.methods.registry import register_method


@register_method("incremental", "oneprompt")
class OnePrompt(OVOR):
    vor_phase = False  # no end-of-task head phase ("vor"): no virtual outlier regularization
