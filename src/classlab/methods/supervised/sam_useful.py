"""SAM + USEFUL: USEFUL's resampled retraining with SAM's sharpness-aware step.

Nguyen, Haddad, Gan, Mirzasoleiman, "Changing the Training Data Distribution to Reduce Simplicity
Bias Improves In-distribution Generalization", NeurIPS 2024 (its best arm, SAM + USEFUL); SAM from
Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021.

No algorithm of its own: the stages (probe, per-class k = 2 clustering of the outputs, the slow
cluster upsampled once, retrain from the initial weights) are ``useful``'s, and every optimizer
step of both stages is ``sam``'s,
    w <- w - lr * step_rule(grad L(w + rho g / ||g||_2)),   g = grad L(w).
"""
from __future__ import annotations

from classlab.methods.registry import register_method
from classlab.methods.supervised.sam import SAM
from classlab.methods.supervised.useful import USEFUL


@register_method("supervised", "sam_useful")
class SAMUseful(USEFUL, SAM):
    """USEFUL's ``training_stages`` / ``end_stage``, SAM's ``optimizer_step``, ERM's loss."""
