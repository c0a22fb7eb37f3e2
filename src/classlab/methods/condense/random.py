"""Random: a seeded, class-balanced subset of the real training images (no optimisation).

The baseline of every condensation paper (Zhao, Mopuri and Bilen, "Dataset Condensation with Gradient
Matching", ICLR 2021, Table 1 "Random"): S = {x_i : i in R_c, c = 1 .. K}, R_c a uniformly random set of
``ipc`` positions of class c (``random_class_subset``: a permutation of each class drawn from a
generator seeded by (seed, class)). It is also the initial set of DC, DSA and DCC under ``init: real``,
so "DC > random" compares a learned set with its own starting point.
"""
from __future__ import annotations

from classlab.methods.condense_learner import CondensationMethod, random_class_subset
from classlab.methods.registry import register_method


@register_method("condense", "random")
class RandomSubset(CondensationMethod):
    optimises = False

    def initialise(self, data, ipc, device):
        idx = random_class_subset(data, ipc, self.seed)  # R_c: ipc random positions per class
        return data.normalize(data.x[idx]), idx
