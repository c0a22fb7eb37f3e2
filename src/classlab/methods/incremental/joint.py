"""Joint training: the upper bound of class-incremental learning.

Zhou et al., "Deep Class-Incremental Learning: A Survey" (arXiv 2302.03648, 2023), baselines:
at every step the model is trained on all data of all tasks seen so far (not a continual
method; it bounds what any of them can reach).

L_t = CE(f(x)|_{seen classes}, y),  (x, y) from tasks 0..t.
"""
from __future__ import annotations

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner


@register_method("incremental", "joint")
class Joint(IncrementalLearner):

    def training_indices(self, task, seen, memory):
        return seen  # every sample of every task so far
