"""Source: the source model as trained, without adaptation (the "source" row of TENT's tables,
Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021).

Eval mode throughout: BatchNorm normalises with the running statistics of the source training
set, nothing is updated, so the prediction for a batch does not depend on the other samples in it.
"""
from __future__ import annotations

import torch

from classlab.methods.registry import register_method
from classlab.methods.shift_learner import TestTimeMethod
from classlab.methods.shift.bn_adapt import use_source_statistics


@register_method("shift", "source")
class Source(TestTimeMethod):
    def setup(self) -> None:
        self.model.requires_grad_(False)
        use_source_statistics(self.model)  # also undoes the batch-statistics mode of another method

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)
