"""Supervised pretraining: cross-entropy on the labelled training set.

The shared pretraining node of the DAG (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016 style recipe: SGD with momentum, weight decay, flip/translate
augmentation). One checkpoint per dataset x backbone x seed serves every downstream
method that names it. ``classes`` in the hyperparameters restricts pretraining to a subset
of classes (e.g. the first task of a class-incremental sequence), so that later classes'
labels are never seen.

L = -1/B sum_i log softmax(f(x_i))_{y_i}

It is its own class, not the supervised family's ``erm``: a change to a fine-tuning recipe
must not change the shared pretraining node of every family.
"""
from __future__ import annotations

import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.registry import register_method


@register_method("pretrain", "supervised")
class SupervisedPretrain(Method):
    """Cross-entropy from scratch: the shared pretraining stage."""

    def training_step(self, batch):
        logits = self.model(batch["x"])
        # L = CE(softmax(f(x)), y), label-smoothed when label_smoothing > 0
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=self.hparams.get("label_smoothing", 0.0))
        return loss, {"logits": logits.detach()}
