"""No pretraining: the backbone as its seeded initialisation leaves it, the reference every
self-supervised method must beat for its pretraining to count.

Not a paper's method. At a small budget a randomly initialised ConvNet is a strong feature
extractor for a linear probe (random convolutional features, e.g. Jarrett et al., ICCV 2009; Saxe et
al., ICML 2011), so a pretrained node that does not beat this one has learnt nothing the probe can
use. It runs zero optimisation steps (``training_stages`` asks for 0 epochs, whatever the group's
budget says), so the saved model is exactly the initialisation ``classlab.train`` builds for the seed.
"""
from __future__ import annotations

from classlab.methods.base import Method
from classlab.methods.registry import register_method


@register_method("pretrain", "random_init")
class RandomInit(Method):
    head_trained = False

    def training_stages(self) -> list[dict]:
        return [{"name": "train", "epochs": 0}]  # no step: the model stays as initialised

    def training_step(self, batch):
        raise RuntimeError("pretrain/random_init never trains (0 epochs)")
