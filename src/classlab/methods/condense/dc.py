"""DC: dataset condensation with per-class gradient matching.

Zhao, Mopuri and Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021 (official code
VICO-UoE/DatasetCondensation, ``main.py --method DC``). With theta the current network, T_c a real
batch of class c and S_c the ``ipc`` synthetic images of class c, one outer step minimises

    L(S) = sum_c D( grad_theta CE(theta; S_c, c), grad_theta CE(theta; T_c, c) ),

D the layer-wise distance of ``gradient_matching_distance`` (per output row, 1 - cosine; biases
ignored). The real gradient is a constant; the synthetic one is differentiated through
(create_graph), so dL/dS is a second-order term. Network re-initialisation and the inner loop are the
shared ``bilevel_update``; DC's schedule (outer_loop, inner_loop) = (1, 1), (10, 50), (50, 10) for
1 / 10 / 50 images per class (``get_loops``).
"""
from __future__ import annotations

from classlab.methods.condense_learner import CondensationMethod
from classlab.methods.registry import register_method


@register_method("condense", "dc")
class DC(CondensationMethod):
    def matching_loss(self, batch):
        # sum_c D(grad CE(S_c, c), grad CE(T_c, c)): CondensationMethod.per_class_matching
        return self.per_class_matching(batch), {}
