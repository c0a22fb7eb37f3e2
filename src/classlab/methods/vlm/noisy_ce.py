"""Noisy CE: plain cross-entropy on the noisy labels, the baseline CAPro is compared against.

The standard baseline of learning with label noise (CAPro's tables report it as "vanilla" training on
WebVision): the same backbone, optimiser and budget as ``capro``, the loss
L = -(1/B) sum_i log softmax(W f(x_i))_{y~_i} on the noisy labels y~ as given, nothing cleaned,
nothing reweighted. Like ``capro`` it is not a prompt method: it runs in the label-noise protocol
(``classlab.protocols.label_noise``), whose ``build(class_names, text_features)`` call it accepts and
ignores (it uses no text).
"""
from __future__ import annotations

import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.registry import register_method


@register_method("vlm", "noisy_ce")
class NoisyCE(Method):
    trains_on_noisy_labels = True

    def build(self, class_names: list[str], text_features=None) -> None:
        self.class_names = list(class_names)

    def training_step(self, batch: dict):
        logits = self.model(batch["x"])
        loss = F.cross_entropy(logits, batch["y"], label_smoothing=float(self.hparams.get("label_smoothing", 0.0)))
        return loss, {"logits": logits.detach()}
