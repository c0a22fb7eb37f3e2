"""Linear probe: a linear classifier on frozen backbone features.

The standard representation-quality protocol (e.g. Chen et al., "A Simple Framework for
Contrastive Learning of Visual Representations", ICML 2020, Sec. 4 linear evaluation).

The backbone g is frozen (and kept in eval mode, so BatchNorm statistics do not move);
only the head W, b is trained:  L = CE(W g(x) + b, y).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.registry import register_method


@register_method("supervised", "linear_probe")
class LinearProbe(Method):
    augment = False  # probing measures the fixed representation of the un-augmented images

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        for p in self.model.backbone.parameters():
            p.requires_grad_(False)

    def param_groups(self):
        return [{"params": list(self.model.head.parameters())}]

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.backbone.eval()  # frozen means frozen BatchNorm statistics too
        return self

    def training_step(self, batch):
        with torch.no_grad():
            feats = self.model.features(batch["x"])
        logits = self.model.head(feats)  # L = CE(W g(x) + b, y), g frozen
        return F.cross_entropy(logits, batch["y"]), {"logits": logits.detach()}
