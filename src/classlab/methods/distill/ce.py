"""CE: the distillation family's baseline, the student trained on the hard labels alone.

The "student trained without a teacher" of Hinton, Vinyals and Dean, "Distilling the Knowledge in a
Neural Network", NIPS Deep Learning Workshop 2015, and of every distillation paper since: the same
student architecture, data, schedule and budget as the distilled students of this family
(``ce.yaml`` repeats ``kd.yaml``'s training keys; a test keeps them equal), with

    L = CE(s, y) = -log softmax(s)_y

and no teacher (``set_teacher`` refuses one). The KD, KD++ and multi-aspect students are compared
with it.
"""
from __future__ import annotations

import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.registry import register_method


@register_method("distill", "ce")
class CE(Method):
    def training_step(self, batch):
        logits = self.model(batch["x"])
        # L = CE(s, y) (label-smoothed when label_smoothing > 0)
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.hparams.get("label_smoothing", 0.0))
        return loss, {"logits": logits.detach()}
