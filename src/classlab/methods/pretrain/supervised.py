"""Supervised pretraining: cross-entropy on the labelled training set.

The shared pretraining node of the DAG (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016 style recipe: SGD with momentum, weight decay, flip/translate
augmentation). One checkpoint per dataset x backbone x seed serves every downstream
method that names it. ``classes`` in the hyperparameters restricts pretraining to a subset
of classes (e.g. the first task of a class-incremental sequence), so that later classes'
labels are never seen.

L = -1/B sum_i log softmax(f(x_i))_{y_i}  (the same loss as ERM fine-tuning, which it reuses)
"""
from __future__ import annotations

from classlab.methods.registry import register_method
from classlab.methods.supervised.erm import ERM


@register_method("pretrain", "supervised")
class SupervisedPretrain(ERM):
    """ERM's cross-entropy step, run from scratch as the shared pretraining stage."""
