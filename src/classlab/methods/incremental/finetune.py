"""Sequential fine-tuning: the lower bound of class-incremental learning.

As defined in the baselines of Zhou et al., "Deep Class-Incremental Learning: A Survey"
(arXiv 2302.03648, 2023): the model is trained on each task's data in turn with no measure
against forgetting.

L_t = CE(f(x)|_{seen classes}, y),  (x, y) from task t only.
"""
from __future__ import annotations

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner


@register_method("incremental", "finetune")
class Finetune(IncrementalLearner):
    """The base learner's masked cross-entropy on the current task's samples, nothing else."""
