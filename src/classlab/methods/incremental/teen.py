"""TEEN: training-free calibration of the new classes' prototypes (few-shot class-incremental).

Wang, Zhou, Zhang, Zhan and Ye, "Few-Shot Class-Incremental Learning via Training-Free
Prototype Calibration", NeurIPS 2023 (arXiv 2312.05229). The backbone and a cosine classifier
(temperature s) are trained on the base session, L = CE(s * cos(phi(x), W), y); the backbone is
then frozen and every class is represented by its prototype p_c (class mean of the features).
In each few-shot session no training happens; the prototype of each new class c is fused with
the base prototypes, weighted by their similarity to it:

    w_{b,c} = exp(tau * cos(p_b, p_c)) / sum_{b'} exp(tau * cos(p_b', p_c))     (b: base classes)
    Delta_c = sum_b w_{b,c} p_b
    p_c    <- alpha * p_c + (1 - alpha) * Delta_c

and samples are classified by cosine similarity to the (calibrated) prototypes. As in the
authors' release, prototypes and Delta_c enter the fusion L2-normalised (the classifier is a
cosine one, so only directions matter); alpha = 1 leaves every prediction unchanged.

Base session and prototypes are SimpleCIL's (``simplecil.py``) with the base session always
trained, so that teen and simplecil on the same few-shot scenario, seed and hyperparameters
share a bit-identical backbone and base prototypes: the only difference is the calibration.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.incremental.simplecil import SimpleCIL
from classlab.methods.registry import register_method
from classlab.methods.learner import TaskContext


def teen_calibrate(new_protos: torch.Tensor, base_protos: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """Calibrated prototypes [N, D] of the new classes from the base prototypes [B, D]."""
    new = F.normalize(new_protos, dim=-1)
    base = F.normalize(base_protos, dim=-1)
    # w_{b,c} = softmax_b(tau * cos(p_b, p_c))
    weights = torch.softmax(tau * new @ base.T, dim=1)
    # Delta_c = sum_b w_{b,c} p_b
    delta = F.normalize(weights @ base, dim=-1)
    # p_c <- alpha * p_c + (1 - alpha) * Delta_c
    return alpha * new + (1.0 - alpha) * delta


@register_method("incremental", "teen")
class TEEN(SimpleCIL):
    """SimpleCIL's base session and prototypes, plus TEEN's calibration of each session's new classes."""


    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.register_buffer("base_mask", torch.zeros(num_classes, dtype=torch.bool))

    def trains_base_session(self) -> bool:
        return True  # the paper trains the base session

    def begin_task(self, task_id, new_classes, seen_classes):
        super().begin_task(task_id, new_classes, seen_classes)
        if task_id == 0:
            self.base_mask[torch.tensor(new_classes, dtype=torch.long)] = True

    @torch.no_grad()
    def end_task(self, task_id: int, context: TaskContext) -> None:
        super().end_task(task_id, context)  # p_c = class means of this session's features
        if task_id == 0:
            return
        new = torch.tensor(context.new_classes, dtype=torch.long, device=self.prototypes.device)
        self.prototypes[new] = teen_calibrate(self.prototypes[new], self.prototypes[self.base_mask],
                                              float(self.hparams["alpha"]), float(self.hparams["tau"]))
