"""Lion (EvoLved Sign Momentum): cross-entropy training with the optimizer found by program search.

Chen, Liang, Huang, Real, Wang, Pham, Dong, Luong, Hsieh, Lu, Le, "Symbolic Discovery of
Optimization Algorithms", NeurIPS 2023 (arXiv 2302.06675).

The loss is ERM's cross-entropy. The update, per parameter w with gradient g and momentum m:
    c = b1 m + (1 - b1) g
    w -= lr (sign(c) + wd w)
    m = b2 m + (1 - b2) g
with b1 = 0.9, b2 = 0.99. timm's ``Lion`` is this algorithm (it applies the decay as
w *= 1 - lr wd before adding -lr sign(c), which is the same step since c does not depend on w);
tests/test_recipes_optim.py checks one run of steps against the equations above. Every update
has the same size lr per coordinate, so lr is 3-10x smaller and wd 3-10x larger than AdamW's.
"""
from __future__ import annotations

from classlab.methods.registry import register_method
from classlab.methods.supervised.adamw import AdamW


@register_method("supervised", "lion")
class Lion(AdamW):
    optimizer_name = "lion"  # timm.optim.Lion: c = b1 m + (1-b1) g; w -= lr (sign(c) + wd w); m = b2 m + (1-b2) g
