"""ERM: full fine-tuning with cross-entropy (empirical risk minimisation).

Vapnik, "Principles of Risk Minimization for Learning Theory", NeurIPS 1991; as the
fine-tuning baseline of every recipe paper in this family.

Every weight of the pretrained backbone and a fresh linear head are trained on
    L = -1/B sum_i log softmax(f(x_i))_{y_i}
(with optional label smoothing eps: the target is (1 - eps) onehot + eps / K).
"""
from __future__ import annotations

import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.registry import register_method


@register_method("supervised", "erm")
class ERM(Method):
    def training_step(self, batch):
        logits = self.model(batch["x"])
        # L = CE(softmax(f(x)), y), label-smoothed when label_smoothing > 0
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.hparams.get("label_smoothing", 0.0))
        return loss, {"logits": logits.detach()}
