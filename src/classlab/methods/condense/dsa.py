"""DSA: dataset condensation with differentiable siamese augmentation.

Zhao and Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021 (official
code VICO-UoE/DatasetCondensation, ``main.py --method DSA --dsa_strategy
color_crop_cutout_flip_scale_rotate --init real``). DC's per-class matching, with the real and the
synthetic batch of each class transformed by the SAME differentiable augmentation A_w (one draw w per
class and step, shared by every sample of both batches):

    L(S) = sum_c D( grad_theta CE(theta; A_w(S_c), c), grad_theta CE(theta; A_w(T_c), c) ),   w ~ Omega,

so the gradient reaches S through A_w (``classlab.methods.condense_augment``). The inner loop trains
the network on per-sample DSA draws of S, and the evaluation network is trained with them too
(``eval_augment: dsa``, 1000 epochs in the paper).
"""
from __future__ import annotations

from classlab.methods.condense_learner import CondensationMethod
from classlab.methods.registry import register_method


@register_method("condense", "dsa")
class DSA(CondensationMethod):
    def matching_loss(self, batch):
        # class_batches draws one w per class and applies A_w to T_c and S_c alike (dsa_strategy set)
        return self.per_class_matching(batch), {}
