"""AdamW: cross-entropy training with Adam and decoupled weight decay, the baseline of Lion.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019; the optimizer Lion
(Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023) is compared with.

The loss is ERM's cross-entropy; the update is timm's AdamW, per parameter with gradient g:
    m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
    w -= lr (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd w)
"""
from __future__ import annotations

from classlab.methods.registry import register_method
from classlab.methods.supervised.erm import ERM


@register_method("supervised", "adamw")
class AdamW(ERM):
    optimizer_name = "adamw"

    def configure_optimizer(self):
        # the method is its optimizer: the YAML's schema admits no other `optimizer`
        if self.hparams.get("optimizer", self.optimizer_name) != self.optimizer_name:
            raise ValueError(f"method {self.family}/{self.name} trains with optimizer {self.optimizer_name!r}, "
                             f"not {self.hparams['optimizer']!r}")
        self.hparams["optimizer"] = self.optimizer_name
        return super().configure_optimizer()
